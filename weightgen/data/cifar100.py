"""``cifar100``: CIFAR-100 from the standard ``cifar-100-python`` folder (Krizhevsky, 2009).

A second source of tasks for head zoos on a backbone (issue 10). Same conventions as
``cifar10`` (:mod:`weightgen.data.cifar`): float32 (3, 32, 32) images in [0, 1], the official
50,000/10,000 split, pickles read with the numpy-only :class:`CifarUnpickler`. The folder holds
``train``, ``test`` and ``meta``; each split has ``fine_labels`` (100 classes) and
``coarse_labels`` (20 superclasses), with names in ``meta``.

Names: ``cifar100`` (fine labels), ``cifar100:labels=coarse``, ``cifar100:classes=3,1,4``,
``cifar100:dir=PATH`` (the folder or its parent), ``cifar100:download=1`` (only when asked).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from weightgen.data import DatasetError, TaskData, data_dir, parse_classes, parse_kv, register_dataset, select_classes
from weightgen.data.cifar import _batch, _to_images, download, unpickle

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
FILES = ["train", "test", "meta"]
LEVELS = {"fine": 100, "coarse": 20}


def _split(path: Path, level: str) -> tuple[np.ndarray, np.ndarray]:
    return _batch(path, f"{level}_labels", LEVELS[level])


@lru_cache(maxsize=2)
def _load_full(folder: str, level: str, stamp: tuple) -> TaskData:
    root = Path(folder)
    meta = unpickle(root / "meta")
    names = meta.get(f"{level}_label_names")
    if not isinstance(names, list) or len(names) != LEVELS[level]:
        raise DatasetError(f"{root / 'meta'}: '{level}_label_names' must be a list of {LEVELS[level]} names")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    x_tr, y_tr = _split(root / "train", level)
    x_te, y_te = _split(root / "test", level)
    return TaskData("cifar100", _to_images(x_tr), torch.from_numpy(y_tr), _to_images(x_te), torch.from_numpy(y_te),
                    LEVELS[level], names, str(root))


@register_dataset("cifar100")
def load_cifar100(args: str) -> TaskData:
    """``cifar100``, ``cifar100:labels=coarse``, ``cifar100:classes=3,1,4``, ``cifar100:dir=PATH``."""
    name = "cifar100" + (f":{args}" if args else "")
    kw = parse_kv(args, {"dir", "classes", "labels", "download"}, name)
    level = kw.get("labels", "fine")
    if level not in LEVELS:
        raise DatasetError(f"{name}: labels must be fine or coarse, got {level!r}")
    if "dir" in kw:
        p = Path(kw["dir"]).expanduser()
        root = p if p.name == FOLDER or (p / "train").is_file() else p / FOLDER
    else:
        root = data_dir() / FOLDER
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing and kw.get("download", "0").lower() in ("1", "true", "yes"):
        download(root.parent, URL, MD5, FOLDER)
        missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise DatasetError(f"{name}: CIFAR-100 not found: {root} lacks {', '.join(missing)}. Use cifar100:download=1 "
                           f"(161 MB) or extract {URL} into {root.parent}; $WEIGHTGEN_DATA is the data folder "
                           f"(now {data_dir()}).")
    full = _load_full(str(root), level, tuple((s.st_mtime_ns, s.st_size) for s in ((root / f).stat() for f in FILES)))
    if "classes" in kw:
        return select_classes(full, parse_classes(kw["classes"], name), name)
    return TaskData(name, full.x_train, full.y_train, full.x_test, full.y_test, full.num_classes,
                    list(full.class_names), full.source)
