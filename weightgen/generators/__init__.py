"""Generator registry, presets, and the discovery of trained generators.

Every generator subclasses :class:`~weightgen.generators.base.WeightGenerator` (``from_zoo``,
``stages``, ``loss``, ``sample``, capabilities as data) and registers itself where it is defined
with ``@register_generator``. The registry finds generator modules itself: every module of this
package, plus the ``weightgen.generators`` entry-point group, so a separate package can add one
(``[project.entry-points."weightgen.generators"] mygen = "mypkg.mygen"``).

Trained generators live in ``$WEIGHTGEN_HOME/generators/NAME`` (config.json + safetensors +
training_summary.json); :func:`trained_generators` is the one way CLI, harness and serving list them.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import torch

from weightgen.registry import Registry, UnknownNameError

GENERATORS: Registry = Registry("generator")
PRESETS: dict[str, tuple[str, dict]] = {}  # preset name -> (generator name, config overrides)
_NOT_GENERATORS = {"base", "class_memory", "common", "diffusers_api", "zoo_data"}
_loaded = False


def register_generator(name: str):
    def deco(cls):
        from weightgen.generators.base import WeightGenerator

        if not issubclass(cls, WeightGenerator):
            raise TypeError(f"generator {name!r} must subclass weightgen.generators.base.WeightGenerator")
        return GENERATORS.register(name)(cls)
    return deco


def register_preset(preset: str, generator: str, **config):
    PRESETS[preset] = (generator, config)


@dataclass
class Condition:
    """What a sample is generated for: a support set (K, M, *input_shape) in label order, and/or an
    instruction text, each label's class name, and which architecture to make (generators that
    make several read it; others check it). Generators that cannot read text ignore it and say so."""

    support: torch.Tensor | None
    instruction: str | None = None
    class_names: list[str] | None = None
    arch: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.support.shape[0] if self.support is not None else len(self.class_names or ())


def _load_all() -> None:
    """Import every generator module (registration is their import side effect), once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in _NOT_GENERATORS and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    for ep in entry_points(group="weightgen.generators"):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not take the built-in generators down
            warnings.warn(f"generator plug-in {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)


def get_generator_class(name: str):
    _load_all()
    return GENERATORS.get(name)


def class_by_name(class_name: str):
    """The registered class whose ``__name__`` is ``class_name`` (what config.json's ``_class_name`` holds)."""
    _load_all()
    for n in GENERATORS.names():
        if GENERATORS.get(n).__name__ == class_name:
            return GENERATORS.get(n)
    raise UnknownNameError(f"Unknown generator class {class_name!r}. Available: "
                           f"{', '.join(GENERATORS.get(n).__name__ for n in GENERATORS.names())}")


def resolve_preset(preset: str) -> tuple[str, dict]:
    """A preset or generator name -> (generator name, config overrides)."""
    _load_all()
    if preset in PRESETS:
        return PRESETS[preset]
    if preset in GENERATORS:
        return preset, {}
    raise UnknownNameError(f"Unknown generator preset {preset!r}. Available presets: {', '.join(sorted(PRESETS))}; "
                           f"generators: {', '.join(GENERATORS.names())}")


@dataclass(frozen=True)
class TrainedGenerator:
    """A trained generator on disk and what it makes, read from its config without loading weights."""

    name: str
    path: Path
    class_name: str | None
    config: dict
    summary: dict

    @property
    def arch(self) -> str | None:
        return self.config.get("arch")

    @property
    def input_shape(self) -> tuple:
        return tuple(self.config.get("input_shape") or ())

    @property
    def makes(self) -> list[tuple[str, tuple]]:
        """Every (arch, input shape) it generates: one, or several for a multi-arch generator."""
        archs = self.config.get("archs")
        return [(a, tuple(s)) for a, s in archs] if archs else [(self.arch, self.input_shape)]

    @property
    def reads_text(self) -> bool:
        try:
            return class_by_name(self.class_name).capabilities.text
        except UnknownNameError:
            return False

    @property
    def priority(self) -> int:
        try:
            return class_by_name(self.class_name).capabilities.priority
        except UnknownNameError:
            return -1

    def info(self) -> dict:
        """What a manifest or a listing says about it."""
        s = self.summary
        return {"name": self.name, "class": self.class_name, "arch": self.arch, "input_shape": list(self.input_shape),
                "makes": [[a, list(s)] for a, s in self.makes],
                "mode": self.config.get("mode", "full"), "num_classes": self.config.get("train_num_classes"),
                "zoo_snapshot": s.get("zoo_snapshot"), "zoo": s.get("zoo"), "trained_seconds": s.get("seconds"),
                "recon_gate": s.get("recon_gate", s.get("vae_gate"))}


def trained_generators(root: str | Path | None = None) -> list[TrainedGenerator]:
    """Every trained generator under ``root`` (default ``$WEIGHTGEN_HOME/generators``), by name."""
    from weightgen.paths import generators_dir

    root = Path(root) if root is not None else generators_dir()
    return [read_trained(d) for d in sorted(root.glob("*")) if (d / "config.json").is_file()] if root.is_dir() else []


def read_trained(path: str | Path) -> TrainedGenerator:
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    summary = path / "training_summary.json"
    return TrainedGenerator(path.name, path, cfg.get("_class_name"), cfg,
                            json.loads(summary.read_text()) if summary.is_file() else {})
