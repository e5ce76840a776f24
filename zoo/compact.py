"""Keeping a zoo of many commits fast: folding commits into the index, merging small segments.

**Folding** (``fold``) writes a new index snapshot (``zoo.index``) that covers every listed
commit: the previous snapshot's parts, plus one part holding the tail's events, plus a bitmap of
what is visible. Writers fold after their commit once the tail is ``FOLD_AT`` commits or ``FOLD_ROWS``
rows long, so readers never read more than that many commit documents or records. Parts are merged like a binary counter
(the last two while the older is not larger), so a zoo of N rows has O(log N) parts and every
row is rewritten O(log N) times. ``full=True`` (``weightgen zoo compact``) rewrites them as one.

**Merging segments** (``compact``): commits of fewer than ``SMALL_ROWS`` rows in a collection
are copied, visible rows only, into segments of up to ``TARGET_BYTES``; each merged segment is
published like any write (lease, segment, commit) and its commit lists every row's original
order (``zoo.events``), so which copy of an id wins never changes. Only then are the source
commit documents deleted; their segments become garbage that ``gc`` reclaims after
``--min-age`` (a reader that listed them still finds them). 10,000 commits of 10 rows made a
stack of 1,000 rows open up to 1,000 segments.

**Writers merge too** (``merge_tiers``, run before each fold): once ``MERGE_FANOUT`` commits of
fewer than ``WRITER_SMALL_ROWS`` rows of one collection fall in the same size tier (rows within a
factor of ``MERGE_FANOUT``), the writer that folds merges them, so commits of 10 rows become
commits of ~320, then ~2,560, and a zoo written by 10,000 jobs of 10 holds tens of commits, not
10,000, before anyone runs ``zoo compact`` (measured: listing 10,000 commit names on every write
made ingest 4x slower by the end, and a stack of 1,000 rows opened ~1,000 segments). Each row is
rewritten twice.

**Why this is safe under kill -9 and concurrent writers.** Every file either is written under a
lease before the one document that publishes it (a segment before its commit, index parts and
bitmap before their snapshot), or is a document written whole. Killed before the document, the
files are an unleased orphan for gc; killed after it, the merged rows and their sources are both
published with equal orders, and readers take the copy in the newest commit (``zoo.events``;
same content, same record), so gc may drop the sources but never the copy. A merge deletes only
commits it copied (or whose rows another copy already holds); two merges of the same commits at
once at worst copy the same rows twice. Any snapshot is a correct view by itself (readers re-read
what it misses), so concurrent folds need no lock.
"""
from __future__ import annotations

import io
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from zoo import events as ev
from zoo import lease
from zoo.filters import SUFFIX, _strings, filters_bytes
from zoo.index import ROW_GROUP
from zoo.records import ZooError, checkpoint_id, from_numpy, new_segment_name

FOLD_AT = 32  # tail commits before a writer folds them into the index
FOLD_ROWS = 4096  # or tail rows: parsing 10,000 records of commit JSON costs a reader ~0.3 s
SMALL_ROWS = 1024  # a commit with fewer rows is merged by `compact`
TARGET_BYTES = 256 << 20  # of one merged segment
MERGE_FANOUT = 8  # small commits of one size tier a writer merges at once
WRITER_SMALL_ROWS = 512  # writers merge commits below this: 10 -> 320 -> 2,560 rows; a job's 1,000 rows are left
# alone (on the S3 test server, merging every 8 commits of 1,000 made ingest fall from 1,161 to 179 ckpt/s)


