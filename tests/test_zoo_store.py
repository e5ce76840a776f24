"""The Zarr zoo: round trips, queries, lazy reads, dtypes, snapshots."""
import json

import pytest
import torch
from safetensors.torch import load_file

from weightgen import build_model
from zoo import Checkpoint, Zoo, ZooError, checkpoint_id
from zoo.export import export_checkpoint


def _ckpt(seed, k=5, dataset="digits:classes=0,1,2,3,4", **kw):
    torch.manual_seed(seed)
    sd = {n: t.contiguous() for n, t in build_model("mlp-s", k, (64,)).state_dict().items()}
    return Checkpoint(sd, "mlp-s", k, (64,), dataset=dataset, seed=seed, **kw)


def test_bit_exact_round_trip_and_export(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    cks = [_ckpt(i, metrics={"test_acc": 0.1 * i}, tags=["a"] if i % 2 else []) for i in range(6)]
    res = z.add(cks)
    assert sorted(res["ingested"]) == sorted(c.id for c in cks) and not res["duplicate"]
    z2 = Zoo(str(tmp_path / "zoo"), mode="r")
    for c in cks:
        got = z2.load(c.id)
        assert got.keys() == c.tensors.keys()
        for n in got:
            assert got[n].dtype == c.tensors[n].dtype and torch.equal(got[n], c.tensors[n])
        assert checkpoint_id(got) == c.id
    out = export_checkpoint(z2, cks[3].id, tmp_path / "exp")
    exported = load_file(str(out / "model.safetensors"))
    assert checkpoint_id(exported) == cks[3].id
    cfg = json.loads((out / "config.json").read_text())
    model = build_model(cfg["arch"], cfg["num_classes"], cfg["input_shape"])
    model.load_state_dict(exported, strict=True)


def test_same_content_same_id_is_skipped(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    c = _ckpt(1)
    assert z.add([c, _ckpt(1)])["duplicate"] == [c.id]
    assert z.add([_ckpt(1)])["duplicate"] == [c.id]
    assert len(z) == 1 and z.stats()["commits"] == 1


def test_queries_and_lazy_reads(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    a = [_ckpt(i, metrics={"test_acc": 0.5 + 0.1 * i}, tags=["good"] if i >= 2 else []) for i in range(4)]
    b = [_ckpt(10 + i, k=3, dataset="digits:classes=7,8,9") for i in range(2)]
    z.add(a)
    z.add(b)
    assert len(z.query(arch="mlp-s")) == 6
    assert {r["id"] for r in z.query(dataset="digits:classes=7,8,9")} == {c.id for c in b}
    assert len(z.query(dataset="digits:classes=0*")) == 4
    assert {r["id"] for r in z.query(tag="good")} == {a[2].id, a[3].id}
    hi = z.query(metrics=[("test_acc", 0.65, None)])
    assert {r["id"] for r in hi} == {a[2].id, a[3].id}
    assert z.query(metrics=[("test_acc", None, 0.55)])[0]["id"] == a[0].id
    for r in z.query():
        assert set(r) >= {"id", "arch", "dataset", "metrics", "seed", "created_at"}
    # one tensor across many checkpoints, in the order asked, across segments of one collection
    ids = [a[3].id, a[0].id, a[2].id]
    stacked = z.read_tensor("fcs.1.weight", ids)
    assert stacked.shape == (3, 5, 32)
    for row, c in zip(stacked, [a[3], a[0], a[2]]):
        assert torch.equal(row, c.tensors["fcs.1.weight"])
    only = z.load(a[1].id, keys=["fcs.0.bias"])
    assert list(only) == ["fcs.0.bias"]
    with pytest.raises(ZooError, match="one architecture shape"):
        z.stack([a[0].id, b[0].id])


def test_bf16_and_fp16_are_stored_exactly(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    base = _ckpt(0)
    for dt in (torch.bfloat16, torch.float16):
        c = Checkpoint({n: t.to(dt) for n, t in base.tensors.items()}, "mlp-s", 5, (64,), dataset="digits")
        z.add([c])
        got = z.load(c.id)
        assert all(got[n].dtype == dt and torch.equal(got[n], c.tensors[n]) for n in got)
        assert z.get(c.id)["dtypes"] == [str(dt).removeprefix("torch.")]
    import zarr

    seg_arrays = [a for _, a in zarr.open_group(str(tmp_path / "zoo"), mode="r").arrays()]
    assert seg_arrays == []  # nothing at the root; data lives in segments
    assert len(z) == 2


def test_id_prefix_errors_and_snapshot(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    c = _ckpt(0)
    s0 = z.snapshot_id()
    z.add([c])
    assert z.snapshot_id() != s0
    assert z.get(c.id[:10])["id"] == c.id
    with pytest.raises(ZooError, match="No checkpoint"):
        z.get("deadbeefdeadbeef")
    with pytest.raises(ZooError, match="No zoo at"):
        Zoo(str(tmp_path / "missing"), mode="r")


def test_invalid_checkpoint_raises_before_any_write(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    good = _ckpt(0)
    bad = _ckpt(1)
    bad.tensors["fcs.0.weight"] = bad.tensors["fcs.0.weight"].clone()
    bad.tensors["fcs.0.weight"][0, 0] = float("nan")
    bad.id = checkpoint_id(bad.tensors)
    with pytest.raises(ZooError, match="non_finite"):
        z.add([good, bad])
    assert len(Zoo(str(tmp_path / "zoo"), mode="r")) == 0


def test_gc_removes_only_unreferenced_old_segments(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    z.add([_ckpt(0)])
    # an orphan segment, as a writer killed before its commit leaves behind
    import time

    young = f"{time.time_ns():020d}-inflight"
    z.root.create_group(f"collections/mlp-s__k5__64/segments/{young}", attributes={})
    assert z.gc(min_age_s=3600) == []  # may belong to a writer still at work: kept
    assert z.gc(min_age_s=0) == [f"mlp-s__k5__64/{young}"]
    assert len(z) == 1 and z.load(z.ids()[0])


def _add_one_after(url: str, seed: int, barrier, results) -> None:
    try:
        barrier.wait()
        Zoo(url).add([_ckpt(seed)])
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(f"{type(e).__name__}: {e}")


def test_writers_that_start_together_on_a_new_zoo(tmp_path):
    """Ray ingestion tasks open the zoo at the same moment; the first to create it must not make
    the others fail (zarr's mode "a" checks, then creates)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(4):
        url = str(tmp_path / f"zoo{trial}")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_add_one_after, args=(url, 10 * trial + i, barrier, results)) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert sorted(results.get(timeout=5) for _ in procs) == ["ok"] * 4
        assert len(Zoo(url, mode="r").query()) == 4


def test_stack_mixed_dtypes_converts_each_row_by_its_stored_dtype(tmp_path):
    """A bf16 row came back as its raw uint16 bit patterns (48,820 for 0.41) when stacked with a
    float32 row, and float32 rows were garbled when the bf16 one came first."""
    z = Zoo(str(tmp_path / "zoo"))
    a, b = _ckpt(0), _ckpt(1)
    half = Checkpoint({n: t.to(torch.bfloat16) for n, t in a.tensors.items()}, "mlp-s", 5, (64,), dataset="digits")
    z.add([half])
    z.add([b])
    for ids, rows in (([half.id, b.id], [half, b]), ([b.id, half.id], [b, half])):
        got = z.stack(ids)
        for n in got:
            assert got[n].dtype == torch.float32, n
            for row, c in zip(got[n], rows):
                assert torch.equal(row, c.tensors[n].float()), n  # bf16 -> fp32 is exact
    assert z.stack([half.id])["fcs.0.weight"].dtype == torch.bfloat16  # one dtype: returned as stored
    assert z.read_tensor("fcs.1.bias", [b.id, half.id]).abs().max() < 10


def test_metadata_is_checked_before_any_write(tmp_path):
    """metrics {"acc": "high"} used to fail in record() after the segment was written: an orphan."""
    z = Zoo(str(tmp_path / "zoo"))
    z.add([_ckpt(0)])
    before = sorted(p for p in (tmp_path / "zoo").rglob("*") if p.is_file())
    for bad in ({"metrics": {"acc": "high"}}, {"metrics": {"acc": float("nan")}}, {"tags": 5},
                {"instructions": 7}, {"step": "x"}, {"train_config": []}):
        with pytest.raises(ZooError, match="bad_metadata"):
            z.add([_ckpt(1, **bad)])
    with pytest.raises(ZooError, match="num_classes"):
        z.add([Checkpoint(_ckpt(2).tensors, "mlp-s", 1, (64,))])
    assert sorted(p for p in (tmp_path / "zoo").rglob("*") if p.is_file()) == before


def _gc_before_every_commit(monkeypatch, url: str, reports: list):
    """Run a full gc (min age 0) in another Zoo just before each commit document is written: the
    moment a live writer's segment exists and is not yet referenced."""
    import zarr

    real = zarr.Group.create_group

    def create_group(self, name, *a, **k):
        if "/commits/" in name and not reports[-1:] == ["busy"]:
            reports.append("busy")
            try:
                reports.append(Zoo(url).gc(min_age_s=0))
            finally:
                reports.remove("busy")
        return real(self, name, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_group", create_group)


def test_gc_at_min_age_0_never_deletes_a_live_writers_segment(tmp_path, monkeypatch):
    """`zoo gc --min-age 0` in a loop during an ingest left 2,000 listed entries without data."""
    url = str(tmp_path / "zoo")
    Zoo(url).add([_ckpt(0)])
    reports: list = []
    _gc_before_every_commit(monkeypatch, url, reports)
    cks = [_ckpt(i) for i in range(1, 4)]
    Zoo(url).add(cks[:2])
    Zoo(url).add(cks[2:])
    monkeypatch.undo()
    assert len(reports) == 2 and reports == [[], []], "gc ran mid-write and kept the writer's segment"
    z = Zoo(url, mode="r")
    for c in cks:
        got = z.load(c.id)
        assert all(torch.equal(got[n], c.tensors[n]) for n in got)


def test_gc_reclaims_segments_of_dead_writers_only(tmp_path):
    import subprocess
    import sys

    from zoo import lease
    from zoo.store import new_segment_name

    z = Zoo(str(tmp_path / "zoo"))
    z.add([_ckpt(0)])
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    held = {"alive": lease.new(), "killed": {**lease.new(), "pid": int(dead_pid)},
            "stalled": {**lease.new(), "host": "elsewhere", "renewed": 0.0}, "remote": {**lease.new(), "host": "elsewhere"}}
    segs = {}
    for what, attrs in held.items():
        seg = segs[what] = new_segment_name()
        z.root.create_group(f"collections/mlp-s__k5__64/leases/{seg}", attributes=attrs)
        z.root.create_group(f"collections/mlp-s__k5__64/segments/{seg}", attributes={})
    removed = z.gc(min_age_s=0)
    assert sorted(removed) == sorted(f"mlp-s__k5__64/{segs[w]}" for w in ("killed", "stalled"))
    left = set(z._list("collections/mlp-s__k5__64/segments"))
    assert {segs["alive"], segs["remote"]} <= left and not {segs["killed"], segs["stalled"]} & left
    assert len(z) == 1 and z.load(z.ids()[0])


def test_writer_whose_lease_was_reclaimed_does_not_commit(tmp_path, monkeypatch):
    """If gc judged a stalled writer dead and took its segment, the writer must not publish it."""
    import zarr

    url = str(tmp_path / "zoo")
    z = Zoo(url)
    real = zarr.Group.create_array

    def create_array(self, name, *a, **k):  # mid-write, another process's gc reclaims the lease
        for key in Zoo(url)._list("collections/mlp-s__k5__64/leases"):
            if key != "zarr.json":
                Zoo(url)._delete_prefix(f"collections/mlp-s__k5__64/leases/{key}")
        return real(self, name, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", create_array)
    with pytest.raises(ZooError, match="lease .* was reclaimed"):
        z.add([_ckpt(0)])
    monkeypatch.undo()
    assert len(Zoo(url, mode="r")) == 0


def test_rm_hides_entries_and_gc_reclaims_their_data(tmp_path):
    url = str(tmp_path / "zoo")
    z = Zoo(url)
    a = [_ckpt(i, metrics={"test_acc": 0.5 + 0.1 * i}) for i in range(3)]
    lone = _ckpt(9)
    z.add(a)
    z.add([lone])
    stale = Zoo(url, mode="r")  # a reader that listed the zoo before rm and gc
    assert stale.load(a[2].id)
    assert z.remove([a[1].id[:10], lone.id]) == [a[1].id, lone.id]
    assert set(z.ids()) == {a[0].id, a[2].id}
    with pytest.raises(ZooError, match="No checkpoint"):
        z.get(lone.id)
    assert z.gc() == []  # the removal is younger than the default min age: nothing reclaimed yet
    report = __import__("zoo.gc", fromlist=["collect"]).collect(z, min_age_s=0)
    assert len(report["removed_segments"]) == 2 and len(report["compacted"]) == 1
    assert len(report["dropped_commits"]) == 2
    segs = [s for s in z._list("collections/mlp-s__k5__64/segments") if s != "zarr.json"]
    assert len(segs) == 1, "one compacted segment holds the two entries left"
    for c in (a[0], a[2]):
        got = Zoo(url, mode="r").load(c.id)
        assert all(torch.equal(got[n], c.tensors[n]) for n in got)
        got = stale.load(c.id)  # re-lists and reads the entry where it is now, never zeros
        assert all(torch.equal(got[n], c.tensors[n]) for n in got)
    with pytest.raises(ZooError):
        stale.load(lone.id)
    assert z.get(a[2].id)["metrics"] == {"test_acc": pytest.approx(0.7)}  # records survive compaction
    assert z.add([lone])["ingested"] == [lone.id] and lone.id in Zoo(url, mode="r")  # re-ingest after rm


def test_nan_metric_from_an_older_zoo_matches_no_filter_and_reads_as_null(tmp_path, monkeypatch):
    z = Zoo(str(tmp_path / "zoo"))
    monkeypatch.setattr(Checkpoint, "problems", lambda self, tensors=True: [])  # as before NaN was refused
    bad = _ckpt(0, metrics={"test_acc": float("nan")})
    z.add([bad, _ckpt(1, metrics={"test_acc": 0.9})])
    monkeypatch.undo()
    assert len(z.query(metrics=[("test_acc", 0.97, None)])) == 0
    assert [r["seed"] for r in z.query(metrics=[("test_acc", None, None)])] == [1]  # "has a value": NaN has none
    assert [r["id"] for r in z.query(metrics=[("test_acc", None, 0.95)])] != [bad.id]
    assert z.get(bad.id)["metrics"] == {"test_acc": None}
    json.dumps(z.query(), allow_nan=False)


def test_a_long_write_renews_its_lease(tmp_path, monkeypatch):
    """A writer slower than the lease TTL would be judged dead by gc on another host: it renews."""
    import zarr

    from zoo import lease

    url = str(tmp_path / "zoo")
    monkeypatch.setattr(lease, "RENEW_S", 0.0)  # renew after every array
    seen = []
    real = zarr.Group.create_array

    def create_array(self, name, *a, **k):
        leases = Zoo(url, mode="r").root["collections/mlp-s__k5__64/leases"]
        seen.extend(g.attrs["renewed"] for _, g in leases.groups())
        return real(self, name, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", create_array)
    Zoo(url).add([_ckpt(0)])
    assert len(seen) == 4 and seen == sorted(seen) and seen[-1] > seen[0], seen


@pytest.mark.parametrize("dtype", ["float32", "uint16", "int8", "float64"])
def test_ranged_row_reads_equal_zarrs_own(tmp_path, dtype):
    """Stack and load read scattered rows as byte ranges (zoo.rows); they must be Zarr's bytes
    exactly: any order, repeats, runs across chunk edges, the padded last chunk, a chunk never written."""
    import numpy as np
    import zarr

    from zoo.rows import raw, take_rows

    g = zarr.open_group(str(tmp_path / "g"), mode="w")
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((203, 3, 5)) * 50).astype(dtype)
    data[70:140] = 0  # chunks 7..13 all fill value: Zarr does not write them
    arr = g.create_array("w", shape=data.shape, dtype=data.dtype, chunks=(10, 3, 5), compressors=None, fill_value=0)
    arr[...] = data
    assert raw(arr) and not (tmp_path / "g/w/c/8/0/0").exists()
    for rows in ([5], [202, 0, 201], [9, 10, 11, 12], list(range(195, 203)), [75, 3, 75, 150, 139, 140],
                 rng.integers(0, 203, 60).tolist(), []):
        got = take_rows(arr, np.array(rows, np.int64))
        want = arr.get_orthogonal_selection((np.array(rows, np.int64),)) if rows else data[:0]
        assert got.dtype == want.dtype and np.array_equal(got, want), rows
    with pytest.raises(IndexError):
        take_rows(arr, np.array([203]))
    squeezed = g.create_array("c", shape=(20, 4), dtype="float32", chunks=(5, 2), compressors=None)
    assert not raw(squeezed), "chunked along more than rows: read through Zarr"
    packed = g.create_array("z", shape=(20, 4), dtype="float32", chunks=(5, 4))  # default compressor
    assert not raw(packed)
