"""Reclaiming space without losing an entry: ``weightgen zoo rm`` and ``weightgen zoo gc``.

**Why gc is safe at any ``--min-age``.** A writer (``Zoo._write_rows``) creates its lease, then
its segment, then its commit, then releases the lease. ``collect`` lists, per zoo, all segments,
then all leases, then all commits, in that order. Take a segment it listed: its lease was created
before it, so when the leases are listed the lease is either there — and the segment is kept
while ``zoo.lease.dead`` cannot prove the writer dead — or already released, which a writer does
only after writing the commit, which the commit listing that follows then sees. So a segment
with neither a lease nor a commit belongs to a writer that died. (Before leases existed,
``gc --min-age 0`` deleted segments of live writers: 2,000 listed entries lost their data while
an ingest ran.) ``min_age_s`` still applies, for writers of versions without leases, and is the
grace period a reader that listed the zoo earlier gets before removed entries' data goes.

**Removal.** ``remove`` writes a commit ``{"removed": [ids]}``; readers apply commits in time
order, so it hides those ids from every earlier commit. ``collect`` then drops a commit none of
whose rows is visible (removed, or a duplicate of an id another commit holds) once the events
that hid them are ``min_age_s`` old; a commit with some visible rows left is compacted first:
those rows are copied, under the same lease protocol, into a new segment named with the old
one's time, so commit order and "first commit wins" do not change.

**Deleting a segment** removes its ``zarr.json`` first, then the chunks. A reader checks that
``zarr.json`` after reading (a missing chunk reads as zeros in Zarr), so it never returns data
from a half-deleted segment: it re-lists the zoo and reads the entry where it is now.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np

from zoo import lease
from zoo.events import ORDER_SEP, REMOVE
from zoo.events import commit_time as _time
from zoo.records import ZooError, new_segment_name


def remove(zoo, ids: Iterable[str]) -> list[str]:
    """Hide checkpoints from every reader; nothing is deleted (``collect`` reclaims it later)."""
    if zoo.read_only:
        raise ZooError(f"Zoo {zoo.url} is open read-only")
    zoo.refresh()
    recs = [zoo._resolve(i) for i in ids]  # an unknown id fails before anything is written
    by_coll: dict[str, set[str]] = {}
    for r in recs:
        by_coll.setdefault(r["_loc"][0], set()).add(r["id"])
    name = new_segment_name()
    for cid, hidden in sorted(by_coll.items()):
        zoo.root.create_group(f"collections/{cid}/commits/{name}", attributes={
            "segment": None, "records": [], "removed": sorted(hidden), "committed_at": time.time()})
    zoo.refresh()
    return list(dict.fromkeys(r["id"] for r in recs))


def _lease_attrs(zoo, key: str) -> dict:
    try:
        return zoo.root[key].attrs.asdict()
    except Exception:  # noqa: BLE001 - half-written or vanished: judged by the segment's age instead
        return {}


def _delete_segment(zoo, cid: str, seg: str) -> None:
    base = f"collections/{cid}/segments/{seg}"
    zoo._delete_key(f"{base}/zarr.json")  # first: readers check it after reading
    zoo._delete_prefix(base)


def _compact(zoo, cid: str, seg: str, attrs: dict, alive: list[int]) -> str:
    """Copy the visible rows of a commit into a new segment + commit that keeps their order keys."""
    g = zoo.root[f"collections/{cid}/segments/{seg}"]
    meta = g.attrs.asdict()
    rows = np.array(alive)
    arrays = ((n, g[n].get_orthogonal_selection((rows,))) for n in meta["tensors"])  # storage dtype, bit-exact
    own = f"{seg}{ORDER_SEP}{cid}"
    orders = [(attrs.get("orders") or [own] * len(attrs["records"]))[i] for i in alive]
    new = new_segment_name()
    zoo._write_rows(cid, new, {**meta, "rows": len(alive)}, arrays, [attrs["records"][i] for i in alive], orders)
    return new


def collect(zoo, min_age_s: float = 3600.0, lease_ttl_s: float | None = None) -> dict:
    """Delete what no visible entry needs; see the module docstring for why this never loses one.

    Returns ``{"removed_segments", "dropped_commits", "compacted", "kept_leased", "removed_index",
    "removed_unpublished"}`` (paths)."""
    if zoo.read_only:
        raise ZooError(f"Zoo {zoo.url} is open read-only")
    if isinstance(min_age_s, bool) or not isinstance(min_age_s, (int, float)) or not math.isfinite(min_age_s) \
            or min_age_s < 0:
        raise ZooError(f"gc min age must be a finite number of seconds >= 0, got {min_age_s!r}")
    ttl = lease.ttl() if lease_ttl_s is None else float(lease_ttl_s)
    now = time.time()
    report: dict[str, list[str]] = {"removed_segments": [], "dropped_commits": [], "compacted": [], "kept_leased": [],
                                    "removed_index": [], "removed_unpublished": []}
    cids = sorted(c for c in zoo._list("collections") if c != "zarr.json")
    # 1. segments, 2. leases, 3. commits: this order is what makes the lease protocol safe
    segments = {cid: [s for s in zoo._list(f"collections/{cid}/segments") if s != "zarr.json"] for cid in cids}
    leases = {(cid, s): _lease_attrs(zoo, f"collections/{cid}/leases/{s}") for cid in cids
              for s in zoo._list(f"collections/{cid}/leases") if s != "zarr.json"}
    zoo.refresh()
    ev_t = zoo._view().events(["commit", "kind", "id", "cid", "seg", "row", "committed_at"]).to_pydict()
    unpublished = set(zoo._view().unpublished)  # commit folders whose document never landed

    committed_at: dict[str, float] = {}
    shown_since: dict[str, float] = {}
    hidden_since: dict[str, float] = {}
    by_commit: dict[str, list[int]] = {}
    for i, (c, kind, ckpt_id, at, vis) in enumerate(zip(ev_t["commit"], ev_t["kind"], ev_t["id"], ev_t["committed_at"],
                                                         ev_t["visible"])):
        committed_at[c] = at or now
        if kind == REMOVE:
            hidden_since[ckpt_id] = max(hidden_since.get(ckpt_id, 0.0), at or now)
            continue
        by_commit.setdefault(c, []).append(i)
        if vis:
            shown_since[ckpt_id] = at or now

    keep: set[tuple[str, str]] = set()
    for c, idx in by_commit.items():
        cid, _ = c.split("/", 1)
        seg = ev_t["seg"][idx[0]]
        alive = [ev_t["row"][i] for i in idx if ev_t["visible"][i]]
        last = max([committed_at[c]] + [max(hidden_since.get(ev_t["id"][i], 0.0), shown_since.get(ev_t["id"][i], 0.0))
                                        for i in idx])
        if len(alive) == len(idx) or now - last < min_age_s:
            keep.add((cid, seg))
            continue
        if alive:
            attrs = zoo._read_docs([zoo._commit_path(c)])[0]
            report["compacted"].append(f"{cid}/{seg} -> {_compact(zoo, cid, seg, attrs, sorted(alive))}")
        zoo._delete_prefix(zoo._commit_path(c))
        report["dropped_commits"].append(c)

    for cid, names in segments.items():
        for seg in sorted(names):
            born = _time(seg)
            if (cid, seg) in keep or born is None:  # referenced, or not a name this code writes
                continue
            if (cid, seg) in leases:
                why = lease.dead(leases[(cid, seg)], since=born, now=now, ttl_s=ttl)
                if why is None:
                    report["kept_leased"].append(f"{cid}/{seg}")
                    continue
            if now - born < min_age_s:
                continue
            zoo._delete_prefix(f"collections/{cid}/leases/{seg}")  # the lease first: its writer must not commit
            if f"{cid}/{seg}" in unpublished:  # its writer died inside the commit step (kill -9 mid-rename)
                zoo._delete_prefix(zoo._commit_path(f"{cid}/{seg}"))
                report["removed_unpublished"].append(f"{cid}/{seg}")
            _delete_segment(zoo, cid, seg)
            report["removed_segments"].append(f"{cid}/{seg}")
    for (cid, seg), attrs in leases.items():  # leases whose writer died before its segment, or after its commit
        if seg not in segments.get(cid, []) or (cid, seg) in keep:
            if lease.dead(attrs, since=_time(seg) or now, now=now, ttl_s=ttl):
                zoo._delete_prefix(f"collections/{cid}/leases/{seg}")
    if report["dropped_commits"]:  # readers would otherwise re-resolve the dropped commits' ids on every open
        from zoo.compact import fold

        fold(zoo)
    report["removed_index"] = _collect_index(zoo, min_age_s, ttl, now)
    zoo.refresh()
    return report


def _collect_index(zoo, min_age_s: float, ttl: float, now: float) -> list[str]:
    """Index snapshots but the newest (and any younger than ``min_age_s``), and the part files no
    remaining snapshot names; nothing while a fold holds a live lease (a fold takes its lease before
    it reads the snapshot it builds on, and reuses that snapshot's parts). Parts, leases, snapshots
    are listed in that order, for the same reason as segments (``zoo.compact`` writes the other way);
    a fold that still finds a part of its snapshot gone withdraws the snapshot (readers skip it)."""
    files = [f for f in zoo._list("index/parts") if f != "zarr.json"]
    leases = {s: _lease_attrs(zoo, f"index/leases/{s}") for s in zoo._list("index/leases") if s != "zarr.json"}
    snaps = sorted((s for s in zoo._list("index/snapshots") if s != "zarr.json"), reverse=True)
    removed, kept = [], []
    if any(lease.dead(a, since=_time(s) or now, now=now, ttl_s=ttl) is None for s, a in leases.items()):
        return removed  # a fold is running: the snapshot it builds on, and its parts, must stay
    for i, s in enumerate(snaps):
        if i == 0 or now - (_time(s) or now) < min_age_s:
            kept.append(s)
        else:
            zoo._delete_prefix(f"index/snapshots/{s}")
            removed.append(f"index/snapshots/{s}")
    named = set()
    for doc in zoo._read_docs([f"index/snapshots/{s}" for s in kept]):
        named |= {p["key"].rsplit("/", 1)[1].removesuffix(".parquet") for p in doc["parts"]} | {doc["visible"].rsplit("/", 1)[1]}
    for f in files:
        snap = f.split(".", 1)[0]
        if f.rsplit(".", 1)[0] in named or f in named or (snap in kept):
            continue
        if snap in leases and lease.dead(leases[snap], since=_time(snap) or now, now=now, ttl_s=ttl) is None:
            continue
        if now - (_time(snap) or now) < min_age_s:
            continue
        zoo._delete_key(f"index/parts/{f}")
        removed.append(f"index/parts/{f}")
    for s, attrs in leases.items():
        if lease.dead(attrs, since=_time(s) or now, now=now, ttl_s=ttl):
            zoo._delete_prefix(f"index/leases/{s}")
    return removed
