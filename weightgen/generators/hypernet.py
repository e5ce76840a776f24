"""A deterministic hypernetwork baseline: MLP(dataset embedding) -> weights, trained with MSE.

The honest comparison for any generative model of weights (shared/research/feasibility.md: it
beat a D2NWG-like diffusion zero-shot). Its input is the plain dataset embedding — the class
prototypes (support means) in label order — so it is tied to the class count it was trained on.
``sample`` returns the same weights n times: there is nothing to sample.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from weightgen.generators import Condition, register_generator, register_preset
from weightgen.generators.base import Capabilities, WeightGenerator
from weightgen.generators.common import WeightStats, decode_tokens, layout_for, masked_mse
from weightgen.generators.diffusers_api import register_to_config


@register_generator("hypernet")
class HyperNet(WeightGenerator):
    capabilities = Capabilities(any_class_count=False)

    @register_to_config
    def __init__(self, arch: str = "mlp-s", input_shape: tuple = (64,), train_num_classes: int = 5, mode: str = "full",
                 token_dim: int = 65, num_tokens: int = 37, stat_names: tuple = (), hidden: int = 512, depth: int = 2,
                 support_per_class: int = 10):
        super().__init__()
        self.stats = WeightStats(arch, train_num_classes, tuple(input_shape), list(stat_names))
        d_in = train_num_classes * math.prod(input_shape)
        layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.GELU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, num_tokens * token_dim))

    @classmethod
    def from_zoo(cls, data, **config) -> "HyperNet":
        model = cls(arch=data.arch, input_shape=tuple(data.input_shape), train_num_classes=data.num_classes,
                    mode=data.mode, token_dim=data.layout.token_dim, num_tokens=data.layout.num_tokens,
                    stat_names=tuple(data.layout.keys), **config)
        model.stats.set(data.standardizer, data.align_ref)
        return model

    @property
    def stages(self) -> dict[str, list[nn.Parameter]]:
        return {"regression": list(self.net.parameters())}

    def _layout(self, k):
        c = self.config
        if k != c.train_num_classes:
            raise ValueError(f"hypernet was trained for {c.train_num_classes} classes, got {k}")
        return layout_for(c.arch, k, tuple(c.input_shape), c.mode, c.token_dim)

    def predict(self, support: torch.Tensor) -> torch.Tensor:  # (B, K, M, *in) -> (B, T, C)
        protos = support.flatten(3).mean(2).flatten(1)  # (B, K*F), label order
        return self.net(protos).reshape(support.shape[0], self.config.num_tokens, self.config.token_dim)

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        layout = self._layout(batch["support"].shape[1])
        return {"loss": masked_mse(self.predict(batch["support"]), batch["tokens"], layout.mask.to(batch["tokens"].device))}

    @torch.no_grad()
    def sample(self, cond: Condition, n: int, generator: torch.Generator | None = None, **_) -> dict[str, torch.Tensor]:
        layout = self._layout(cond.num_classes)
        tokens = self.predict(cond.support[None].float()).expand(n, -1, -1)
        return decode_tokens(layout, tokens, self.stats)


register_preset("hypernet-tiny", "hypernet", hidden=32, depth=1)
register_preset("hypernet-s", "hypernet")