def maybe_fold(zoo) -> None:
    """Merge small commits' tiers and fold when the tail is long; a failure here never fails the
    write that already committed."""
    try:
        v = zoo._view()
        if not (len(v.tail_keys) >= FOLD_AT or v.tail.num_rows >= FOLD_ROWS):
            return
    except Exception as e:  # noqa: BLE001 - the data is committed; the next writer or `zoo compact` folds
        warnings.warn(f"zoo index not updated ({type(e).__name__}: {e}); readers read the commits instead")
        return
    try:
        if merge_tiers(zoo, MERGE_FANOUT, WRITER_SMALL_ROWS):  # read here, so tests can lower them
            zoo.refresh()
    except Exception as e:  # noqa: BLE001 - merging is an optimisation: the next fold tries again
        zoo.refresh()
        warnings.warn(f"small commits not merged ({type(e).__name__}: {e}); `weightgen zoo compact` merges them")
    try:
        fold(zoo)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"zoo index not updated ({type(e).__name__}: {e}); readers read the commits instead")


def _write_part(zoo, key: str, t: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=ROW_GROUP, compression="zstd")
    zoo._set_bytes(key, buf.getvalue())
    ids = ev.id_prefix64(t["id"].to_pylist())
    order = np.argsort(ids, kind="stable")
    zoo._set_bytes(key.removesuffix(".parquet") + ".keys", ids[order].tobytes() + order.astype(np.int32).tobytes())
    zoo._set_bytes(key.removesuffix(".parquet") + SUFFIX, filters_bytes(t))


def fold(zoo, full: bool = False) -> dict:
    """Write a snapshot covering every commit listed now; ``full``: as one part, without the
    events of commits that are gone. Returns {"snapshot", "parts", "rows", "folded"}."""
    if zoo.read_only:
        raise ZooError(f"Zoo {zoo.url} is open read-only")
    name = new_segment_name()
    lease_key = f"index/leases/{name}"
    zoo.root.create_group(lease_key, attributes=lease.new())  # before reading the snapshot it builds on (gc)
    try:
        zoo.refresh()
        v = zoo._view()
        if not (full or v.tail_keys or v.gone):
            return {"snapshot": v.snapshot, "parts": len(v.parts), "rows": v.n_index, "folded": 0}
        parts = [{"key": p.key, "rows": p.rows, "commits": p.commits, "vis": v.vis[p.offset:p.offset + p.rows],
                  "part": p} for p in v.parts]
        if v.tail_keys:
            parts.append({"key": None, "rows": v.tail.num_rows, "commits": v.tail_keys, "vis": v.tail_vis,
                          "table": v.tail})
        gone = sorted(v.absent)
        k = 0
        if full and parts:
            parts = [_merge(v, parts, gone)]
        while not full and len(parts) >= 2 and parts[-2]["rows"] <= parts[-1]["rows"]:
            parts[-2:] = [_merge(v, parts[-2:], gone)]  # rows of commits merged away since are left out
        for p in parts:
            if p["key"] is None:
                p["key"] = f"index/parts/{name}.{k}.parquet"
                k += 1
                _write_part(zoo, p["key"], p["table"])
        vis = np.concatenate([p["vis"] for p in parts]) if parts else np.zeros(0, bool)
        zoo._set_bytes(f"index/parts/{name}.visible", np.packbits(vis).tobytes())
        if not zoo._exists(f"{lease_key}/zarr.json"):
            raise ZooError(f"the lease of index snapshot {name} was reclaimed by gc while it was written; run again")
        covered = {c for p in parts for c in p["commits"]}
        zoo.root.create_group(f"index/snapshots/{name}", attributes={
            "format": 1, "parts": [{"key": p["key"], "rows": p["rows"], "commits": p["commits"]} for p in parts],
            "visible": f"index/parts/{name}.visible", "count": int(vis.sum()), "created_at": time.time(),
            "dropped": sorted(set(gone) & covered)})
        if not all(zoo._exists(p["key"]) for p in parts):  # a part of the base reclaimed meanwhile: withdraw
            zoo._delete_prefix(f"index/snapshots/{name}")
            raise ZooError(f"a part of index snapshot {name} was reclaimed by gc while it was written; run again")
    finally:
        zoo._delete_prefix(lease_key)
    zoo.refresh()
    return {"snapshot": name, "parts": len(parts), "rows": len(vis), "folded": len(v.tail_keys)}


