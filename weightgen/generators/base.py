"""The one interface every weight generator implements; generic layers use only this.

Training (``training/train.py``), sampling, the eval harness and serving never name a generator
class: they call the methods below and read :class:`Capabilities`, which a generator declares as
data. Adding a generator is one file in this package: subclass :class:`WeightGenerator`, declare
its capabilities, register it with ``@register_generator("name")`` and its size presets with
``register_preset``. (diffusers keeps the same split: ``ModelMixin`` for weights, ``ConfigMixin``
for the config that is saved beside them.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from weightgen.generators.diffusers_api import ConfigMixin, ModelMixin


@dataclass(frozen=True)
class Capabilities:
    """What a generator can do. Generic code branches on these, never on a class name."""

    modes: tuple[str, ...] = ("full",)  # generation modes it makes (see weightgen.archs.MODES)
    any_class_count: bool = True  # False: only the class count it was trained on
    reconstruct: bool = False  # has ``reconstruct(tokens, k, support)`` (autoencoder gate, harness table)
    gate_after: str | None = None  # stage after which training checks reconstructions of held-out weights
    ema_stages: tuple[str, ...] | None = None  # stages whose steps update the EMA (None: every stage)
    text: bool = False  # reads ``Condition.instruction``
    multi_arch: bool = False  # one model trained on, and making, several architectures (``Condition.arch``)
    closed_form: tuple[str, ...] = ()  # parts computed in closed form from the support set (declared in manifests)
    priority: int = 0  # the default for a request that names no generator: highest priority among those that fit


class WeightGenerator(ModelMixin, ConfigMixin):
    """Base class: ``from_zoo``, ``stages``, ``loss``, ``sample``; saved as config.json + safetensors."""

    config_name = "config.json"
    capabilities: ClassVar[Capabilities] = Capabilities()

    @classmethod
    def from_zoo(cls, data, **config) -> "WeightGenerator":
        """A fresh generator for the zoo weights ``data`` (a ``ZooWeights``), with ``config`` overrides."""
        raise NotImplementedError

    @property
    def stages(self) -> dict[str, list[nn.Parameter]]:
        """Stage name -> the parameters it trains, in training order."""
        raise NotImplementedError

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """``batch`` (tokens, support, stage) -> losses; ``"loss"`` is what training backpropagates."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:  # so DDP wrappers see the training step
        return self.loss(batch)

    def sample(self, cond, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """n weight sets for ``cond`` (a ``Condition``) -> stacked raw-scale state dict (name -> (n, ...))."""
        raise NotImplementedError

    def on_stage_end(self, stage: str, data, *, seed: int = 0) -> dict | None:
        """Called by training after each stage with the training ``ZooWeights`` (e.g. to fit a scale);
        what it returns is recorded in the training summary under ``stage_metrics``."""
        return None

    @property
    def remembered_classes(self) -> list[str]:
        """Names of the classes it keeps examples of (see ``remembered_support``)."""
        return []

    def remembered_support(self, class_names: list[str]):
        """(x, y) examples of the named classes that the generator kept from its training data
        (``weightgen.generators.class_memory``), for requests that name classes but give no data;
        None when it keeps none."""
        return None

    def weight_stats(self, arch: str | None = None):
        """The ``WeightStats`` (standardization, alignment reference) of the weights it makes for ``arch``."""
        return self.stats

    # ------------------------------------------------------------------ what it was trained for

    @property
    def support_per_class(self) -> int:
        """Support examples per class it conditions on (set from the training config)."""
        return int(self.config.get("support_per_class", 10))

    def trained_for(self) -> dict:
        c = self.config
        return {"arch": c.get("arch"), "input_shape": list(c.get("input_shape") or ()), "mode": c.get("mode", "full"),
                "num_classes": c.get("train_num_classes"), "any_class_count": self.capabilities.any_class_count}

    def unfit_reason(self, arch: str, input_shape, num_classes: int | None = None, mode: str = "full") -> str | None:
        """Why this generator cannot make (arch, input shape, classes, mode), or None when it can."""
        t = self.trained_for()
        if (t["arch"], tuple(t["input_shape"])) != (arch, tuple(input_shape)):
            return f"makes {t['arch']} for input shape {tuple(t['input_shape'])}, not {arch} for {tuple(input_shape)}"
        if mode != t["mode"]:
            return f"makes {t['mode']}-mode weights, not {mode}"
        if num_classes is not None and not t["any_class_count"] and num_classes != t["num_classes"]:
            return f"makes exactly {t['num_classes']} classes, not {num_classes}"
        return None
