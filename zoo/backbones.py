"""Backbones and their feature caches in the zoo: stored once, by content hash, committed last.

Layout (beside ``collections/``, in the same Zarr v3 root)::

    backbones/<id>/data-<rand>/<tensor name>     one array per tensor (written first)
    backbones/<id>/commit/zarr.json              attrs: the record, naming its data group (written last)
    features/<backbone id>__<fingerprint>/data-<rand>/{features,labels}
    features/<backbone id>__<fingerprint>/commit/zarr.json

Why a separate area and not a zoo collection: a backbone is not an entry of a registered
architecture *shape* (a pretrained ViT-S at 224 px with patch 16 is not the registry's 32 px
``vit-s``); it carries its own transformers config and preprocessing, and task-specific parts
(heads, generators) reference it by id. The write protocol is the collections' one in small:
data first under a fresh random name, then one commit document (a single atomic key write), so
a reader never sees a half-written backbone and two writers of the same content lose nothing
(the first commit wins; the other's data group is unreferenced and harmless). The id is a
sha256 over the tensors (``checkpoint_id``) and the canonical config, and reads check the
tensors against it, so a corrupted chunk is an error, never silently different weights.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid

import numpy as np
import torch
from zarr.errors import ContainsGroupError

from zoo.records import ZooError, checkpoint_id, dtype_name, from_numpy, to_numpy

_ID = re.compile(r"^[0-9a-f]{8,64}$")
_FP = re.compile(r"^[0-9a-f]{8,64}$")


def backbone_id(tensors: dict[str, torch.Tensor], arch: str, config: dict, preprocessing: dict) -> str:
    """Content hash: the weights (as ``checkpoint_id``), the arch name, the canonical config and the
    preprocessing (the same weights fed differently scaled images are a different feature map)."""
    h = hashlib.sha256()
    h.update(checkpoint_id(tensors).encode())
    h.update(arch.encode() + b"\0")
    h.update(json.dumps([config, preprocessing], sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def _write_group(zoo, base: str, arrays: dict[str, np.ndarray], record: dict) -> bool:
    """Data under ``base/data-<rand>``, then ``base/commit`` naming it. False: already committed."""
    if zoo.read_only:
        raise ZooError(f"Zoo {zoo.url} is open read-only")
    if zoo._exists(f"{base}/commit/zarr.json"):
        return False
    data = f"data-{uuid.uuid4().hex[:12]}"
    g = zoo.root.create_group(f"{base}/{data}")
    for name, a in arrays.items():
        arr = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape), compressors=None,
                             fill_value=0)
        arr[...] = a
    try:
        zoo.root.create_group(f"{base}/commit", attributes={**record, "data": data, "committed_at": time.time()})
    except ContainsGroupError:  # a concurrent writer committed the same content first
        zoo._delete_prefix(f"{base}/{data}")
        return False
    return True


def _commit(zoo, base: str) -> dict | None:
    if not zoo._exists(f"{base}/commit/zarr.json"):
        return None
    return zoo.root[f"{base}/commit"].attrs.asdict()


# --------------------------------------------------------------------------- backbones


def add_backbone(zoo, tensors: dict[str, torch.Tensor], arch: str, config: dict, preprocessing: dict,
                 source: str = "", model_type: str = "", size_matches_arch: bool | None = None) -> tuple[str, bool]:
    """Store a backbone (already validated by the caller); returns (id, newly stored)."""
    if not tensors:
        raise ZooError("a backbone needs at least one tensor")
    bid = backbone_id(tensors, arch, config, preprocessing)
    record = {"id": bid, "arch": arch, "model_type": model_type, "size_matches_arch": size_matches_arch,
              "config": config, "preprocessing": preprocessing,
              "source": source, "weights_sha256": checkpoint_id(tensors),
              "num_params": int(sum(t.numel() for t in tensors.values())),
              "tensors": {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in tensors.items()}}
    json.dumps(record, allow_nan=False)  # a config that is not strict JSON fails before any write
    fresh = _write_group(zoo, f"backbones/{bid}", {n: to_numpy(t) for n, t in tensors.items()}, record)
    return bid, fresh


def list_backbones(zoo, arch: str | None = None) -> list[dict]:
    """Records of every committed backbone (optionally of one arch), oldest first."""
    root = zoo.root.get("backbones")
    out = []
    for bid in sorted(root.group_keys()) if root is not None else []:
        rec = _commit(zoo, f"backbones/{bid}")
        if rec is not None and (arch is None or rec.get("arch") == arch):
            out.append(rec)
    return sorted(out, key=lambda r: r.get("committed_at", 0))


def resolve_backbone(zoo, ref: str | None, arch: str | None = None) -> dict:
    """The record of backbone ``ref`` (an id or a unique prefix of >= 8 hex digits), or, with no
    ref, the only backbone of ``arch`` in the zoo (several: an error that lists them)."""
    recs = list_backbones(zoo, arch)
    if ref is None:
        if not recs:
            raise ZooError(f"no {arch or ''} backbone in zoo {zoo.url}; add one with "
                           f"`weightgen zoo add-backbone FOLDER --arch {arch or 'ARCH'}`")
        if len(recs) > 1:
            raise ZooError(f"{len(recs)} {arch} backbones in zoo {zoo.url} ({', '.join(r['id'][:12] for r in recs)}); "
                           f"name one with --backbone")
        return recs[0]
    if not isinstance(ref, str) or not _ID.match(ref):
        raise ZooError(f"backbone id must be 8-64 lowercase hex digits, got {ref!r}")
    hits = [r for r in list_backbones(zoo) if r["id"].startswith(ref)]
    if len(hits) != 1:
        raise ZooError(f"backbone {ref!r} is {'ambiguous' if hits else 'not in zoo ' + zoo.url}")
    if arch and hits[0]["arch"] != arch:
        raise ZooError(f"backbone {ref[:12]} is a {hits[0]['arch']} backbone, not {arch}")
    return hits[0]


def load_backbone(zoo, ref: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, tensors) of a backbone, checked against its content hash."""
    rec = resolve_backbone(zoo, ref)
    base = f"backbones/{rec['id']}/{rec['data']}"
    try:
        tensors = {n: from_numpy(np.asarray(zoo.root[f"{base}/{n}"][...]), m["dtype"]).reshape(m["shape"])
                   for n, m in rec["tensors"].items()}  # reshape: a 0-d array comes back 1-d
    except (KeyError, FileNotFoundError) as e:
        raise ZooError(f"backbone {rec['id'][:12]}: its data is missing from {zoo.url} ({e})") from None
    if checkpoint_id(tensors) != rec["weights_sha256"]:
        raise ZooError(f"backbone {rec['id'][:12]} in {zoo.url} is corrupt: its tensors do not match their "
                       f"stored sha256; add it again from its source")
    return rec, tensors


