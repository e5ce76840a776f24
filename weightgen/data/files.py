"""A user's own data: ``npz:PATH`` (arrays already in model-input space) and ``folder:PATH`` (images).

Memory is bounded by what files *declare*, checked before anything is inflated or decoded: an
``.npz``'s arrays by their zip directory and ``.npy`` headers, a folder's images by their pixel
headers (``folder.py``). The limit is ``$WEIGHTGEN_MAX_DATASET_BYTES`` (default 1 GiB of arrays;
CIFAR-10 as float32 is 0.74 GB): a 1.1 MB ``.npz`` that inflated to 1 GiB once used 3.5 GB.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from weightgen.data import DatasetError, TaskData, register_dataset, stratified_split

TEST_FRACTION = 0.3
DEFAULT_MAX_DATASET_BYTES = 1 << 30


def max_dataset_bytes() -> int:
    """The most bytes of arrays a user's dataset may declare ($WEIGHTGEN_MAX_DATASET_BYTES)."""
    raw = os.environ.get("WEIGHTGEN_MAX_DATASET_BYTES")
    try:
        return int(raw) if raw else DEFAULT_MAX_DATASET_BYTES
    except ValueError:
        raise DatasetError(f"WEIGHTGEN_MAX_DATASET_BYTES must be a number of bytes, got {raw!r}") from None


def _check_xy(x, y, path: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2:
        raise DatasetError(f"{path}: {which} x must have shape (N, ...features), got {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: {which} x must be numeric, got dtype {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{path}: {which} y must have shape ({len(x)},) to match x, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DatasetError(f"{path}: {which} y must hold integer class labels, got dtype {y.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{path}: {which} x contains NaN or Inf")
    return x, y.astype(np.int64)


def task_from_arrays(name: str, x, y, x_test=None, y_test=None, source: str = "") -> TaskData:
    """Validate arrays and make a task; with no test split, a stratified 30 % is held out."""
    x, y = _check_xy(np.asarray(x), np.asarray(y), name, "train")
    if len(y) == 0:
        raise DatasetError(f"{name}: no examples")
    labels = np.unique(y)  # sorted; compared with 0..K-1 without ever building range(max label)
    k = int(labels[-1]) + 1
    if labels[0] < 0 or len(labels) != k:
        shown = ", ".join(str(v) for v in labels[:20].tolist()) + (", ..." if len(labels) > 20 else "")
        raise DatasetError(f"{name}: labels must be 0..K-1 with every class present, got [{shown}]")
    if k < 2:
        raise DatasetError(f"{name}: need at least 2 classes, got {k}")
    if x_test is None:
        if y_test is not None:
            raise DatasetError(f"{name}: y_test given without x_test")
        tr, te = stratified_split(y, TEST_FRACTION, 0)
        x, y, x_test, y_test = x[tr], y[tr], x[te], y[te]
    else:
        if y_test is None:
            raise DatasetError(f"{name}: x_test given without y_test")
        x_test, y_test = _check_xy(np.asarray(x_test), np.asarray(y_test), name, "test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(f"{name}: x_test shape {x_test.shape[1:]} differs from x shape {x.shape[1:]}")
        if len(y_test) and (y_test.min() < 0 or y_test.max() >= k):
            raise DatasetError(f"{name}: y_test labels must be in 0..{k - 1}")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    # labels only: no class names (a name-reading generator must not take label 3 for the digit 3)
    return TaskData(name, t(x), t(y), t(x_test), t(y_test), k, [], source or name)


def task_from_npz(name: str, file, max_bytes: int | None = None, source: str = "") -> TaskData:
    """A task from an .npz (a path or a binary file object): arrays ``x`` float (N, ...) in
    model-input space and ``y`` int labels 0..K-1, optional ``x_test``/``y_test``.

    Loaded with ``allow_pickle=False`` (an npz never runs code). ``max_bytes`` (default
    :func:`max_dataset_bytes`) caps the arrays' *uncompressed* size, read from the zip directory
    and each ``.npy`` header before anything is inflated, so a small compressed file cannot
    expand into gigabytes."""
    import zipfile

    max_bytes = max_dataset_bytes() if max_bytes is None else max_bytes
    try:
        with zipfile.ZipFile(file) as z:
            total = sum(i.file_size for i in z.infolist())
            declared = sum(_npy_bytes(z, i.filename) for i in z.infolist() if i.filename.endswith(".npy"))
        if max(total, declared) > max_bytes:
            raise DatasetError(f"{name}: arrays are {max(total, declared)} bytes uncompressed, over the {max_bytes}-byte "
                               f"limit (set WEIGHTGEN_MAX_DATASET_BYTES to allow more)")
        if hasattr(file, "seek"):
            file.seek(0)
        with np.load(file, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except DatasetError:
        raise
    except Exception as e:  # zipfile/format errors, object arrays refused
        raise DatasetError(f"{name} is not a readable .npz of numeric arrays: {e}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DatasetError(f"{name}: missing arrays {missing}; found {sorted(arrays)} (need x, y; optional x_test, y_test)")
    return task_from_arrays(name, arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"), source=source)


def _npy_bytes(z, member: str) -> int:
    """Bytes an array in the zip declares (its .npy header: shape x itemsize); reads the header only."""
    with z.open(member) as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f, max_header_size=10000)
    return math.prod(shape) * dtype.itemsize


def npz_feature_shape(file) -> tuple[int, ...]:
    """The per-example shape of ``x`` in an .npz, read from its header alone (nothing inflated
    past the header): what a server needs to pick a generator before it parses the upload."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as z, z.open("x.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    except KeyError:
        raise DatasetError("the .npz has no array 'x' (need x, y; optional x_test, y_test)") from None
    except Exception as e:  # noqa: BLE001 - not a zip, not an .npy header
        raise DatasetError(f"not a readable .npz of numeric arrays: {e}") from None
    finally:
        if hasattr(file, "seek"):
            file.seek(0)
    if len(shape) < 2:
        raise DatasetError(f"x must have shape (N, ...features), got {shape}")
    return tuple(shape[1:])


@register_dataset("npz")
def load_npz(args: str) -> TaskData:
    """``npz:PATH``: see ``task_from_npz`` for the arrays it holds."""
    if not args:
        raise DatasetError("npz dataset needs a path: npz:PATH")
    path = Path(args).expanduser()
    if not path.is_file():
        raise DatasetError(f"npz dataset file not found: {path}")
    return task_from_npz(f"npz:{args}", path, source=str(path))
