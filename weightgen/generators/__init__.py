"""Generator registry and the one small interface every weight generator shares.

A generator is an ``nn.Module`` (diffusers ``ModelMixin`` + ``ConfigMixin``, so it saves as
``config.json`` + safetensors, never a pickle) with:

* ``loss(batch) -> dict[str, Tensor]`` — ``"loss"`` is what the training loop backpropagates;
* ``sample(cond, n, generator=None) -> dict[str, Tensor]`` — n stacked state dicts (name -> (n, ...));
* ``save_pretrained(dir)`` / ``from_pretrained(dir)``;
* ``stages`` — the ordered training stages (e.g. VAE, then diffusion) and their parameters.

Generators are built from a :class:`~weightgen.generators.zoo_data.ZooWeights` (tokenized,
aligned zoo weights plus the tasks' support data) with ``from_zoo(data, preset)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from weightgen.registry import Registry

GENERATORS: Registry = Registry("generator")
PRESETS: dict[str, tuple[str, dict]] = {}  # preset name -> (generator name, config overrides)


def register_generator(name: str):
    return GENERATORS.register(name)


def register_preset(preset: str, generator: str, **config):
    PRESETS[preset] = (generator, config)


@dataclass
class Condition:
    """What a sample is generated for: a support set (K, M, *input_shape) in label order, plus an
    optional instruction text (generators that cannot read text ignore it and say so)."""

    support: torch.Tensor
    instruction: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.support.shape[0]


def get_generator_class(name: str):
    _load_all()
    return GENERATORS.get(name)


def resolve_preset(preset: str) -> tuple[str, dict]:
    _load_all()
    if preset in PRESETS:
        return PRESETS[preset]
    if preset in GENERATORS:
        return preset, {}
    raise KeyError(f"Unknown generator preset {preset!r}. Available: {', '.join(sorted(PRESETS))}")


def _load_all() -> None:
    from weightgen.generators import d2nwg, hypernet  # noqa: F401  (registration side effects)
