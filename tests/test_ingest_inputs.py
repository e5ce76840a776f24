"""Ingestion of hostile and careless inputs: every bad one is a row, memory follows the headers."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_mlp_files
from weightgen.cli import main
from zoo import Zoo, checkpoint_id
from zoo.ingest import ingest

DS = "digits:classes=0,1,2,3,4"
CFG = {"arch": "mlp-s", "num_classes": 5, "input_shape": [64]}


def _hf(folder: Path, sd, config=CFG, index=None):
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if index is None:
        save_file(sd, str(folder / "model.safetensors"))
    else:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _poison(tmp_path):
    """3 good checkpoints (their config in their metadata, as `zoo export` writes it) beside one bad
    input of each kind issue 14 found; returns (dir, manifest, good)."""
    root = tmp_path / "poison"
    good = make_mlp_files(tmp_path / "raw", 3)
    root.mkdir()
    for p, sd in good:
        save_file(sd, str(root / p.name), metadata={"weightgen": json.dumps(CFG)})
    sd = good[0][1]
    _hf(root / "cfg_list", sd, config=[1])
    _hf(root / "cfg_k1", sd, config={**CFG, "num_classes": 1})
    _hf(root / "cfg_shape64", sd, config={**CFG, "input_shape": 64})
    _hf(root / "cfg_arch_list", sd, config={**CFG, "arch": ["mlp-s"]})
    _hf(root / "index_5", sd, index={"weight_map": {"fcs.0.weight": 5}})
    lines = [{"path": 5}, {"path": None}, {"tags": ["x"]}]
    base = {"path": str(root / good[1][0].name), "dataset": DS}
    lines += [{**base, "tags": 5}, {**base, "arch": ["mlp-s"]}, {**base, "instructions": 7},
              {**base, "metrics": {"acc": "high"}}, {**base, "dataset": "digits:classes=0"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(d) for d in lines) + '\n{"path": "x", "metrics": {"acc": NaN}}\n')
    return root, manifest, good


EXPECTED = {"cfg_list": "bad_config", "cfg_k1": "bad_metadata", "cfg_shape64": "bad_metadata",
            "cfg_arch_list": "bad_metadata", "index_5": "unreadable",
            "ckpt_00001.safetensors": "bad_dataset"}  # the manifest's digits:classes=0 line
MANIFEST_EXPECTED = ["bad_manifest", "bad_manifest", "bad_manifest", "bad_metadata", "bad_metadata", "bad_metadata",
                     "bad_metadata", "bad_metadata"]


def _check_summary(out, zoo_dir, good):
    by_name = {Path(r["path"]).name: r["reason"] for r in out["rejections"] if "m.jsonl" not in r["path"]}
    assert by_name == EXPECTED, out["rejections"]
    manifest_rows = sorted((r for r in out["rejections"] if "m.jsonl" in r["path"]), key=lambda r: int(r["path"].split(":")[-1]))
    assert [r["reason"] for r in manifest_rows] == MANIFEST_EXPECTED, manifest_rows
    assert "finite" in manifest_rows[-1]["detail"] and "'path'" in manifest_rows[0]["detail"]
    assert all(r["detail"] for r in out["rejections"])
    z = Zoo(str(zoo_dir), mode="r")
    assert set(z.ids()) == {checkpoint_id(sd) for _, sd in good}, "the good ones are ingested"
    segs = list(zoo_dir.glob("collections/*/segments/*/zarr.json"))
    assert len(segs) == len(list(zoo_dir.glob("collections/*/commits/*/zarr.json"))), "no orphaned segment"


def test_each_malformed_input_is_a_rejected_row_and_the_good_ones_are_ingested(tmp_path, capsys):
    root, manifest, good = _poison(tmp_path)
    zoo_dir = tmp_path / "zoo"
    args = ["zoo", "ingest", str(root), str(manifest), "--zoo", str(zoo_dir), "--json", "--no-progress"]
    for _ in range(2):  # every re-run gives the same rows, never a traceback
        assert main(args) == 1
        out = json.loads(capsys.readouterr().out)
        _check_summary(out, zoo_dir, good)
    assert out["duplicate"] == 3 and out["ingested"] == 0


@pytest.mark.ray
def test_malformed_inputs_with_ray_workers(tmp_path, ray_session):
    root, manifest, good = _poison(tmp_path)
    s = ingest([str(root), str(manifest)], str(tmp_path / "zoo"), workers=2, show_progress=False)
    _check_summary(s.as_dict(), tmp_path / "zoo", good)


def test_sharded_hf_folder_and_files_outside_the_folder(tmp_path):
    (p0, sd), = make_mlp_files(tmp_path / "raw", 1)
    keys = sorted(sd)
    half = {k: sd[k] for k in keys[:2]}, {k: sd[k] for k in keys[2:]}
    ok = _hf(tmp_path / "sharded", sd, index={"weight_map": {k: f"part-{i}.safetensors" for i, part in enumerate(half)
                                                             for k in part}})
    for i, part in enumerate(half):
        save_file(part, str(ok / f"part-{i}.safetensors"))
    outside = _hf(tmp_path / "escapes", sd, index={"weight_map": {k: "../raw/ckpt_00000.safetensors" for k in keys}})
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "config.json").write_text(json.dumps(CFG))
    (linked / "model.safetensors").symlink_to(p0)  # a symlink out of the folder: same as a shard outside it
    inside = tmp_path / "inside"
    inside.mkdir()
    (inside / "blob").write_bytes(p0.read_bytes())
    (inside / "config.json").write_text(json.dumps(CFG))
    (inside / "model.safetensors").symlink_to(inside / "blob")
    s = ingest([str(ok), str(outside), str(linked), str(inside)], str(tmp_path / "zoo"), show_progress=False)
    assert s.ingested == [checkpoint_id(sd)] and s.duplicate == [checkpoint_id(sd)]
    rows = {Path(r["path"]).name: r for r in s.rejected}
    assert set(rows) == {"escapes", "linked"} and all(r["reason"] == "unreadable" for r in rows.values())
    assert "outside the folder" in rows["linked"]["detail"] and "outside the folder" in rows["escapes"]["detail"]
    got = Zoo(str(tmp_path / "zoo"), mode="r").load(checkpoint_id(sd))
    assert all(torch.equal(got[k], sd[k]) for k in sd)


_PEAK = """
import resource, sys, json
from zoo.ingest import ingest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
reasons = []
for cap in (None, 1 << 32):  # the default cap, then one so large that only the shapes can refuse them
    s = ingest(sys.argv[2:], sys.argv[1], "mlp-s", "digits:classes=0,1,2,3,4", show_progress=False, max_bytes=cap)
    reasons.append([r["reason"] for r in s.rejected])
