"""The ``weightgen`` console script: one entry point, subcommands, heavy imports done lazily."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _zoo_arg(p):
    p.add_argument("--zoo", default=None, help="zoo URL or directory (default: $WEIGHTGEN_ZOO or $WEIGHTGEN_HOME/zoo)")


def arch_arg(text: str) -> str:
    """``--arch``, checked against the registry when it is parsed (not when the parser is built:
    the registry imports torch, which ``weightgen --help`` should not wait for)."""
    from weightgen.archs import ARCHS

    if text not in ARCHS:
        raise argparse.ArgumentTypeError(f"unknown arch {text!r} (choose from {', '.join(ARCHS.names())})")
    return text


def _metric_filter(text: str):
    """'test_acc>=0.9' / 'loss<=0.1' -> (name, lo, hi)."""
    for op in (">=", "<="):
        if op in text:
            name, value = text.split(op, 1)
            v = float(value)
            return (name.strip(), v, None) if op == ">=" else (name.strip(), None, v)
    raise argparse.ArgumentTypeError(f"metric filter must look like NAME>=VALUE or NAME<=VALUE, got {text!r}")


def _int_in(lo: int, hi: int | None, what: str):
    """An argparse type: an integer in lo..hi, checked when the arguments are parsed (before any work)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{what} must be in {lo}..{'' if hi is None else hi}, got {text}")
        return v
    return parse


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return v


def _dumps(obj, **kw) -> str:
    return json.dumps(obj, allow_nan=False, **kw)  # NaN is not JSON: strict parsers (jq) refuse it


def cmd_zoo_ingest(a) -> int:
    from weightgen.paths import default_zoo
    from zoo.ingest import ingest

    s = ingest(a.paths, a.zoo or default_zoo(), arch=a.arch, dataset=a.dataset, tags=a.tag or [],
               workers=a.workers, show_progress=not a.no_progress, max_bytes=a.max_bytes)
    print(_dumps(s.as_dict(), indent=1) if a.json else s.text())
    return 1 if s.rejected else 0


def cmd_zoo_ls(a) -> int:
    from zoo import open_zoo

    z = open_zoo(a.zoo, mode="r")
    filters = dict(arch=a.arch, dataset=a.dataset, tag=a.tag, metrics=a.metric or [], instruction=a.instruction)
    recs = z.query(**filters, limit=a.limit or None, offset=a.offset)  # only this page's records are read
    if a.jsonl:  # one checkpoint per line: `| head` and `jq` work on any zoo size
        for r in recs:
            print(_dumps(r))
        return 0
    if a.json:
        print(_dumps(recs))
        return 0
    print(f"{'id':14} {'arch':10} {'dataset':28} {'step':>5} {'seed':>5}  metrics")
    for r in recs:
        m = " ".join(f"{k}={v:.4g}" if v is not None else f"{k}=null" for k, v in sorted(r["metrics"].items()))
        print(f"{r['id'][:12]:14} {r['arch']:10} {r['dataset'][:28]:28} {str(r['step']):>5} {str(r['seed']):>5}  {m}")
    total = len(recs) if not (a.limit or a.offset) else z.count(**filters)
    print(f"({len(recs)} checkpoints)" if not a.offset else f"({len(recs)} checkpoints, {a.offset + 1}-{a.offset + len(recs)} of {total})")
    if a.offset + len(recs) < total:
        print(f"{total - a.offset - len(recs)} more: --offset {a.offset + len(recs)}", file=sys.stderr)
    return 0


