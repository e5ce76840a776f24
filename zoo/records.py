"""A zoo entry: tensors plus the metadata its record carries, and how tensors are stored.

Split from ``zoo.store`` (the store's reads and writes) so both stay readable: this is the data,
that is the protocol.
"""
from __future__ import annotations

import hashlib
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch

from zoo.validate import HEAD_PART, check_metadata, validate_head, validate_tensors

RECORD_FIELDS = ("id", "arch", "dataset", "num_classes", "input_shape", "seed", "run_id", "step", "train_config",
                 "metrics", "tags", "instructions", "source", "created_at", "dtypes")

_NP_DTYPES = {  # torch dtype -> (numpy storage dtype, logical name)
    torch.float32: ("float32", "float32"), torch.float64: ("float64", "float64"), torch.float16: ("float16", "float16"),
    torch.bfloat16: ("uint16", "bfloat16"),  # Zarr has no bf16: stored as its bit pattern
    torch.int64: ("int64", "int64"), torch.int32: ("int32", "int32"), torch.uint8: ("uint8", "uint8"),
    torch.bool: ("bool", "bool"),
}
_TORCH_DTYPES = {logical: dt for dt, (_, logical) in _NP_DTYPES.items()}


class ZooError(ValueError):
    """A zoo request that cannot be served (unknown id, ambiguous prefix, bad URL, ...)."""


def dtype_name(dt: torch.dtype) -> str:
    if dt not in _NP_DTYPES:
        raise ZooError(f"dtype {dt} cannot be stored; supported: {', '.join(_TORCH_DTYPES)}")
    return _NP_DTYPES[dt][1]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def from_numpy(a: np.ndarray, logical: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if logical == "bfloat16" else t


def checkpoint_id(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order: same content, same id,
    whatever file format it came in."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def collection_id(arch: str, num_classes: int, input_shape) -> str:
    return f"{arch}__k{int(num_classes)}__{'x'.join(str(int(s)) for s in input_shape)}"


@dataclass
class Checkpoint:
    """Tensors plus the metadata one zoo record carries; ``id`` is derived from the tensors."""

    tensors: dict[str, torch.Tensor]
    arch: str
    num_classes: int
    input_shape: tuple[int, ...]
    dataset: str = ""
    seed: int | None = None
    run_id: str | None = None
    step: int | None = None
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if isinstance(self.input_shape, (list, tuple)):  # anything else is reported by problems()
            self.input_shape = tuple(self.input_shape)
        self.id = checkpoint_id(self.tensors)

    def problems(self, tensors: bool = True) -> list[tuple[str, str]]:
        """Every way this is not a valid zoo entry: metadata always, tensors when asked."""
        bad = check_metadata(self.arch, self.num_classes, self.input_shape, dataset=self.dataset, seed=self.seed,
                             run_id=self.run_id, step=self.step, train_config=self.train_config,
                             metrics=self.metrics, tags=self.tags, instructions=self.instructions,
                             source=self.source)
        if not bad and tensors:
            if isinstance(self.train_config, dict) and self.train_config.get("part") == HEAD_PART:
                bad = validate_head(self.tensors, self.arch, self.num_classes, self.train_config)
            else:
                bad = validate_tensors(self.tensors, self.arch, self.num_classes, self.input_shape)
        return bad

    def record(self) -> dict:
        return {
            "id": self.id, "arch": self.arch, "dataset": self.dataset, "num_classes": int(self.num_classes),
            "input_shape": list(self.input_shape), "seed": self.seed, "run_id": self.run_id, "step": self.step,
            "train_config": self.train_config, "metrics": {k: float(v) for k, v in self.metrics.items()},
            "tags": list(self.tags), "instructions": list(self.instructions), "source": self.source,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dtypes": sorted({dtype_name(t.dtype) for t in self.tensors.values()}),
        }


def new_segment_name(t_ns: int | None = None) -> str:
    """``<time ns, 20 digits>-<random>``: names sort by (the writer's) time, never collide."""
    return f"{time.time_ns() if t_ns is None else t_ns:020d}-{uuid.uuid4().hex[:12]}"


def public(r: dict) -> dict:
    """A record without internal fields, in a stable field order. A non-finite metric (stored
    before NaN was refused at ingestion) reads as null: NaN is not JSON."""
    out = {k: r.get(k) for k in RECORD_FIELDS}
    if isinstance(out["metrics"], dict):
        out["metrics"] = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in out["metrics"].items()}
    return out