print(json.dumps({"grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                  "reasons": reasons, "ingested": len(s.ingested)}))
"""


def _deflated_pt(path: Path, numel: int) -> None:
    """A torch zip whose one tensor ("fcs.0.weight", wrong shape) is ``numel`` float32 zeros,
    deflated to ~1/1000 of that; written in chunks, never held in memory."""
    tiny = path.with_suffix(".tiny")
    torch.save({"fcs.0.weight": torch.zeros(1)}, tiny)
    n = b"J" + numel.to_bytes(4, "little")
    with zipfile.ZipFile(tiny) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):  # storage numel and size 1 -> numel; stride stays 1
                data = data.replace(b"cpuq\x06K\x01t", b"cpuq\x06" + n + b"t").replace(b"K\x00K\x01\x85q\x08",
                                                                                       b"K\x00" + n + b"\x85q\x08")
            if info.filename.endswith("/data/0"):
                with zout.open(info.filename, "w", force_zip64=True) as w:
                    for _ in range(numel * 4 // (1 << 24)):
                        w.write(bytes(1 << 24))
                continue
            zout.writestr(info.filename, data)
    tiny.unlink()


def test_declared_shapes_and_size_are_checked_before_any_data_is_read(tmp_path):
    """A sparse 4 KB .safetensors declaring 3 GiB used 8.9 GB; a 1 MB deflated .pt holding a 1 GiB
    tensor of the wrong shape peaked at 3.1 GB: tensors were read before shapes were compared."""
    (_, sd), = make_mlp_files(tmp_path / "raw", 1)
    sparse = tmp_path / "in" / "sparse.safetensors"
    sparse.parent.mkdir()
    header = json.dumps({"fcs.0.weight": {"dtype": "F32", "shape": [1 << 27], "data_offsets": [0, 1 << 29]}}).encode()
    with open(sparse, "wb") as f:  # 512 MiB of declared data, a hole on disk
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 29))
    _deflated_pt(tmp_path / "in" / "deflated.pt", 1 << 26)  # 256 MiB inflated
    assert (tmp_path / "in" / "deflated.pt").stat().st_size < 2 << 20
    assert torch.load(tmp_path / "in" / "deflated.pt", map_location="meta")["fcs.0.weight"].shape == (1 << 26,)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "zoo"), str(sparse), str(tmp_path / "in" / "deflated.pt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["reasons"] == [["too_large"] * 2, ["missing_keys"] * 2] and res["ingested"] == 0  # from the headers
    assert res["grew_mb"] < 100, f"peak memory grew by {res['grew_mb']:.0f} MB for files that declare 768 MiB"


def test_size_cap_is_configurable_and_shapes_are_refused_from_the_header(tmp_path):
    (_, sd), = make_mlp_files(tmp_path / "raw", 1)
    wrapped = tmp_path / "in" / "with_optimizer.pt"
    wrapped.parent.mkdir()
    torch.save({"state_dict": sd, "optimizer": {"exp_avg": torch.zeros(1 << 18)}}, wrapped)  # + 1 MiB of state
    save_file({**sd, "fcs.1.weight": torch.zeros(7, 32)}, str(tmp_path / "in" / "shape.safetensors"))
    torch.save({k: torch.empty_like(v, device="meta") for k, v in sd.items()}, tmp_path / "in" / "no_data.pt")
    s = ingest([str(tmp_path / "in")], str(tmp_path / "zoo"), "mlp-s", DS, show_progress=False, max_bytes=1 << 20)
    assert {Path(r["path"]).name: r["reason"] for r in s.rejected} == {
        "shape.safetensors": "shape_mismatch", "with_optimizer.pt": "too_large", "no_data.pt": "not_a_checkpoint"}
    assert "--max-bytes" in s.rejected[-1]["detail"] or "--max-bytes" in s.rejected[0]["detail"]
    assert ingest([str(wrapped)], str(tmp_path / "zoo"), "mlp-s", DS, show_progress=False).ingested == [checkpoint_id(sd)]


def test_an_unforeseen_failure_is_that_items_row_not_the_jobs(tmp_path, monkeypatch):
    import zoo.ingest as zi

    files = make_mlp_files(tmp_path / "in", 3)
    real = zi.open_checkpoint

    def flaky(path):
        if str(path).endswith("ckpt_00001.safetensors"):
            raise RuntimeError("disk on fire")
        return real(path)

    monkeypatch.setattr(zi, "open_checkpoint", flaky)
    s = ingest([str(tmp_path / "in")], str(tmp_path / "zoo"), "mlp-s", DS, show_progress=False)
    assert sorted(s.ingested) == sorted(checkpoint_id(sd) for _, sd in (files[0], files[2]))
    assert s.rejected == [{"path": str(files[1][0]), "reason": "error", "detail": "RuntimeError: disk on fire"}]
