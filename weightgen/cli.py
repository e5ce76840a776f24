"""The ``weightgen`` console script: one entry point, subcommands, heavy imports done lazily."""
from __future__ import annotations

import argparse
import json
import sys


def _zoo_arg(p):
    p.add_argument("--zoo", default=None, help="zoo URL or directory (default: $WEIGHTGEN_ZOO or $WEIGHTGEN_HOME/zoo)")


def _metric_filter(text: str):
    """'test_acc>=0.9' / 'loss<=0.1' -> (name, lo, hi)."""
    for op in (">=", "<="):
        if op in text:
            name, value = text.split(op, 1)
            v = float(value)
            return (name.strip(), v, None) if op == ">=" else (name.strip(), None, v)
    raise argparse.ArgumentTypeError(f"metric filter must look like NAME>=VALUE or NAME<=VALUE, got {text!r}")


def cmd_zoo_ingest(a) -> int:
    from weightgen.paths import default_zoo
    from zoo.ingest import ingest

    s = ingest(a.paths, a.zoo or default_zoo(), arch=a.arch, dataset=a.dataset, tags=a.tag or [],
               workers=a.workers, show_progress=not a.no_progress)
    print(json.dumps(s.as_dict(), indent=1) if a.json else s.text())
    return 1 if s.rejected else 0


def cmd_zoo_ls(a) -> int:
    from zoo import open_zoo

    recs = open_zoo(a.zoo, mode="r").query(arch=a.arch, dataset=a.dataset, tag=a.tag, metrics=a.metric or [])
    recs = recs[: a.limit] if a.limit else recs
    if a.json:
        print(json.dumps(recs))
        return 0
    print(f"{'id':14} {'arch':10} {'dataset':28} {'step':>5} {'seed':>5}  metrics")
    for r in recs:
        m = " ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))
        print(f"{r['id'][:12]:14} {r['arch']:10} {r['dataset'][:28]:28} {str(r['step']):>5} {str(r['seed']):>5}  {m}")
    print(f"({len(recs)} checkpoints)")
    return 0


