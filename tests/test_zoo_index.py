"""The metadata index (zoo.index) and compaction (zoo.compact): readers see exactly what the commit
documents say, through folds, merges, removals and gc; compaction survives kill -9 and writers."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zoo.compact as zc
from weightgen import build_model
from zoo import Checkpoint, Zoo, checkpoint_id
from zoo.records import public

ROOT = str(Path(__file__).resolve().parents[1])


def _ckpt(seed, k=5, **kw):
    torch.manual_seed(seed)
    sd = {n: t.contiguous() for n, t in build_model("mlp-s", k, (64,)).state_dict().items()}
    meta = dict(dataset=f"digits:classes={','.join(str((seed + i) % 10) for i in range(k))}", seed=seed,
                metrics={"test_acc": (seed % 17) / 16}, tags=[f"t{seed % 3}"], instructions=[f"Tell digits apart, run {seed}"])
    return Checkpoint(sd, "mlp-s", k, (64,), **{**meta, **kw})


def _truth(zoo_dir: Path) -> dict[str, dict]:
    """id -> record, read straight from every commit document, by the rule readers followed
    before the index existed (extended by each row's order key): in order, a removal hides an
    id, and the first add after the last removal wins."""
    evs = []
    for doc in zoo_dir.glob("collections/*/commits/*/zarr.json"):
        cid, name = doc.parts[-4], doc.parts[-2]
        a = json.loads(doc.read_text())["attributes"]
        own = f"{name}\x00{cid}"
        for i in a.get("removed", []):
            evs.append((own, 1, i, None))
        recs = a.get("records", [])
        for r, o in zip(recs, a.get("orders") or [own] * len(recs)):
            evs.append((o, 0, r["id"], r))
    out: dict[str, dict] = {}
    for _, kind, i, r in sorted(evs, key=lambda e: e[0]):
        if kind:
            out.pop(i, None)
        elif i not in out:
            out[i] = r
    return out


def _check(zoo_dir: Path, sds: dict) -> None:
    truth = _truth(zoo_dir)
    z = Zoo(str(zoo_dir), mode="r")
    assert len(z) == len(truth) and set(z.ids()) == set(truth)
    got = {r["id"]: r for r in z.query()}
    assert got == {i: public(r) for i, r in truth.items()}
    for i in random.Random(len(truth)).sample(sorted(truth), min(5, len(truth))):
        assert checkpoint_id(z.load(i)) == i and i in z
    if truth:
        ids = sorted(truth)
        st = z.stack(ids)
        assert all(torch.equal(st[n][j], sds[i][n]) for j, i in enumerate(ids) for n in st)


@pytest.mark.parametrize("seed", [0, 1])
def test_index_agrees_with_commit_documents_through_folds_merges_removals_and_gc(tmp_path, monkeypatch, seed):
    monkeypatch.setattr(zc, "FOLD_AT", 2)
    zoo_dir = tmp_path / "zoo"
    z = Zoo(str(zoo_dir))
    pool = [_ckpt(i) for i in range(40)]
    sds = {c.id: c.tensors for c in pool}
    rng = random.Random(seed)
    for step in range(30):
        op = rng.choice(["add", "add", "add", "rm", "compact", "gc", "fold"])
        if op == "add":  # a duplicate carries other metadata: which copy's record wins is visible
            z.add([_ckpt(c.seed, tags=[f"step{step}"]) for c in rng.sample(pool, rng.randint(1, 6))])
        elif op == "rm" and len(z):
            z.remove(rng.sample(z.ids(), min(2, len(z))))
        elif op == "compact":
            zc.compact(z, small_rows=rng.choice([3, 8, 100]))
        elif op == "gc":
            z.gc(min_age_s=0)
        elif op == "fold":
            zc.fold(z, full=rng.random() < 0.5)
        _check(zoo_dir, sds)
    assert zoo_dir.joinpath("index/snapshots").is_dir()


def test_merged_rows_keep_their_commit_order(tmp_path):
    """The first commit of an id wins. Merged into a commit written now, a row would lose to a
    later duplicate left unmerged (a big commit) unless it keeps its original order."""
    z = Zoo(str(tmp_path / "zoo"))
    z.add([_ckpt(0, tags=["first"])])
    z.add([_ckpt(1)])
    # 4 rows, not small, with a second copy of checkpoint 0, as a writer that raced the first one commits it
    z._write_segment("mlp-s__k5__64", [_ckpt(0, tags=["later"])] + [_ckpt(i) for i in range(2, 5)])
    assert z.get(_ckpt(0).id)["tags"] == ["first"]
    report = zc.compact(z, small_rows=2)
    assert report["merged_commits"] == 2
    assert Zoo(z.url, mode="r").get(_ckpt(0).id)["tags"] == ["first"]
    _check(tmp_path / "zoo", {c.id: c.tensors for c in map(_ckpt, range(5))})


def test_queries_run_on_the_index_and_ls_pages(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    cks = [_ckpt(i) for i in range(12)] + [_ckpt(100 + i, k=3) for i in range(3)]
    for i in range(0, 15, 4):
        z.add(cks[i:i + 4])
    zc.fold(z)
    z.add([_ckpt(50, tags=["late"])])  # a tail commit the index does not cover
    recs = [public(r) for r in _truth(tmp_path / "zoo").values()]
    scan = [
        ({"arch": "mlp-s"}, recs),
        ({"dataset": "digits:classes=3*"}, [r for r in recs if r["dataset"].startswith("digits:classes=3")]),
        ({"tag": "t1"}, [r for r in recs if "t1" in r["tags"]]),
        ({"tag": "late"}, [r for r in recs if "late" in r["tags"]]),
        ({"instruction": "RUN 1"}, [r for r in recs if any("run 1" in s.lower() for s in r["instructions"])]),
        ({"num_classes": 3, "input_shape": [64]}, [r for r in recs if r["num_classes"] == 3]),
        ({"metrics": [("test_acc", 0.25, 0.5)]}, [r for r in recs if 0.25 <= r["metrics"]["test_acc"] <= 0.5]),
        ({"metrics": [("nope", 0, None)]}, []),
        ({"seed": 3}, [r for r in recs if r["seed"] == 3]),
    ]
    sidecars = list((tmp_path / "zoo/index/parts").glob("*.filters"))
    assert sidecars, "folded parts carry their filters file"
    for state in ("mapped", "unreadable", "absent"):  # parts written before filters files existed: Parquet
        for f in sidecars:
            if state == "unreadable":
                f.write_bytes(b"not an arrow file")
            elif state == "absent":
                f.unlink()
        z = Zoo(str(tmp_path / "zoo"), mode="r")
        for filt, want in scan:
            got = z.query(**filt)
            assert sorted(r["id"] for r in got) == sorted(r["id"] for r in want) and want != [] or \
                not filt.get("metrics") or filt["metrics"][0][0] == "nope", filt
            assert z.count(**filt) == len(want)
        assert z.count(metrics=[["test_acc", 0.25, 0.5]]) == len([r for r in recs if 0.25 <= r["metrics"]["test_acc"] <= 0.5])
        assert z.count(tag="t1", instruction="run 1", arch="mlp-s") == \
            len([r for r in recs if "t1" in r["tags"] and any("run 1" in s.lower() for s in r["instructions"])])
    everything = [r["id"] for r in z.query()]
    pages = [r["id"] for off in range(0, 16, 5) for r in z.query(limit=5, offset=off)]
    assert pages == everything and len(everything) == 16
    assert z.stats()["index"]["tail_commits"] == 1 and z.get(everything[-1][:9])["id"] == everything[-1]


def test_add_reads_only_new_commit_documents(tmp_path, monkeypatch):
    """Every add re-read every commit document to find duplicates: quadratic in commits."""
    monkeypatch.setattr(zc, "FOLD_AT", 10**9)
    z = Zoo(str(tmp_path / "zoo"))
    reads = []
    real = Zoo._fetch_docs
    monkeypatch.setattr(Zoo, "_fetch_docs", lambda self, paths: (reads.extend(paths), real(self, paths))[1])
    for i in range(12):
        z.add([_ckpt(i)])
    assert len(z) == 12 and len(reads) == len(set(reads)) == 12, reads  # each once (it was 1 + 2 + ... + 12 = 78)


def test_writers_merge_small_commits_as_they_go(tmp_path, monkeypatch):
    """10,000 ingestion jobs of 10 made 10,000 commits: every write listed them all and a stack
    opened a segment per row group of 10. Writers now merge each size tier once it is full."""
    monkeypatch.setattr(zc, "FOLD_AT", 2)
    monkeypatch.setattr(zc, "MERGE_FANOUT", 3)
    zoo_dir = tmp_path / "zoo"
    z = Zoo(str(zoo_dir))
    cks = [_ckpt(i) for i in range(45)]
    sds = {c.id: c.tensors for c in cks}
    for i, c in enumerate(cks):
        z.add([c])
        if i == 20:  # a removal in between: merged copies keep it hidden
            z.remove([cks[3].id])
            del sds[cks[3].id]
    commits, _ = _state(zoo_dir)
    assert commits <= 12, f"{commits} commits for 45 one-row writes"
    _check(zoo_dir, sds)
    sizes = zc._commit_rows(Zoo(str(zoo_dir), mode="r")._view())
    assert max(sizes.values()) >= 9, sizes  # merged twice: 1 -> 3 -> 9 rows
    assert _state(zoo_dir)[1] > 0, "merged sources' segments stay for readers until gc"
    z.gc(min_age_s=0)
    assert _state(zoo_dir)[1] == 0
    _check(zoo_dir, sds)


def test_gc_beside_a_merge_keeps_the_copy_not_only_the_source(tmp_path):
    """A merge publishes its copy (same order keys), then deletes the source commit. When readers
    took the source's rows, gc between those two steps saw the copy as hidden duplicates and
    dropped it; the merger then dropped the source, and the entries were gone."""
    z = Zoo(str(tmp_path / "zoo"))
    cks = [_ckpt(i) for i in range(3)]
    z.add(cks)
    (k1,) = z._view().commits
    cid, name = k1.split("/")
    doc = z._read_docs([z._commit_path(k1)])[0]
    meta = z._read_docs([f"collections/{cid}/segments/{doc['segment']}"])[0]
    src = z.root[f"collections/{cid}/segments/{doc['segment']}"]
    own = f"{name}\x00{cid}"
    z._write_rows(cid, zc.new_segment_name(), meta, ((n, src[n][...]) for n in meta["tensors"]), doc["records"],
                  [own] * len(doc["records"]))  # the merger's copy, published; its source not yet deleted
    z.refresh()
    z.gc(min_age_s=0)  # between the merger's two steps
    z._delete_prefix(z._commit_path(k1))  # the merger's second step
    z = Zoo(str(tmp_path / "zoo"), mode="r")
    assert sorted(z.ids()) == sorted(c.id for c in cks)
    assert all(checkpoint_id(z.load(c.id)) == c.id for c in cks)


_COMPACT = """
import sys, time, zarr
from zoo import Zoo
_c, _d = zarr.Group.create_array, Zoo._delete_prefix  # slowed down, so a kill can be aimed
zarr.Group.create_array = lambda *a, **k: (_c(*a, **k), time.sleep(0.03))[0]
Zoo._delete_prefix = lambda *a: (_d(*a), time.sleep(0.03))[0]
from zoo.compact import compact
compact(Zoo(sys.argv[1]), small_rows=8, target_bytes=int(sys.argv[2]))
"""


def _state(zoo_dir: Path) -> tuple[int, int]:
    """(commits, segments no commit names)."""
    commits = {p.parent.name for p in zoo_dir.glob("collections/*/commits/*/zarr.json")}
    segs = {p.parent.name for p in zoo_dir.glob("collections/*/segments/*/zarr.json")}
    return len(commits), len(segs - commits)


def test_compaction_killed_at_any_moment_loses_nothing_and_reruns(tmp_path):
    zoo_dir = tmp_path / "zoo"
    z = Zoo(str(zoo_dir))
    cks = [_ckpt(i) for i in range(60)]
    sds = {c.id: c.tensors for c in cks}
    for i in range(0, 60, 3):  # 20 commits of 3
        z.add(cks[i:i + 3])
    z.remove([cks[4].id])
    del sds[cks[4].id]
    row_bytes = sum(t.numel() * 4 for t in cks[0].tensors.values())
    n0 = _state(zoo_dir)[0]  # 21 commits
    aims = {  # when to kill: inside a merged segment; after a merged commit, before its sources go; later
        "mid-segment": lambda c, o: o > 0,
        "merged, sources kept": lambda c, o: c > n0,
        "sources half deleted": lambda c, o: c < n0 - 2,
    }
    for what, ready in aims.items():
        proc = subprocess.Popen([sys.executable, "-c", _COMPACT, str(zoo_dir), str(6 * row_bytes)],
                                env={**os.environ, "PYTHONPATH": ROOT})
        deadline = time.time() + 60
        while not ready(*_state(zoo_dir)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{what}: compaction finished before the kill"
        _check(zoo_dir, sds)  # every entry whole and bit-exact, none lost, the removed one still hidden
        n0 = _state(zoo_dir)[0]
    proc = subprocess.run([sys.executable, "-c", _COMPACT, str(zoo_dir), str(6 * row_bytes)],
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0
    Zoo(str(zoo_dir)).gc(min_age_s=0)
    _check(zoo_dir, sds)
    assert _state(zoo_dir) == (11, 0)  # 59 rows in 10 merged segments of <= 6, and the removal


_WRITER = """
import sys, torch
import zoo.compact as zc
zc.FOLD_AT, zc.MERGE_FANOUT = 4, 3  # writers fold and merge each other's commits while compaction and gc run
from weightgen import build_model
from zoo import Checkpoint, Zoo
z = Zoo(sys.argv[1])
for i in range(int(sys.argv[2]), int(sys.argv[3]), 2):
    cks = []
    for s in (i, i + 1):
        torch.manual_seed(s)
        sd = {n: t.contiguous() for n, t in build_model("mlp-s", 5, (64,)).state_dict().items()}
        cks.append(Checkpoint(sd, "mlp-s", 5, (64,), dataset="digits", seed=s))
    z.add(cks)
"""


def test_compaction_and_gc_while_writers_write_lose_nothing(tmp_path):
    zoo_dir = tmp_path / "zoo"
    Zoo(str(zoo_dir)).add([_ckpt(1000)])
    env = {**os.environ, "PYTHONPATH": ROOT}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(zoo_dir), str(a), str(a + 40)], env=env)
               for a in (0, 30)]  # 10 ids written by both
    rounds = 0
    while any(w.poll() is None for w in writers) or rounds < 2:
        z = Zoo(str(zoo_dir))
        zc.compact(z, small_rows=16)
        z.gc(min_age_s=0)
        rounds += 1
    assert [w.wait() for w in writers] == [0, 0]
    sds = {}
    for s in range(70):
        torch.manual_seed(s)
        sd = {n: t.contiguous() for n, t in build_model("mlp-s", 5, (64,)).state_dict().items()}
        sds[checkpoint_id(sd)] = sd
    sds[_ckpt(1000).id] = _ckpt(1000).tensors
    _check(zoo_dir, sds)
    assert set(Zoo(str(zoo_dir), mode="r").ids()) == set(sds) and rounds >= 2
