"""Dataset encoders: a support set -> per-class and whole-dataset embeddings (as in D2NWG).

Samples first pass a pluggable feature extractor (``FEATURES``: raw inputs for small data; a
frozen image encoder where one is available). An intra-class set encoder pools each class's
sample features (attention pooling with a learned seed, plus the class mean), then an
inter-class set encoder (self-attention across classes, no positional ids) contextualizes the
class vectors: permuting the classes permutes the outputs and changes nothing else, so class
order only enters through which head row a class embedding is attached to.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from weightgen.registry import Registry

FEATURES: Registry = Registry("feature extractor")


@FEATURES.register("raw")
class RawFeatures(nn.Module):
    """Flattened inputs: right for 8x8 digits and other small, already-meaningful inputs."""

    def __init__(self, input_shape):
        super().__init__()
        self.dim = math.prod(input_shape)

    def forward(self, x):  # (N, *input_shape) -> (N, dim)
        return x.flatten(1)


class SetPool(nn.Module):
    """Attention pooling of a set with one learned seed (PMA, Lee et al. 2019)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.seed = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # (B, N, D) -> (B, D)
        out, _ = self.attn(self.seed.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return self.norm(out[:, 0] + x.mean(1))


class DatasetEncoder(nn.Module):
    def __init__(self, feature_dim: int, dim: int, depth: int = 2, heads: int = 4):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(feature_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.mean_proj = nn.Linear(feature_dim, dim)
        self.intra = SetPool(dim, heads)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.inter = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, K, M, F): M support features for each of K classes, in label order.
        Returns class embeddings (B, K, D) and a dataset embedding (B, D)."""
        b, k, m, f = feats.shape
        per_sample = self.phi(feats.reshape(b * k, m, f))  # (B*K, M, D)
        cls = self.intra(per_sample).reshape(b, k, -1) + self.mean_proj(feats.mean(2))  # (B, K, D)
        cls = self.out_norm(self.inter(cls))
        return cls, cls.mean(1)


def group_support(x: torch.Tensor, y: torch.Tensor, num_classes: int, per_class: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, ...) samples + labels -> (K, M, ...) with M = per_class examples of every class
    (drawn with replacement when a class has fewer)."""
    out = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        if len(idx) == 0:
            raise ValueError(f"support set has no example of class {c} (labels must cover 0..{num_classes - 1})")
        pick = torch.randint(len(idx), (per_class,), generator=generator) if len(idx) < per_class else \
            torch.randperm(len(idx), generator=generator)[:per_class]
        out.append(x[idx[pick]])
    return torch.stack(out)
