"""Generator benchmark: the evaluation harness at full size, scored against the issue's targets.

    python benchmarks/generators.py [--quick] [--results benchmarks/RESULTS.md]

Runs ``weightgen.harness.run_eval`` (10 + 10 held-out digit tasks, n = 8) on every trained
generator in ``$WEIGHTGEN_HOME/generators``, writes the full report to ``$WEIGHTGEN_HOME/eval``
and rewrites only the "## Generators (issue: D2NWG)" section of RESULTS.md (other sections, such
as "## Zoo", are kept as they are). Targets are scored per generator on both held-out kinds
pooled; "scratch" is the same arch trained 300 steps on the task (the harness's reference).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import runpy
import sys
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and "zoo" would import benchmarks/zoo.py, not the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


import torch

from weightgen.harness import EvalConfig, format_tables, run_eval, write_report
from weightgen.paths import home

update_section = runpy.run_path(str(Path(__file__).resolve().parent / "results_md.py"))["update_section"]

SECTION = "## Generators (issue: D2NWG)"


def _steps(x):
    return math.inf if x is None else x


def targets(res: dict, generator: str) -> list[tuple[str, str, bool]]:
    """(target, measured, passed) for one generator, on the held-out tasks of both kinds."""
    s = {r["method"]: r for r in res["summary"]
         if r["variant"] == "heldout" and r["split"] == "all" and "table" not in r}
    nov = next((r for r in res["summary"] if r.get("table") == "recon_novelty" and r["split"] == "all"
                and r["method"] == generator), {})
    g, scratch, near = s[generator], s["scratch"]["mean"], s["nearest"]["mean"]
    base_steps = min(_steps(s["random"].get("steps_to_0.975")), _steps(s["zoo_mean"].get("steps_to_0.975")))
    gen_steps = _steps(g.get("steps_to_0.975"))
    speed = res["speed"][generator]["models_per_s"]
    ratio = nov.get("ratio")
    fmt = lambda x: ">100" if x == math.inf else str(x)  # noqa: E731
    return [
        ("best-of-n zero-shot ≥ 0.95 × scratch", f"{g['best'] / scratch:.3f} × ({100 * g['best']:.1f} vs "
         f"{100 * scratch:.1f} %)", g["best"] >= 0.95 * scratch),
        ("mean zero-shot ≥ 0.85 × scratch", f"{g['mean'] / scratch:.3f} ×", g["mean"] >= 0.85 * scratch),
        ("mean zero-shot ≥ retrieval + 20 points", f"{100 * (g['mean'] - near):+.1f} points ({100 * near:.1f} % "
         "retrieval)", g["mean"] - near >= 0.20),
        ("novelty ≥ 1.0", "–" if ratio is None else f"{ratio:.2f}", ratio is not None and ratio >= 1.0),
        ("FT steps to 97.5 % ≤ ½ × min(random, zoo-mean)", f"{fmt(gen_steps)} vs {fmt(base_steps)}",
         gen_steps < math.inf and gen_steps <= base_steps / 2),
        ("sampling ≥ 100 mlp-s models/s", f"{speed:.0f}/s", speed >= 100),
    ]


def section(res: dict, command: str) -> str:
    gens = list(res["generators"])
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{res['config']['threads']} torch thread(s), load average {os.getloadavg()[0]:.1f}")
    lines = [SECTION, "", f"`{command}` | {time.strftime('%Y-%m-%d')} | {machine} | {res['seconds']:.0f} s", "",
             f"Zoo `{res['zoo']}` ({res['zoo_checkpoints']} final checkpoints); generators: "
             + ", ".join(f"{g} ({i['class']})" for g, i in res["generators"].items()) + ".", ""]
    if gens:
        scored = {g: targets(res, g) for g in gens}
        lines += ["### Targets (held-out set + tuple tasks pooled)", "", "| target | " + " | ".join(gens) + " |",
                  "|---" * (1 + len(gens)) + "|"]
        for i, (name, _, _) in enumerate(scored[gens[0]]):
            lines.append(f"| {name} | " + " | ".join(
                f"{'PASS' if scored[g][i][2] else 'FAIL'}: {scored[g][i][1]}" for g in gens) + " |")
        lines.append("")
    return "\n".join(lines) + "\n" + re.sub(r"^### ", "#### ", format_tables(res), flags=re.M) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 + 3 tasks, for a smoke run")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    p.add_argument("--out", default=None, help="full report directory (default: $WEIGHTGEN_HOME/eval)")
    a = p.parse_args(argv)
    res = run_eval(EvalConfig(quick=a.quick, verbose=True))
    write_report(res, a.out or home() / "eval")
    text = section(res, "python benchmarks/generators.py" + (" --quick" if a.quick else ""))
    update_section(Path(a.results), SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