# --------------------------------------------------------------------------- feature cache


def _features_base(bid: str, fingerprint: str) -> str:
    if not _ID.match(bid) or not _FP.match(fingerprint):
        raise ZooError(f"bad feature cache key ({bid!r}, {fingerprint!r})")
    return f"features/{bid}__{fingerprint}"


def load_features(zoo, bid: str, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached (features (N, D) float32, labels (N,)) for (backbone, data fingerprint), or None."""
    base = _features_base(bid, fingerprint)
    rec = _commit(zoo, base)
    if rec is None:
        return None
    try:
        f = torch.from_numpy(zoo.root[f"{base}/{rec['data']}/features"][...])
        y = torch.from_numpy(zoo.root[f"{base}/{rec['data']}/labels"][...])
    except (KeyError, FileNotFoundError):
        raise ZooError(f"feature cache {base} in {zoo.url} is committed but its data is missing; remove that folder")
    if hashlib.sha256(f.numpy().tobytes()).hexdigest() != rec.get("sha256"):
        raise ZooError(f"feature cache {base} in {zoo.url} is corrupt (sha256 mismatch); remove that folder")
    return f, y


def save_features(zoo, bid: str, fingerprint: str, feats: torch.Tensor, labels: torch.Tensor, info: dict) -> None:
    f = feats.detach().float().contiguous().numpy()
    _write_group(zoo, _features_base(bid, fingerprint), {"features": f, "labels": labels.long().numpy()},
                 {**info, "backbone": bid, "fingerprint": fingerprint, "shape": list(f.shape),
                  "sha256": hashlib.sha256(f.tobytes()).hexdigest()})
