"""Reading checkpoint files without trusting them: headers first, data only once they fit.

Accepted: ``.safetensors``; Hugging Face-style folders (``config.json`` + ``model.safetensors``,
or a sharded ``model.safetensors.index.json``); ``.pt``/``.pth``/``.bin`` pickles, only through
``torch.load(weights_only=True)``, whose unpickler refuses every global that could run code. A
file that cannot be read or is not a state dict raises :class:`Rejected` with a reason code, so
ingestion can report it and move on without writing anything for it.

:func:`open_checkpoint` reads only what a file *declares*: the safetensors header, the folder's
``config.json`` and index, a torch zip's directory (and, for :meth:`CheckpointFile.declared`, its
pickle with every storage on the ``meta`` device, so no tensor byte is read or allocated). The
caller compares names, shapes and dtypes with the architecture and the declared size with a cap
before :meth:`CheckpointFile.load` reads any data: a 1 MB deflated ``.pt`` holding a 1 GiB tensor
of the wrong shape peaked at 3.1 GB when tensors were read first. Every file a folder names must
resolve inside it: a symlinked ``model.safetensors`` is refused like an index shard outside it.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".pt", ".pth", ".bin")
CHECKPOINT_EXT = SAFETENSORS_EXT + PICKLE_EXT
MAX_JSON_BYTES = 16 << 20  # config.json / index: a few KB in practice
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_WRAPPERS = ("state_dict", "model", "model_state_dict")  # common training-script wrappers


class Rejected(Exception):
    """A checkpoint that will not enter the zoo; ``reason`` is a short code for summaries."""

    def __init__(self, reason: str, detail: str, path: str = ""):
        super().__init__(f"{path}: {reason}: {detail}" if path else f"{reason}: {detail}")
        self.reason, self.detail, self.path = reason, detail, path


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


class CheckpointFile:
    """An opened checkpoint: ``info`` (its config), ``alloc_bytes`` (what loading it allocates, as
    declared), ``declared()`` (name -> (shape, dtype)) and ``load()`` (the tensors)."""

    def __init__(self, path: Path, info: dict, alloc_bytes: int, declared, load):
        self.path, self.info, self.alloc_bytes = path, info, alloc_bytes
        self._declared, self._load = declared, load

    def declared(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
        return self._declared()

    def load(self) -> dict[str, torch.Tensor]:
        return self._load()


def open_checkpoint(path: str | Path) -> CheckpointFile:
    """Headers and config of a file or HF folder; no tensor data is read."""
    p = Path(path)
    if not p.exists():
        raise Rejected("not_found", "no such file or directory", str(p))
    if p.is_dir():
        if not is_hf_folder(p):
            raise Rejected("not_a_checkpoint", "folder has no model.safetensors (or index)", str(p))
        return _open_hf_folder(p)
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_EXT:
        return _open_safetensors(p)
    if suffix in PICKLE_EXT:
        return _open_pickle(p)
    raise Rejected("not_a_checkpoint", f"unsupported file type {suffix or '(none)'}; "
                   f"expected one of {', '.join(CHECKPOINT_EXT)} or a folder with model.safetensors", str(p))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file or HF folder, with no size check (trusted input only)."""
    f = open_checkpoint(path)
    return f.load(), f.info


# --------------------------------------------------------------------------- safetensors


