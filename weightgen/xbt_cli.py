"""``weightgen xbt fit|eval``: projections that let generators trained with one text encoder read
another's embeddings (see weightgen.xbt)."""
from __future__ import annotations

import json


def cmd_xbt_fit(a) -> int:
    from weightgen.xbt import fit

    print(fit(a.old, a.new, a.out, steps=a.steps, rank=a.rank, noise_std=a.noise, tokens=not a.sentence,
              show_progress=not a.no_progress))
    return 0


def cmd_xbt_eval(a) -> int:
    from weightgen.xbt import evaluate

    res = evaluate(a.dir, generation=not a.no_generation)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k:32} {v}")
    return 0


def add_xbt_parser(subparsers, int_in) -> None:
    xp = subparsers.add_parser("xbt", help="XBT projections: use a new text encoder with generators trained on an "
                               "old one").add_subparsers(dest="xbt_command", required=True)
    s = xp.add_parser("fit", help="fit the projection NEW -> OLD on text (minutes on 2 cores)")
    s.add_argument("--old", required=True, help="the encoder generators were trained with (e.g. minilm-l6)")
    s.add_argument("--new", required=True, help="the encoder to adopt (e.g. paraphrase-minilm-l3)")
    s.add_argument("--out", help="directory (default: $WEIGHTGEN_HOME/xbt/NEW__to__OLD, where sampling looks)")
    s.add_argument("--steps", type=int_in(1, None, "--steps"), default=1000)
    s.add_argument("--rank", type=int_in(0, None, "--rank"), default=0, help="low-rank linear part (0: full)")
    s.add_argument("--noise", type=float, default=0.1, help="injected noise, relative to the embedding norm")
    s.add_argument("--sentence", action="store_true",
                   help="map the new encoder's pooled sentence embeddings (default: its per-token states)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_xbt_fit)
    s = xp.add_parser("eval", help="recall@1 of held-out phrasings old->old, new->old raw and projected; "
                                   "held-out generation accuracy with old vs projected conditions")
    s.add_argument("dir")
    s.add_argument("--no-generation", action="store_true", help="recall only (no trained IGPG needed)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_xbt_eval)
