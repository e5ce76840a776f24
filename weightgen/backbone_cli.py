"""CLI for backbone archs (issue 10): ``zoo add-backbone``, ``zoo backbones``, ``heads train`` and
``sample`` for vit-*/resnet-18. Kept apart from ``weightgen/cli.py`` so that file stays small;
it registers these parsers and hands ``sample`` here when the arch takes a backbone."""
from __future__ import annotations

import json
import sys


def cmd_add_backbone(a) -> int:
    from weightgen.backbones import add_from_source
    from weightgen.paths import default_zoo
    from zoo import open_zoo

    bid, fresh = add_from_source(open_zoo(a.zoo or default_zoo()), a.src, a.arch)
    print(json.dumps({"id": bid, "arch": a.arch, "stored": fresh,
                      "note": "stored" if fresh else "already in the zoo (same content): nothing written"}, indent=1))
    return 0


def cmd_backbones(a) -> int:
    from weightgen.paths import default_zoo
    from zoo import open_zoo
    from zoo.backbones import list_backbones

    recs = list_backbones(open_zoo(a.zoo or default_zoo(), mode="r"), a.arch)
    print(json.dumps([{k: r.get(k) for k in ("id", "arch", "size_matches_arch", "source", "num_params",
                                             "preprocessing")} for r in recs],
                     indent=1))
    return 0


def cmd_zoo_build_heads(a) -> int:
    """``weightgen zoo build --arch vit-s --backbone ID --family cifar10-subsets``: a head zoo as zoo entries."""
    from training.heads import build_from_cli
    from weightgen.sampling import RequestError

    if not a.family.endswith("-subsets"):
        raise RequestError(f"--family for {a.arch} is DATASET-subsets (e.g. cifar10-subsets), got {a.family!r}")
    print(json.dumps(build_from_cli(a, a.family.removesuffix("-subsets")), indent=1))
    return 0


def add_build_head_args(s, int_in) -> None:
    """``zoo build``'s options for backbone archs."""
    s.add_argument("--backbone", help="backbone archs (vit-s, vit-t, resnet-18): the stored backbone whose heads "
                   "are built (default: the only one of --arch); --family is then DATASET-subsets")
    s.add_argument("--classes", help="backbone archs: source classes the heads' class sets are drawn from")
    s.add_argument("--max-classes", type=int_in(2, None, "--max-classes"), default=10)
    s.add_argument("--per-class", type=int_in(1, None, "--per-class"), default=16,
                   help="backbone archs: support rows per class each head is fitted on")


def cmd_heads_train(a) -> int:
    from training.heads import train_from_cli

    print(json.dumps(train_from_cli(a), indent=1))
    return 0


def cmd_backbone_train(a) -> int:
    from training.backbone import train_backbone

    print(json.dumps(train_backbone(a.arch, a.dataset, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                                    size=a.size, out=a.out, zoo_url=a.zoo, seed=a.seed,
                                    progress=not a.no_progress), indent=1))
    return 0


def cmd_quickstart_backbone(a) -> int:
    """``weightgen quickstart --arch vit-s --dataset cifar10 [--backbone SRC]``: the backbone (stored
    from SRC, or trained: it says how long first), then a head generator on it; idempotent."""
    import time
    from argparse import Namespace

    from weightgen.backbones import add_from_source, family_of
    from weightgen.generators import trained_generators
    from weightgen.paths import default_zoo
    from weightgen.sampling import RequestError
    from zoo import open_zoo

    family_of(a.arch)
    if not a.dataset:
        raise RequestError(f"quickstart --arch {a.arch} needs --dataset (the images its head zoo is built from)")
    t0, zoo_url = time.time(), default_zoo()
    if a.backbone:
        bid, fresh = add_from_source(open_zoo(zoo_url), a.backbone, a.arch)
        print(f"[quickstart] backbone {bid[:12]}: {'stored' if fresh else 'already in the zoo'}", file=sys.stderr)
    else:
        from training.backbone import train_backbone

        size = "tiny" if a.fast else "full"
        print(f"[quickstart] no --backbone: training a {size} {a.arch} on {a.dataset} (a GPU is much faster; the time "
              f"it will take is printed after 5 steps)", file=sys.stderr)
        bid = train_backbone(a.arch, a.dataset, epochs=2 if a.fast else 30, size=size,
                             progress=not a.no_progress)["backbone"]
    name = f"feature-head-{a.arch}-{bid[:8]}"
    if any(g.name == name for g in trained_generators()):
        print(f"[quickstart] generator {name}: already trained; skipping", file=sys.stderr)
    else:
        cmd_heads_train(Namespace(zoo=None, backbone=bid, arch=a.arch, dataset=a.dataset, classes=None,
                                  tasks=50 if a.fast else 300, max_classes=10, per_class=16,
                                  steps=100 if a.fast else 400, hidden=128, seed=0, name=name,
                                  no_progress=a.no_progress))
    print(f"[quickstart] done in {time.time() - t0:.0f} s. Next: weightgen sample --arch {a.arch} --dataset "
          f"{a.dataset} --out DIR", file=sys.stderr)
    return 0


