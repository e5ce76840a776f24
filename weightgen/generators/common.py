"""Pieces every tokenized-weight generator needs: token ids, stats buffers, decoding to state dicts."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from weightgen.align import PERM_CHAINS
from weightgen.archs import get_arch
from weightgen.tokenize import Standardizer, TokenLayout


@lru_cache(maxsize=32)
def layout_for(arch: str, num_classes: int, input_shape: tuple, mode: str, token_dim: int) -> TokenLayout:
    return TokenLayout(arch, num_classes, input_shape, mode, token_dim)


class TokenIds(nn.Module):
    """Embedding of where a token sits: its module and its slot (see ``TokenLayout.slot``)."""

    def __init__(self, num_modules: int, max_slot: int, dim: int):
        super().__init__()
        self.layer = nn.Embedding(num_modules, dim)
        self.slot = nn.Embedding(max_slot, dim)
        self.is_class = nn.Parameter(torch.zeros(dim))

    def forward(self, layout: TokenLayout, device) -> torch.Tensor:  # (T, dim)
        e = self.layer(layout.layer.to(device)) + self.slot(layout.slot.clamp_max(self.slot.num_embeddings - 1).to(device))
        return e + (layout.cls.to(device) >= 0).float()[:, None] * self.is_class


class WeightStats(nn.Module):
    """Zoo statistics kept as buffers so they travel inside the generator's safetensors file:
    per-tensor mean/std and the alignment reference (hidden layers of the permutation chain)."""

    def __init__(self, arch: str, num_classes: int, input_shape, stat_names: list[str]):
        super().__init__()
        self.stat_names = list(stat_names)
        self.register_buffer("mean", torch.zeros(len(stat_names)))
        self.register_buffer("std", torch.ones(len(stat_names)))
        chain = PERM_CHAINS.get(arch, ())
        shapes = {t.name: t.shape for t in get_arch(arch).tensors(num_classes, input_shape)}
        self.ref_names = [n for mod in chain[:-1] for n in (f"{mod}.weight", f"{mod}.bias") if n in shapes]
        for i, n in enumerate(self.ref_names):
            self.register_buffer(f"ref_{i}", torch.zeros(shapes[n]))

    def set(self, standardizer: Standardizer, align_ref: dict[str, torch.Tensor]) -> None:
        self.mean.copy_(torch.tensor([standardizer.stats[n][0] for n in self.stat_names]))
        self.std.copy_(torch.tensor([standardizer.stats[n][1] for n in self.stat_names]))
        for i, n in enumerate(self.ref_names):
            getattr(self, f"ref_{i}").copy_(align_ref[n])

    def standardizer(self) -> Standardizer:
        return Standardizer({n: (float(m), float(s)) for n, m, s in zip(self.stat_names, self.mean, self.std)})

    def align_ref(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"ref_{i}") for i, n in enumerate(self.ref_names)}


def decode_tokens(layout: TokenLayout, tokens: torch.Tensor, stats: WeightStats) -> dict[str, torch.Tensor]:
    """Standardized tokens (n, T, C) -> raw-scale stacked state dict (name -> (n, ...)), float32."""
    sd = layout.detokenize(tokens.float() * layout.mask.to(tokens.device))
    return {k: v.contiguous() for k, v in stats.standardizer().denormalize(sd).items()}


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(pred.dtype).expand_as(pred)
    return ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1)
