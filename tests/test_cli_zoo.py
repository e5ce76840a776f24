"""`weightgen zoo ...` from the command line: every subcommand the README shows, and its errors."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightgen import build_model
from weightgen.cli import main
from zoo import Checkpoint, Zoo, checkpoint_id

DS = "digits:classes=0,1,2,3,4"


def _run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def zoo_url(tmp_path):
    z = Zoo(str(tmp_path / "zoo"))
    cks = []
    for i in range(6):
        torch.manual_seed(i)
        sd = {n: t.contiguous() for n, t in build_model("mlp-s", 5, (64,)).state_dict().items()}
        cks.append(Checkpoint(sd, "mlp-s", 5, (64,), dataset=DS, seed=i, metrics={"test_acc": 0.9 + 0.01 * i},
                              tags=["even"] if i % 2 == 0 else []))
    z.add(cks[:4])
    z.add(cks[4:])
    return str(tmp_path / "zoo"), cks


def test_ls_filters_limit_json_and_jsonl(zoo_url, capsys):
    url, cks = zoo_url
    rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--metric", "test_acc>=0.935", "--json"], capsys)
    assert rc == 0 and {r["id"] for r in json.loads(out)} == {c.id for c in cks[4:]}
    rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--metric", "test_acc<=0.915", "--metric", "test_acc>=0.905",
                       "--json"], capsys)
    assert [r["id"] for r in json.loads(out)] == [cks[1].id]
    rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--tag", "even", "--jsonl", "--limit", "2"], capsys)
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2 and all(json.loads(line)["id"] in {c.id for c in cks[::2]} for line in lines)
    rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--limit", "3"], capsys)
    assert rc == 0 and out.splitlines()[-1] == "(3 checkpoints)" and cks[0].id[:12] in out
    with pytest.raises(SystemExit):
        main(["zoo", "ls", "--zoo", url, "--metric", "test_acc>0.9"])
    with pytest.raises(SystemExit):
        main(["zoo", "ls", "--zoo", url, "--json", "--jsonl"])


def test_show_export_and_stats(zoo_url, tmp_path, capsys):
    url, cks = zoo_url
    rc, out, _ = _run(["zoo", "show", cks[2].id[:12], "--zoo", url], capsys)
    rec = json.loads(out)
    assert rc == 0 and rec["id"] == cks[2].id and rec["seed"] == 2 and rec["dataset"] == DS
    assert {"name": "fcs.1.weight", "shape": [5, 32], "dtype": "float32"} in rec["tensors"]
    out_dir = tmp_path / "exp"
    out_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out_dir / "config.json").symlink_to(victim)  # an existing symlink is replaced, never written through
    rc, out, err = _run(["zoo", "export", cks[2].id, "--zoo", url, "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert victim.read_text() == "keep me" and not (out_dir / "config.json").is_symlink()
    assert checkpoint_id(load_file(str(out_dir / "model.safetensors"))) == cks[2].id
    umask = os.umask(0)
    os.umask(umask)
    modes = {f: stat.S_IMODE((out_dir / f).stat().st_mode) for f in ("model.safetensors", "config.json")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes  # readable like any file the user writes
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"], "no temp files left"
    rc, _, err = _run(["zoo", "export", cks[2].id, "--zoo", url, "--out", str(victim)], capsys)
    assert rc == 2 and "exists and is not a directory" in err and victim.read_text() == "keep me"
    rc, out, _ = _run(["zoo", "stats", "--zoo", url], capsys)
    s = json.loads(out)
    assert rc == 0 and s["checkpoints"] == 6 and s["commits"] == 2 and s["by_arch"] == {"mlp-s": 6}


def test_rm_then_gc(zoo_url, capsys):
    url, cks = zoo_url
    rc, out, _ = _run(["zoo", "rm", cks[4].id[:12], cks[5].id, "--zoo", url], capsys)
    assert rc == 0 and json.loads(out)["removed"] == [cks[4].id, cks[5].id]
    rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--jsonl"], capsys)
    assert {json.loads(line)["id"] for line in out.splitlines()} == {c.id for c in cks[:4]}
    rc, out, _ = _run(["zoo", "gc", "--zoo", url], capsys)
    assert rc == 0 and json.loads(out)["removed_segments"] == []  # younger than the default --min-age
    rc, out, _ = _run(["zoo", "gc", "--zoo", url, "--min-age", "0"], capsys)
    report = json.loads(out)
    assert rc == 0 and len(report["removed_segments"]) == 1 and len(report["dropped_commits"]) == 1
    assert len(Zoo(url, mode="r")) == 4
    rc, _, err = _run(["zoo", "rm", "deadbeefdeadbeef", "--zoo", url], capsys)
    assert rc == 2 and "No checkpoint" in err
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            main(["zoo", "gc", "--zoo", url, "--min-age", bad])


def test_ls_json_is_strict_json_for_a_nan_metric_from_an_older_zoo(zoo_url, capsys, monkeypatch):
    url, _ = zoo_url
    monkeypatch.setattr(Checkpoint, "problems", lambda self, tensors=True: [])  # as weightgen once wrote them
    torch.manual_seed(99)
    sd = {n: t.contiguous() for n, t in build_model("mlp-s", 5, (64,)).state_dict().items()}
    Zoo(url).add([Checkpoint(sd, "mlp-s", 5, (64,), dataset=DS, metrics={"test_acc": float("nan")})])
    monkeypatch.undo()
    for flag in ("--json", "--jsonl"):
        rc, out, _ = _run(["zoo", "ls", "--zoo", url, flag], capsys)
        parsed = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in output")) if flag == "--json" \
            else [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) for line in out.splitlines()]
        assert rc == 0 and len(parsed) == 7
    for f in ("test_acc>=0.97", "test_acc<=0.0"):
        rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--metric", f, "--jsonl"], capsys)
        assert out == "", f"NaN passed {f}"


def test_ls_into_a_closed_pipe_is_quiet(zoo_url):
    """`weightgen zoo ls | head` ended in a BrokenPipeError traceback."""
    url, _ = zoo_url
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "weightgen.cli", "zoo", "ls", "--zoo", url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_ls_pages_and_compact(zoo_url, capsys):
    url, cks = zoo_url
    rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--jsonl"], capsys)
    every = [json.loads(line)["id"] for line in out.splitlines()]
    pages = []
    for off in (0, 4):
        rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--jsonl", "--limit", "4", "--offset", str(off)], capsys)
        pages += [json.loads(line)["id"] for line in out.splitlines()]
    assert pages == every and len(every) == 6
    rc, out, err = _run(["zoo", "ls", "--zoo", url, "--limit", "3", "--offset", "2"], capsys)
    assert out.splitlines()[-1] == "(3 checkpoints, 3-5 of 6)" and err == "1 more: --offset 5\n"
    rc, out, err = _run(["zoo", "compact", "--zoo", url], capsys)
    report = json.loads(out)
    assert rc == 0, err
    assert report["merged_commits"] == 2 and report["index"]["parts"] == 1
    assert report["novelty_index"]["mlp-s__k5__64"]["rows"] == 6
    rc, out, _ = _run(["zoo", "stats", "--zoo", url], capsys)
    s = json.loads(out)
    assert s["checkpoints"] == 6 and s["commits"] == 1 and s["index"]["tail_commits"] == 0
    rc, out, _ = _run(["zoo", "ls", "--zoo", url, "--jsonl"], capsys)
    assert sorted(json.loads(line)["id"] for line in out.splitlines()) == sorted(every)