def _merge(v, parts: list[dict], gone: list[str]) -> dict:
    """One part from several (in order); rows of ``gone`` commits are left out."""
    tables, vis = [], []
    for p in parts:
        t = p.get("table")
        if t is None:
            t = pq.read_table(v.zoo._open_file(p["key"]))
        keep = np.ones(t.num_rows, bool)
        if gone:
            keep = ~pc.is_in(t["commit"], pa.array(gone)).fill_null(False).to_numpy(zero_copy_only=False)
        tables.append(t.filter(pa.array(keep)) if not keep.all() else t)
        vis.append(p["vis"][keep])
    t = ev.concat(tables)
    commits = sorted({c for p in parts for c in p["commits"]} - set(gone))
    return {"key": None, "rows": t.num_rows, "commits": commits, "vis": np.concatenate(vis), "table": t}


def compact(zoo, small_rows: int = SMALL_ROWS, target_bytes: int = TARGET_BYTES) -> dict:
    """Merge small commits' segments, then fold everything into one index part (see the module
    docstring). Returns {"merged_commits", "new_segments", "index": fold's report}."""
    if zoo.read_only:
        raise ZooError(f"Zoo {zoo.url} is open read-only")
    zoo.refresh()
    v = zoo._view()
    sizes = _commit_rows(v)
    small = [k for k, n in sizes.items() if n < small_rows]
    report = _merge_groups(zoo, v, small, lambda k: 0, 1, target_bytes)
    report["index"] = fold(zoo, full=True)
    return report


def merge_tiers(zoo, fanout: int = MERGE_FANOUT, small_rows: int = SMALL_ROWS,
                target_bytes: int = TARGET_BYTES) -> list[str]:
    """Writer-side compaction (module docstring): merge the small commits of every size tier that
    holds at least ``fanout`` of one collection. Returns the new segments ("cid/seg")."""
    zoo.refresh()
    v = zoo._view()
    sizes = _commit_rows(v)

    def tier(k: str) -> int:  # floor(log_fanout(rows)), in integers
        n, t = sizes[k], 0
        while n >= fanout:
            n, t = n // fanout, t + 1
        return t

    tiers: dict[tuple[str, int], list[str]] = {}
    for k, n in sizes.items():
        if n < small_rows:
            tiers.setdefault((k.split("/")[0], tier(k)), []).append(k)
    todo = [k for ks in tiers.values() if len(ks) >= fanout for k in ks]
    return _merge_groups(zoo, v, todo, tier, fanout, target_bytes)["new_segments"] if todo else []


def _commit_rows(v) -> dict[str, int]:
    """Rows (add events, visible or not) of every commit the view lists, counted on the index's
    dictionary codes: no string per row is made."""
    out: dict[str, int] = {}
    for t in [v._read(p, ["commit", "kind"]) for p in v.parts] + [v.tail]:
        if not t.num_rows:
            continue
        adds = pc.filter(t["commit"], pc.equal(t["kind"], ev.ADD))
        for item in pc.value_counts(adds).to_pylist():
            out[item["values"]] = out.get(item["values"], 0) + item["counts"]
    listed = set(v.commits)
    return {k: n for k, n in out.items() if k in listed}


def _alive(v, keys: list[str]) -> dict[str, np.ndarray]:
    """Rows of these commits that hold visible entries (only their parts are read)."""
    want = set(keys)
    if not want:
        return {}
    sources = [(v._read(p, ["commit", "kind", "row"]), v.vis[p.offset:p.offset + p.rows]) for p in v.parts
               if want & set(p.commits)] + [(v.tail, v.tail_vis)]
    out: dict[str, list] = {k: [] for k in keys}
    for t, vis in sources:
        if not t.num_rows:
            continue
        named = _strings(t["commit"], lambda a: pc.is_in(a, pa.array(sorted(want), pa.string())))
        hit = vis & (t["kind"].to_numpy() == ev.ADD) & named
        sel = pa.array(hit)
        for k, r in zip(pc.filter(t["commit"], sel).to_pylist(), pc.filter(t["row"], sel).to_numpy()):
            out[k].append(r)
    return {k: np.sort(np.array(r, np.int64)) for k, r in out.items()}


