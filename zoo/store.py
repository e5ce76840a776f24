"""The checkpoint zoo: a Zarr v3 store of stacked per-tensor arrays plus committed metadata.

Layout (one root, local directory or any fsspec URL such as ``s3://bucket/zoo``)::

    collections/<arch>__k<K>__<input shape>/          one per architecture *shape*
        segments/<seg>/<tensor name>                  (rows, *shape) arrays, rows = checkpoints
        commits/<commit>/zarr.json                    attrs: {"segment": seg, "records": [...]}

Why this shape: stacked rows write ~100x faster than a group per checkpoint and read one tensor
across many checkpoints in one request. Writers never touch each other's keys: each ingestion
batch writes a fresh segment, then publishes it with one commit document (a single atomic key
write: temp file + rename locally, one PUT on object stores). Readers only see rows named by a
commit, so a writer killed at any moment leaves no half-written entry visible, and two writers
at once lose nothing. The same content always hashes to the same id; if two writers race on the
same checkpoint, the earliest commit wins on read and the other row is unreferenced garbage
(``Zoo.gc`` deletes unreferenced segments once they are old enough not to be in flight).
"""
from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import torch
import zarr
from zarr.errors import ContainsGroupError

from weightgen.archs import get_arch

FORMAT_VERSION = 1
CHUNK_BYTES = 4 << 20  # inner chunk target: big enough for throughput, small enough for lazy reads
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
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.id = checkpoint_id(self.tensors)

    def record(self) -> dict:
        return {
            "id": self.id, "arch": self.arch, "dataset": self.dataset, "num_classes": int(self.num_classes),
            "input_shape": list(self.input_shape), "seed": self.seed, "run_id": self.run_id, "step": self.step,
            "train_config": self.train_config, "metrics": {k: float(v) for k, v in self.metrics.items()},
            "tags": list(self.tags), "instructions": list(self.instructions), "source": self.source,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dtypes": sorted({dtype_name(t.dtype) for t in self.tensors.values()}),
        }


def validate_tensors(tensors: dict[str, torch.Tensor], arch: str, num_classes: int, input_shape) -> list[tuple[str, str]]:
    """Every way ``tensors`` fails to be a checkpoint of this arch, as (reason, detail) pairs.

    Names must match the arch's state-dict keys exactly; shapes must match; floating tensors must
    be a floating dtype and finite; integer buffers keep their integer dtype."""
    spec = {t.name: t for t in get_arch(arch).tensors(num_classes, input_shape)}
    problems = []
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec))
    if missing:
        problems.append(("missing_keys", f"{len(missing)} missing, e.g. {missing[:3]}"))
    if extra:
        problems.append(("unexpected_keys", f"{len(extra)} unexpected, e.g. {extra[:3]}"))
    for name in sorted(set(spec) & set(tensors)):
        t, s = tensors[name], spec[name]
        if not isinstance(t, torch.Tensor):
            problems.append(("not_a_tensor", f"{name} is {type(t).__name__}"))
            continue
        if tuple(t.shape) != s.shape:
            problems.append(("shape_mismatch", f"{name}: expected {list(s.shape)}, got {list(t.shape)}"))
        if s.dtype.is_floating_point != t.dtype.is_floating_point or t.dtype not in _NP_DTYPES:
            problems.append(("bad_dtype", f"{name}: expected {s.dtype}, got {t.dtype}"))
        elif t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            problems.append(("non_finite", f"{name} contains NaN or Inf"))
    return problems


def _open_root(url: str, mode: str, storage_options: dict | None):
    for attempt in range(3):
        try:
            if "://" in url and not url.startswith("file://"):
                return zarr.open_group(url, mode=mode, storage_options=storage_options or {}, use_consolidated=False)
            return zarr.open_group(url.removeprefix("file://"), mode=mode, use_consolidated=False)
        except FileNotFoundError:
            raise ZooError(f"No zoo at {url}: create one with `weightgen zoo ingest` or `weightgen zoo build`") from None
        except ContainsGroupError:
            # mode "a" on a new zoo checks, then creates: two writers starting together (Ray
            # ingestion tasks) both see no zoo, one creates it and the other's create fails.
            # The zoo exists now, so opening again succeeds.
            if attempt == 2:
                raise


