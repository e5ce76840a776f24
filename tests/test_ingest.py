"""Safe ingestion: every rejection case, idempotence, kill -9, concurrent writers, Ray batch jobs."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_mlp_files
from weightgen.cli import main
from zoo import Zoo, checkpoint_id
from zoo.ingest import ingest

DS = "digits:classes=0,1,2,3,4"


def _zoo_files(zoo_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(zoo_dir)): p.read_bytes() for p in sorted(zoo_dir.rglob("*")) if p.is_file()}


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_every_rejection_leaves_the_zoo_unchanged(tmp_path):
    zoo_dir = tmp_path / "zoo"
    files = make_mlp_files(tmp_path / "good", 2)
    assert ingest([str(p) for p, _ in files], str(zoo_dir), "mlp-s", DS, show_progress=False).ingested
    before = _zoo_files(zoo_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    marker = tmp_path / "PWNED"
    sd = files[0][1]
    torch.save({**sd, "extra": Evil(str(marker))}, bad / "evil.pt")
    with open(bad / "evil2.pth", "wb") as f:
        pickle.dump(Evil(str(marker)), f)
    good_bytes = (tmp_path / "good" / "ckpt_00000.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(good_bytes[: len(good_bytes) // 2])
    torch.save(sd, bad / "full.pt")
    full = (bad / "full.pt").read_bytes()
    (bad / "truncated.pt").write_bytes(full[: len(full) // 2])
    (bad / "full.pt").unlink()
    save_file({**sd, "fcs.0.weight": torch.full_like(sd["fcs.0.weight"], float("nan"))}, str(bad / "nan.safetensors"))
    save_file({**sd, "fcs.1.weight": torch.zeros(7, 32)}, str(bad / "shape.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "fcs.1.bias"}, str(bad / "missing.safetensors"))
    save_file({**sd, "fcs.0.weight": sd["fcs.0.weight"].to(torch.int32)}, str(bad / "dtype.safetensors"))
    (bad / "notes.pt").write_text("this is not a checkpoint")
    torch.save([1, 2, 3], bad / "list.pt")

    s = ingest([str(bad)], str(zoo_dir), "mlp-s", DS, show_progress=False)
    reasons = {Path(r["path"]).name: r["reason"] for r in s.rejected}
    assert reasons == {
        "evil.pt": "unsafe_pickle", "evil2.pth": "unsafe_pickle", "truncated.safetensors": "unreadable",
        "truncated.pt": "unreadable", "nan.safetensors": "non_finite", "shape.safetensors": "shape_mismatch",
        "missing.safetensors": "missing_keys", "dtype.safetensors": "bad_dtype", "notes.pt": "unreadable",
        "list.pt": "not_a_checkpoint",
    }
    assert not marker.exists(), "the malicious pickle must never run"
    assert not s.ingested
    assert _zoo_files(zoo_dir) == before, "a rejected checkpoint leaves the zoo byte-for-byte unchanged"
    detail = next(r["detail"] for r in s.rejected if r["path"].endswith("shape.safetensors"))
    assert "fcs.1.weight" in detail and "[5, 32]" in detail and "[7, 32]" in detail


def test_cli_ingest_is_idempotent_and_exit_status_reports_rejections(tmp_path, capsys):
    files = make_mlp_files(tmp_path / "in", 4, fmt="pt") + make_mlp_files(tmp_path / "in", 2, start_seed=10)
    zoo = str(tmp_path / "zoo")
    args = ["zoo", "ingest", str(tmp_path / "in"), "--zoo", zoo, "--arch", "mlp-s", "--dataset", DS, "--json",
            "--no-progress", "--tag", "t1"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["ingested"] == 6 and first["rejected"] == 0
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["ingested"] == 0 and again["duplicate"] == 6
    (tmp_path / "in" / "broken.safetensors").write_bytes(b"\x00" * 5)
    assert main(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["rejected_by_reason"] == {"unreadable": 1}
    assert main(["zoo", "ls", "--zoo", zoo, "--json", "--tag", "t1"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 6 and {r["id"] for r in listed} == {checkpoint_id(sd) for _, sd in files}
    assert all(r["dataset"] == DS and r["arch"] == "mlp-s" and "metrics" in r for r in listed)


def test_hf_folder_and_manifest(tmp_path):
    files = make_mlp_files(tmp_path / "raw", 3)
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(files[0][0].read_bytes())
    (hf / "config.json").write_text(json.dumps({"arch": "mlp-s", "num_classes": 5, "input_shape": [64]}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"path": str(files[1][0]), "dataset": DS, "seed": 7, "metrics": {"test_acc": 0.9}, "tags": ["x"]}),
        json.dumps({"path": "raw/ckpt_00002.safetensors", "dataset": "digits:classes=5,6,7,8,9", "step": 3}),
        "{not json",
    ]))
    s = ingest([str(hf), str(manifest)], str(tmp_path / "zoo"), arch="mlp-s", show_progress=False)
    assert len(s.ingested) == 3 and [r["reason"] for r in s.rejected] == ["bad_manifest"]
    z = Zoo(str(tmp_path / "zoo"), mode="r")
    r1 = z.get(checkpoint_id(files[1][1]))
    assert r1["seed"] == 7 and r1["metrics"] == {"test_acc": 0.9} and r1["tags"] == ["x"]
    assert z.get(checkpoint_id(files[2][1]))["step"] == 3
    assert z.get(checkpoint_id(files[0][1]))["num_classes"] == 5  # shape from the folder's config.json


_KILLABLE = """
import sys, zoo.ingest as ingest
ingest.BATCH_ROWS = 8  # many small commits, so a kill lands between and inside them
from weightgen.cli import main
sys.exit(main(["zoo", "ingest", sys.argv[1], "--zoo", sys.argv[2], "--arch", "mlp-s",
               "--dataset", "digits:classes=0,1,2,3,4", "--no-progress"]))
