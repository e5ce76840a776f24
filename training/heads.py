"""A head zoo on a stored backbone's cached features, and the head generator trained on it.

    weightgen heads train --backbone ID --dataset cifar10 --classes 0,1,2,3,4,5 --tasks 300 --steps 600

Why a separate, small loop and not ``training/train.py``: that loop reads zoo collections of one
architecture *shape* (full checkpoints, aligned and tokenized); a head zoo is many closed-form
heads over one backbone's features, all built here in seconds from the feature cache, so the
checkpoints never need to exist as files. The loop is the same shape: Adam over the generator's
``stages``, ``loss(batch)``, saved as config.json + safetensors + training_summary.json in
``$WEIGHTGEN_HOME/generators/NAME`` where ``trained_generators()`` finds it.

The head zoo: for each task, k classes (k drawn from ``class_counts``) of the source classes, in
random order, ``per_class`` support rows each; the head is shrinkage LDA with cross-validated
shrinkage (``weightgen.heads.fit_lda``), recorded with its accuracy on the task's other rows.
Heads are zoo entries (task parts: just the classifier, naming the backbone by id; ``zoo build
--arch vit-s --backbone ID`` adds them), and the generator trains on every head of its backbone
and dataset the zoo holds whose classes are all source classes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from weightgen.heads import fit_lda


@dataclass
class HeadZoo:
    arch: str
    input_shape: tuple
    backbone_id: str
    features: torch.Tensor  # (N, D) train-split features of the source dataset
    labels: torch.Tensor  # (N,)
    classes: list[list[int]]  # per task, the source classes in label order
    heads_w: list[torch.Tensor]  # per task (K, D), on raw features
    heads_b: list[torch.Tensor]  # per task (K,)
    query_acc: list[float]
    class_counts: tuple = (2, 10)
    weight_key: str = "classifier.weight"
    bias_key: str = "classifier.bias"
    info: dict = field(default_factory=dict)


def build_head_zoo(features, labels, source_classes: list[int], *, arch: str, input_shape, backbone_id: str,
                   tasks: int = 200, class_counts=(2, 10), per_class: int = 16, seed: int = 0,
                   weight_key="classifier.weight", bias_key="classifier.bias", progress=True) -> HeadZoo:
    g = torch.Generator().manual_seed(seed)
    lo, hi = int(class_counts[0]), min(int(class_counts[1]), len(source_classes))
    if hi < lo or lo < 2:
        raise ValueError(f"need at least {max(lo, 2)} source classes for {lo}..{class_counts[1]}-class tasks, "
                         f"got {len(source_classes)}")
    by_class = {c: (labels == c).nonzero().flatten() for c in source_classes}
    zoo = HeadZoo(arch, tuple(input_shape), backbone_id, features, labels, [], [], [], [], (lo, hi), weight_key, bias_key)
    for _ in tqdm(range(tasks), desc="head zoo (LDA on cached features)", disable=not progress):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        cls = [source_classes[i] for i in torch.randperm(len(source_classes), generator=g)[:k].tolist()]
        sup, qry = [], []
        for c in cls:
            idx = by_class[c][torch.randperm(len(by_class[c]), generator=g)]
            sup.append(idx[:per_class])
            qry.append(idx[per_class:per_class + 200])
        ys = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sup)])
        yq = torch.cat([torch.full((len(q),), i) for i, q in enumerate(qry)])
        w, b, _ = fit_lda(features[torch.cat(sup)][None], ys, k, 0, seed=seed)
        pred = (features[torch.cat(qry)] @ w[0].T + b[0]).argmax(-1)
        zoo.classes.append(cls)
        zoo.heads_w.append(w[0])
        zoo.heads_b.append(b[0])
        zoo.query_acc.append(float((pred == yq).float().mean()) if len(yq) else float("nan"))
    return zoo


def ingest_head_zoo(z, hz: HeadZoo, dataset: str, seed: int) -> dict:
    """The head zoo's heads as zoo entries: task parts that name their backbone by id
    (``train_config``: part, backbone_id, feature_dim; tag ``backbone:<id12>``), deduplicated by
    content like any checkpoint. Returns ``Zoo.add``'s report."""
    import math

    from zoo import Checkpoint
    from zoo.validate import HEAD_PART

    cks = [Checkpoint({hz.weight_key: w.float().contiguous(), hz.bias_key: b.float().contiguous()}, hz.arch, len(cls),
                      hz.input_shape, dataset=f"{dataset}:classes={','.join(map(str, cls))}", seed=seed,
                      train_config={"part": HEAD_PART, "backbone_id": hz.backbone_id, "feature_dim": int(w.shape[1]),
                                    "method": "shrinkage LDA, cross-validated shrinkage"},
                      metrics={"test_acc": acc} if math.isfinite(acc) else {},
                      tags=["head", f"backbone:{hz.backbone_id[:12]}"], source=f"heads:{hz.backbone_id[:12]}")
           for cls, w, b, acc in zip(hz.classes, hz.heads_w, hz.heads_b, hz.query_acc)]
    return z.add(cks)


