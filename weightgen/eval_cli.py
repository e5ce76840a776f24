"""``weightgen eval``: trained generators vs baselines on held-out tasks (see weightgen.harness)."""
from __future__ import annotations


def cmd_eval(a) -> int:
    from weightgen.harness import EvalConfig, format_tables, run_eval, write_report
    from weightgen.paths import home

    cfg = EvalConfig(arch=a.arch, tasks=a.tasks, n=a.n, quick=a.quick, zoo=a.zoo, threads=a.threads,
                     variants=tuple(a.variants.split(",")), verbose=a.verbose,
                     support_sizes=(10,) if a.quick else EvalConfig.support_sizes,
                     class_counts=(10,) if a.quick else EvalConfig.class_counts)
    results = run_eval(cfg)
    out = write_report(results, a.out or home() / "eval")
    print(format_tables(results))
    print(f"report, results.json and plots in {out} ({results['seconds']:.0f} s)")
    return 0


def add_eval_parser(subparsers) -> None:
    """Register ``weightgen eval`` on the console script's subparsers."""
    from weightgen.cli import arch_arg

    s = subparsers.add_parser("eval", help="evaluate trained generators against baselines on held-out tasks")
    s.add_argument("--quick", action="store_true", help="3 tasks per kind instead of 10 (a smoke run)")
    s.add_argument("--tasks", type=int, default=None, help="held-out tasks per kind (unseen class set / unseen order)")
    s.add_argument("--n", type=int, default=8, help="samples per method and task")
    s.add_argument("--out", default=None, help="output directory (default: $WEIGHTGEN_HOME/eval)")
    s.add_argument("--arch", default="mlp-s", type=arch_arg)
    s.add_argument("--zoo", default=None, help="zoo URL or directory (default: $WEIGHTGEN_ZOO or $WEIGHTGEN_HOME/zoo)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    s.add_argument("--variants", default="heldout,shifted,elastic,mnist8",
                   help="task variants: heldout, and the unseen distributions shifted, elastic, mnist8 (comma-separated)")
    s.add_argument("--verbose", action="store_true", help="one line per task")
    s.set_defaults(fn=cmd_eval)
