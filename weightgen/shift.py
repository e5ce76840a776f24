"""Is a request's input distribution one the generator was trained on? A cheap, honest flag.

Training records a profile of the inputs the generator learned from (per-feature mean and
variance over its zoo tasks' train splits, and how far typical support sets of those tasks score
from it); sampling scores the request's support set the same way and flags it when it scores
beyond what training tasks ever did. The score is the mean squared standardized deviation per
feature, with the variance floored at a fraction of the average variance so that features that
never vary in training (the border pixels of digits) flag a change without exploding.
A flag does not stop the request: closed-form parts are fitted to the user's own data, and the
manifest says so beside the measured accuracy.
"""
from __future__ import annotations

import torch

FLOOR = 0.05  # variance floor, as a fraction of the mean variance
MARGIN = 1.25  # flag above MARGIN x the largest score seen on training tasks' support sets


def _score(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return ((x.flatten(1) - mean) ** 2 / var).mean(1)  # (N,) per example


def input_profile(pool: list[torch.Tensor], per_set: int = 50, sets: int = 200, seed: int = 0) -> dict:
    """Profile of training inputs: ``pool`` is one (N_i, *input_shape) tensor per training task."""
    allx = torch.cat([p.flatten(1).float() for p in pool])
    mean = allx.mean(0)
    var = allx.var(0)
    var = var.clamp_min(FLOOR * float(var.mean()))
    g = torch.Generator().manual_seed(seed)
    scores = []
    for i in range(sets):
        p = pool[i % len(pool)].flatten(1).float()
        rows = torch.randint(len(p), (min(per_set, len(p)),), generator=g)
        scores.append(float(_score(p[rows], mean, var).mean()))
    return {"mean": mean.tolist(), "var": var.tolist(), "max_score": max(scores),
            "median_score": sorted(scores)[len(scores) // 2]}


def check_inputs(profile: dict | None, x: torch.Tensor) -> dict | None:
    """{"score", "typical", "limit", "shifted"} for support inputs x, or None without a profile."""
    if not profile or len(profile.get("mean", ())) != x.flatten(1).shape[1]:
        return None
    s = float(_score(x.float(), torch.tensor(profile["mean"]), torch.tensor(profile["var"])).mean())
    limit = MARGIN * profile["max_score"]
    return {"score": round(s, 4), "typical": round(profile["median_score"], 4), "limit": round(limit, 4),
            "shifted": s > limit}
