"""Reading checkpoint files without trusting them.

Accepted: ``.safetensors``; Hugging Face-style folders (``config.json`` + ``model.safetensors``,
or a sharded ``model.safetensors.index.json``); ``.pt``/``.pth``/``.bin`` pickles, only through
``torch.load(weights_only=True)``, whose unpickler refuses every global that could run code. A
file that cannot be read or is not a state dict raises :class:`Rejected` with a reason code, so
ingestion can report it and move on without writing anything for it.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".pt", ".pth", ".bin")
CHECKPOINT_EXT = SAFETENSORS_EXT + PICKLE_EXT


class Rejected(Exception):
    """A checkpoint that will not enter the zoo; ``reason`` is a short code for summaries."""

    def __init__(self, reason: str, detail: str, path: str = ""):
        super().__init__(f"{path}: {reason}: {detail}" if path else f"{reason}: {detail}")
        self.reason, self.detail, self.path = reason, detail, path


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) from a file or HF folder; metadata holds whatever config came with it."""
    p = Path(path)
    if not p.exists():
        raise Rejected("not_found", "no such file or directory", str(p))
    if p.is_dir():
        if not is_hf_folder(p):
            raise Rejected("not_a_checkpoint", "folder has no model.safetensors (or index)", str(p))
        return _read_hf_folder(p)
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_EXT:
        return _read_safetensors(p)
    if suffix in PICKLE_EXT:
        return _read_pickle(p), {}
    raise Rejected("not_a_checkpoint", f"unsupported file type {suffix or '(none)'}; "
                   f"expected one of {', '.join(CHECKPOINT_EXT)} or a folder with model.safetensors", str(p))


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise Rejected("unreadable", f"not a valid safetensors file ({e})", str(p)) from None
    if not tensors:
        raise Rejected("not_a_checkpoint", "file holds no tensors", str(p))
    info = {}
    if "weightgen" in meta:  # our own exports carry their config as JSON metadata
        try:
            info = json.loads(meta["weightgen"])
        except json.JSONDecodeError:
            pass
    return tensors, info


def _read_hf_folder(p: Path) -> tuple[dict[str, torch.Tensor], dict]:
    info = {}
    if (p / "config.json").is_file():
        try:
            info = json.loads((p / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Rejected("unreadable", f"config.json is not valid JSON ({e})", str(p)) from None
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise Rejected("unreadable", f"bad model.safetensors.index.json ({e})", str(p)) from None
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            shard = (p / name).resolve()
            if p.resolve() not in shard.parents:
                raise Rejected("unreadable", f"index points outside the folder: {name}", str(p))
            tensors.update(_read_safetensors(shard)[0])
    else:
        tensors, meta_info = _read_safetensors(p / "model.safetensors")
        info = {**meta_info, **info}
    return tensors, info


def _read_pickle(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e).split("\n")[0]
        if "global" in str(e).lower() or "weights_only" in str(e):
            found = re.search(r"Unsupported global: GLOBAL (\S+)|Unsupported operand \S+", str(e))
            what = found.group(1) or found.group(0) if found else msg
            raise Rejected("unsafe_pickle", f"pickle would run code ({what}); refused, never executed", str(p)) from None
        raise Rejected("unreadable", f"corrupt pickle ({msg})", str(p)) from None
    except Exception as e:  # the weights-only unpickler fails in many ways on garbage; all mean 'unreadable'
        raise Rejected("unreadable", f"cannot read as a torch checkpoint ({str(e).splitlines()[0][:200]})", str(p)) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise Rejected("not_a_checkpoint", f"expected a dict of name -> tensor, got {type(obj).__name__}", str(p))
    return dict(obj)
