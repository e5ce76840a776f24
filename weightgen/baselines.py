"""Baseline weight sources for a task no generator saw: what a weight generator must beat.

Each source takes a :class:`Request` (arch, task, the support set a generator would condition
on, n) and returns a stacked state dict (name -> (n, ...)) that loads into the arch, so the
evaluation harness treats baselines and generators alike. The methods follow
shared/research/feasibility.md §1 (its D, B, C and E baselines):

* ``random``       PyTorch-default init, n fresh seeds;
* ``nearest``      retrieval: the final checkpoints of the zoo task(s) whose dataset embedding
                   (class prototypes of the support set, in label order, flattened; plain L2) is
                   nearest, nearest task first, n of them;
* ``nearest_noise`` those checkpoints + Gaussian noise, sigma = ``NOISE_SCALE`` (0.1) x the std
                   of each tensor of each checkpoint: a "sample around retrieval" that keeps
                   accuracy close to retrieval's (checked on digits: within a few points);
* ``nearest_avg``  the average of the aligned checkpoints of the two nearest tasks, paired by
                   init seed (one model per seed both tasks have);
* ``zoo_mean``     the mean of all aligned final zoo checkpoints with this class count (one model;
                   useless zero-shot but a strong fine-tuning init, feasibility.md §3);
* ``lda``, ``logreg`` the support-set rules a generator must beat, as weights (linear classifiers on
                   the inputs embedded exactly in the MLP's ReLU units; MLP archs only);
* ``scratch``      trained on the task's train split with the zoo's recipe (minibatch 64 AdamW,
                   300 steps, from the zoo's shared inits: seed s), all seeds at once; the
                   reference every generator is measured against. The zoo draws lr per model
                   log-uniform in [3e-3, 3e-2]; here lr is fixed at 1e-2 (about the middle).

``prototype_accuracy`` (nearest class mean, no weights) is the non-neural reference. "Final"
checkpoints are the last step of each zoo run. :func:`train_stack` is the one vectorized trainer
(also used for fine-tuning curves): Adam's update is per coordinate, so one optimizer over
stacked (n, ...) tensors with the sum of per-model losses trains n independent models exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import vmap

from weightgen.align import align
from weightgen.archs import get_arch
from weightgen.data import TaskData, load_dataset
from weightgen.evaluate import _Bound, accuracy_many, prototype_accuracy

NOISE_SCALE = 0.1
RANDOM_SEED_OFFSET = 10_000  # random-init seeds stay clear of the zoo's shared-init seeds 0, 1, ...

StateDict = dict[str, torch.Tensor]


def embedding(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The dataset embedding: class prototypes (support means) in label order, flattened (K * F,)."""
    return torch.stack([x[y == c].flatten(1).mean(0) for c in range(num_classes)]).flatten()


class ZooIndex:
    """The final checkpoints of one (arch, class count, input shape) in a zoo, aligned to one
    reference, and each zoo task's dataset embedding (from its own support set)."""

    def __init__(self, zoo, arch: str, num_classes: int, input_shape, per_class: int = 10, seed: int = 0):
        shape = tuple(input_shape)
        last: dict[str, dict] = {}  # run -> its last checkpoint
        for r in zoo.query(arch=arch):
            if r["num_classes"] == num_classes and tuple(r["input_shape"]) == shape:
                run = r.get("run_id") or r["id"]
                if run not in last or (r.get("step") or 0) > (last[run].get("step") or 0):
                    last[run] = r
        recs = sorted(last.values(), key=lambda r: (r["dataset"], r.get("seed") or 0, r["id"]))
        if not recs:
            raise ValueError(f"no {arch} checkpoints with {num_classes} classes and input {shape} in zoo {zoo.url}")
        self.arch, self.num_classes, self.input_shape = arch, num_classes, shape
        self.ids = [r["id"] for r in recs]
        keys = [t.name for t in get_arch(arch).tensors(num_classes, shape)]
        self.weights, self.ref = align({k: v.float() for k, v in zoo.stack(self.ids, keys).items()}, arch)
        self.tasks = sorted({r["dataset"] for r in recs})
        self.task_of = torch.tensor([self.tasks.index(r["dataset"]) for r in recs])
        self.embeddings = torch.stack([embedding(*load_dataset(t).support(per_class, seed), num_classes)
                                       for t in self.tasks])  # (tasks, K * F)

    def take(self, rows: torch.Tensor) -> StateDict:
        return {k: v[rows].clone() for k, v in self.weights.items()}

    def rows_of(self, task: int) -> torch.Tensor:
        return (self.task_of == task).nonzero().flatten()

    def nearest_tasks(self, x: torch.Tensor, y: torch.Tensor) -> list[int]:
        """Zoo task indices, nearest embedding first."""
        d = torch.cdist(embedding(x, y, self.num_classes)[None], self.embeddings)[0]
        return d.argsort().tolist()


@dataclass
class Request:
    """What every weight source gets: the task and the support set generators condition on."""

    arch: str
    task: TaskData
    support_x: torch.Tensor
    support_y: torch.Tensor
    n: int
    seed: int = 0
    zoo: ZooIndex | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.task.input_shape


# --------------------------------------------------------------------------- helpers


def init_stack(arch: str, num_classes: int, input_shape, seeds) -> StateDict:
    """PyTorch-default inits, one per seed (seed s builds the same model as the zoo's init seed s)."""
    spec, models = get_arch(arch), []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(s))
            models.append(spec.build(num_classes, input_shape))
    return {k: torch.stack([m.state_dict()[k] for m in models]) for k in models[0].state_dict()}


