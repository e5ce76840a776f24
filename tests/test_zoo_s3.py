"""The same zoo code on an S3-compatible object store (moto in server mode, as s3fs's tests do).

moto[server] is in the test extra and s3fs a dependency: imported plainly, a missing one fails the
run instead of skipping these tests unnoticed."""
import pytest
import s3fs  # noqa: F401
import torch
from moto.server import ThreadedMotoServer

from conftest import make_mlp_files
from zoo import Zoo, checkpoint_id
from zoo.export import export_checkpoint
from zoo.ingest import ingest


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)  # the OS picks a free port as it binds: no race
    server.start()
    url = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
    import boto3

    boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="zoo-bucket")
    yield url
    server.stop()


def test_zoo_on_s3_round_trip_ingest_and_query(tmp_path, s3_endpoint):
    opts = {"key": "test", "secret": "test", "endpoint_url": s3_endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    url = "s3://zoo-bucket/zoos/a"
    files = make_mlp_files(tmp_path / "in", 6)
    s = ingest([str(tmp_path / "in")], url, "mlp-s", "digits:classes=0,1,2,3,4", show_progress=False,
               storage_options=opts)
    assert len(s.ingested) == 6
    z = Zoo(url, mode="r", storage_options=opts)
    assert set(z.ids()) == {checkpoint_id(sd) for _, sd in files}
    p, sd = files[2]
    got = z.load(checkpoint_id(sd))
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert z.read_tensor("fcs.1.bias", [checkpoint_id(sd)])[0].equal(sd["fcs.1.bias"])
    assert len(z.query(arch="mlp-s", dataset="digits:classes=0,1,2,3,4")) == 6
    out = export_checkpoint(z, checkpoint_id(sd), tmp_path / "exp")
    assert (out / "model.safetensors").exists()
    again = ingest([str(tmp_path / "in")], url, "mlp-s", "digits:classes=0,1,2,3,4", show_progress=False,
                   storage_options=opts)
    assert len(again.duplicate) == 6


def test_two_writers_on_one_s3_zoo_at_once_then_gc(tmp_path, s3_endpoint, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import zoo.ingest

    opts = {"key": "test", "secret": "test", "endpoint_url": s3_endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    url = "s3://zoo-bucket/zoos/two-writers"
    a = make_mlp_files(tmp_path / "a", 8)
    b = make_mlp_files(tmp_path / "b", 8, start_seed=4)  # 4 checkpoints in both
    monkeypatch.setattr(zoo.ingest, "BATCH_ROWS", 4)  # several commits from each writer, interleaved
    with ThreadPoolExecutor(2) as pool:  # two writers, each with its own Zoo, at once
        runs = list(pool.map(lambda d: ingest([str(tmp_path / d)], url, "mlp-s", "digits:classes=0,1,2,3,4",
                                              show_progress=False, storage_options=opts), "ab"))
    assert [len(s.ingested) + len(s.duplicate) for s in runs] == [8, 8] and not any(s.rejected for s in runs)
    expected = {checkpoint_id(sd): sd for _, sd in a + b}
    z = Zoo(url, mode="r", storage_options=opts)
    assert set(z.ids()) == set(expected) and len(expected) == 12
    writer = Zoo(url, storage_options=opts)
    segs = [s for s in writer._list("collections/mlp-s__k5__64/segments") if s != "zarr.json"]
    assert len(segs) >= 3, "gc lists the segments on S3 (a commit per 4 new checkpoints)"
    report = __import__("zoo.gc", fromlist=["collect"]).collect(writer, min_age_s=0)
    assert not report["kept_leased"] and not writer._list("collections/mlp-s__k5__64/leases")[1:]
    z = Zoo(url, mode="r", storage_options=opts)
    assert set(z.ids()) == set(expected), "gc (duplicates compacted away, if any) keeps every entry"
    stacked = z.stack(list(expected))
    for i, sd in enumerate(expected.values()):
        assert all(torch.equal(stacked[k][i], sd[k]) for k in sd)


def test_index_and_compaction_on_s3(tmp_path, s3_endpoint, monkeypatch):
    """The metadata index (Parquet parts read with ranged requests) and `zoo compact` on an object store."""
    import zoo.compact as zc

    opts = {"key": "test", "secret": "test", "endpoint_url": s3_endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    url = "s3://zoo-bucket/zoos/indexed"
    monkeypatch.setattr(zc, "FOLD_AT", 3)
    files = make_mlp_files(tmp_path / "in", 12)
    z = Zoo(url, storage_options=opts)
    sds = {checkpoint_id(sd): sd for _, sd in files}
    from zoo import Checkpoint

    for i in range(0, 12, 2):
        z.add([Checkpoint(sd, "mlp-s", 5, (64,), dataset="digits:classes=0,1,2,3,4", seed=j, tags=[f"t{j % 2}"])
               for j, (_, sd) in enumerate(files[i:i + 2], start=i)])
    r = Zoo(url, mode="r", storage_options=opts)
    assert r.stats()["index"]["parts"] >= 1 and set(r.ids()) == set(sds)
    assert len(r.query(tag="t1")) == 6 and r.count(tag="t0", arch="mlp-s") == 6
    report = zc.compact(Zoo(url, storage_options=opts), small_rows=100)
    assert report["merged_commits"] == 6 and report["index"]["parts"] == 1
    Zoo(url, storage_options=opts).gc(min_age_s=0)
    r = Zoo(url, mode="r", storage_options=opts)
    assert r.stats()["commits"] == 1 and set(r.ids()) == set(sds) and r.get(files[3][0] and checkpoint_id(files[3][1]))["seed"] == 3
    st = r.stack(sorted(sds))
    assert all(torch.equal(st[k][i], sds[c][k]) for i, c in enumerate(sorted(sds)) for k in st)