def _safetensors_header(p: Path) -> tuple[dict, dict]:
    """({name: (shape, dtype)}, metadata) from the header alone (safe_open maps, reads nothing else)."""
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            declared = {}
            for k in f.keys():
                s = f.get_slice(k)
                declared[k] = (tuple(s.get_shape()), _ST_DTYPES.get(s.get_dtype(), s.get_dtype()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise Rejected("unreadable", f"not a valid safetensors file ({e})", str(p)) from None
    if not declared:
        raise Rejected("not_a_checkpoint", "file holds no tensors", str(p))
    return declared, meta


def _nbytes(declared: dict) -> int:
    total = 0
    for shape, dtype in declared.values():
        n = 1
        for s in shape:
            n *= int(s)
        total += n * (dtype.itemsize if isinstance(dtype, torch.dtype) else 8)
    return total


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise Rejected("unreadable", f"not a valid safetensors file ({e})", str(p)) from None


def _open_safetensors(p: Path) -> CheckpointFile:
    declared, meta = _safetensors_header(p)
    info = {}
    if "weightgen" in meta:  # our own exports carry their config as JSON metadata
        try:
            info = json.loads(meta["weightgen"])
        except json.JSONDecodeError:
            pass
    return CheckpointFile(p, info if isinstance(info, dict) else {}, _nbytes(declared), lambda: declared,
                          lambda: _read_safetensors(p))


# --------------------------------------------------------------------------- HF folders


def _inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name``, refused unless it resolves inside ``folder`` (a symlink pointing out of it
    is refused like a ``../`` shard path)."""
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise Rejected("unreadable", f"{what} {name} points outside the folder (to {target}); copy the file into "
                       f"the folder or ingest it directly", str(folder))
    return target


def _read_json(p: Path, what: str, folder: Path):
    if p.stat().st_size > MAX_JSON_BYTES:
        raise Rejected("too_large", f"{what} is {p.stat().st_size} bytes, over {MAX_JSON_BYTES}", str(folder))
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Rejected("unreadable", f"{what} is not valid JSON ({e})", str(folder)) from None


def _open_hf_folder(p: Path) -> CheckpointFile:
    info = {}
    if (p / "config.json").is_file():
        info = _read_json(_inside(p, "config.json", "config.json"), "config.json", p)
        if not isinstance(info, dict):
            raise Rejected("bad_config", f"config.json must be a JSON object, got {type(info).__name__}", str(p))
    index = p / "model.safetensors.index.json"
    if index.is_file():
        doc = _read_json(_inside(p, index.name, index.name), index.name, p)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise Rejected("unreadable", f"{index.name} needs a non-empty 'weight_map' object", str(p))
        bad = [v for v in weight_map.values() if not isinstance(v, str)]
        if bad:
            raise Rejected("unreadable", f"{index.name}: weight_map values must be shard file names, got {bad[0]!r}", str(p))
        shards = [_inside(p, name, "index shard") for name in sorted(set(weight_map.values()))]
        declared: dict = {}
        for shard in shards:
            part, _ = _safetensors_header(shard)
            twice = sorted(set(part) & set(declared))
            if twice:
                raise Rejected("unreadable", f"tensors {twice[:3]} are in more than one shard", str(p))
            declared.update(part)

        def load():
            out = {}
            for shard in shards:
                out.update(_read_safetensors(shard))
            return out
        return CheckpointFile(p, info, _nbytes(declared), lambda: declared, load)
    inner = _open_safetensors(_inside(p, "model.safetensors", "model.safetensors"))
    inner.info = {**inner.info, **info}
    inner.path = p
    return inner


# --------------------------------------------------------------------------- torch pickles


def _unwrap(obj):
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _torch_load(p: Path, device: str):
    try:
        return torch.load(str(p), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).split("\n")[0]
        if "global" in str(e).lower() or "weights_only" in str(e):
            found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \S+", str(e))
            what = found.group(1) or found.group(0) if found else msg
            raise Rejected("unsafe_pickle", f"pickle would run code ({what}); refused, never executed", str(p)) from None
        raise Rejected("unreadable", f"corrupt pickle ({msg})", str(p)) from None
    except Exception as e:  # the weights-only unpickler fails in many ways on garbage; all mean 'unreadable'
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise Rejected("unreadable", f"cannot read as a torch checkpoint ({why})", str(p)) from None


def _state_dict(obj, p: Path) -> dict:
    obj = _unwrap(obj)
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise Rejected("not_a_checkpoint", f"expected a dict of name -> tensor, got {type(obj).__name__}", str(p))
    return dict(obj)


def _open_pickle(p: Path) -> CheckpointFile:
    """A torch zip declares every storage's size in its directory (what ``torch.load`` allocates,
    whatever the compression); the legacy format is uncompressed, so its file size bounds it."""
    alloc = p.stat().st_size
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                alloc = sum(i.file_size for i in z.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise Rejected("unreadable", f"corrupt zip ({e})", str(p)) from None
    cache: dict = {}

    def declared():
        if "meta" not in cache:  # shapes and dtypes with every storage on "meta": no data read
            cache["meta"] = {k: (tuple(v.shape), v.dtype) for k, v in _state_dict(_torch_load(p, "meta"), p).items()}
        return cache["meta"]

    def load():
        sd = _state_dict(_torch_load(p, "cpu"), p)
        empty = sorted(k for k, v in sd.items() if v.device.type != "cpu")
        if empty:  # torch.save of meta tensors: shapes without data
            raise Rejected("not_a_checkpoint", f"tensors {empty[:3]} hold no data (saved from the meta device)", str(p))
        return sd

    return CheckpointFile(p, {}, alloc, declared, load)