def cmd_zoo_show(a) -> int:
    from zoo import open_zoo

    z = open_zoo(a.zoo, mode="r")
    rec = z.get(a.id)
    from weightgen.archs import get_arch

    rec["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                      for t in get_arch(rec["arch"]).tensors(rec["num_classes"], rec["input_shape"])]
    print(_dumps(rec, indent=1))
    return 0


def cmd_zoo_rm(a) -> int:
    from zoo import open_zoo

    removed = open_zoo(a.zoo).remove(a.ids)
    print(_dumps({"removed": removed, "note": "hidden from every reader now; `weightgen zoo gc` reclaims the data "
                  "once the removal is --min-age old"}, indent=1))
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

    from zoo.gc import collect

    print(_dumps(collect(open_zoo(a.zoo), min_age_s=a.min_age), indent=1))
    return 0


def cmd_zoo_compact(a) -> int:
    from zoo import open_zoo
    from zoo.compact import compact

    z = open_zoo(a.zoo)
    report = compact(z, small_rows=a.small_rows)
    if not a.no_novelty_index:
        from weightgen.nn_index import update_all

        report["novelty_index"] = update_all(z)
    report["new_segments"] = len(report["new_segments"])
    print(_dumps(report, indent=1))
    return 0


def cmd_zoo_build(a) -> int:
    from weightgen.archs import get_arch
    from weightgen.paths import default_zoo
    from zoo.population import PopulationConfig, build_population

    if get_arch(a.arch).family in ("vit", "resnet"):  # task parts on a stored backbone (issue 10)
        from weightgen.backbone_cli import cmd_zoo_build_heads

        return cmd_zoo_build_heads(a)
    cfg = PopulationConfig(arch=a.arch, family=a.family, tasks=a.tasks, seeds=a.seeds, steps=a.steps,
                           k=a.k, task_seed=a.task_seed, device=a.device)
    summary = build_population(cfg, a.zoo or default_zoo(), show_progress=not a.no_progress, workers=a.workers)
    print(json.dumps(summary, indent=1))
    return 0


def default_out(a) -> str:
    """Where ``sample`` writes without --out: under $WEIGHTGEN_HOME, never the current directory
    (a repository checkout would show it in ``git status``)."""
    import re

    from weightgen.paths import home

    slug = re.sub(r"[^A-Za-z0-9.,=-]+", "-", a.dataset or "instruction").strip("-")[:80] or "dataset"
    return str(home() / "samples" / f"{a.arch}_{slug}_seed{a.seed}")


def cmd_sample(a) -> int:
    import torch

    from weightgen.archs import get_arch
    from weightgen.outputs import check_out_dir
    from weightgen.sampling import sample, write

    out_dir = a.out or default_out(a)
    check_out_dir(out_dir)  # an unusable --out fails now, not after sampling
    if get_arch(a.arch).family in ("vit", "resnet"):  # a head on a stored backbone (issue 10)
        from weightgen.backbone_cli import cmd_sample_backbone

        return cmd_sample_backbone(a, out_dir)
    # weights depend on the intra-op thread count at ~1e-6 (float sums split differently across
    # threads); servers sample with 1 thread per replica, and so does this by default: same bytes
    torch.set_num_threads(a.torch_threads)
    res = sample(a.arch, a.dataset, generator=a.generator, n=a.n, select=a.select, seed=a.seed,
                 instruction=a.instruction, refine_steps=a.refine, novelty=not a.no_novelty, head=a.head,
                 support_per_class=a.support_per_class, text_encoder=a.text_encoder)
    out = write(res, out_dir)
    m = res.manifest
    for w in m["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if a.json:
        print(json.dumps(m, indent=1))
    else:
        nov = m.get("novelty") or {}
        pred = (("n/a (no data)" if not m["support_size"] else "n/a (too few examples to set any aside)")
                if m["predicted_accuracy"] is None else
                f"{m['predicted_accuracy']:.3f} [{m['predicted_accuracy_interval'][0]:.3f}, "
                f"{m['predicted_accuracy_interval'][1]:.3f}] on {m['predicted_accuracy_n']} held-out examples")
        print(f"wrote {out}/model.safetensors ({m['arch']}, {m['num_classes']} classes) from {m['generator']}: "
              f"support acc {'n/a' if m['support_accuracy'] is None else format(m['support_accuracy'], '.3f')}, "
              f"predicted acc {pred}, novelty "
              + (f"{nov['ratio']:.2f}" if nov.get("ratio") is not None else "n/a")
              + (f", refined {m['refine_steps']} steps" if m["refine_steps"] else ""))
    return 0


def cmd_quickstart(a) -> int:
    from weightgen.quickstart import quickstart

    if getattr(a, "arch", None) not in (None, "mlp-s"):  # a head generator on a backbone (issue 10)
        from weightgen.backbone_cli import cmd_quickstart_backbone

        return cmd_quickstart_backbone(a)

    quickstart(fast=a.fast, show_progress=not a.no_progress, extra=tuple(a.extra), without=tuple(a.without))
    return 0


def cmd_generators(a) -> int:
    from weightgen.generators import trained_generators

    print(json.dumps([g.info() for g in trained_generators()], indent=1))
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
    s.add_argument("--workers", type=_int_in(1, None, "--workers"), default=1, help="N > 1 runs a Ray batch job with N workers")
    s.add_argument("--max-bytes", type=_int_in(1, None, "--max-bytes"), default=None,
                   help="refuse a file that declares more data than this (default: $WEIGHTGEN_MAX_CHECKPOINT_BYTES, "
                        "else 4x the arch's size + 64 MiB); checked from its header before any data is read")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_zoo_ingest)

    s = zp.add_parser("ls", help="list checkpoints matching filters")
    _zoo_arg(s)
    s.add_argument("--arch")
    s.add_argument("--dataset", help="exact name, or a prefix ending in '*'")
    s.add_argument("--tag")
    s.add_argument("--metric", action="append", type=_metric_filter, help="e.g. test_acc>=0.9 (repeatable)")
    s.add_argument("--instruction", help="entries with an instruction containing this text (case-insensitive)")
    s.add_argument("--limit", type=_int_in(0, None, "--limit"), default=0, help="at most this many (0: all)")
    s.add_argument("--offset", type=_int_in(0, None, "--offset"), default=0, help="skip this many first (paging)")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON array")
    out.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    s.set_defaults(fn=cmd_zoo_ls)

    s = zp.add_parser("show", help="one checkpoint's record and tensor list")
    s.add_argument("id")
    _zoo_arg(s)
    s.set_defaults(fn=cmd_zoo_show)

    s = zp.add_parser("rm", help="hide checkpoints from every reader (one commit); `zoo gc` reclaims their data")
    s.add_argument("ids", nargs="+", metavar="ID", help="checkpoint id or a unique prefix of >= 8 hex digits")
    _zoo_arg(s)
    s.set_defaults(fn=cmd_zoo_rm)

    s = zp.add_parser("export", help="write DIR/model.safetensors (bit-exact) + DIR/config.json")
    s.add_argument("id")
    _zoo_arg(s)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_zoo_export)

    s = zp.add_parser("stats", help="counts by architecture and collection")
    _zoo_arg(s)
    s.set_defaults(fn=cmd_zoo_stats)

    s = zp.add_parser("gc", help="delete data no entry needs: segments of killed writers, removed entries")
    _zoo_arg(s)
    s.add_argument("--min-age", type=_seconds, default=3600.0,
                   help="only what has been garbage this many seconds (default 3600). Segments a live writer holds a "
                        "lease on are kept at any age, 0 included; the age protects writers of weightgen versions "
                        "without leases, and readers that listed the zoo before a `zoo rm`")
    s.set_defaults(fn=cmd_zoo_gc)

    s = zp.add_parser("compact", help="merge small commits' segments, fold every commit into the metadata index, "
                      "update the novelty index; safe beside writers, readers and kill -9")
    _zoo_arg(s)
    s.add_argument("--small-rows", type=_int_in(1, None, "--small-rows"), default=1024,
                   help="merge commits of fewer rows than this (default 1024)")
    s.add_argument("--no-novelty-index", action="store_true", help="leave the novelty index as it is")
    s.set_defaults(fn=cmd_zoo_compact)

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
    s.add_argument("--workers", type=_int_in(1, None, "--workers"), default=1,
                   help="N > 1: one vectorized shard of the tasks per Ray task (or a Ray cluster via RAY_ADDRESS), "
                        "each committing its own checkpoints")
    from weightgen.backbone_cli import add_build_head_args

    add_build_head_args(s, _int_in)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_zoo_build)

    sub.add_parser("train", help="train a generator: weightgen train --config CONFIG.yaml [--resume] [KEY=VALUE ...]",
                   add_help=False)  # dispatched in main() to training.train's own parser

    s = sub.add_parser("sample", help="generate ready-to-load weights for an architecture and a dataset")
    s.add_argument("--arch", required=True, type=arch_arg, help="mlp-s, mlp-m, cnn-s, vit-t, vit-s, resnet-18, ...")
    s.add_argument("--dataset", help="registry name (digits:classes=3,1,4) or npz:PATH / folder:PATH; may be left out "
                                     "with an --instruction for a generator that reads text")
    s.add_argument("--generator", help="trained generator name or directory (default: the one for this arch)")
    s.add_argument("--instruction", help="a text instruction (used by instruction-conditioned generators)")
    s.add_argument("--text-encoder", help="embed the instruction with this encoder (e.g. paraphrase-minilm-l3); a "
                                          "generator trained with another reads it through an XBT projection")
    s.add_argument("--n", type=_int_in(1, 4096, "--n"), default=8, help="candidates to sample")
    s.add_argument("--select", choices=["best", "none"], default="best",
                   help="best: keep the candidate with the best support-set accuracy; none: the first one")
    s.add_argument("--seed", type=_int_in(0, 2**63 - 1, "--seed"), default=0)
    s.add_argument("--head", choices=["fit", "generated"], default="fit",
                   help="fit (default): a closed-form head fitted on your data's class statistics under the generated "
                        "backbone, declared in the manifest; generated: the generator's own head")
    s.add_argument("--support-per-class", type=_int_in(1, None, "--support-per-class"), default=256, metavar="N",
                   help="use up to N labelled examples per class to condition, fit and select (default 256); "
                        "the rest, or a fifth set aside, estimates accuracy")
    s.add_argument("--refine", type=_int_in(0, None, "--refine"), default=0, metavar="K",
                   help="K gradient steps on the support set after sampling (off by default; declared in the manifest)")
    s.add_argument("--no-novelty", action="store_true", help="skip the novelty check against the zoo")
    s.add_argument("--torch-threads", type=_int_in(1, None, "--torch-threads"), default=1,
                   help="torch threads (default 1, as a server replica: the same request gives the same bytes)")
    s.add_argument("--out", help="output directory (default: $WEIGHTGEN_HOME/samples/ARCH_DATASET_seedSEED)")
    s.add_argument("--json", action="store_true", help="print the manifest")
    s.set_defaults(fn=cmd_sample)

    from weightgen.xbt_cli import add_xbt_parser

    add_xbt_parser(sub, _int_in)

    s = sub.add_parser("generators", help="list trained generators")
    s.set_defaults(fn=cmd_generators)

    s = sub.add_parser("quickstart", help="build the default zoo and train the default generators (idempotent)")
    s.add_argument("--fast", action="store_true", help="a minutes-long smaller run (smoke test)")
    s.add_argument("--without", action="append", default=[], choices=["igpg"],
                   help="skip IGPG (weights from an instruction alone; ~9 of the ~15 min on 2 quiet cores)")
    s.add_argument("--with", dest="extra", action="append", default=[], choices=["igpg"],
                   help=argparse.SUPPRESS)  # IGPG was opt-in before it became a default; old scripts pass it
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_quickstart)

    from weightgen.backbone_cli import add_parsers

    add_parsers(sub, zp, arch_arg, _zoo_arg, _int_in)
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
    from weightgen.outputs import OutputError
    from weightgen.registry import UnknownNameError
    from weightgen.sampling import NoGeneratorError, RequestError
    from weightgen.text import NoProjectionError
    from zoo.store import ZooError

    try:
        rc = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler
        return rc
    except (ZooError, DatasetError, UnknownNameError, ShapeError, NoGeneratorError, OutputError, RequestError,
            NoProjectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `weightgen zoo ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