def _chunk_rows(n: int, row_bytes: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(row_bytes, 1)))


class Zoo:
    """A checkpoint zoo at ``url``. Cheap to open; metadata is read once and cached (``refresh()``)."""

    def __init__(self, url: str, mode: str = "a", storage_options: dict | None = None):
        self.url = str(url)
        self.read_only = mode == "r"
        self.root = _open_root(self.url, mode, storage_options)
        if not self.read_only and "format_version" not in self.root.attrs:
            self.root.attrs["format_version"] = FORMAT_VERSION
        self._records: dict[str, dict] | None = None
        self._commits: list[str] = []
        self._segments: dict[tuple[str, str], Any] = {}
        self._arrays: dict[tuple[str, str, str], Any] = {}

    # ------------------------------------------------------------------ metadata

    def refresh(self) -> None:
        self._records = None

    def _load(self) -> dict[str, dict]:
        if self._records is not None:
            return self._records
        recs: dict[str, dict] = {}
        commits = []
        coll_root = self.root.get("collections")
        for cid in sorted(coll_root.group_keys()) if coll_root is not None else []:
            cgroup = coll_root.get(f"{cid}/commits")
            if cgroup is None:
                continue
            for name, g in sorted(cgroup.groups(), key=lambda kv: kv[0]):  # oldest first: first commit wins
                attrs = g.attrs.asdict()
                commits.append(f"{cid}/{name}")
                for row, r in enumerate(attrs.get("records", [])):
                    if r["id"] not in recs:
                        recs[r["id"]] = {**r, "_loc": (cid, attrs["segment"], row)}
        self._records, self._commits = recs, commits
        return recs

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, ckpt_id: str) -> bool:
        return ckpt_id in self._load()

    def ids(self) -> list[str]:
        return list(self._load())

    def query(self, arch: str | None = None, dataset: str | None = None, tag: str | None = None,
              metrics: Iterable[tuple[str, float | None, float | None]] = (), **equals) -> list[dict]:
        """Records matching every filter; ``metrics`` is (name, min, max) ranges (None = open).
        ``dataset`` matches exactly, or as a prefix when it ends with ``*``."""
        out = []
        for r in self._load().values():
            if arch and r["arch"] != arch:
                continue
            if dataset and not (r["dataset"].startswith(dataset[:-1]) if dataset.endswith("*") else r["dataset"] == dataset):
                continue
            if tag and tag not in r["tags"]:
                continue
            if any(r.get(k) != v for k, v in equals.items()):
                continue
            ok = True
            for name, lo, hi in metrics:
                v = r["metrics"].get(name)
                if v is None or (lo is not None and v < lo) or (hi is not None and v > hi):
                    ok = False
                    break
            if ok:
                out.append(public(r))
        return out

    def get(self, ckpt_id: str) -> dict:
        """The record of ``ckpt_id`` (a unique prefix of at least 8 hex digits is enough)."""
        return public(self._resolve(ckpt_id))

    def _resolve(self, ckpt_id: str) -> dict:
        recs = self._load()
        if ckpt_id in recs:
            return recs[ckpt_id]
        if len(ckpt_id) >= 8:
            hits = [k for k in recs if k.startswith(ckpt_id)]
            if len(hits) == 1:
                return recs[hits[0]]
            if len(hits) > 1:
                raise ZooError(f"Checkpoint id prefix {ckpt_id!r} is ambiguous ({len(hits)} matches)")
        raise ZooError(f"No checkpoint {ckpt_id!r} in zoo {self.url}")

    def snapshot_id(self) -> str:
        """Names exactly which commits a reader saw: generators record it as their training data."""
        self._load()
        return hashlib.sha256("\n".join(self._commits).encode()).hexdigest()[:16]

    def stats(self) -> dict:
        recs = self._load()
        by_arch: dict[str, int] = {}
        by_coll: dict[str, int] = {}
        for r in recs.values():
            by_arch[r["arch"]] = by_arch.get(r["arch"], 0) + 1
            by_coll[r["_loc"][0]] = by_coll.get(r["_loc"][0], 0) + 1
        datasets = {r["dataset"] for r in recs.values()}
        return {"url": self.url, "checkpoints": len(recs), "commits": len(self._commits), "datasets": len(datasets),
                "by_arch": by_arch, "by_collection": by_coll, "snapshot": self.snapshot_id()}

    # ------------------------------------------------------------------ tensor reads

    def _segment(self, cid: str, seg: str):
        key = (cid, seg)
        if key not in self._segments:
            self._segments[key] = self.root[f"collections/{cid}/segments/{seg}"]
        return self._segments[key]

    def _array(self, cid: str, seg: str, name: str):
        """Array handles are cached: opening one reads its zarr.json, which dominates small reads."""
        key = (cid, seg, name)
        if key not in self._arrays:
            self._arrays[key] = self._segment(cid, seg)[name]
        return self._arrays[key]

    def load(self, ckpt_id: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """One checkpoint's tensors, bit-exact as ingested (lazy: only ``keys`` are read)."""
        r = self._resolve(ckpt_id)
        cid, seg, row = r["_loc"]
        g = self._segment(cid, seg)
        meta = g.attrs["tensors"]
        names = list(meta) if keys is None else list(keys)
        return {n: from_numpy(self._array(cid, seg, n)[row], meta[n]["dtype"]) for n in names}

    def read_tensor(self, name: str, ids: list[str]) -> torch.Tensor:
        """One tensor across many checkpoints, stacked (len(ids), *shape); one read per segment."""
        return self.stack(ids, [name])[name]

    def stack(self, ids: list[str], keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of many same-shape checkpoints, stacked along a new first axis in ``ids`` order."""
        recs = [self._resolve(i) for i in ids]
        if not recs:
            raise ZooError("stack() needs at least one checkpoint id")
        colls = {r["_loc"][0] for r in recs}
        if len(colls) > 1:
            raise ZooError(f"stack() needs checkpoints of one architecture shape, got {sorted(colls)}")
        by_seg: dict[str, list[tuple[int, int]]] = {}
        for pos, r in enumerate(recs):
            by_seg.setdefault(r["_loc"][1], []).append((pos, r["_loc"][2]))
        cid = recs[0]["_loc"][0]
        first = self._segment(cid, next(iter(by_seg)))
        names = list(first.attrs["tensors"]) if keys is None else list(keys)
        out = {}
        for n in names:
            parts = []
            for seg, pos_rows in by_seg.items():
                arr = self._array(cid, seg, n)
                rows = np.array([row for _, row in pos_rows])
                pos = np.array([p for p, _ in pos_rows])
                lo, hi = int(rows.min()), int(rows.max()) + 1
                if hi - lo == len(rows) and (np.diff(rows) == 1).all():
                    block = arr[lo:hi]  # in order and contiguous: no gather, no copy
                elif hi - lo <= 2 * len(rows):
                    block = arr[lo:hi][rows - lo]
                else:
                    block = arr.get_orthogonal_selection((rows,))
                parts.append((pos, block))
            logical = first.attrs["tensors"][n]["dtype"]
            if len(parts) == 1 and (parts[0][0] == np.arange(len(recs))).all():
                out[n] = from_numpy(parts[0][1], logical)  # one segment, asked in row order
                continue
            full = np.empty((len(recs), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
            for pos, block in parts:
                full[pos] = block
            out[n] = from_numpy(full, logical)
        return out

    # ------------------------------------------------------------------ writes

    def add(self, checkpoints: list[Checkpoint], *, validate: bool = True) -> dict[str, list[str]]:
        """Store checkpoints; returns {"ingested": ids, "duplicate": ids}. All-or-nothing per segment:
        nothing is visible until its commit is written, and invalid input raises before any write."""
        if self.read_only:
            raise ZooError(f"Zoo {self.url} is open read-only")
        if validate:
            for c in checkpoints:
                problems = validate_tensors(c.tensors, c.arch, c.num_classes, c.input_shape)
                if problems:
                    raise ZooError(f"checkpoint {c.source or c.id[:12]} is not a valid {c.arch}: {problems}")
        self.refresh()
        known = self._load()
        fresh, dup, seen = [], [], set()
        for c in checkpoints:
            (dup if c.id in known or c.id in seen else fresh).append(c)
            seen.add(c.id)
        groups: dict[tuple, list[Checkpoint]] = {}
        for c in fresh:
            sig = tuple((n, dtype_name(t.dtype)) for n, t in sorted(c.tensors.items()))
            groups.setdefault((collection_id(c.arch, c.num_classes, c.input_shape), sig), []).append(c)
        for (cid, _), group in groups.items():
            self._write_segment(cid, group)
        self.refresh()
        return {"ingested": [c.id for c in fresh], "duplicate": [c.id for c in dup]}

    def _write_segment(self, cid: str, group: list[Checkpoint]) -> None:
        seg = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        first = group[0]
        tensors = {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in first.tensors.items()}
        g = self.root.create_group(f"collections/{cid}/segments/{seg}", attributes={
            "arch": first.arch, "num_classes": first.num_classes, "input_shape": list(first.input_shape),
            "rows": len(group), "tensors": tensors})
        for n, t in first.tensors.items():
            data = np.stack([to_numpy(c.tensors[n]) for c in group])
            rows = _chunk_rows(len(group), data[0].nbytes)
            arr = g.create_array(n, shape=data.shape, dtype=data.dtype, chunks=(rows, *data.shape[1:]),
                                 compressors=None, fill_value=0)
            arr[...] = data
        records = [c.record() for c in group]
        # The commit: one document, written last. Until it exists the segment is invisible.
        try:
            self.root.create_group(f"collections/{cid}/commits/{seg}", attributes={"segment": seg, "records": records})
        except ContainsGroupError:  # pragma: no cover - name has a random part
            raise ZooError(f"commit {seg} already exists") from None

    def gc(self, min_age_s: float = 3600.0) -> list[str]:
        """Delete segments no commit references and older than ``min_age_s`` (younger ones may be in
        flight in another writer). Returns the deleted segment paths."""
        if self.read_only:
            raise ZooError(f"Zoo {self.url} is open read-only")
        self.refresh()
        self._load()
        referenced = {(r["_loc"][0], r["_loc"][1]) for r in self._records.values()}
        coll_root = self.root.get("collections")
        removed = []
        now = time.time_ns()
        for cid in list(coll_root.group_keys()) if coll_root is not None else []:
            segs = coll_root.get(f"{cid}/segments")
            commits = coll_root.get(f"{cid}/commits")
            committed = {g.attrs["segment"] for _, g in commits.groups()} if commits is not None else set()
            for seg in list(segs.group_keys()) if segs is not None else []:
                age_s = (now - int(seg.split("-")[0])) / 1e9
                if seg not in committed and (cid, seg) not in referenced and age_s >= min_age_s:
                    del segs[seg]
                    removed.append(f"{cid}/{seg}")
        return removed


def public(r: dict) -> dict:
    """A record without internal fields, in a stable field order."""
    return {k: r.get(k) for k in RECORD_FIELDS}


def open_zoo(url: str | None = None, mode: str = "a", storage_options: dict | None = None) -> Zoo:
    from weightgen.paths import default_zoo

    return Zoo(url or default_zoo(), mode=mode, storage_options=storage_options)