def head_zoo_from_zoo(z, backbone_id: str, dataset: str, features, labels, *, arch: str, input_shape,
                      source_classes: list[int], weight_key="classifier.weight", bias_key="classifier.bias") -> HeadZoo:
    """Every head of ``backbone_id`` on ``dataset`` in the zoo whose classes are all source
    classes (held-out classes stay held out), read back as a ``HeadZoo`` to train on."""
    from zoo.validate import HEAD_PART

    recs = [r for r in z.query(tag=f"backbone:{backbone_id[:12]}", dataset=f"{dataset}:classes=*")
            if (r.get("train_config") or {}).get("part") == HEAD_PART
            and r["train_config"].get("backbone_id") == backbone_id]
    allowed = set(source_classes)
    recs = [r for r in recs if set(_classes_of(r["dataset"])) <= allowed]
    hz = HeadZoo(arch, tuple(input_shape), backbone_id, features, labels, [], [], [], [], (2, 2), weight_key, bias_key)
    for k in sorted({r["num_classes"] for r in recs}):
        group = [r for r in recs if r["num_classes"] == k]
        st = z.stack([r["id"] for r in group], [weight_key, bias_key])
        for i, r in enumerate(group):
            hz.classes.append(_classes_of(r["dataset"]))
            hz.heads_w.append(st[weight_key][i].float())
            hz.heads_b.append(st[bias_key][i].float())
            hz.query_acc.append(float((r.get("metrics") or {}).get("test_acc", float("nan"))))
    if hz.classes:
        counts = [len(c) for c in hz.classes]
        hz.class_counts = (min(counts), max(counts))
    return hz


def _classes_of(name: str) -> list[int]:
    return [int(c) for c in name.split("classes=", 1)[1].split(",")]


def build_from_cli(a, dataset: str) -> dict:
    """``weightgen zoo build --arch vit-s --backbone ID --family cifar10-subsets``: heads on the
    backbone's cached features, ``--tasks`` class sets per seed, ingested as zoo entries."""
    from weightgen.backbones import FAMILIES, cached_features, family_of
    from weightgen.data import load_dataset, parse_classes
    from weightgen.paths import default_zoo
    from zoo import open_zoo
    from zoo.backbones import resolve_backbone

    t0 = time.time()
    z = open_zoo(a.zoo or default_zoo())
    rec = resolve_backbone(z, a.backbone, a.arch)
    task = load_dataset(dataset)
    source = parse_classes(a.classes, dataset) if a.classes else list(range(task.num_classes))
    feats, _ = cached_features(z, rec["id"], task.x_train, task.y_train, progress=not a.no_progress)
    wkey = FAMILIES[family_of(rec["arch"])][2]
    added, dup, accs = 0, 0, []
    for s in range(a.seeds):
        hz = build_head_zoo(feats, task.y_train, source, arch=rec["arch"], input_shape=task.input_shape,
                            backbone_id=rec["id"], tasks=a.tasks, class_counts=(2, a.max_classes), per_class=a.per_class,
                            seed=a.task_seed + s, weight_key=wkey, bias_key=wkey[:-len("weight")] + "bias",
                            progress=not a.no_progress)
        r = ingest_head_zoo(z, hz, dataset, a.task_seed + s)
        added, dup, accs = added + len(r["ingested"]), dup + len(r["duplicate"]), accs + hz.query_acc
    return {"arch": rec["arch"], "backbone": rec["id"], "dataset": dataset, "source_classes": source,
            "ingested": added, "duplicate": dup, "mean_query_acc": round(sum(accs) / max(len(accs), 1), 4),
            "seconds": round(time.time() - t0, 1)}


