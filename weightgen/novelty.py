"""Novelty: is a generated model a copy of a zoo checkpoint? (Zeng et al., arXiv 2506.07998)

Distances are taken after hidden-unit alignment to one reference (a permuted copy of a zoo
model is still a copy) and per-tensor standardization (so no layer dominates). The score is the
distance to the nearest zoo checkpoint divided by the zoo's own typical nearest-neighbour
distance: ~0 means a copy, >= 1 means as far from the zoo as zoo members are from each other.
The nearest checkpoint's accuracy on the requested task is reported too: distance alone is
ambiguous (shared/research/feasibility.md §3, pitfall 4).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from weightgen.align import align
from weightgen.evaluate import accuracy_many
from weightgen.tokenize import Standardizer

MAX_ZOO = 3000


def flat(sd: dict[str, torch.Tensor], keys: list[str], std: Standardizer) -> torch.Tensor:
    z = std.normalize({k: sd[k] for k in keys})
    return torch.cat([z[k].flatten(1) for k in keys], 1)


@lru_cache(maxsize=4)
def _zoo_reference(zoo_url: str, snapshot: str, arch: str, k: int, shape: tuple, keys: tuple, ref_key: tuple):
    from zoo import open_zoo

    z = open_zoo(zoo_url, mode="r")
    recs = sorted((r for r in z.query(arch=arch) if r["num_classes"] == k and tuple(r["input_shape"]) == shape),
                  key=lambda r: r["id"])[:MAX_ZOO]
    if not recs:
        return None
    ids = [r["id"] for r in recs]
    return ids, z.stack(ids, list(keys))


def zoo_nn_distance(x: torch.Tensor, max_n: int = 500) -> float:
    """Median distance from a zoo member to its nearest other member."""
    x = x[:max_n]
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.median())


def novelty_vs_zoo(gen, info: dict, arch: str, k: int, shape, sd: dict[str, torch.Tensor], task) -> dict | None:
    """Novelty of stacked samples ``sd`` (n=1 usually) against the generator's zoo."""
    if not info.get("zoo"):
        return None
    keys = list(gen.stats.stat_names)
    ref = {n: v for n, v in gen.stats.align_ref().items()}
    try:
        got = _zoo_reference(info["zoo"], info.get("zoo_snapshot") or "", arch, k, tuple(shape), tuple(keys),
                             tuple(sorted(ref)))
    except Exception as e:  # a zoo that moved or is unreachable must not fail the sample
        return {"error": f"zoo unavailable for novelty: {e}"}
    if got is None:
        return {"error": f"no {arch} checkpoints with {k} classes in the zoo to compare with"}
    ids, zoo_sd = got
    return novelty_scores(arch, k, shape, sd, ids, zoo_sd, keys, ref, gen.stats.standardizer(), task)


def novelty_scores(arch, k, shape, sd, zoo_ids, zoo_sd, keys, ref, std, task=None) -> dict:
    zoo_al, _ = align({n: zoo_sd[n].float() for n in keys}, arch, ref=ref or None)
    s_al, _ = align({n: sd[n].float() for n in keys}, arch, ref=ref or None)
    zx, sx = flat(zoo_al, keys, std), flat(s_al, keys, std)
    d = torch.cdist(sx, zx)  # (n, Z)
    dmin, idx = d.min(1)
    base = zoo_nn_distance(zx)
    out = {"distance_to_nearest": float(dmin.mean()), "zoo_nn_distance": base, "ratio": float(dmin.mean()) / max(base, 1e-12),
           "nearest_zoo_id": zoo_ids[int(idx[0])]}
    if task is not None and len(task.y_test):
        near = {n: zoo_sd[n][idx] for n in keys}
        out["nearest_zoo_accuracy"] = float(accuracy_many(arch, k, shape, near, task.x_test, task.y_test).mean())
    return out