def cmd_sample_backbone(a, out_dir: str) -> int:
    """``weightgen sample`` for an arch that sits on a stored backbone."""
    import torch

    from weightgen.backbone_sampling import sample_on_backbone, write_folder
    from weightgen.sampling import RequestError

    if not a.dataset:
        raise RequestError(f"{a.arch} needs --dataset (labelled images: the head is conditioned on their features)")
    if a.instruction:
        raise RequestError(f"{a.arch}: instruction-only sampling is not supported for backbone heads")
    torch.set_num_threads(a.torch_threads)
    res = sample_on_backbone(a.arch, a.dataset, zoo_url=getattr(a, "zoo", None), backbone=a.backbone,
                             generator=a.generator, n=a.n, select=a.select, seed=a.seed, head=a.head,
                             support_per_class=a.support_per_class, refine_steps=a.refine)
    out = write_folder(res, out_dir)
    m = res.manifest
    for w in m["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if a.json:
        print(json.dumps(m, indent=1))
        return 0
    pred = ("n/a (too few examples to set any aside)" if m["predicted_accuracy"] is None else
            f"{m['predicted_accuracy']:.3f} [{m['predicted_accuracy_interval'][0]:.3f}, "
            f"{m['predicted_accuracy_interval'][1]:.3f}] on {m['predicted_accuracy_n']} held-out examples")
    gen = m["generated_head_support_accuracy"]
    print(f"wrote {out} ({m['arch']} on backbone {m['backbone']['id'][:12]}, {m['num_classes']} classes, "
          f"head {m['head_used']}): support acc {m['support_accuracy']:.3f}, predicted acc {pred}"
          + (f"; generated head support acc {gen:.3f} ({m['generator']})" if gen is not None else ""))
    return 0


def add_parsers(sub, zoo_sub, arch_arg, zoo_arg, int_in) -> None:
    """The subcommands above, and the options ``sample`` and ``quickstart`` take for backbone archs."""
    s = sub.choices["sample"]
    s.add_argument("--backbone", help="vit-*/resnet-*: stored backbone id (default: the generator's, or the only one)")
    zoo_arg(s)
    s = sub.choices["quickstart"]
    s.add_argument("--arch", type=arch_arg, help="vit-t/vit-s/resnet-18: a head generator on a backbone (default mlp-s)")
    s.add_argument("--dataset", help="with --arch: the dataset its head zoo is built from (e.g. cifar10)")
    s.add_argument("--backbone", help="with --arch: a pretrained backbone (HF folder or hub id); none: train one")
    s = zoo_sub.add_parser("add-backbone", help="store a pretrained backbone once (HF folder or hub id)")
    s.add_argument("src", help="a Hugging Face model folder (config.json + model.safetensors) or a hub id")
    s.add_argument("--arch", required=True, type=arch_arg, help="vit-t, vit-s or resnet-18")
    zoo_arg(s)
    s.set_defaults(fn=cmd_add_backbone)
    s = zoo_sub.add_parser("backbones", help="list stored backbones")
    s.add_argument("--arch")
    zoo_arg(s)
    s.set_defaults(fn=cmd_backbones)

    bp = sub.add_parser("backbone", help="backbones for vit-*/resnet-18").add_subparsers(dest="backbone_command",
                                                                                        required=True)
    s = bp.add_parser("train", help="train a backbone on a dataset (accelerate) and add it to the zoo")
    s.add_argument("--arch", required=True, type=arch_arg)
    s.add_argument("--dataset", required=True)
    s.add_argument("--epochs", type=int_in(1, None, "--epochs"), default=30)
    s.add_argument("--batch-size", type=int_in(1, None, "--batch-size"), default=128)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: a smoke-test size for CPUs")
    s.add_argument("--seed", type=int_in(0, 2**63 - 1, "--seed"), default=0)
    s.add_argument("--out", help="folder for the transformers model (default: $WEIGHTGEN_HOME/backbones/...)")
    s.add_argument("--no-progress", action="store_true")
    zoo_arg(s)
    s.set_defaults(fn=cmd_backbone_train)

    hp = sub.add_parser("heads", help="head generators on stored backbones").add_subparsers(dest="heads_command",
                                                                                            required=True)
    s = hp.add_parser("train", help="build a head zoo on cached features and train a feature-head generator")
    s.add_argument("--dataset", required=True, help="source dataset (its train split's features are cached)")
    s.add_argument("--backbone", help="backbone id or prefix (default: the only one of --arch)")
    s.add_argument("--arch", default=None, type=arch_arg)
    s.add_argument("--classes", help="source classes the head zoo draws tasks from (default: all)")
    s.add_argument("--tasks", type=int_in(1, None, "--tasks"), default=200)
    s.add_argument("--max-classes", type=int_in(2, None, "--max-classes"), default=10)
    s.add_argument("--per-class", type=int_in(1, None, "--per-class"), default=16)
    s.add_argument("--steps", type=int_in(0, None, "--steps"), default=600)
    s.add_argument("--hidden", type=int_in(1, None, "--hidden"), default=256)
    s.add_argument("--seed", type=int_in(0, 2**63 - 1, "--seed"), default=0)
    s.add_argument("--name", help="generator name (default feature-head-ARCH-BACKBONE)")
    s.add_argument("--no-progress", action="store_true")
    zoo_arg(s)
    s.set_defaults(fn=cmd_heads_train)
