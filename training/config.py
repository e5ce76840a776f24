"""Training configuration: one plain dataclass, loaded from YAML and saved beside every run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    name: str = "d2nwg-digits-mlp-s"  # the trained generator's name under $WEIGHTGEN_HOME/generators
    generator: str = "d2nwg-s"  # a preset (or generator) name
    generator_overrides: dict = field(default_factory=dict)
    zoo: str | None = None  # default: $WEIGHTGEN_ZOO or $WEIGHTGEN_HOME/zoo
    arch: str = "mlp-s"
    num_classes: int = 5
    input_shape: list = field(default_factory=lambda: [64])
    extra_archs: list = field(default_factory=list)  # more archs (same classes and input) for one multi-arch generator
    dataset_prefix: str = "digits:"
    mode: str = "full"
    min_test_acc: float = 0.9  # skip undertrained checkpoints (early steps of a run)
    max_checkpoints: int | None = None
    stages: dict = field(default_factory=lambda: {"vae": 1500, "diffusion": 1000})
    batch_size: int = 64
    support_per_class: int = 10  # examples per class the generator reads (the most, when a minimum is set)
    support_per_class_min: int | None = None  # set: each step draws its support size in [min, support_per_class]
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (diffusers' default)
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    heldout_task_fraction: float = 0.1  # zoo tasks kept out of training to check the autoencoder
    gate_min_recon_ratio: float = 0.95  # the VAE must keep this share of accuracy on held-out-task weights
    strict_gate: bool = False  # stop before diffusion when the gate fails (else record and go on)
    out_dir: str | None = None  # default: $WEIGHTGEN_HOME/generators/<name>
    run_dir: str | None = None  # default: $WEIGHTGEN_HOME/runs/<name> (accelerate checkpoints, logs)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict({**data, **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown training config keys {unknown}. Known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as YAML (``stages={vae: 10, diffusion: 20}``)."""
    key, eq, value = text.partition("=")
    if not eq:
        raise ValueError(f"override must be KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)
