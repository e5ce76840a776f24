#!/usr/bin/env python3
"""Show that each guard's regression test fails when the guard is removed.

A test that passes for another reason protects nothing. Every entry of ``.ci/guards/*.yaml``
names a guard in the code (an exact snippet), a bypass (what replaces it), and the test that
must catch its absence:

    - name: zoo stack converts rows by their stored dtype
      file: zoo/store.py
      find: "block = _as_dtype(block, dtype)"
      replace: "pass"
      test: tests/test_zoo_store.py::test_stack_mixed_dtypes

For each entry this copies the working tree to a temp dir, applies the bypass there (the snippet
must occur exactly once), runs the one test and expects it to FAIL; it also runs every named test
on the unmodified copy and expects it to PASS. Nothing in the checkout is modified.

    python .ci/guard_check.py [--only SUBSTRING] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def _run_test(tree: Path, test: str) -> tuple[bool, str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test], cwd=tree,
                       env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    return p.returncode == 0, (lines[-1] if lines else p.stderr[-300:]), time.time() - t0


def load_guards(only: str | None) -> list[dict]:
    guards = []
    for f in sorted((ROOT / ".ci" / "guards").glob("*.yaml")):
        for g in yaml.safe_load(f.read_text()) or []:
            g["source"] = f.name
            if not only or only in g["name"] or only in g["test"]:
                guards.append(g)
    return guards


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="only guards whose name or test contains this")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    guards = load_guards(a.only)
    rows, ok = [], True
    with tempfile.TemporaryDirectory(prefix="weightgen-guards-") as tmp:
        clean = Path(tmp) / "clean"
        _copy_tree(clean)
        passes = {t: _run_test(clean, t) for t in sorted({g["test"] for g in guards})}
        for g in guards:
            tree = Path(tmp) / "bypassed"
            shutil.rmtree(tree, ignore_errors=True)
            shutil.copytree(clean, tree)
            path = tree / g["file"]
            text = path.read_text()
            count = text.count(g["find"])
            if count != 1:
                rows.append({**g, "verdict": f"BAD ENTRY: snippet found {count} times"})
                ok = False
                continue
            path.write_text(text.replace(g["find"], g["replace"]))
            passed, summary, secs = _run_test(tree, g["test"])
            good = passes[g["test"]][0] and not passed
            ok &= good
            rows.append({"name": g["name"], "test": g["test"], "with_guard": passes[g["test"]][1],
                         "bypassed": summary, "seconds": round(secs, 1),
                         "verdict": "caught" if good else ("NOT CAUGHT" if passed else "test fails even with the guard")})
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['verdict']:>14}  {r['name']}\n{'':>16}{r.get('test', '')}: bypassed -> {r.get('bypassed', '')}")
        print(f"{sum(r['verdict'] == 'caught' for r in rows)}/{len(rows)} guards caught by their tests")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
