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
