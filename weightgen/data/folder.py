"""``folder:PATH``: a user's own images in the ImageFolder layout (as torchvision reads it).

Either ``PATH/train/<class>/*.png`` with ``PATH/test/<class>/...`` (the user's own split; test
classes must be among the train classes), or just ``PATH/<class>/...``, in which case a fixed
stratified 30 % is held out for test. Classes are the folder names, sorted; label i = the i-th
name. Images (.png, .jpg, .jpeg, .bmp) become float32 (C, H, W) in [0, 1]: C = 1 when every image
is grayscale, else 3 (RGB), so one colour image turns the whole set RGB rather than failing.
All are resized (bilinear) to the first image's size, or to N x N with ``folder:PATH;size=N``
(the path comes first; ``;`` separates the options from it).

Limits, checked from the image headers before any pixel is decoded: one image may have at most
``$WEIGHTGEN_MAX_IMAGE_PIXELS`` pixels (default 64 M; a 144-400 MP PNG used 3.6 GB or crashed
PIL), and the decoded set at most ``$WEIGHTGEN_MAX_DATASET_BYTES`` of float32 (``files.py``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from weightgen.data import DatasetError, TaskData, parse_kv, register_dataset
from weightgen.data.files import max_dataset_bytes, task_from_arrays

EXTS = (".png", ".jpg", ".jpeg", ".bmp")
GRAY_MODES = {"1", "L", "LA"}
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


def max_image_pixels() -> int:
    raw = os.environ.get("WEIGHTGEN_MAX_IMAGE_PIXELS")
    try:
        return int(raw) if raw else DEFAULT_MAX_IMAGE_PIXELS
    except ValueError:
        raise DatasetError(f"WEIGHTGEN_MAX_IMAGE_PIXELS must be a number of pixels, got {raw!r}") from None


def _class_dirs(root: Path) -> dict[str, list[Path]]:
    """``{class name: sorted image files}`` for the sub-folders of ``root`` (hidden ones skipped)."""
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not dirs:
        raise DatasetError(f"{root}: no class folders; put each class's images in {root}/<class name>/")
    out = {}
    for d in dirs:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in EXTS)
        if not files:
            raise DatasetError(f"{d}: class {d.name!r} has no images ({', '.join(EXTS)}); add some or remove the folder")
        out[d.name] = files
    return out


def _layout(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]] | None]:
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train and has_test:
        train, test = _class_dirs(root / "train"), _class_dirs(root / "test")
        extra = sorted(set(test) - set(train))
        if extra:
            raise DatasetError(f"{root / 'test'}: classes {extra} have no train images; train classes are "
                               f"{sorted(train)}. Add {root / 'train'}/<class>/ for them or remove them from test")
        return train, test
    if has_train or has_test:
        have, lack = ("train", "test") if has_train else ("test", "train")
        raise DatasetError(f"{root} has {have}/ but no {lack}/: add {root / lack}/<class>/ images, or put the class "
                           f"folders directly in {root} to hold out a stratified 30 % for test")
    return _class_dirs(root), None


def _too_big(path: Path, pixels: int, limit: int) -> DatasetError:
    return DatasetError(f"{path}: {pixels:,} pixels, over the limit of {limit:,} per image; resize it first "
                        f"(or set WEIGHTGEN_MAX_IMAGE_PIXELS)")


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (W, H)) from the image header; nothing is decoded."""
    from PIL import Image, UnidentifiedImageError

    limit = max_image_pixels()
    try:
        with Image.open(path) as im:  # reads the header only
            mode, size = im.mode, im.size
    except Image.DecompressionBombError as e:  # PIL's own guard (2x its default limit) fired first
        raise DatasetError(f"{path}: over PIL's decompression-bomb limit ({e}); resize it first") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read this image ({e}); fix or remove the file") from None
    if size[0] * size[1] > limit:
        raise _too_big(path, size[0] * size[1], limit)
    return mode, size


def _pixels(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """One image as uint8 (C, H, W) in ``mode``, resized (bilinear) to ``size`` = (W, H) if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > max_image_pixels():  # it may have changed since its header was read
                raise _too_big(path, im.size[0] * im.size[1], max_image_pixels())
            im = im.convert(mode)  # decodes: a truncated file fails here
            if size is not None and im.size != size:
                im = im.resize(size, Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read this image ({e}); fix or remove the file") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)


def _size(value: str, name: str) -> tuple[int, int]:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 4096:
        raise DatasetError(f"{name}: size must be an integer 1..4096 (pixels per side), got {value!r}")
    return n, n


@register_dataset("folder")
def load_folder(args: str) -> TaskData:
    """``folder:PATH`` or ``folder:PATH;size=N``."""
    name = f"folder:{args}"
    path_str, _, rest = args.partition(";")
    if not path_str:
        raise DatasetError("folder dataset needs a path: folder:PATH (optionally folder:PATH;size=N)")
    kw = parse_kv(rest, {"size"}, name)
    root = Path(path_str).expanduser()
    if not root.is_dir():
        raise DatasetError(f"folder dataset directory not found: {root}")
    train, test = _layout(root)
    classes = sorted(train)
    splits = [train] + ([test] if test is not None else [])
    files = [[(f, classes.index(c)) for c in sorted(s) for f in s[c]] for s in splits]
    headers = {f: _header(f) for fs in files for f, _ in fs}  # every image's size checked before any decode
    mode = "L" if all(m in GRAY_MODES for m, _ in headers.values()) else "RGB"
    size = _size(kw["size"], name) if "size" in kw else headers[files[0][0][0]][1]
    n = sum(len(fs) for fs in files)
    need = n * (1 if mode == "L" else 3) * size[0] * size[1] * 4  # float32 (N, C, H, W)
    if need > max_dataset_bytes():
        raise DatasetError(f"{name}: {n} images at {size[0]}x{size[1]} decode to {need:,} bytes, over the "
                           f"{max_dataset_bytes():,}-byte limit; add ;size=N to resize them (or set "
                           f"WEIGHTGEN_MAX_DATASET_BYTES)")
    arrays = []
    for fs in files:
        x = np.stack([_pixels(f, mode, size) for f, _ in fs]).astype(np.float32) / 255.0  # (N, C, H, W)
        arrays += [x, np.array([label for _, label in fs], dtype=np.int64)]
    task = task_from_arrays(name, *arrays, source=str(root))
    task.class_names = classes
    return task