def task_batch(zoo: HeadZoo, batch: int, cond_per_class: int, query_per_class: int, g: torch.Generator) -> dict:
    """B tasks of one class count: a fresh conditioning draw and query rows per task, the zoo heads."""
    k = len(zoo.classes[int(torch.randint(len(zoo.classes), (1,), generator=g))])
    same = [i for i, c in enumerate(zoo.classes) if len(c) == k]
    pick = [same[i] for i in torch.randint(len(same), (batch,), generator=g).tolist()]
    means, var, query, qy = [], [], [], []
    for t in pick:
        m, v, q = [], [], []
        for c in zoo.classes[t]:
            idx = (zoo.labels == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            m.append(zoo.features[idx[:cond_per_class]].mean(0))
            v.append(zoo.features[idx[:cond_per_class]].var(0) if cond_per_class > 1 else m[-1])
            q.append(zoo.features[idx[cond_per_class:cond_per_class + query_per_class]])
        n_q = min(len(x) for x in q)
        means.append(torch.stack(m))
        var.append(torch.stack(v).mean(0))
        query.append(torch.cat([x[:n_q] for x in q]))
        qy.append(torch.arange(k).repeat_interleave(n_q))
    n = min(len(x) for x in qy)
    out = {"var": torch.stack(var)} if cond_per_class > 1 else {}  # one example per class has no spread
    return {**out, "means": torch.stack(means), "query": torch.stack([x[:n] for x in query]),
            "query_y": torch.stack([y[:n] for y in qy]),
            "target_w": torch.stack([zoo.heads_w[t] for t in pick]), "target_b": torch.stack([zoo.heads_b[t] for t in pick])}


def train_feature_head(zoo: HeadZoo, *, steps: int = 600, batch: int = 16, lr: float = 1e-3, hidden: int = 256,
                       support_per_class: int = 16, seed: int = 0, progress: bool = True):
    """Fit the ``feature-head`` generator on a head zoo (Adam over its stages, one readable loop)."""
    from weightgen.generators import get_generator_class

    torch.manual_seed(seed)
    gen = get_generator_class("feature-head").from_zoo(zoo, hidden=hidden, support_per_class=support_per_class)
    params = [p for ps in gen.stages.values() for p in ps]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    hist = []
    for step in tqdm(range(steps), desc="feature-head", disable=not progress):
        out = gen.loss(task_batch(zoo, batch, support_per_class, 32, g))
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        hist.append({k: float(v.detach()) for k, v in out.items()})
    scores = []  # the shift scores of supports like its training ones: requests above the largest are flagged
    for cls in zoo.classes:
        rows = torch.cat([(zoo.labels == c).nonzero().flatten()[:support_per_class] for c in cls])
        scores.append(gen.shift_score(zoo.features[rows]))
    gen.register_to_config(shift_limit=round(max(scores), 4))
    return gen.eval(), hist


def save_trained(gen, zoo: HeadZoo, hist: list[dict], out_dir: str | Path, *, dataset: str, seconds: float) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen.save_pretrained(str(out))
    tail = hist[-50:] or [{}]
    summary = {"zoo_snapshot": f"backbone:{zoo.backbone_id[:16]}", "zoo": "head zoo on cached features",
               "backbone_id": zoo.backbone_id, "dataset": dataset, "seconds": round(seconds, 1),
               "training_tasks": [f"{dataset}:classes={','.join(map(str, c))}" for c in zoo.classes],
               "source_classes": sorted({c for cs in zoo.classes for c in cs}),
               "head_zoo": {"tasks": len(zoo.classes), "class_counts": list(zoo.class_counts),
                            "mean_query_acc": sum(zoo.query_acc) / max(len(zoo.query_acc), 1)},
               "final": {k: sum(h.get(k, 0.0) for h in tail) / len(tail) for k in tail[0]}}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
    return out


def train_from_cli(a) -> dict:
    """``weightgen heads train``: features (cached), head zoo, generator, saved by name."""
    from weightgen.backbones import FAMILIES, cached_features, family_of
    from weightgen.data import load_dataset, parse_classes
    from weightgen.paths import default_zoo, generators_dir
    from zoo import open_zoo
    from zoo.backbones import resolve_backbone

    t0 = time.time()
    z = open_zoo(a.zoo or default_zoo())
    rec = resolve_backbone(z, a.backbone, a.arch)
    task = load_dataset(a.dataset)
    source = parse_classes(a.classes, a.dataset) if a.classes else list(range(task.num_classes))
    feats, _ = cached_features(z, rec["id"], task.x_train, task.y_train, progress=not a.no_progress)
    wkey = FAMILIES[family_of(rec["arch"])][2]
    bkey = wkey[:-len("weight")] + "bias"
    built = build_head_zoo(feats, task.y_train, source, arch=rec["arch"], input_shape=task.input_shape,
                           backbone_id=rec["id"], tasks=a.tasks, class_counts=(2, a.max_classes),
                           per_class=a.per_class, seed=a.seed, weight_key=wkey, bias_key=bkey,
                           progress=not a.no_progress)
    ingest_head_zoo(z, built, a.dataset, a.seed)  # the zoo is the source of truth: train on all it holds
    hz = head_zoo_from_zoo(z, rec["id"], a.dataset, feats, task.y_train, arch=rec["arch"], input_shape=task.input_shape,
                           source_classes=source, weight_key=wkey, bias_key=bkey)
    gen, hist = train_feature_head(hz, steps=a.steps, hidden=a.hidden, support_per_class=a.per_class, seed=a.seed,
                                   progress=not a.no_progress)
    name = a.name or f"feature-head-{rec['arch']}-{rec['id'][:8]}"
    out = save_trained(gen, hz, hist, generators_dir() / name, dataset=a.dataset, seconds=time.time() - t0)
    return {"generator": name, "path": str(out), "backbone": rec["id"], "head_zoo_tasks": len(hz.classes),
            "head_zoo_mean_query_acc": round(sum(hz.query_acc) / len(hz.query_acc), 4),
            "final_loss": round(hist[-1]["loss"], 4) if hist else None, "seconds": round(time.time() - t0, 1)}
