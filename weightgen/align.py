"""Hidden-unit permutation alignment ("weight matching", Ainsworth et al., Git Re-Basin).

Permuting the hidden units of a network leaves its function unchanged, so two trained models
can be far apart in weight space while computing the same thing. Generators learn much more
from a zoo whose units are put in a consistent order, and novelty ("is this sample a copy of a
zoo model?") is only meaningful after the same alignment. An arch opts in by naming its chain
of layers (``PERM_CHAINS``): each layer's output units are the next layer's inputs (axis 1).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# arch -> module names in order; the last one's outputs (classes) are never permuted
PERM_CHAINS: dict[str, tuple[str, ...]] = {
    "mlp-s": ("fcs.0", "fcs.1"),
    "mlp-m": ("fcs.0", "fcs.1", "fcs.2"),
    "cnn-s": ("conv1", "conv2", "classifier"),
}


def _unit_features(sd: dict[str, torch.Tensor], mod: str) -> torch.Tensor:
    """(B, units, features): each output unit's incoming weights and bias."""
    w = sd[f"{mod}.weight"]
    parts = [w.reshape(w.shape[0], w.shape[1], -1).flatten(2)]
    if f"{mod}.bias" in sd:
        parts.append(sd[f"{mod}.bias"][..., None])
    return torch.cat(parts, -1)


def permute_units(sd: dict[str, torch.Tensor], chain: tuple[str, ...], perms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply per-model permutations (B, units) of each hidden layer; returns a new stacked state dict."""
    out = dict(sd)
    for li, perm in enumerate(perms):
        mod, nxt = chain[li], chain[li + 1]
        idx = perm
        w = out[f"{mod}.weight"]
        out[f"{mod}.weight"] = torch.gather(w, 1, idx.view(*idx.shape, *[1] * (w.dim() - 2)).expand_as(w))
        if f"{mod}.bias" in out:
            out[f"{mod}.bias"] = torch.gather(out[f"{mod}.bias"], 1, idx)
        w2 = out[f"{nxt}.weight"]  # (B, out, in, ...): permute the input axis
        out[f"{nxt}.weight"] = torch.gather(w2, 2, idx.view(idx.shape[0], 1, idx.shape[1], *[1] * (w2.dim() - 3)).expand_as(w2))
    return out


def match_to(sd: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], chain: tuple[str, ...]) -> list[torch.Tensor]:
    """Per model, the unit permutation of each hidden layer that best matches ``ref`` (unbatched),
    layer by layer (the previous layer's permutation is applied to the next layer's inputs first)."""
    perms: list[torch.Tensor] = []
    cur = dict(sd)
    for li in range(len(chain) - 1):
        mod = chain[li]
        a = _unit_features(cur, mod).double()  # (B, U, F)
        b = _unit_features({k: v[None] for k, v in ref.items()}, mod)[0].double()  # (U, F)
        sim = torch.einsum("buf,vf->bvu", a, b).numpy()  # (B, ref unit, model unit)
        p = torch.from_numpy(np.stack([linear_sum_assignment(s, maximize=True)[1] for s in sim])).long()
        perms.append(p)
        cur = permute_units(cur, chain[li:li + 2], [p])
    return perms


def align(sd: dict[str, torch.Tensor], arch: str, ref: dict[str, torch.Tensor] | None = None,
          iters: int = 3) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Align a stack of same-arch models (name -> (B, ...)) to ``ref``, or to their own barycenter
    (start from model 0, then re-match to the aligned mean ``iters`` times). Returns
    (aligned stack, reference). A no-op for archs without a permutation chain."""
    chain = PERM_CHAINS.get(arch)
    if chain is None or len(chain) < 2:
        return sd, ref if ref is not None else {k: v.mean(0) for k, v in sd.items()}
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    fixed_ref = ref is not None
    ref = {k: v.double() for k, v in ref.items()} if fixed_ref else {k: v[0] for k, v in sd.items()}
    out = sd
    for _ in range(1 if fixed_ref else iters):
        out = permute_units(sd, chain, match_to(sd, ref, chain))
        if not fixed_ref:
            ref = {k: v.mean(0) for k, v in out.items()}
    return {k: v.float() for k, v in out.items()}, {k: v.float() for k, v in ref.items()}
