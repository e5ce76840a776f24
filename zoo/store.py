"""The checkpoint zoo: a Zarr v3 store of stacked per-tensor arrays plus committed metadata.

Layout (one root, local directory or any fsspec URL such as ``s3://bucket/zoo``)::

    collections/<arch>__k<K>__<input shape>/          one per architecture *shape*
        segments/<seg>/<tensor name>                  (rows, *shape) arrays, rows = checkpoints
        commits/<commit>/zarr.json                    attrs: {"segment": seg, "records": [...]},
                                                      or {"removed": [ids]} (``zoo rm``)
        leases/<seg>/zarr.json                        held by the writer of <seg> until it commits
    index/                                            the metadata index beside the commits (``zoo.index``)
    nn/<collection>/<version>/                        the novelty index (``weightgen.nn_index``)

Why this shape: stacked rows write ~100x faster than a group per checkpoint and read one tensor
across many checkpoints in one request. A commit may list each row's ``orders`` (rows copied by
compaction or gc keep their first commit's order, ``zoo.events``). Writers never touch each
other's keys: each ingestion
batch writes a fresh segment, then publishes it with one commit document (a single atomic key
write: temp file + rename locally, one PUT on object stores). Readers only see rows named by a
commit, so a writer killed at any moment leaves no half-written entry visible, and two writers
at once lose nothing. The same content always hashes to the same id; if two writers race on the
same checkpoint, the earliest commit wins on read and the other row is unreferenced garbage
(``Zoo.gc`` reclaims it, see ``zoo.gc``).

Writers hold a *lease* (``collections/<cid>/leases/<seg>``) from before their segment exists
until after its commit, so ``gc`` never deletes data a live writer is about to publish, whatever
``--min-age`` says (``zoo.gc`` has the protocol and why it is race-free). Mixed dtypes: rows keep
the dtype they were ingested in; ``stack`` converts each segment's rows by its stored dtype to
the promoted dtype (bf16 + fp32 -> fp32), never reinterpreting one dtype's bits as another's.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from functools import reduce
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync
from zarr.errors import ContainsGroupError

from zoo import lease
from zoo.records import (  # noqa: F401
    Checkpoint,
    ZooError,
    checkpoint_id,
    collection_id,
    dtype_name,
    from_numpy,
    new_segment_name,
    public,
    to_numpy,
)
from zoo.storeio import StoreIO
from zoo.validate import validate_tensors  # noqa: F401  (re-exported: zoo.validate_tensors)

FORMAT_VERSION = 1
CHUNK_BYTES = 4 << 20  # inner chunk target: big enough for throughput, small enough for lazy reads


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


class Zoo(StoreIO):
    """A checkpoint zoo at ``url``. Cheap to open; metadata is read once and cached (``refresh()``)."""

    def __init__(self, url: str, mode: str = "a", storage_options: dict | None = None):
        self.url = str(url)
        self.read_only = mode == "r"
        self.root = _open_root(self.url, mode, storage_options)
        if not self.read_only and "format_version" not in self.root.attrs:
            self.root.attrs["format_version"] = FORMAT_VERSION
        self.storage_options = storage_options or {}
        self._v = None  # zoo.index.View, built on first use
        self._docs: dict[str, dict] = {}  # group path -> attributes (commit and snapshot documents never change)
        self._tables: dict = {}  # commit key -> its events (zoo.events), for commits not in the index
        self._fs = None
        self._segments: dict[tuple[str, str], Any] = {}
        self._arrays: dict[tuple[str, str, str], Any] = {}

    # ------------------------------------------------------------------ metadata

    def refresh(self) -> None:
        """Forget what this reader saw; the next read lists the zoo again (reading only new documents)."""
        self._v = None

    def _view(self):
        """The zoo as of the last refresh: index snapshot + commits it does not cover (``zoo.index``)."""
        if self._v is None:
            from zoo.index import View

            skip: set[str] = set()
            for attempt in range(4):  # bounded by attempts: with no snapshot, skip would never grow
                try:
                    self._v = View(self, skip)
                    break
                except FileNotFoundError:  # gc took that snapshot's files after it was listed
                    if attempt == 3:
                        raise
                    skip.add(self._last_snapshot)
        return self._v

    def __len__(self) -> int:
        return self._retry(lambda: self._view().count())

    def __contains__(self, ckpt_id: str) -> bool:
        return bool(self._retry(lambda: self._view().contains_many([ckpt_id])[0]))

    def ids(self, **filters) -> list[str]:
        """Ids of every entry (matching ``filters``, as ``query`` takes them), without reading records."""
        from zoo.filters import Filters

        return self._retry(lambda: self._view().ids(Filters(**filters) if filters else None))

    def query(self, arch: str | None = None, dataset: str | None = None, tag: str | None = None,
              metrics: Iterable[tuple[str, float | None, float | None]] = (), *, instruction: str | None = None,
              num_classes: int | None = None, input_shape=None, limit: int | None = None, offset: int = 0,
              **equals) -> list[dict]:
        """Records matching every filter, in commit order; ``metrics`` is (name, min, max) ranges
        (None = open); ``dataset`` matches exactly, or as a prefix when it ends with ``*``;
        ``instruction`` is a case-insensitive substring of one of the entry's instructions.
        Filters run on the index's columns; only the ``offset``/``limit`` page is read as records."""
        from zoo.filters import Filters

        f = Filters(arch, dataset, tag, metrics, instruction, num_classes, input_shape, **equals)
        places = self._retry(lambda: self._view().match(f))
        if f.equals:  # fields without a column: checked on the records themselves
            return [public(r) for r in self._records(places[:]) if f.keep(r)][offset:None if limit is None else offset + limit]
        page = places[offset:None if limit is None else offset + limit]
        return [public(r) for r in self._records(page)]

    def count(self, **filters) -> int:
        """How many entries ``query(**filters)`` returns, without reading their records."""
        from zoo.filters import Filters

        if not filters:
            return len(self)
        f = Filters(**filters)
        return len(self.query(**filters)) if f.equals else len(self._retry(lambda: self._view().match(f)))

    def _records(self, places) -> list[dict]:
        return self._retry(lambda: self._view().records(places)) if places else []

    def _retry(self, fn):
        """An index part can be reclaimed by gc after this reader listed the zoo: list again, once."""
        try:
            return fn()
        except FileNotFoundError:
            self.refresh()
            return fn()

    def get(self, ckpt_id: str) -> dict:
        """The record of ``ckpt_id`` (a unique prefix of at least 8 hex digits is enough)."""
        return public(self._resolve(ckpt_id))

    def _resolve(self, ckpt_id: str) -> dict:
        if not isinstance(ckpt_id, str) or not ckpt_id:
            raise ZooError(f"No checkpoint {ckpt_id!r} in zoo {self.url}")
        hits = self._retry(lambda: self._view().find(ckpt_id))
        if not hits and len(ckpt_id) >= 8 and all(c in "0123456789abcdefABCDEF" for c in ckpt_id):
            hits = self._retry(lambda: self._view().find(ckpt_id.lower(), prefix=True))
            if len(hits) > 1:
                raise ZooError(f"Checkpoint id prefix {ckpt_id!r} is ambiguous ({len(hits)} matches)")
        if not hits:
            raise ZooError(f"No checkpoint {ckpt_id!r} in zoo {self.url}")
        return self._records(hits[:1])[0]

    def _locate(self, ids: list[str]) -> list[dict]:
        """Records (with ``_loc``) of many ids at once, in order: one keys lookup, one read of the
        row groups that hold them. An id that is not a visible entry goes through ``_resolve``
        (a prefix, or the error that says it is not there)."""
        v = self._view()
        uniq = list(dict.fromkeys(ids))
        pos = v._positions(uniq)
        pos = pos[v.vis[pos]] if len(pos) else pos
        got = v._take(pos, ["id"])["id"].to_pylist() if len(pos) else []
        want = set(uniq)
        where = {i: ("index", int(q)) for q, i in zip(pos, got) if i in want}
        tail_ids = v.tail["id"].to_pylist()
        where.update({tail_ids[j]: ("tail", int(j)) for j in np.flatnonzero(v.tail_vis) if tail_ids[j] in want})
        found = [i for i in uniq if i in where]
        recs = dict(zip(found, v.records([where[i] for i in found], full=False)))
        return [recs[i] if i in recs else self._resolve(i) for i in ids]

    def snapshot_id(self) -> str:
        """Names exactly which commits a reader saw: generators record it as their training data."""
        return hashlib.sha256("\n".join(self._view().commits).encode()).hexdigest()[:16]

    def stats(self) -> dict:
        return {"url": self.url, **self._retry(lambda: self._view().stats()), "snapshot": self.snapshot_id()}

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

    def _open_arrays(self, cid: str, segs: list[str], names: list[str]) -> None:
        """Open every (segment, tensor) array not open yet, concurrently: one at a time, opening
        400 arrays for a stack of 1,000 rows over 100 segments took 0.24 s."""
        from zarr.api.asynchronous import open_array

        todo = [(seg, n) for seg in segs for n in names if (cid, seg, n) not in self._arrays]
        if not todo:
            return

        async def open_all():
            return await asyncio.gather(*(open_array(store=self.root.store, zarr_format=3, mode="r",
                                                     path=self._path(f"collections/{cid}/segments/{seg}/{n}"))
                                          for seg, n in todo))

        for (seg, n), a in zip(todo, sync(open_all())):
            self._arrays[(cid, seg, n)] = zarr.Array(a)

    def _still_there(self, cid: str, seg: str) -> bool:
        """Checked *after* a read: gc deletes a segment's zarr.json before its chunks, so if it is
        still there, every chunk read before it was intact (a deleted chunk reads as zeros)."""
        return self._exists(f"collections/{cid}/segments/{seg}/zarr.json")

    def _all_there(self, segs: list[tuple[str, str]]) -> list[bool]:
        """``_still_there`` of many segments, checked concurrently."""
        async def check():
            return await asyncio.gather(*((self.root.store_path / f"collections/{c}/segments/{s}/zarr.json").exists()
                                          for c, s in segs))

        return list(sync(check())) if len(segs) > 1 else [self._still_there(*x) for x in segs]

    def _forget(self) -> None:
        self._segments.clear()
        self._arrays.clear()
        self.refresh()

    def _read(self, what: str, read):
        """``read()`` -> (result, segments read); retried once on a fresh listing when a segment
        went away (gc compacted or reclaimed it after this reader listed the zoo)."""
        for _ in range(2):
            try:
                out, segs = read()
                if all(self._all_there(segs)):
                    return out
            except (KeyError, FileNotFoundError):
                pass
            self._forget()
        raise ZooError(f"{what}: its data is gone from {self.url} (removed and reclaimed by gc while being read?)")

    def load(self, ckpt_id: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """One checkpoint's tensors, bit-exact as ingested (lazy: only ``keys`` are read)."""
        keys = None if keys is None else list(keys)

        def read():
            cid, seg, row = self._locate([ckpt_id])[0]["_loc"]
            meta = self._segment(cid, seg).attrs["tensors"]
            unknown = sorted(set(keys or ()) - set(meta))
            if unknown:
                raise ZooError(f"checkpoint {ckpt_id} has no tensors {unknown[:5]}; it has {list(meta)[:10]}")
            names = list(meta) if keys is None else keys
            return {n: from_numpy(_rows(self._array(cid, seg, n), np.array([row]))[0], meta[n]["dtype"])
                    for n in names}, [(cid, seg)]

        return self._read(f"checkpoint {ckpt_id}", read)

    def read_tensor(self, name: str, ids: list[str]) -> torch.Tensor:
        """One tensor across many checkpoints, stacked (len(ids), *shape); one read per segment."""
        return self.stack(ids, [name])[name]

    def stack(self, ids: list[str], keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of many same-shape checkpoints, stacked along a new first axis in ``ids`` order.

        Each segment's rows are converted by the dtype they were stored in; rows of different
        dtypes come back in the promoted dtype (bf16 + fp32 -> fp32, exact)."""
        if not ids:
            raise ZooError("stack() needs at least one checkpoint id")
        keys = None if keys is None else list(keys)
        return self._read(f"stack of {len(ids)} checkpoints", lambda: self._stack(ids, keys))

    def _stack(self, ids: list[str], keys: list[str] | None):
        recs = self._locate(ids)
        colls = {r["_loc"][0] for r in recs}
        if len(colls) > 1:
            raise ZooError(f"stack() needs checkpoints of one architecture shape, got {sorted(colls)}")
        by_seg: dict[str, list[tuple[int, int]]] = {}
        for pos, r in enumerate(recs):
            by_seg.setdefault(r["_loc"][1], []).append((pos, r["_loc"][2]))
        cid = recs[0]["_loc"][0]
        segs = list(by_seg)
        metas = dict(zip(segs, (d["tensors"] for d in self._read_docs([f"collections/{cid}/segments/{s}" for s in segs]))))
        names = list(next(iter(metas.values()))) if keys is None else keys
        unknown = sorted({n for n in names for m in metas.values() if n not in m})
        if unknown:
            raise ZooError(f"no tensors {unknown[:5]} in these checkpoints")
        self._open_arrays(cid, segs, names)
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
                else:
                    block = _rows(arr, rows)
                parts.append((pos, from_numpy(block, metas[seg][n]["dtype"])))  # by *this* segment's dtype
            dtype = reduce(torch.promote_types, (t.dtype for _, t in parts))
            if len(parts) == 1 and (parts[0][0] == np.arange(len(recs))).all():
                out[n] = parts[0][1]  # one segment, asked in row order
                continue
            full = torch.empty((len(recs), *parts[0][1].shape[1:]), dtype=dtype)
            for pos, t in parts:
                full[torch.from_numpy(pos)] = t.to(dtype)
            out[n] = full
        return out, [(cid, seg) for seg in by_seg]

    # ------------------------------------------------------------------ writes

    def add(self, checkpoints: list[Checkpoint], *, validate: bool = True) -> dict[str, list[str]]:
        """Store checkpoints; returns {"ingested": ids, "duplicate": ids}. All-or-nothing per segment:
        nothing is visible until its commit is written, and invalid input raises before any write
        (metadata is always checked; tensors too unless ``validate=False``, for callers that did)."""
        if self.read_only:
            raise ZooError(f"Zoo {self.url} is open read-only")
        for c in checkpoints:
            problems = c.problems(tensors=validate)
            if problems:
                raise ZooError(f"checkpoint {c.source or c.id[:12]} is not a valid {c.arch}: {problems}")
        self.refresh()  # lists the zoo; reads only commit documents this Zoo has not read yet
        ids = [c.id for c in checkpoints]
        known = dict(zip(ids, self._retry(lambda: self._view().contains_many(ids))))
        fresh, dup, seen = [], [], set()
        for c in checkpoints:
            (dup if known[c.id] or c.id in seen else fresh).append(c)
            seen.add(c.id)
        groups: dict[tuple, list[Checkpoint]] = {}
        for c in fresh:
            sig = tuple((n, dtype_name(t.dtype)) for n, t in sorted(c.tensors.items()))
            groups.setdefault((collection_id(c.arch, c.num_classes, c.input_shape), sig), []).append(c)
        for (cid, _), group in groups.items():
            self._write_segment(cid, group)
        self.refresh()
        if fresh:
            from zoo.compact import maybe_fold

            maybe_fold(self)  # every FOLD_AT commits: the index keeps up, readers read a short tail
        return {"ingested": [c.id for c in fresh], "duplicate": [c.id for c in dup]}

    def _write_segment(self, cid: str, group: list[Checkpoint]) -> None:
        first = group[0]
        records = [c.record() for c in group]  # before any write: a bad value fails here, not after the data
        attrs = {"arch": first.arch, "num_classes": first.num_classes, "input_shape": list(first.input_shape),
                 "rows": len(group),
                 "tensors": {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in first.tensors.items()}}
        arrays = ((n, np.stack([to_numpy(c.tensors[n]) for c in group])) for n in first.tensors)  # one at a time
        self._write_rows(cid, new_segment_name(), attrs, arrays, records)

    def _write_rows(self, cid: str, seg: str, attrs: dict, arrays, records: list[dict],
                    orders: list[str] | None = None) -> None:
        """Lease, segment, commit, release: the write protocol ``zoo.gc`` relies on. ``orders``:
        each row's order key when rows are copied from other commits (``zoo.events``)."""
        lease_key = f"collections/{cid}/leases/{seg}"
        held = lease.new()
        self.root.create_group(lease_key, attributes=held)  # 1. before the segment exists
        try:
            g = self.root.create_group(f"collections/{cid}/segments/{seg}", attributes=attrs)  # 2. the data
            for n, data in arrays:
                rows = _chunk_rows(len(data), data[0].nbytes)
                arr = g.create_array(n, shape=data.shape, dtype=data.dtype, chunks=(rows, *data.shape[1:]),
                                     compressors=None, fill_value=0)
                arr[...] = data
                if lease.due(held):
                    self.root[lease_key].attrs.update(lease.renew(held))
            if not self._exists(f"{lease_key}/zarr.json"):  # 3. gc judged this writer dead: do not publish
                raise ZooError(f"the lease of segment {cid}/{seg} was reclaimed by gc while it was written "
                               f"(stalled longer than the lease TTL?); nothing was committed: run again")
            # 4. The commit: one document, written last. Until it exists the segment is invisible.
            try:
                doc = {"segment": seg, "records": records, "committed_at": time.time()}
                self.root.create_group(f"collections/{cid}/commits/{seg}",
                                       attributes=doc if orders is None else {**doc, "orders": orders})
            except ContainsGroupError:  # pragma: no cover - name has a random part
                raise ZooError(f"commit {seg} already exists") from None
        finally:
            self._delete_prefix(lease_key)  # 5. (a failed write leaves an unleased orphan for gc)

    def remove(self, ids: Iterable[str]) -> list[str]:
        """Hide checkpoints (``weightgen zoo rm``): one commit per collection that lists them as
        removed. Nothing is deleted here; ``gc`` reclaims their data later. Returns full ids."""
        from zoo.gc import remove

        return remove(self, ids)

    def gc(self, min_age_s: float = 3600.0, lease_ttl_s: float | None = None) -> list[str]:
        """Reclaim what no visible entry needs (see ``zoo.gc``); returns the deleted segment paths."""
        from zoo.gc import collect

        return collect(self, min_age_s, lease_ttl_s)["removed_segments"]


def _rows(arr, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]``: only those rows' bytes where the array is stored raw (``zoo.rows``)."""
    from zoo.rows import raw, take_rows

    return take_rows(arr, rows) if raw(arr) else arr.get_orthogonal_selection((rows,))


def open_zoo(url: str | None = None, mode: str = "a", storage_options: dict | None = None) -> Zoo:
    from weightgen.paths import default_zoo

    return Zoo(url or default_zoo(), mode=mode, storage_options=storage_options)
