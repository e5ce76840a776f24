#!/usr/bin/env python3
"""Prove the README's test command on a fresh machine: a new venv in a temp dir, a clean copy of
this checkout, the command exactly as the README writes it, and the versions pip resolved.

    python .ci/fresh_install.py              # clean clone of HEAD
    python .ci/fresh_install.py --worktree   # the working tree as it is (uncommitted changes too)
    python .ci/fresh_install.py --relock     # resolve from the hand-kept pins only, and if the suite
                                             # passes, rewrite constraints.txt's locked section

Why: a green suite on a machine that already had packages hid a fresh install that resolved
pytest 9.2.0, whose API broke schemathesis' plugin (1 failed on a new machine). constraints.txt
therefore locks every package a fresh install of '.[test]' gets; this script checks that the lock
still covers everything pip installs and that the suite passes with it. Run it (and --relock when
you change dependencies) before resolving any issue that touches them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "# ---- locked"


def readme_test_command() -> str:
    """The README's test command, which must also be what .ci/run runs."""
    readme = (ROOT / "README.md").read_text()
    cmds = [line.strip() for line in readme.splitlines() if line.strip().startswith("pip install") and "[test]" in line]
    if len(cmds) != 1:
        raise SystemExit(f"expected one test command in README.md, found {cmds}")
    ci = (ROOT / ".ci" / "run").read_text()
    if cmds[0] not in ci:
        raise SystemExit(f".ci/run does not run the README's test command {cmds[0]!r}")
    return cmds[0]


def hand_pins(text: str) -> str:
    """constraints.txt above the locked section: the pins kept by hand, with their reasons."""
    return text.split(MARKER, 1)[0].rstrip() + "\n"


def copy_checkout(dst: Path, worktree: bool) -> None:
    if worktree:  # tracked + untracked-but-not-ignored files, as they are now
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True).stdout.decode().split("\0")
        for f in filter(None, files):
            src = ROOT / f
            if src.is_file():
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / f)
    else:
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dst)], check=True)


def freeze(venv: Path) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json",
                          "--exclude-editable", "--disable-pip-version-check"], check=True, capture_output=True, text=True).stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(out)}


def locked(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-").split("[")[0]] = m.group(2)
    return pins


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worktree", action="store_true", help="copy the working tree instead of cloning HEAD")
    ap.add_argument("--relock", action="store_true", help="resolve from the hand-kept pins and rewrite the lock")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (prints where)")
    ap.add_argument("--pytest-args", default="", help="extra arguments appended to the test command")
    a = ap.parse_args(argv)

    cmd = readme_test_command() + (" " + a.pytest_args if a.pytest_args else "")
    tmp = Path(tempfile.mkdtemp(prefix="weightgen-fresh-"))
    repo, venv = tmp / "repo", tmp / "venv"
    repo.mkdir()
    copy_checkout(repo, a.worktree or a.relock)
    constraints = (repo / "constraints.txt").read_text()
    if a.relock:
        (repo / "constraints.txt").write_text(hand_pins(constraints))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["WEIGHTGEN_HOME"] = str(tmp / "home")  # never the user's own home
    print(f"$ {cmd}    (in {repo}, venv {venv})", flush=True)
    t0 = time.time()
    proc = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    got = freeze(venv)
    pins = locked(hand_pins(constraints) if a.relock else constraints)
    report = {"exit_code": proc.returncode, "seconds": round(seconds, 1), "pytest": tail[0],
              "versions": {k: got.get(k) for k in ("torch", "pytest", "schemathesis", "hypothesis", "moto", "boto3",
                                                    "botocore", "ray", "zarr", "diffusers", "transformers", "accelerate",
                                                    "vector-quantize-pytorch", "numpy")},
              "packages": len(got),
              "unpinned": sorted(k for k in got if k not in pins and k not in ("pip", "setuptools", "wheel")),
              "differs_from_lock": {k: [pins[k], v] for k, v in got.items() if k in pins and pins[k].split("+")[0] != v.split("+")[0]}}
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-4000:], sep="\n")
    if a.relock and proc.returncode == 0:
        lock = [f"{MARKER} by `python .ci/fresh_install.py --relock` on {time.strftime('%Y-%m-%d')}: every package a",
                "# fresh install of '.[test]' resolved (Python 3.11, CPU), with the suite green. Do not edit by hand;",
                "# change the pins above and relock."]
        lock += [f"{k}=={v.split('+')[0]}" for k, v in sorted(got.items()) if k not in ("pip", "setuptools", "wheel")]
        (ROOT / "constraints.txt").write_text(hand_pins(constraints) + "\n" + "\n".join(lock) + "\n")
        report["relocked"] = str(ROOT / "constraints.txt")
    print(json.dumps(report, indent=1))
    if a.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = proc.returncode == 0 and (a.relock or (not report["unpinned"] and not report["differs_from_lock"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