def _merge_groups(zoo, v, keys: list[str], tier, min_members: int, target_bytes: int) -> dict:
    """Merge ``keys`` commits, grouped by collection, tensor layout and ``tier(key)``, oldest first,
    in batches of up to ``target_bytes``; groups of fewer than ``min_members`` are left alone."""
    keys = sorted(keys, key=lambda k: k.split("/", 1)[1])
    docs = dict(zip(keys, zoo._read_present([zoo._commit_path(k) for k in keys])))
    keys = [k for k in keys if docs[k] is not None]  # merged away by another writer since the listing
    seg_meta = dict(zip(keys, zoo._read_present([f"collections/{k.split('/')[0]}/segments/{docs[k]['segment']}"
                                                   for k in keys])))
    keys = [k for k in keys if seg_meta[k] is not None]
    groups: dict[tuple, list[str]] = {}
    for k in keys:
        groups.setdefault((k.split("/")[0], repr(sorted(seg_meta[k]["tensors"].items())), tier(k)), []).append(k)
    groups = {g: ks for g, ks in groups.items() if len(ks) >= min_members}
    alive = _alive(v, [k for ks in groups.values() for k in ks])
    report = {"merged_commits": 0, "new_segments": []}
    for (cid, _, _), members in groups.items():
        meta = seg_meta[members[0]]
        row_bytes = sum(int(np.prod(x["shape"])) * np.dtype(_storage(x["dtype"])).itemsize
                        for x in meta["tensors"].values())
        batch, n = [], 0
        for k in members + [None]:
            if k is None or (batch and (n + len(alive[k])) * row_bytes > target_bytes):
                if len(batch) > 1 or (batch and len(batch[0][1]) < len(docs[batch[0][0]]["records"])):
                    report["new_segments"].append(_merge_segments(zoo, cid, meta, batch, docs))
                    report["merged_commits"] += len(batch)
                batch, n = [], 0
            if k is not None:
                batch.append((k, alive[k]))
                n += len(alive[k])
    return report


def _storage(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def _merge_segments(zoo, cid: str, meta: dict, batch: list[tuple[str, np.ndarray]], docs: dict) -> str:
    """Copy the visible rows of ``batch`` commits into one new segment + commit, then delete the
    source commit documents (their segments are left to gc)."""
    records, orders = [], []
    for k, alive in batch:
        d = docs[k]
        own = k.split("/", 1)[1] + ev.ORDER_SEP + cid
        records += [d["records"][i] for i in alive]
        orders += [(d.get("orders") or [own] * len(d["records"]))[i] for i in alive]

    data = {}
    for name in meta["tensors"]:
        parts = []
        for k, alive in batch:
            if len(alive):
                arr = zoo.root[f"collections/{cid}/segments/{docs[k]['segment']}/{name}"]
                parts.append(arr[...][alive] if len(alive) * 2 >= arr.shape[0] else arr.get_orthogonal_selection((alive,)))
        data[name] = np.concatenate(parts) if parts else None
    # a segment deleted while it was read reads as zeros: check they are all still there, and that
    # every copied row still hashes to its id, before anything is published
    if not all(zoo._still_there(cid, docs[k]["segment"]) for k, _ in batch):
        raise ZooError(f"a segment of {cid} was reclaimed while it was merged; nothing was published: run again")
    for i, r in enumerate(records):
        got = checkpoint_id({n: from_numpy(data[n][i], x["dtype"]) for n, x in meta["tensors"].items()})
        if got != r["id"]:
            raise ZooError(f"row of {r['id'][:12]} in {cid} does not hash to its id ({got[:12]}); nothing was published")
    seg = new_segment_name()
    if records:
        zoo._write_rows(cid, seg, {**meta, "rows": len(records)}, iter(data.items()), records, orders)
    for k, _ in batch:  # after the merged commit: a kill -9 in between leaves both, never neither
        zoo._delete_prefix(zoo._commit_path(k))
    return f"{cid}/{seg}"
