"""What of the user's labelled data does what: condition, fit, select, and estimate accuracy.

The user's labelled examples (a dataset's train split) are the most valuable input a request
has, so all of them up to a cap per class (``SUPPORT_CAP``, ``--support-per-class``) form the
*support*: the generator is conditioned on it (as many per class as it was trained to read),
closed-form parts are fitted on it and best-of-n is chosen on it. Accuracy is then estimated on
examples that did none of that:

* labelled examples beyond the cap, when there are any ("train examples outside the support");
* otherwise, when every class has at least ``MIN_PER_CLASS_TO_SPLIT`` examples, a stratified
  ``ESTIMATE_FRACTION`` of them, set aside before anything else (deterministic given the seed);
* otherwise no estimate: the manifest says there were too few examples, instead of reporting a
  number measured on the examples that fitted and selected the model.

Every estimate comes with a Wilson score interval (95 %).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORT_CAP = 256  # examples per class used to condition, fit and select
ESTIMATE_FRACTION = 0.2
MIN_PER_CLASS_TO_SPLIT = 8  # below this, holding examples out costs the head more than the estimate is worth
MAX_ESTIMATE = 5000  # rows an estimate is measured on (more only costs time)


@dataclass
class UserSplit:
    x: torch.Tensor  # support: conditions, fits, selects
    y: torch.Tensor
    x_est: torch.Tensor  # disjoint: estimates accuracy (may be empty)
    y_est: torch.Tensor
    basis: str  # what x_est is, for the manifest
    per_class_cap: int

    @property
    def per_class(self) -> list[int]:
        return torch.bincount(self.y, minlength=int(self.y.max()) + 1).tolist() if len(self.y) else []


def split_user_data(x: torch.Tensor, y: torch.Tensor, num_classes: int, cap: int = SUPPORT_CAP,
                    seed: int = 0) -> UserSplit:
    """Support (up to ``cap`` per class, in class order) and a disjoint estimate set, from labelled (x, y)."""
    if cap < 1:
        raise ValueError(f"support per class must be >= 1, got {cap}")
    g = torch.Generator().manual_seed(seed)
    by_class = [(y == c).nonzero().flatten() for c in range(num_classes)]
    by_class = [idx[torch.randperm(len(idx), generator=g)] for idx in by_class]
    sup = [idx[:cap] for idx in by_class]
    rest = torch.cat([idx[cap:] for idx in by_class])
    if len(rest):
        basis = "labelled examples beyond the support cap (never used to condition, fit or select)"
    elif min(len(i) for i in by_class) >= MIN_PER_CLASS_TO_SPLIT:
        held = [idx[:max(1, int(round(len(idx) * ESTIMATE_FRACTION)))] for idx in sup]
        sup = [idx[len(h):] for idx, h in zip(sup, held)]
        rest = torch.cat(held)
        basis = (f"{int(ESTIMATE_FRACTION * 100)} % of the labelled examples, stratified and set aside "
                 f"before conditioning, fitting and selection")
    else:
        basis = (f"none: fewer than {MIN_PER_CLASS_TO_SPLIT} examples in some class, too few to set any aside; "
                 f"support_cv_accuracy is measured on the examples that also fitted and selected the model")
    if len(rest) > MAX_ESTIMATE:
        rest = rest[torch.randperm(len(rest), generator=g)[:MAX_ESTIMATE]]
    sup_idx = torch.cat(sup)
    return UserSplit(x[sup_idx], y[sup_idx], x[rest], y[rest], basis, cap)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sound for small n and near 0 or 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))