def train_stack(arch: str, task: TaskData, sd: StateDict, steps: int, lr: float, *, weight_decay: float = 0.0,
                batch_size: int | None = None, seed: int = 0,
                record_at=()) -> tuple[StateDict, dict[int, torch.Tensor]]:
    """Train n stacked models on the task's train split, all at once: AdamW (Adam when
    ``weight_decay`` is 0), full-batch or per-model minibatches. Returns the trained stack and
    {step: (n,) test accuracy} for every step in ``record_at`` (0 = before training)."""
    spec = get_arch(arch)
    k, shape = task.num_classes, task.input_shape
    base = spec.build(k, shape, device="meta")
    params = {name: v.detach().float().clone().requires_grad_(True) for name, v in sd.items()}
    n = next(iter(params.values())).shape[0]
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    fwd = vmap(lambda p, x: spec.logits(_Bound(base, p), x), in_dims=(0, None if batch_size is None else 0))
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = task.x_train, task.y_train
    curve = {}

    def record(step):
        if step in record_at:
            curve[step] = accuracy_many(arch, k, shape, {n_: v.detach() for n_, v in params.items()},
                                        task.x_test, task.y_test)

    record(0)
    for step in range(1, steps + 1):
        if batch_size is None:
            x, y = x_all, y_all.expand(n, -1)  # (N, ...) shared, (n, N)
        else:
            idx = torch.randint(len(y_all), (n, batch_size), generator=g)
            x, y = x_all[idx], y_all[idx]  # (n, B, ...), (n, B)
        logits = fwd(params, x)  # (n, B, K)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        record(step)
    return {name: v.detach() for name, v in params.items()}, curve


def _need_zoo(req: Request) -> ZooIndex:
    if req.zoo is None:
        raise ValueError("this baseline needs a zoo (Request.zoo)")
    return req.zoo


def _nearest_rows(req: Request, tasks: int | None = None) -> list[torch.Tensor]:
    """Per nearest zoo task (nearest first; all, or the first ``tasks``), its final checkpoints' rows."""
    zoo = _need_zoo(req)
    order = zoo.nearest_tasks(req.support_x, req.support_y)
    return [zoo.rows_of(t) for t in order[:tasks]]


# --------------------------------------------------------------------------- sources


def random_init(req: Request) -> StateDict:
    k = req.task.num_classes
    return init_stack(req.arch, k, req.shape, range(RANDOM_SEED_OFFSET + req.seed * req.n,
                                                    RANDOM_SEED_OFFSET + (req.seed + 1) * req.n))


def nearest(req: Request) -> StateDict:
    return _need_zoo(req).take(torch.cat(_nearest_rows(req))[:req.n])


def nearest_noise(req: Request) -> StateDict:
    g = torch.Generator().manual_seed(req.seed)
    out = {}
    for name, v in nearest(req).items():
        sigma = NOISE_SCALE * v.flatten(1).std(1).view(-1, *[1] * (v.dim() - 1))  # (n, 1, ...) per model and tensor
        out[name] = v + sigma * torch.randn(v.shape, generator=g)
    return out


def nearest_avg(req: Request) -> StateDict:
    a, b = _nearest_rows(req, tasks=2)
    m = min(len(a), len(b), req.n)  # rows are in init-seed order within a task
    zoo = _need_zoo(req)
    wa, wb = zoo.take(a[:m]), zoo.take(b[:m])
    return {k: (wa[k] + wb[k]) / 2 for k in wa}


def zoo_mean(req: Request) -> StateDict:
    return {k: v.mean(0, keepdim=True) for k, v in _need_zoo(req).weights.items()}


def scratch(req: Request, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4,
            batch_size: int = 64) -> StateDict:
    init = init_stack(req.arch, req.task.num_classes, req.shape, range(req.n))
    return train_stack(req.arch, req.task, init, steps, lr, weight_decay=weight_decay, batch_size=batch_size,
                       seed=req.seed)[0]


def prototype(req: Request) -> float:
    """Test accuracy of the nearest-class-mean classifier on the support set (no weights)."""
    t = req.task
    return prototype_accuracy(req.support_x, req.support_y, t.x_test, t.y_test, t.num_classes)


def _repeat(sd: StateDict, n: int) -> StateDict:
    return {k: v.expand(n, *v.shape[1:]).clone() for k, v in sd.items()}


def lda_probe(req: Request) -> StateDict:
    """Shrinkage LDA on the support's inputs (shrinkage by cross-validation on the support), as
    weights of the arch: the closed-form rule without any generated part (weightgen.heads)."""
    from weightgen.heads import embed_linear_classifier, fit_lda

    x, k = req.support_x.flatten(1).float(), req.task.num_classes
    w, b, _ = fit_lda(x[None], req.support_y, k, x.shape[1], seed=req.seed)
    return _repeat(embed_linear_classifier(req.arch, k, req.shape, w[0], b[0], x.mean(0)), req.n)


def logreg_probe(req: Request) -> StateDict:
    """Multinomial logistic regression (scikit-learn, its default C = 1) on the support's inputs,
    as weights of the arch: the linear probe a user would fit in one line."""
    from sklearn.linear_model import LogisticRegression

    from weightgen.heads import embed_linear_classifier

    x, y, k = req.support_x.flatten(1).double().numpy(), req.support_y.numpy(), req.task.num_classes
    lr = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    w, b = torch.from_numpy(lr.coef_).float(), torch.from_numpy(lr.intercept_).float()
    if k == 2:  # binary: one row for class 1
        w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
    return _repeat(embed_linear_classifier(req.arch, k, req.shape, w, b, torch.from_numpy(x.mean(0)).float()), req.n)


BASELINES: dict[str, Callable[[Request], StateDict]] = {
    "random": random_init, "nearest": nearest, "nearest_noise": nearest_noise, "nearest_avg": nearest_avg,
    "zoo_mean": zoo_mean, "lda": lda_probe, "logreg": logreg_probe, "scratch": scratch,
}