def cmd_zoo_show(a) -> int:
    from zoo import open_zoo

    z = open_zoo(a.zoo, mode="r")
    rec = z.get(a.id)
    from weightgen.archs import get_arch

    rec["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                      for t in get_arch(rec["arch"]).tensors(rec["num_classes"], rec["input_shape"])]
    print(json.dumps(rec, indent=1))
    return 0


def cmd_zoo_export(a) -> int:
    from zoo import open_zoo
    from zoo.export import export_checkpoint

    out = export_checkpoint(open_zoo(a.zoo, mode="r"), a.id, a.out)
    print(out)
    return 0


def cmd_zoo_stats(a) -> int:
    from zoo import open_zoo

    print(json.dumps(open_zoo(a.zoo, mode="r").stats(), indent=1))
    return 0


def cmd_zoo_gc(a) -> int:
    from zoo import open_zoo

    removed = open_zoo(a.zoo).gc(min_age_s=a.min_age)
    print(json.dumps({"removed_segments": removed}))
    return 0


def cmd_zoo_build(a) -> int:
    from weightgen.paths import default_zoo
    from zoo.population import PopulationConfig, build_population

    cfg = PopulationConfig(arch=a.arch, family=a.family, tasks=a.tasks, seeds=a.seeds, steps=a.steps,
                           k=a.k, task_seed=a.task_seed, device=a.device)
    summary = build_population(cfg, a.zoo or default_zoo(), show_progress=not a.no_progress)
    print(json.dumps(summary, indent=1))
    return 0


def _threads(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}")
    return int(v)


def cmd_sample(a) -> int:
    import torch

    from weightgen.sampling import sample, write

    # weights depend on the intra-op thread count at ~1e-6 (float sums split differently across
    # threads); servers sample with 1 thread per replica, and so does this by default: same bytes
    torch.set_num_threads(a.torch_threads)
    res = sample(a.arch, a.dataset, generator=a.generator, n=a.n, select=a.select, seed=a.seed,
                 instruction=a.instruction, refine_steps=a.refine, novelty=not a.no_novelty)
    out = write(res, a.out)
    m = res.manifest
    if a.json:
        print(json.dumps(m, indent=1))
    else:
        nov = m.get("novelty") or {}
        print(f"wrote {out}/model.safetensors ({m['arch']}, {m['num_classes']} classes) from {m['generator']}: "
              f"support acc {m['support_accuracy']:.3f}, predicted acc "
              f"{m['predicted_accuracy'] if m['predicted_accuracy'] is None else round(m['predicted_accuracy'], 3)}, "
              f"novelty {nov.get('ratio', float('nan')):.2f}" + (f", refined {m['refine_steps']} steps" if m['refine_steps'] else ""))
    return 0


def cmd_quickstart(a) -> int:
    from weightgen.quickstart import quickstart

    quickstart(fast=a.fast, show_progress=not a.no_progress)
    return 0


def cmd_generators(a) -> int:
    from weightgen.sampling import _generator_dirs, generator_info

    print(json.dumps([generator_info(d) for d in _generator_dirs()], indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weightgen", description="Generate ready-to-load neural-network weights.")
    sub = p.add_subparsers(dest="command", required=True)

    zp = sub.add_parser("zoo", help="the checkpoint zoo: ingest, list, show, export, build").add_subparsers(
        dest="zoo_command", required=True)
    s = zp.add_parser("ingest", help="ingest checkpoint files, HF folders, directories or .jsonl manifests")
    s.add_argument("paths", nargs="+")
    _zoo_arg(s)
    s.add_argument("--arch", help="architecture (default: from each checkpoint's config)")
    s.add_argument("--dataset", help="dataset the checkpoints were trained on (default: from their config)")
    s.add_argument("--tag", action="append", help="tag every ingested checkpoint (repeatable)")
    s.add_argument("--workers", type=int, default=1, help="N > 1 runs a Ray batch job with N workers")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_zoo_ingest)

    s = zp.add_parser("ls", help="list checkpoints matching filters")
    _zoo_arg(s)
    s.add_argument("--arch")
    s.add_argument("--dataset", help="exact name, or a prefix ending in '*'")
    s.add_argument("--tag")
    s.add_argument("--metric", action="append", type=_metric_filter, help="e.g. test_acc>=0.9 (repeatable)")
    s.add_argument("--limit", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_zoo_ls)

    s = zp.add_parser("show", help="one checkpoint's record and tensor list")
    s.add_argument("id")
    _zoo_arg(s)
    s.set_defaults(fn=cmd_zoo_show)

    s = zp.add_parser("export", help="write DIR/model.safetensors (bit-exact) + DIR/config.json")
    s.add_argument("id")
    _zoo_arg(s)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_zoo_export)

    s = zp.add_parser("stats", help="counts by architecture and collection")
    _zoo_arg(s)
    s.set_defaults(fn=cmd_zoo_stats)

    s = zp.add_parser("gc", help="delete segments that no commit references (left by killed writers)")
    _zoo_arg(s)
    s.add_argument("--min-age", type=float, default=3600.0, help="only segments older than this many seconds")
    s.set_defaults(fn=cmd_zoo_gc)

    s = zp.add_parser("build", help="train a population of models at once (vectorized) and ingest it")
    _zoo_arg(s)
    s.add_argument("--arch", default="mlp-s")
    s.add_argument("--family", default="digits-subsets")
    s.add_argument("--tasks", type=int, default=20)
    s.add_argument("--seeds", type=int, default=5)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--k", type=int, default=5, help="classes per task")
    s.add_argument("--task-seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_zoo_build)

    sub.add_parser("train", help="train a generator: weightgen train --config CONFIG.yaml [--resume] [KEY=VALUE ...]",
                   add_help=False)  # dispatched in main() to training.train's own parser

    from weightgen.archs import ARCHS

    s = sub.add_parser("sample", help="generate ready-to-load weights for an architecture and a dataset")
    s.add_argument("--arch", required=True, choices=ARCHS.names())
    s.add_argument("--dataset", required=True, help="registry name (digits:classes=3,1,4) or npz:PATH / folder:PATH")
    s.add_argument("--generator", help="trained generator name or directory (default: the one for this arch)")
    s.add_argument("--instruction", help="a text instruction (used by instruction-conditioned generators)")
    s.add_argument("--n", type=int, default=8, help="candidates to sample")
    s.add_argument("--select", choices=["best", "none"], default="best",
                   help="best: keep the candidate with the best support-set accuracy; none: the first one")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--refine", type=int, default=0, metavar="K",
                   help="K gradient steps on the support set after sampling (off by default; declared in the manifest)")
    s.add_argument("--no-novelty", action="store_true", help="skip the novelty check against the zoo")
    s.add_argument("--torch-threads", type=_threads, default=1,
                   help="torch threads (default 1, as a server replica: the same request gives the same bytes)")
    s.add_argument("--out", required=True)
    s.add_argument("--json", action="store_true", help="print the manifest")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("generators", help="list trained generators")
    s.set_defaults(fn=cmd_generators)

    s = sub.add_parser("quickstart", help="build the default zoo and train the default generators (idempotent)")
    s.add_argument("--fast", action="store_true", help="a minutes-long smaller run (smoke test)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_quickstart)

    from weightgen.eval_cli import add_eval_parser

    add_eval_parser(sub)

    from serving.cli import add_serve_parser

    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its own parser (training.train), so --config etc. pass straight through
        from training.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    from weightgen.archs import ShapeError
    from weightgen.data import DatasetError
    from weightgen.registry import UnknownNameError
    from weightgen.sampling import NoGeneratorError
    from zoo.store import ZooError

    try:
        return int(args.fn(args) or 0)
    except (ZooError, DatasetError, UnknownNameError, ShapeError, NoGeneratorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
