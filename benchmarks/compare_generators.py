"""Held-out quality of trained generators given by path, side by side on the same tasks and seeds.

    python benchmarks/compare_generators.py DIR [DIR ...] [--tasks 10]

For checks such as "DDP training gives a generator as good as one process" (RESULTS.md, "Training on
several processes"): each generator runs exactly as ``weightgen sample`` does (fitted head, and pure
with ``generated``) on the harness's held-out class sets, plain and rolled by one pixel, 10 support
examples per class, n = 8, seed 0. Prints test accuracy %, mean and best-of-n (chosen on the support).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

# benchmarks/zoo.py would shadow the zoo package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def heldout(n: int) -> dict[str, list[str]]:
    from weightgen.data.digits import get_family
    from weightgen.paths import default_zoo
    from zoo import open_zoo

    seen = {r["dataset"] for r in open_zoo(default_zoo(), mode="r").query()}
    return get_family("digits-subsets").heldout_tasks(n, seed=1, zoo_tasks=seen)


def main(argv=None) -> int:
    from weightgen.baselines import Request
    from weightgen.data import load_dataset
    from weightgen.eval_tasks import shift_task
    from weightgen.evaluate import accuracy_many
    from weightgen.harness import generator_source
    from weightgen.sampling import load_generator

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--tasks", type=int, default=10)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    tasks = [t for names in heldout(a.tasks).values() for t in names]
    res: dict[tuple, list[float]] = {}
    for d in a.dirs:
        g = load_generator(d)
        sources = {"fit": generator_source(g.model, "fit", g.input_profile),
                   "generated": generator_source(g.model, "generated")}
        for name in tasks:
            for variant in ("heldout", "rolled"):
                task = load_dataset(name)
                task = shift_task(task) if variant == "rolled" else task
                sx, sy = task.support(10, 0)
                req = Request("mlp-s", task, sx, sy, 8, 0, None)
                for head, src in sources.items():
                    sd, score = src(req)
                    acc = accuracy_many("mlp-s", task.num_classes, (64,), sd, task.x_test, task.y_test)
                    key = (g.info["name"], variant, head)
                    res.setdefault(key + ("mean",), []).append(float(acc.mean()))
                    res.setdefault(key + ("best",), []).append(float(acc[score.argmax()]))
    for k, v in sorted(res.items()):
        print(f"{' '.join(k):60} {100 * np.mean(v):5.1f}  ({len(v)} tasks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
