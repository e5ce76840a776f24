"""Dataset registry: a dataset name -> a :class:`TaskData` with a fixed train/test split.

Names are ``KIND`` or ``KIND:ARGS``: ``digits``, ``digits:classes=3,1,4,0,9`` (label i = the
i-th listed class), ``mnist``, ``cifar10``, ``npz:PATH``, ``folder:PATH``. Every dataset gives
its input shape, number of classes, train/test split and a fixed-size support set, which is
what generators condition on (they never see the test split).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from weightgen.registry import Registry


class DatasetError(ValueError):
    """A dataset name, file or argument that cannot be used; the message says what was wrong."""


@dataclass
class TaskData:
    """A classification task in model-input space: x float32 (N, *input_shape), y int64 in 0..K-1."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def support_indices(self, per_class: int = 10, seed: int = 0) -> torch.Tensor:
        """Train-split indices of the support set: ``per_class`` examples of each class, in class
        order (fewer where a class has fewer). Deterministic in ``seed``."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for c in range(self.num_classes):
            idx = (self.y_train == c).nonzero().flatten()
            out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        return torch.cat(out)

    def support(self, per_class: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The support set (x, y) that generators condition on (see :meth:`support_indices`)."""
        idx = self.support_indices(per_class, seed)
        return self.x_train[idx], self.y_train[idx]

    def fingerprint(self) -> str:
        """sha256 over the train split, so results can name exactly which data they used."""
        h = hashlib.sha256()
        h.update(self.x_train.numpy().tobytes())
        h.update(self.y_train.numpy().tobytes())
        return h.hexdigest()[:16]

    def info(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "n_train": len(self.y_train), "n_test": len(self.y_test), "source": self.source}


DATASETS: Registry[Callable[[str], TaskData]] = Registry("dataset")


def register_dataset(kind: str):
    """Register a loader ``fn(args: str) -> TaskData`` for names ``kind`` and ``kind:args``."""
    return DATASETS.register(kind)


def split_name(name: str) -> tuple[str, str]:
    kind, _, args = name.partition(":")
    return kind, args


def load_dataset(name: str) -> TaskData:
    """Load a dataset by registry name (cached: loaders are deterministic)."""
    _ensure_loaders()
    kind, args = split_name(name)
    loader = DATASETS.get(kind)
    if kind in ("npz", "folder") or "download" in args:  # files can change between calls: don't cache
        return loader(args)
    return _CACHE.get((name, str(data_dir())), lambda: loader(args))  # keyed on the data dir too


class _TaskCache:
    """Loaded tasks, least recently used first out, bounded by their tensors' bytes (a server
    asked for many class subsets of a big dataset must not keep a copy of each); thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.total, self.items, self.lock = max_bytes, 0, OrderedDict(), threading.Lock()

    def get(self, key, load: Callable[[], "TaskData"]) -> "TaskData":
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key][0]
        task = load()  # outside the lock: loads can be slow; two threads may load the same key once each
        size = sum(t.numel() * t.element_size() for t in (task.x_train, task.y_train, task.x_test, task.y_test))
        with self.lock:
            if key not in self.items:
                self.items[key] = (task, size)
                self.total += size
            while len(self.items) > 1 and self.total > self.max_bytes:  # the newest always stays
                _, (_, old) = self.items.popitem(last=False)
                self.total -= old
        return task


_CACHE = _TaskCache(int(os.environ.get("WEIGHTGEN_DATASET_CACHE_BYTES", 1 << 30)))


def parse_kv(args: str, allowed: set[str], dataset: str) -> dict[str, str]:
    """Parse ``a=1;b=x`` (or a single ``a=...``) arguments, rejecting unknown keys."""
    out = {}
    if not args:
        return out
    for part in args.split(";"):
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise DatasetError(
                f"Bad argument {part!r} for dataset {dataset!r}; expected KEY=VALUE with KEY in {sorted(allowed)}"
            )
        out[key] = value
    return out


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), per class, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def check_classes(classes: list[int], num_classes: int, name: str) -> None:
    """A class subset must name at least 2 distinct classes of the base dataset."""
    if len(classes) < 2:
        raise DatasetError(f"{name}: a class subset needs at least 2 classes, got {classes}")
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{name}: classes must be distinct, got {classes}")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DatasetError(f"{name}: classes {bad} are not in 0..{num_classes - 1}")


def select_classes(task: TaskData, classes: list[int], name: str) -> TaskData:
    """The ordered class-subset task: label i = the i-th listed class of ``task``."""
    check_classes(classes, task.num_classes, name)
    lut = torch.full((task.num_classes,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))

    def pick(x, y):
        keep = lut[y] >= 0
        return x[keep], lut[y[keep]]

    xtr, ytr = pick(task.x_train, task.y_train)
    xte, yte = pick(task.x_test, task.y_test)
    names = [task.class_names[c] if task.class_names else str(c) for c in classes]
    return TaskData(name, xtr, ytr, xte, yte, len(classes), names, task.source)


def parse_classes(value: str, name: str) -> list[int]:
    try:
        return [int(c) for c in value.split(",") if c.strip() != ""]
    except ValueError:
        raise DatasetError(f"{name}: classes must be comma-separated integers, got {value!r}") from None


def data_dir() -> Path:
    """Where real datasets live: ``$WEIGHTGEN_DATA``, default ``$WEIGHTGEN_HOME/data``."""
    if os.environ.get("WEIGHTGEN_DATA"):
        return Path(os.environ["WEIGHTGEN_DATA"]).expanduser()
    from weightgen.paths import home

    return home() / "data"


_LOADED = False


def _ensure_loaders() -> None:
    """Import the loader modules so their ``@register_dataset`` runs (kept lazy for import speed)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from weightgen.data import digits, files  # noqa: F401
        for optional in ("mnist", "cifar", "cifar100", "folder"):
            try:
                __import__(f"weightgen.data.{optional}")
            except ModuleNotFoundError as e:  # a loader module not written yet
                if e.name != f"weightgen.data.{optional}":
                    raise


# Shapes known without reading the data, so checkpoints for a dataset can be validated on a
# machine that does not hold it (ingesting CIFAR-10 checkpoints needs no CIFAR-10 files).
KNOWN_SHAPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "digits": (10, (64,)), "mnist": (10, (1, 28, 28)), "cifar10": (10, (3, 32, 32)),
}


def dataset_shape(name: str) -> tuple[int, tuple[int, ...]]:
    """(num_classes, input_shape) of a dataset name, reading the data only when it must (and
    refusing the class lists ``load_dataset`` would refuse: ``digits:classes=0`` has one class)."""
    kind, args = split_name(name)
    if kind in KNOWN_SHAPES:
        k, shape = KNOWN_SHAPES[kind]
        for part in args.split(";") if args else []:
            key, _, value = part.partition("=")
            if key == "classes":
                classes = parse_classes(value, name)
                check_classes(classes, k, name)
                k = len(classes)
        return k, shape
    task = load_dataset(name)
    return task.num_classes, task.input_shape


def dataset_names() -> list[str]:
    _ensure_loaders()
    return DATASETS.names()
