"""Zoo metadata as a table of *events*, and the rule that turns events into visible entries.

Every commit document is a list of events: an ``add`` per record (a row of a segment) or a
``remove`` per id (``zoo rm``). Each event carries an *order* key: its commit's ``name\\0cid``,
or, for rows that compaction or gc copied into a new commit, the order of the commit they came
from (the commit's ``orders`` list), so moving rows never changes which copy of an id wins.
The rule (the same one readers applied to commit documents before the index existed): in order,
a removal hides the id, and the first add after the last removal of an id is its visible row.

Events live in Arrow tables with one schema, whether they come from index parts (Parquet, see
``zoo.index``) or from commit documents not yet folded into the index, so one vectorized filter
serves both. ``visible`` resolves a whole table with a sort, never a Python loop over rows.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

ADD, REMOVE = 0, 1
ORDER_SEP = "\x00"
DICT_COLUMNS = ["commit", "cid", "seg", "arch", "dataset", "shape"]  # low-cardinality strings
SCHEMA = pa.schema([
    ("commit", pa.string()), ("order", pa.string()), ("kind", pa.int8()), ("id", pa.string()),
    ("cid", pa.string()), ("seg", pa.string()), ("row", pa.int32()), ("committed_at", pa.float64()),
    ("arch", pa.string()), ("dataset", pa.string()), ("num_classes", pa.int32()), ("shape", pa.string()),
    ("tags", pa.list_(pa.string())), ("instructions", pa.list_(pa.string())), ("record", pa.string()),
])
METRIC_PREFIX = "m:"  # one float64 column per metric name: range filters read only that column


def commit_time(name: str) -> float | None:
    """Seconds since the epoch from a segment or commit name (``<20-digit ns>-<random>``)."""
    head = name.split("-", 1)[0]
    return int(head) / 1e9 if len(head) == 20 and head.isdigit() else None


def doc_events(key: str, attrs: dict) -> dict[str, list]:
    """Columns (a dict of lists, ``SCHEMA`` plus metric columns) of one commit document's events."""
    cid, name = key.split("/", 1)
    own = name + ORDER_SEP + cid
    at = attrs.get("committed_at") or commit_time(name) or 0.0
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    metrics: dict[str, list] = {}
    recs = attrs.get("records") or []
    orders = attrs.get("orders") or [own] * len(recs)
    removed = attrs.get("removed") or []
    n = len(recs) + len(removed)
    for i, r in enumerate(recs):
        _append(cols, commit=key, order=orders[i], kind=ADD, id=r["id"], cid=cid, seg=attrs["segment"], row=i,
                committed_at=at, arch=r.get("arch"), dataset=r.get("dataset"), num_classes=r.get("num_classes"),
                shape="x".join(str(s) for s in r.get("input_shape") or []), tags=list(r.get("tags") or []),
                instructions=list(r.get("instructions") or []), record=json.dumps(r))
        for m, v in (r.get("metrics") or {}).items():
            metrics.setdefault(m, [None] * n)[i] = float(v) if isinstance(v, (int, float)) else None
    for ckpt_id in removed:
        _append(cols, commit=key, order=own, kind=REMOVE, id=ckpt_id, cid=cid, seg=None, row=-1, committed_at=at,
                arch=None, dataset=None, num_classes=None, shape=None, tags=None, instructions=None, record=None)
    cols.update({METRIC_PREFIX + m: v for m, v in metrics.items()})
    return cols


def _append(cols: dict, **values) -> None:
    for k, v in values.items():
        cols[k].append(v)


def table(docs: list[tuple[str, dict]]) -> pa.Table:
    """Events of many commit documents, in the order given."""
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    n = 0
    for key, attrs in docs:
        ev = doc_events(key, attrs)
        k = len(ev["id"])
        for name, vals in ev.items():
            cols.setdefault(name, [None] * n).extend(vals)
        for name in cols:
            if name not in ev:
                cols[name].extend([None] * k)
        n += k
    arrays = {f.name: pa.array(cols.pop(f.name), type=f.type) for f in SCHEMA}
    arrays.update({m: pa.array(v, type=pa.float64()) for m, v in sorted(cols.items())})
    return pa.table(arrays)


def concat(tables: list[pa.Table]) -> pa.Table:
    """One table; metric columns missing from some are null there."""
    tables = [t for t in tables if t is not None]
    if not tables:
        return table([])
    return pa.concat_tables(tables, promote_options="default")


def id_prefix64(ids) -> np.ndarray:
    """The first 16 hex digits of each id as uint64: ids are sha256, so this sorts and searches
    like the id itself (an equal prefix is checked against the full id by the caller)."""
    ids = list(ids)
    if not ids:
        return np.zeros(0, np.uint64)
    return np.frombuffer(bytes.fromhex("".join(i[:16].ljust(16, "0") for i in ids)), ">u8").astype(np.uint64)


def visible(ids: np.ndarray, orders: np.ndarray, kinds: np.ndarray, excluded: np.ndarray | None = None,
            commits: np.ndarray | None = None) -> np.ndarray:
    """Which events are visible entries: per id, the first add after its last removal, in order.
    Equal orders are a row and its copies (compaction, gc and writers' merges copy rows with their
    order): the copy in the newest commit (``commits``, commit keys) wins, then the earlier
    position. Why newest: a merge publishes its copy, then deletes the source; had the source
    won, gc would see the copy as a hidden duplicate and drop it while the merger dropped the
    source, and the entry was gone (found by writers merging beside gc). ``ids``, ``orders`` and
    ``commits`` are comparable keys (codes or strings); ``excluded`` rows take no part."""
    n = len(ids)
    out = np.zeros(n, bool)
    if n == 0:
        return out
    keep = np.arange(n) if excluded is None else np.flatnonzero(~excluded)
    if len(keep) == 0:
        return out
    _, id_code = np.unique(ids[keep], return_inverse=True)
    _, ord_code = np.unique(orders[keep], return_inverse=True)
    newest = np.zeros(len(keep), np.int64)
    if commits is not None:
        newest = -np.unique(commits[keep], return_inverse=True)[1].astype(np.int64)
    idx = np.lexsort((np.arange(len(keep)), newest, ord_code, id_code))  # id, order, newest commit, position
    g, k = id_code[idx], kinds[keep][idx]
    m = len(idx)
    start = np.r_[True, g[1:] != g[:-1]]
    gid = np.cumsum(start) - 1
    gstart = np.flatnonzero(start)
    gend = np.r_[gstart[1:], m] - 1
    pos = np.arange(m)
    last_rm = np.maximum.accumulate(np.where(k == REMOVE, pos, -1))[gend]
    last_rm = np.where(last_rm >= gstart, last_rm, -1)  # per group: its last removal, or -1
    elig = np.flatnonzero((k == ADD) & (pos > last_rm[gid]))
    first = elig[np.r_[True, gid[elig][1:] != gid[elig][:-1]]] if len(elig) else elig
    out[keep[idx[first]]] = True
    return out