"""
# A writer slowed down inside each segment (after every array), so a kill can be aimed at one in flight.
_SLOW = "import time, zarr; _c = zarr.Group.create_array\n" \
        "zarr.Group.create_array = lambda *a, **k: (_c(*a, **k), time.sleep(0.02))[0]\n"


def _commits(zoo_dir: Path) -> int:
    return len(list(zoo_dir.glob("collections/*/commits/*/zarr.json")))


def _orphans(zoo_dir: Path) -> set[str]:
    """Segments no commit names: what a writer killed mid-segment leaves."""
    segs = {p.parent.name for p in zoo_dir.glob("collections/*/segments/*/zarr.json")}
    return segs - {p.parent.name for p in zoo_dir.glob("collections/*/commits/*/zarr.json")}


def test_kill_9_mid_ingest_then_rerun_completes(tmp_path):
    files = make_mlp_files(tmp_path / "in", 400)
    zoo_dir = tmp_path / "zoo"
    orphaned = 0
    for wait_commits in (1, 3, 6):
        proc = subprocess.Popen([sys.executable, "-c", _SLOW + _KILLABLE, str(tmp_path / "in"), str(zoo_dir)])
        deadline = time.time() + 60
        # kill inside a segment: after `wait_commits` commits, once a segment exists that no commit names
        while (_commits(zoo_dir) < wait_commits or not _orphans(zoo_dir)) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        orphaned += bool(_orphans(zoo_dir))
        z = Zoo(str(zoo_dir), mode="r")  # opens after a kill -9
        for ckpt_id in z.ids():  # and every listed entry is whole
            assert checkpoint_id(z.load(ckpt_id)) == ckpt_id
        assert len(z) < 400
    assert orphaned == 3, "every kill landed inside a segment: the orphans prove the commit is what publishes"
    assert Zoo(str(zoo_dir)).gc(min_age_s=0), "gc reclaims a killed writer's segment at once (its pid is gone)"
    assert not _orphans(zoo_dir)
    proc = subprocess.run([sys.executable, "-c", _KILLABLE, str(tmp_path / "in"), str(zoo_dir)])
    assert proc.returncode == 0
    z = Zoo(str(zoo_dir), mode="r")
    assert set(z.ids()) == {checkpoint_id(sd) for _, sd in files}


def test_a_writer_killed_inside_its_commit_step_leaves_the_zoo_readable_and_gc_cleans_up(tmp_path, monkeypatch):
    """A kill -9 after a commit's folder exists but before its document is renamed into place leaves
    the folder with only zarr's temp file. Readers skip it (they once re-listed the zoo forever at
    100 % CPU: a hang found by the kill -9 test above, about 1 run in 4); gc removes it with its
    segment; every published entry stays whole, and ingesting again adds what was lost."""
    import zarr

    import zoo.ingest as zi

    files = make_mlp_files(tmp_path / "in", 24)
    zoo_dir = str(tmp_path / "zoo")
    first = make_mlp_files(tmp_path / "first", 8, start_seed=100)
    ingest([str(tmp_path / "first")], zoo_dir, "mlp-s", DS, show_progress=False)
    published = set(Zoo(zoo_dir, mode="r").ids())
    assert published == {checkpoint_id(sd) for _, sd in first}

    real = zarr.Group.create_group

    def killed_mid_commit(self, name, **kw):  # the folder and zarr's temp file exist; the rename never happens
        if "/commits/" not in name:
            return real(self, name, **kw)
        folder = Path(zoo_dir) / name
        folder.mkdir(parents=True)
        (folder / "zarr.json.0f3a.partial").write_text(json.dumps({"attributes": kw.get("attributes", {})}))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(zarr.Group, "create_group", killed_mid_commit)
    monkeypatch.setattr(zi, "BATCH_ROWS", 8)
    with pytest.raises(KeyboardInterrupt):
        ingest([str(tmp_path / "in")], zoo_dir, "mlp-s", DS, show_progress=False)
    monkeypatch.setattr(zarr.Group, "create_group", real)

    z = Zoo(zoo_dir, mode="r")
    assert set(z.ids()) == published and len(z) == len(published)
    assert all(checkpoint_id(z.load(i)) == i for i in published)
    torn = [p.parent.name for p in Path(zoo_dir).glob("collections/*/commits/*/zarr.json.*.partial")]
    assert len(torn) == 1
    from zoo.gc import collect

    report = collect(Zoo(zoo_dir), min_age_s=0)
    assert [r.split("/")[1] for r in report["removed_unpublished"]] == torn
    assert [r.split("/")[1] for r in report["removed_segments"]] == torn
    assert not list(Path(zoo_dir).glob(f"collections/*/commits/{torn[0]}")), "the torn commit folder is gone"
    assert not list(Path(zoo_dir).glob(f"collections/*/segments/{torn[0]}")), "... with its segment"
    assert set(Zoo(zoo_dir, mode="r").ids()) == published
    ingest([str(tmp_path / "in")], zoo_dir, "mlp-s", DS, show_progress=False)
    assert set(Zoo(zoo_dir, mode="r").ids()) == published | {checkpoint_id(sd) for _, sd in files}


def test_two_concurrent_ingesters_lose_nothing(tmp_path):
    a = make_mlp_files(tmp_path / "a", 120)
    b = make_mlp_files(tmp_path / "b", 120, start_seed=80)  # 40 checkpoints in both
    zoo_dir = tmp_path / "zoo"
    procs = [subprocess.Popen([sys.executable, "-c", _KILLABLE, str(tmp_path / d), str(zoo_dir)]) for d in "ab"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    z = Zoo(str(zoo_dir), mode="r")
    expected = {checkpoint_id(sd) for _, sd in a + b}
    assert set(z.ids()) == expected and len(expected) == 200
    for ckpt_id in list(expected)[::7]:
        assert checkpoint_id(z.load(ckpt_id)) == ckpt_id


@pytest.mark.ray
def test_ray_batch_ingestion(tmp_path, ray_session):
    files = make_mlp_files(tmp_path / "in", 30)
    (tmp_path / "in" / "junk.pt").write_bytes(b"junk")
    s = ingest([str(tmp_path / "in")], str(tmp_path / "zoo"), "mlp-s", DS, workers=2, show_progress=False)
    assert len(s.ingested) == 30 and [r["reason"] for r in s.rejected] == ["unreadable"]
    assert ray_session.is_initialized(), "a Ray instance the caller started stays up"
    z = Zoo(str(tmp_path / "zoo"), mode="r")
    assert set(z.ids()) == {checkpoint_id(sd) for _, sd in files}
    again = ingest([str(tmp_path / "in")], str(tmp_path / "zoo"), "mlp-s", DS, workers=2, show_progress=False)
    assert len(again.duplicate) == 30 and not again.ingested


@pytest.mark.ray
def test_cli_workers_starts_its_own_ray(tmp_path):
    """`weightgen zoo ingest --workers 2` as a user runs it: Ray not started yet, relative paths, a
    bad file among good ones; the CLI starts Ray, ingests, reports, and shuts it down."""
    files = make_mlp_files(tmp_path / "in", 6)
    (tmp_path / "in" / "junk.pt").write_bytes(b"junk")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "weightgen.cli", "zoo", "ingest", "in", "--zoo", "zoo", "--arch",
                           "mlp-s", "--dataset", DS, "--workers", "2", "--json", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1: one rejection
    out = json.loads(proc.stdout)
    assert out["ingested"] == 6 and out["rejected_by_reason"] == {"unreadable": 1}
    assert set(Zoo(str(tmp_path / "zoo"), mode="r").ids()) == {checkpoint_id(sd) for _, sd in files}
