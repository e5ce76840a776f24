"""CLI start-up benchmark: what a user waits for, against what the work itself costs.

    python benchmarks/cli_startup.py [--runs 7] [--results benchmarks/RESULTS.md]

Times, in fresh processes, side by side in one run (median and min of ``--runs``):
``python -c pass`` (the interpreter), ``python -c "import torch"`` (the floor any torch program
pays), ``weightgen --help``, and ``weightgen sample`` on the default generator (the README's
command, novelty included). In one process it also times repeated ``sample()`` calls after the
first, which is what batch use from Python and a server pay (imports are paid once there).
Targets (issue: new user): ``weightgen --help`` <= 1 s; ``weightgen sample`` <= 3 s wall.
Needs a trained default generator (``weightgen quickstart``). Rewrites only its RESULTS.md section.
"""
from __future__ import annotations

import argparse
import os
import platform
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
update_section = runpy.run_path(str(Path(__file__).resolve().parent / "results_md.py"))["update_section"]

SECTION = "## CLI start-up (issue: new user)"
DATASET = "digits:classes=4,2,8,1,0"


def wall(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return out


def in_process(runs: int) -> tuple[float, float]:
    """(first call, median of later calls) of sampling.sample in one process, imports excluded."""
    from weightgen.sampling import sample

    t0 = time.perf_counter()
    sample("mlp-s", DATASET, n=8)
    first = time.perf_counter() - t0
    later = []
    for seed in range(runs):
        t0 = time.perf_counter()
        sample("mlp-s", DATASET, n=8, seed=seed)
        later.append(time.perf_counter() - t0)
    return first, statistics.median(later)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    a = ap.parse_args(argv)
    exe = [sys.executable, "-m", "weightgen.cli"]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "python -c pass": wall([sys.executable, "-c", "pass"], a.runs),
            "python -c 'import torch'": wall([sys.executable, "-c", "import torch"], a.runs),
            "weightgen --help": wall(exe + ["--help"], a.runs),
            f"weightgen sample --arch mlp-s --dataset {DATASET} --out DIR": wall(
                exe + ["sample", "--arch", "mlp-s", "--dataset", DATASET, "--out", str(Path(tmp) / "s")], a.runs),
        }
    first, later = in_process(a.runs)
    load1 = os.getloadavg()[0]
    torch_med = statistics.median(rows["python -c 'import torch'"])
    lines = [SECTION, "",
             f"`python benchmarks/cli_startup.py --runs {a.runs}` | {time.strftime('%Y-%m-%d')} | {platform.machine()}, "
             f"{os.cpu_count()} CPU cores | load average {load0:.1f} at start, {load1:.1f} at end", "",
             "Wall time of fresh processes (each command run in turn, the same number of times, in this one run):", "",
             "| command | median | min | vs `import torch` |", "|---|---|---|---|"]
    for name, ts in rows.items():
        med = statistics.median(ts)
        lines.append(f"| `{name}` | {med:.2f} s | {min(ts):.2f} s | {med / torch_med:.2f}× |")
    help_med = statistics.median(rows["weightgen --help"])
    sample_med = statistics.median(rows[next(k for k in rows if k.startswith("weightgen sample"))])
    lines += ["", f"In one process (batch use from Python, a server): the first `sample(n=8)` took {first:.2f} s "
              f"(imports, generator load, novelty's zoo preparation); later calls {1000 * later:.0f} ms each (median).", "",
              "Targets:", "",
              f"- `weightgen --help` ≤ 1 s: {'PASS' if help_med <= 1 else 'FAIL'} ({help_med:.2f} s)",
              f"- `weightgen sample` on the default generator ≤ 3 s: {'PASS' if sample_med <= 3 else 'FAIL'} "
              f"({sample_med:.2f} s)", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    update_section(Path(a.results), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
