"""``cifar10``: CIFAR-10 from the standard ``cifar-10-batches-py`` folder (Krizhevsky, 2009).

Images are float32 (3, 32, 32) in [0, 1] (uint8 rows of 3072 = R, G, B planes of 32x32, / 255),
with the official 50,000/10,000 split and the ten names from ``batches.meta``. The folder is
``$WEIGHTGEN_DATA/cifar-10-batches-py`` or ``cifar10:dir=PATH`` (PATH is that folder or its parent).

The batches are Python pickles, and unpickling runs whatever the file names, so they are read
with :class:`CifarUnpickler`, which resolves only the few numpy constructors an array needs and
refuses everything else: a planted ``data_batch_1`` can fail to load but never run code.
``cifar10:download=1`` fetches the official archive (md5-checked) and extracts it, refusing
absolute, ``..``, link or out-of-folder members; nothing is downloaded unless asked for.
"""
from __future__ import annotations

import codecs
import hashlib
import pickle
import tarfile
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from weightgen.data import DatasetError, TaskData, data_dir, parse_classes, parse_kv, register_dataset, select_classes

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
FILES = TRAIN + ["test_batch", "batches.meta"]

_reconstruct = np.zeros(0).__reduce__()[0]  # numpy's own, whichever module this numpy keeps it in
_frombuffer = np.zeros(0).__reduce_ex__(5)[0]  # what protocol-5 pickles of arrays call
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x pickles (the real files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x pickles
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    ("codecs", "encode"): codecs.encode,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(f"refusing to unpickle {module}.{name}: not a CIFAR-10 batch") from None


def unpickle(path: Path) -> dict:
    """A CIFAR batch as a dict with str keys. ``latin1`` is how numpy reads Python 2 array pickles."""
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, encoding="latin1").load()
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); re-download "
                           f"it with cifar10:download=1 after deleting {path.parent}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}; not a CIFAR-10 batch")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch(path: Path, key: str = "labels", k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 rows (N, 3072), labels in 0..k-1) of one pickled batch, checked; CIFAR-100's splits
    name their labels ``fine_labels`` / ``coarse_labels``."""
    d = unpickle(path)
    x, labels = d.get("data"), d.get(key)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array (N, 3072), got {desc}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: '{key}' must be a list of integers") from None
    if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= k)):
        raise DatasetError(f"{path}: '{key}' must be {len(x)} integers in 0..{k - 1}, got shape {y.shape}")
    return x, y


def _to_images(rows: np.ndarray) -> torch.Tensor:
    x = rows.reshape(-1, 3, 32, 32).astype(np.float32)  # (N, C, H, W): rows are whole colour planes
    x /= 255.0
    return torch.from_numpy(x)


@lru_cache(maxsize=1)
def _load_full(folder: str, stamp: tuple) -> TaskData:
    """The full task; cached on the files' (mtime, size) so class subsets don't re-read 60,000 images."""
    root = Path(folder)
    meta = unpickle(root / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DatasetError(f"{root / 'batches.meta'}: 'label_names' must be a list of 10 names")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    train = [_batch(root / f) for f in TRAIN]
    x_te, y_te = _batch(root / "test_batch")
    y_tr = np.concatenate([y for _, y in train])
    return TaskData("cifar10", _to_images(np.concatenate([x for x, _ in train])), torch.from_numpy(y_tr),
                    _to_images(x_te), torch.from_numpy(y_te), 10, names, str(root))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_extract(tgz: Path, dest: Path, folder: str = FOLDER) -> None:
    """Extract the archive's ``folder/`` (``cifar-10-batches-py``) into ``dest``, refusing any member
    that could land elsewhere (absolute path, ``..``, link, device) before writing anything."""
    with tarfile.open(tgz, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            p = PurePosixPath(m.name)
            if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()) or p.parts[:1] != (folder,):
                raise DatasetError(f"{tgz}: refusing to extract {m.name!r} (absolute path, '..', link or outside "
                                   f"{folder}/); delete the archive, it is not the official one")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)


def download(dest: Path, url: str | None = None, md5: str | None = None, folder: str | None = None) -> None:
    """Download the official archive at ``url`` into ``dest`` (kept for re-extraction), check its
    md5, extract its ``folder/``; CIFAR-10's by default, CIFAR-100 comes the same way."""
    url, md5, folder = url or URL, md5 or MD5, folder or FOLDER
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / url.rsplit("/", 1)[-1]
    if not tgz.is_file() or _md5(tgz) != md5:
        part = tgz.with_name(tgz.name + ".part")
        try:
            urllib.request.urlretrieve(url, part)
        except (OSError, urllib.error.URLError) as e:
            raise DatasetError(f"could not download {url} ({e}); download it by hand and extract it into {dest}") from None
        part.replace(tgz)
        if _md5(tgz) != md5:
            raise DatasetError(f"{tgz}: md5 {_md5(tgz)} is not the official {md5}; delete it and try again")
    safe_extract(tgz, dest, folder)


def _folder(kw: dict[str, str]) -> Path:
    if "dir" not in kw:
        return data_dir() / FOLDER
    p = Path(kw["dir"]).expanduser()
    return p if p.name == FOLDER or (p / "data_batch_1").exists() else p / FOLDER


@register_dataset("cifar10")
def load_cifar10(args: str) -> TaskData:
    """``cifar10``, ``cifar10:dir=PATH``, ``cifar10:classes=3,1,4``, ``cifar10:download=1``."""
    name = "cifar10" + (f":{args}" if args else "")
    kw = parse_kv(args, {"dir", "classes", "download"}, name)
    if kw.get("download", "0").lower() not in ("0", "1", "true", "false", "yes", "no"):
        raise DatasetError(f"{name}: download must be 1 or 0, got {kw['download']!r}")
    root = _folder(kw)
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing and kw.get("download", "0").lower() in ("1", "true", "yes"):
        download(root.parent)
        missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise DatasetError(
            f"{name}: CIFAR-10 not found: {root} lacks {'all of ' if len(missing) == len(FILES) else ''}"
            f"{', '.join(missing)}. Use the dataset "
            f"name cifar10:download=1 to download it (163 MB) into {root.parent}, or extract {URL} there yourself "
            f"so that {root}/data_batch_1 exists; set $WEIGHTGEN_DATA to use another data folder (now {data_dir()})."
        )
    full = _load_full(str(root), tuple((s.st_mtime_ns, s.st_size) for s in ((root / f).stat() for f in FILES)))
    if "classes" in kw:
        return select_classes(full, parse_classes(kw["classes"], name), name)
    return TaskData(name, full.x_train, full.y_train, full.x_test, full.y_test, 10, list(full.class_names), full.source)
