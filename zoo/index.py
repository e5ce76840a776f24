"""The metadata index: what a reader sees without reading every commit document.

Layout, beside ``collections/`` (the commits stay the source of truth)::

    index/parts/<name>.parquet     immutable event tables (``zoo.events``), one Parquet file each
    index/parts/<name>.keys        their ids' first 64 bits, sorted, with row positions (lookups)
    index/parts/<snap>.visible     a bitmap: which events of the snapshot's parts are visible
    index/snapshots/<snap>         one document: its parts, the commits each covers, the bitmap
    index/leases/<snap>            held by the writer of a snapshot's files until its document exists

A reader takes the newest snapshot, lists the commits (names only), and reads just the commit
documents the snapshot does not cover (the *tail*). Events of commits that are gone since
(compaction merged them, gc dropped them) are excluded. Only ids the tail or the gone commits
touch are resolved again (``zoo.events.visible``), found through the sorted keys, so opening a
zoo costs a listing, one document, a bitmap and the tail, whatever the zoo's size (at 100k
checkpoints in 100 commits, reading every record took 3.0-3.4 s and ~570 MB). Queries read only
the columns they filter on (Parquet), records only for the rows they return. Snapshots are
written by ``zoo.compact`` (folded in by writers every ``FOLD_AT`` commits, and by ``zoo compact``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from zoo import events as ev
from zoo.filters import Filters, _np, _strings, open_filters
from zoo.records import ZooError

ROW_GROUP = 4096  # rows per Parquet row group: reading one record decodes its group (~2 MB of records)
CACHED_GROUPS = 8  # row groups of the record column kept per part: loads near each other share them


@dataclass
class Part:
    key: str
    rows: int
    offset: int  # of its first row in the snapshot's bitmap
    commits: list[str]
    _file: object = None
    _keys: tuple | None = None
    _cols: dict = field(default_factory=dict)
    _groups: dict = field(default_factory=dict)
    _filters: object = None  # its filters file (zoo.filters), False when it has none


class View:
    """One consistent reading of the zoo: snapshot parts + tail, with every event's visibility."""

    def __init__(self, zoo, skip: set[str] = frozenset()):
        self.zoo = zoo
        self.snapshot, doc = _newest_snapshot(zoo, skip)
        zoo._last_snapshot = self.snapshot
        offset, self.parts = 0, []
        for p in doc.get("parts", []):
            self.parts.append(Part(p["key"], p["rows"], offset, p["commits"]))
            offset += p["rows"]
        self.n_index = offset
        self.commits = zoo._list_commits()  # sorted "cid/name"
        listed = set(self.commits)
        covered = {c for p in self.parts for c in p.commits}
        self.absent = covered - listed  # commits deleted since the snapshot (compaction, gc)
        self.gone = self.absent - set(doc.get("dropped", []))  # ... and not yet accounted for in its bitmap
        tail = sorted((c for c in self.commits if c not in covered), key=_order_of)
        found = zoo._read_present([zoo._commit_path(k) for k in tail])
        self.unpublished = [k for k, d in zip(tail, found) if d is None]
        if self.unpublished:
            # A commit listed without its document was either deleted since the listing (a merge or gc,
            # whose replacement this listing may lack: read the zoo again) or never published (its writer
            # is renaming the document into place, or was killed first; gc removes those). Only the second
            # keeps the zoo's commits as they were: then it is skipped, as before its folder existed.
            again = zoo._list_commits()
            if set(again) - listed or set(self.unpublished) - set(again):
                raise FileNotFoundError(f"commits of {zoo.url} changed while it was read")
            skipped = set(self.unpublished)
            self.commits = [c for c in self.commits if c not in skipped]
        self.tail_keys, docs = [k for k, d in zip(tail, found) if d is not None], [d for d in found if d is not None]
        cache = zoo._tables  # a commit's events never change: a writer rebuilds only its new commits' tables
        for k, d in zip(self.tail_keys, docs):
            if k not in cache:
                cache[k] = ev.table([(k, d)])
        self.tail = ev.concat([cache[k] for k in self.tail_keys])
        for k in set(cache) - set(self.tail_keys):  # folded since: the index has them now
            del cache[k]
        self.vis = (np.unpackbits(np.frombuffer(zoo._get_bytes(doc["visible"]), np.uint8), count=offset).astype(bool)
                    if offset else np.zeros(0, bool))
        self.tail_vis = np.zeros(self.tail.num_rows, bool)
        self._matched: dict[tuple, Matches] = {}
        self._patch()

    # ------------------------------------------------------------------ building

    def _patch(self) -> None:
        """Resolve again the ids the tail or the gone commits touch; everything else keeps the snapshot's answer."""
        ids = set(self.tail["id"].to_pylist())
        for p in self.parts:
            if self.gone & set(p.commits):
                t = self._read(p, ["commit", "id"])
                hit = _strings(t["commit"], lambda a: pc.is_in(a, pa.array(sorted(self.gone))))
                self.vis[p.offset + np.flatnonzero(hit)] = False
                ids |= set(pc.filter(t["id"], pa.array(hit)).to_pylist())
        if not ids:
            return
        pos = self._positions(sorted(ids))  # index rows of these ids, visible or not
        t = self._take(pos, ["commit", "id", "order", "kind"])
        gone = np.isin(np.array(t["commit"].to_pylist(), object), list(self.absent)) if self.absent else np.zeros(len(pos), bool)
        all_ids = np.array(t["id"].to_pylist() + self.tail["id"].to_pylist(), object)
        orders = np.array(t["order"].to_pylist() + self.tail["order"].to_pylist(), object)
        kinds = np.concatenate([_np(t["kind"], 0), _np(self.tail["kind"], 0)]).astype(np.int8)
        commits = np.array(t["commit"].to_pylist() + self.tail["commit"].to_pylist(), object)
        v = ev.visible(all_ids, orders, kinds, excluded=np.r_[gone, np.zeros(self.tail.num_rows, bool)], commits=commits)
        self.vis[pos] = v[: len(pos)]
        self.tail_vis = v[len(pos):]

    def _file(self, p: Part):
        if p._file is None:
            p._file = pq.ParquetFile(self.zoo._open_file(p.key), read_dictionary=ev.DICT_COLUMNS)
        return p._file

    def _read(self, p: Part, columns: list[str]) -> pa.Table:
        """Whole columns of one part (cached: parts never change); filter columns from its
        filters file when it has one (``zoo.filters``: mapped, not decoded)."""
        if self._mapped(p, columns):
            return pa.table({c: p._cols[c] for c in columns}) if columns else pa.table({"_": pa.nulls(p.rows)})
        have = set(self._file(p).schema_arrow.names)
        missing = [c for c in columns if c not in p._cols and c in have]
        if missing:
            t = self._file(p).read(columns=missing)
            p._cols.update({c: t[c] for c in missing})
        cols = {c: p._cols[c] for c in columns if c in p._cols}
        return pa.table(cols) if cols else pa.table({"_": pa.nulls(p.rows)})

    def _mapped(self, p: Part, columns: list[str]) -> bool:
        """Whether all ``columns`` of ``p`` are at hand (cached, or in its filters file)."""
        if p._filters is None:
            p._filters = open_filters(self.zoo, p.key) or False
        if p._filters is not False:
            p._cols.update({c: p._filters[c] for c in columns if c not in p._cols and c in p._filters.column_names})
        return all(c in p._cols for c in columns)

    def _group(self, p: Part, g: int, columns: list[str]) -> pa.Table:
        key = (g, tuple(columns))
        hit = p._groups.pop(key, None)
        if hit is None:
            hit = self._file(p).read_row_group(g, columns=columns)
        p._groups[key] = hit  # most recently used last
        while len(p._groups) > CACHED_GROUPS:
            p._groups.pop(next(iter(p._groups)))
        return hit

    def _keys(self, p: Part) -> tuple[np.ndarray, np.ndarray]:
        if p._keys is None:  # parts never change: kept by the Zoo across refreshes (a writer's views share them)
            cache = self.zoo.__dict__.setdefault("_part_keys", {})
            if p.key not in cache:
                raw = self.zoo._get_bytes(p.key.removesuffix(".parquet") + ".keys")
                cache[p.key] = (np.frombuffer(raw, np.uint64, p.rows), np.frombuffer(raw, np.int32, p.rows, 8 * p.rows))
                for k in [k for k in cache if k not in {q.key for q in self.parts}]:
                    del cache[k]  # parts merged away since
            p._keys = cache[p.key]
        return p._keys

    def _positions(self, ids: list[str]) -> np.ndarray:
        """Global index positions whose id's first 64 bits match one of ``ids`` (a superset)."""
        want = np.unique(ev.id_prefix64(ids))
        out = []
        for p in self.parts:
            keys, rows = self._keys(p)
            lo, hi = np.searchsorted(keys, want, "left"), np.searchsorted(keys, want, "right")
            for a, b in zip(lo[hi > lo], hi[hi > lo]):
                out.append(p.offset + rows[a:b])
        return np.unique(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)

    def _take(self, pos: np.ndarray, columns: list[str]) -> pa.Table:
        """Rows at global positions ``pos`` (sorted), reading only the row groups that hold them."""
        pieces = []
        for p in self.parts:
            local = pos[(pos >= p.offset) & (pos < p.offset + p.rows)] - p.offset
            if not len(local):
                continue
            if self._mapped(p, columns):
                pieces.append(self._read(p, columns).take(pa.array(local)))
                continue
            rgs = np.unique(local // ROW_GROUP)
            t = pa.concat_tables([self._group(p, int(g), columns) for g in rgs])
            starts = np.searchsorted(rgs, local // ROW_GROUP) * ROW_GROUP
            pieces.append(t.take(pa.array(starts + local % ROW_GROUP)))
        pieces = [pa.table({c: x[c].cast(_plain(x[c].type)) for c in columns}) for x in pieces]
        return pa.concat_tables(pieces) if pieces else _empty(columns)

    # ------------------------------------------------------------------ reads

    def count(self) -> int:
        return int(self.vis.sum() + self.tail_vis.sum())

    def find(self, ckpt_id: str, prefix: bool = False) -> list[tuple[str, int]]:
        """Visible (where, position) of an id, or of every id starting with ``ckpt_id``: where is
        "index" (global position) or "tail" (tail row)."""
        hits = []
        if prefix:
            p16 = ckpt_id[:16].lower()
            lo = int(p16.ljust(16, "0"), 16)
            hi = int(p16.ljust(16, "f"), 16)
            pos = []
            for p in self.parts:
                keys, rows = self._keys(p)
                a, b = np.searchsorted(keys, np.uint64(lo), "left"), np.searchsorted(keys, np.uint64(hi), "right")
                pos.append(p.offset + rows[a:b])
            pos = np.unique(np.concatenate(pos)).astype(np.int64) if pos else np.zeros(0, np.int64)
        else:
            pos = self._positions([ckpt_id])
        pos = pos[self.vis[pos]] if len(pos) else pos
        if len(pos):
            got = self._take(pos, ["id"])["id"].to_pylist()
            hits += [("index", int(q)) for q, i in zip(pos, got) if (i.startswith(ckpt_id) if prefix else i == ckpt_id)]
        tail_ids = self.tail["id"].to_pylist()
        hits += [("tail", j) for j in np.flatnonzero(self.tail_vis)
                 if (tail_ids[j].startswith(ckpt_id) if prefix else tail_ids[j] == ckpt_id)]
        return hits

    def records(self, where: list[tuple[str, int]], full: bool = True) -> list[dict]:
        """Internal records (with ``_loc``) at these places, in the order given; ``full=False``:
        only ``_loc`` (tensor reads need no record: reading records decodes their row groups)."""
        cols = ["record", "cid", "seg", "row"] if full else ["cid", "seg", "row"]
        idx = np.array(sorted({q for w, q in where if w == "index"}), np.int64)
        got = self._take(idx, cols).to_pylist() if len(idx) else []
        by_pos = dict(zip(idx.tolist(), got))
        tail_rows = self.tail.select(cols).to_pylist() if any(w == "tail" for w, _ in where) else []
        out = []
        for w, q in where:
            r = by_pos[q] if w == "index" else tail_rows[q]
            out.append({**(json.loads(r["record"]) if full else {}), "_loc": (r["cid"], r["seg"], int(r["row"]))})
        return out

    def contains_many(self, ids: list[str]) -> np.ndarray:
        """Which of ``ids`` are visible entries."""
        found = set()
        pos = self._positions(ids) if ids else np.zeros(0, np.int64)
        pos = pos[self.vis[pos]] if len(pos) else pos
        if len(pos):
            found |= set(self._take(pos, ["id"])["id"].to_pylist())
        tail_ids = self.tail["id"].to_pylist()
        found |= {tail_ids[j] for j in np.flatnonzero(self.tail_vis)}
        return np.array([i in found for i in ids], bool)

    def match(self, f: Filters) -> "Matches":
        """Places of every visible entry matching ``f``, in commit order (index, then tail)."""
        key = f.key()
        if key not in self._matched:  # count() then query() of one filter: matched once
            cols = f.columns()
            pos = []
            for p in self.parts:
                vis = self.vis[p.offset:p.offset + p.rows]
                m = f.mask(self._read(p, cols), vis) if cols else vis
                pos.append(p.offset + np.flatnonzero(m))
            m = f.mask(self.tail, self.tail_vis) if cols else self.tail_vis
            self._matched[key] = Matches(np.concatenate(pos) if pos else np.zeros(0, np.int64), np.flatnonzero(m))
        return self._matched[key]

    def ids(self, f: Filters | None = None) -> list[str]:
        """Visible ids (matching ``f``), reading only the id column and the filtered ones."""
        if f is not None:
            m = self.match(f)
            tail = self.tail["id"].to_pylist()
            return (self._take(m.index, ["id"])["id"].to_pylist() if len(m.index) else []) + [tail[q] for q in m.tail]
        out = []
        for p in self.parts:
            vis = self.vis[p.offset:p.offset + p.rows]
            out += pc.filter(self._read(p, ["id"])["id"], pa.array(vis)).to_pylist()
        return out + pc.filter(self.tail["id"], pa.array(self.tail_vis)).to_pylist()

    def stats(self) -> dict:
        return {"checkpoints": self.count(), "commits": len(self.commits), "datasets": len(self.counts("dataset")),
                "by_arch": self.counts("arch"), "by_collection": self.counts("cid"),
                "index": {"snapshot": self.snapshot, "parts": len(self.parts), "rows": self.n_index,
                          "tail_commits": len(self.tail_keys)}}

    def counts(self, column: str) -> dict[str, int]:
        """Visible entries per value of a string column (arch, cid, dataset)."""
        out: dict[str, int] = {}
        for t, vis in [(self._read(p, [column]), self.vis[p.offset:p.offset + p.rows]) for p in self.parts] + \
                      [(self.tail, self.tail_vis)]:
            vc = pc.value_counts(pc.filter(t[column].combine_chunks(), pa.array(vis)).cast(pa.string()))
            for item in vc.to_pylist():
                out[item["values"]] = out.get(item["values"], 0) + item["counts"]
        return out

    def events(self, columns: list[str]) -> pa.Table:
        """Every event of a listed commit, with a ``visible`` column (gc, compaction)."""
        pieces = []
        for p in self.parts:
            t = self._read(p, columns + ["commit"])
            keep = ~_strings(t["commit"], lambda a: pc.is_in(a, pa.array(sorted(self.absent)))) if self.absent \
                else np.ones(p.rows, bool)
            t = pa.table({c: t[c].cast(_plain(t[c].type)) for c in columns})
            pieces.append(t.append_column("visible", pa.array(self.vis[p.offset:p.offset + p.rows])).filter(pa.array(keep)))
        t = self.tail.select([c for c in columns if c in self.tail.column_names])
        for c in columns:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.float64()))
        pieces.append(t.select(columns).append_column("visible", pa.array(self.tail_vis)))
        return pa.concat_tables([x.select(columns + ["visible"]) for x in pieces], promote_options="default")


class Matches:
    """Matching places as two position arrays (a million matches are not a million Python tuples):
    index positions, then tail rows. Indexing and slicing give ("index" | "tail", position) places."""

    def __init__(self, index: np.ndarray, tail: np.ndarray):
        self.index, self.tail = index.astype(np.int64), tail.astype(np.int64)

    def __len__(self) -> int:
        return len(self.index) + len(self.tail)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = k + len(self) if k < 0 else k
        return ("index", int(self.index[k])) if k < len(self.index) else ("tail", int(self.tail[k - len(self.index)]))

    def __iter__(self):
        return iter(self[:])


def _empty(columns: list[str]) -> pa.Table:
    return pa.table({c: pa.array([], _plain(ev.SCHEMA.field(c).type)) for c in columns})


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _order_of(key: str) -> str:
    cid, name = key.split("/", 1)
    return name + ev.ORDER_SEP + cid


def _newest_snapshot(zoo, skip) -> tuple[str | None, dict]:
    """(name, document) of the newest readable snapshot not in ``skip``; (None, {}) for a zoo
    without an index (every commit is then read: slower, never wrong). A snapshot deleted between
    the listing and the read (gc) is skipped for the next newest."""
    for name in sorted((n for n in zoo._list("index/snapshots") if n != "zarr.json" and n not in skip), reverse=True):
        try:
            return name, zoo._read_docs([f"index/snapshots/{name}"])[0]
        except (FileNotFoundError, KeyError, ZooError):
            continue
    return None, {}

