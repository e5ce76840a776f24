"""The population builder: train tasks x seeds small models at once, vectorized, and ingest them.

``weightgen zoo build`` stacks the M = tasks x seeds models with ``torch.func.stack_module_state``
and runs them as one batched model (``vmap`` over ``functional_call``), with AdamW written out over
the stacked parameters so every model has its own learning rate and weight decay. Each model sees
minibatches of its own task: every task of a subset family is the base dataset's fixed split with
a per-task label lookup table, so a minibatch (drawn with replacement) is an index tensor into the
shared base split, and evaluation runs every model over the whole base split, masked to its task.

``shared_init``: init seed s gives the same initial weights on every task, which partly aligns
hidden units across the zoo (the weight generators need that). A consequence of content-addressed
ids: checkpoints taken at step 0 are byte-identical across tasks, so the zoo keeps one per seed.

Deterministic given the config (explicit ``torch.Generator``s), so re-running a build reproduces
the same bytes (also across 1 vs 2 CPU threads) and the zoo reports every checkpoint as a duplicate. A model's bytes depend on the
whole config (the batch generator draws for all M models together), not only on its own task/seed.
Archs with buffers (BatchNorm) are not supported: their running statistics would need updating
inside ``vmap``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from weightgen.archs import get_arch
from weightgen.data import DatasetError, load_dataset, parse_classes
from weightgen.data.digits import get_family
from zoo.store import Checkpoint, Zoo

SOURCE = "weightgen zoo build"
EVAL_ROWS = 1 << 16  # model x sample rows per vectorized evaluation chunk (bounds activation memory)


@dataclass
class PopulationConfig:
    """One population: ``tasks`` tasks of ``family`` x ``seeds`` init seeds, all trained ``steps`` steps."""

    arch: str = "mlp-s"
    family: str = "digits-subsets"
    tasks: int = 20
    seeds: int = 5
    steps: int = 300
    k: int = 5  # classes per task
    task_seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", ..., or "auto"
    batch_size: int = 64
    lr_range: tuple[float, float] = (3e-3, 3e-2)  # log-uniform, one draw per model
    weight_decay: tuple[float, ...] = (0.0, 1e-4, 1e-3)  # one choice per model
    betas: tuple[float, float] = (0.9, 0.999)
    checkpoint_fractions: tuple[float, ...] = (0.1, 0.5, 1.0)  # of steps; 0.0 checkpoints the init
    shared_init: bool = True
    hp_seed: int = 0  # hyperparameters draw from Generator(hp_seed), minibatches from Generator(hp_seed + 1)
    shard: int = 0  # this builder trains tasks shard, shard + shards, ... (``build_population(workers=N)``)
    shards: int = 1

    def seed_for(self, base: int) -> int:
        """Generator seed of this shard: one shard keeps the unsharded bytes; shards draw apart."""
        return base if self.shards == 1 else base * 1_000_003 + self.shard

    def task_ids(self) -> list[int]:
        return list(range(self.tasks))[self.shard::self.shards]

    def checkpoint_steps(self) -> list[int]:
        if any(not 0.0 <= f <= 1.0 for f in self.checkpoint_fractions):
            raise ValueError(f"checkpoint fractions must lie in [0, 1], got {self.checkpoint_fractions}")
        return sorted({round(f * self.steps) for f in self.checkpoint_fractions})

    def digest(self) -> str:
        """Short hash of everything that decides the trained bytes (not the device)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "shard")}
        if self.shards == 1:
            d.pop("shards")  # the digest of an unsharded population is what it was before sharding
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- data


@dataclass
class _Tasks:
    """All tasks as one base split plus per-task label tables: label = lut[task, base label] or -1."""

    names: list[str]
    lut: torch.Tensor  # (T, C_base) int64
    x_train: torch.Tensor  # (N_train, *input_shape)
    y_train: torch.Tensor  # (N_train,) base labels
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_idx: torch.Tensor  # (T, N_max) base-train rows of each task, padded with row 0
    train_lab: torch.Tensor  # (T, N_max) task labels of those rows
    n_train: torch.Tensor  # (T,)


def _load_tasks(cfg: PopulationConfig) -> _Tasks:
    fam = get_family(cfg.family)
    if fam.k != cfg.k:
        fam = dataclasses.replace(fam, k=cfg.k)
    every = fam.train_tasks(cfg.tasks, seed=cfg.task_seed)
    names = [every[t] for t in cfg.task_ids()]
    base = load_dataset(fam.base)
    lut = torch.full((len(names), base.num_classes), -1, dtype=torch.long)
    for t, name in enumerate(names):  # subset tasks are ``BASE:classes=a,b,...`` (label i = i-th class)
        lut[t, torch.tensor(parse_classes(name.split("classes=", 1)[1], name))] = torch.arange(cfg.k)
    member = lut[:, base.y_train] >= 0  # (T, N_train)
    n_train = member.sum(1)
    order = torch.argsort((~member).to(torch.int8), dim=1, stable=True)  # task rows first, in base order
    train_idx = torch.where(torch.arange(member.shape[1]) < n_train[:, None], order, 0)[:, : int(n_train.max())]
    train_idx = train_idx.contiguous()
    train_lab = torch.gather(lut, 1, base.y_train[train_idx]).contiguous()
    first = load_dataset(names[0])  # the tables must reproduce the family's own task data
    n0 = int(n_train[0])
    if not (torch.equal(first.x_train, base.x_train[train_idx[0, :n0]]) and torch.equal(first.y_train, train_lab[0, :n0])):
        raise DatasetError(f"{names[0]} is not the class subset of {fam.base} that the population builder assumes")
    return _Tasks(names, lut, base.x_train, base.y_train, base.x_test, base.y_test, train_idx, train_lab, n_train)


# --------------------------------------------------------------------------- model and optimizer


class _Bound:
    """Stands in for a module inside ``ArchSpec.logits``: calling it runs ``base`` with ``params``."""

    def __init__(self, base: torch.nn.Module, params: dict[str, torch.Tensor]):
        self.base, self.params = base, params

    def __call__(self, x):
        return functional_call(self.base, self.params, (x,))


def _init_population(cfg: PopulationConfig, input_shape, device) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[int]]:
    """(meta base module, stacked params (M, ...), init seed per model); model m = task m // S, seed m % S."""
    spec = get_arch(cfg.arch)
    init_seeds = [s if cfg.shared_init else s + cfg.seeds * (t + 1) for t in cfg.task_ids() for s in range(cfg.seeds)]
    built: dict[int, torch.nn.Module] = {}
    for seed in dict.fromkeys(init_seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built[seed] = spec.build(cfg.k, input_shape)
    first = built[init_seeds[0]]
    if list(first.buffers()):
        raise ValueError(f"{cfg.arch} has buffers (e.g. BatchNorm statistics); the population builder "
                         "supports buffer-free archs such as mlp-s, mlp-m, cnn-s")
    params, _ = stack_module_state([built[s] for s in init_seeds])
    params = {k: v.detach().to(device).contiguous().requires_grad_(True) for k, v in params.items()}
    return first.to("meta"), params, init_seeds


def _adamw_(params, grads, state, lr, wd, step: int, betas, eps: float = 1e-8) -> None:
    """One AdamW step in place over stacked params, with per-model ``lr`` and ``wd`` of shape (M,)."""
    b1, b2 = betas
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    for name, p in params.items():
        g, (m, v) = grads[name], state[name]
        shape = (-1,) + (1,) * (p.dim() - 1)  # (M, 1, ...) broadcasts over the model's tensor
        lr_, wd_ = lr.view(shape), wd.view(shape)
        p.mul_(1 - lr_ * wd_)  # decoupled weight decay
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = v.sqrt().add_(eps * math.sqrt(bc2))  # sqrt(v / bc2) + eps, times sqrt(bc2)
        p.addcdiv_(m * (lr_ * (math.sqrt(bc2) / bc1)), denom, value=-1.0)


# --------------------------------------------------------------------------- train and evaluate


def _logits_fn(arch: str, base: torch.nn.Module, shared_x: bool):
    """vmapped (params (M, ...), x) -> (M, B, K) logits; x is (M, B, D), or (B, D) shared by all models."""
    spec = get_arch(arch)
    return vmap(lambda p, x: spec.logits(_Bound(base, p), x), in_dims=(0, None if shared_x else 0))


@torch.no_grad()
def _evaluate(fwd, params, x, y_base, labels_of) -> tuple[torch.Tensor, torch.Tensor]:
    """(acc (M,), loss (M,)) of every model on its own task's share of the base split ``x``."""
    m_total = next(iter(params.values())).shape[0]
    chunk = max(1, EVAL_ROWS // len(y_base))
    accs, losses = [], []
    for lo in range(0, m_total, chunk):
        hi = min(lo + chunk, m_total)
        y = labels_of(lo, hi)[:, y_base]  # (Mc, N) task labels, -1 = not in this task
        logits = fwd({k: v[lo:hi] for k, v in params.items()}, x)  # (Mc, N, K)
        mask = y >= 0
        n = mask.sum(1).clamp_min(1)
        ce = F.cross_entropy(logits.transpose(1, 2), y.clamp_min(0), reduction="none")  # (Mc, N)
        losses.append((ce * mask).sum(1) / n)
        accs.append(((logits.argmax(-1) == y) & mask).sum(1) / n)
    return torch.cat(accs).cpu(), torch.cat(losses).cpu()


def train_population(cfg: PopulationConfig, show_progress: bool = False, progress=None) -> tuple[list[Checkpoint], float]:
    """Train the population; returns (checkpoints in (step, task, seed) order, training seconds).
    ``progress(k)`` is called as steps complete (a Ray worker reports to the driver's bar)."""
    from tqdm import tqdm

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    t0 = time.perf_counter()
    tasks = _load_tasks(cfg)
    input_shape = tuple(tasks.x_train.shape[1:])
    base, params, init_seeds = _init_population(cfg, input_shape, device)
    M, S = len(init_seeds), cfg.seeds
    task_of = torch.arange(M) // S  # (M,)
    g_hp = torch.Generator().manual_seed(cfg.seed_for(cfg.hp_seed))
    lo, hi = (math.log(v) for v in cfg.lr_range)
    lr = torch.exp(lo + (hi - lo) * torch.rand(M, generator=g_hp, dtype=torch.float64)).float()
    wd_choices = torch.tensor(cfg.weight_decay, dtype=torch.float32)
    wd = wd_choices[torch.randint(len(wd_choices), (M,), generator=g_hp)]
    g_batch = torch.Generator().manual_seed(cfg.seed_for(cfg.hp_seed + 1))

    lut, x_tr, y_tr = tasks.lut.to(device), tasks.x_train.to(device), tasks.y_train.to(device)
    x_te, y_te = tasks.x_test.to(device), tasks.y_test.to(device)
    train_idx, train_lab, task_dev = tasks.train_idx.to(device), tasks.train_lab.to(device), task_of.to(device)
    n_rows = tasks.n_train[task_of, None].to(device)  # (M, 1) rows in each model's task
    row0 = (task_of[:, None] * tasks.train_idx.shape[1]).to(device)  # (M, 1) offset of its task in train_idx
    labels_of = lambda a, b: lut[task_dev[a:b]]
    fwd_batch = _logits_fn(cfg.arch, base, shared_x=False)
    fwd_eval = _logits_fn(cfg.arch, base, shared_x=True)
    state = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}  # Adam (m, v)
    lr_d, wd_d = lr.to(device), wd.to(device)
    ckpt_steps = cfg.checkpoint_steps()
    snaps = []  # (step, {name: (M, ...) cpu}, metrics {name: (M,)})

    def snapshot(step):
        tr_acc, tr_loss = _evaluate(fwd_eval, params, x_tr, y_tr, labels_of)
        te_acc, te_loss = _evaluate(fwd_eval, params, x_te, y_te, labels_of)
        snaps.append((step, {k: v.detach().to("cpu", copy=True) for k, v in params.items()},
                      {"train_acc": tr_acc, "test_acc": te_acc, "train_loss": tr_loss, "test_loss": te_loss}))

    if 0 in ckpt_steps:
        snapshot(0)
    for step in tqdm(range(1, cfg.steps + 1), desc=f"train {M} x {cfg.arch}", unit="step", disable=not show_progress):
        u = torch.rand(M, cfg.batch_size, generator=g_batch).to(device)
        flat = ((u * n_rows).long() + row0).view(-1)  # (M * B,) positions into train_idx, with replacement
        x = x_tr.index_select(0, train_idx.view(-1).index_select(0, flat)).view(M, cfg.batch_size, *x_tr.shape[1:])
        y = train_lab.view(-1).index_select(0, flat).view(M, cfg.batch_size)  # (M, B)
        logits = fwd_batch(params, x)  # (M, B, K)
        # classes on dim 1: (M, K, B) is ~6x faster on CPU than flattening to (M * B, K) with K ~ 5
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="sum") / cfg.batch_size
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        with torch.no_grad():
            _adamw_(params, grads, state, lr_d, wd_d, step, cfg.betas)
        if step in ckpt_steps:
            snapshot(step)
        if progress is not None and (step % 10 == 0 or step == cfg.steps):
            progress(10 if step % 10 == 0 else step % 10)
    seconds = time.perf_counter() - t0

    keys = list(base.state_dict().keys())
    digest = cfg.digest()
    out = []
    for step, stacked, metrics in snaps:
        for m in range(M):
            t, s = divmod(m, S)
            t_global = cfg.task_ids()[t]
            out.append(Checkpoint(
                tensors={k: stacked[k][m].clone() for k in keys}, arch=cfg.arch, num_classes=cfg.k,
                input_shape=input_shape, dataset=tasks.names[t], seed=init_seeds[m],
                run_id=f"{cfg.family}-{t_global}-s{s}-{digest}", step=step,
                train_config={"optimizer": "adamw", "lr": float(lr[m]), "weight_decay": float(wd[m]),
                              "betas": list(cfg.betas), "batch_size": cfg.batch_size, "steps": cfg.steps,
                              "init_seed": init_seeds[m], "shared_init": cfg.shared_init, "population": digest},
                metrics={k: float(v[m]) for k, v in metrics.items()},
                tags=["population", cfg.family], source=SOURCE, instructions=_instructions(tasks.names[t])))
    return out, seconds


def build_population(cfg: PopulationConfig, zoo_url: str, show_progress: bool = True, workers: int = 1) -> dict:
    """Train the population, ingest every checkpoint into the zoo at ``zoo_url``, and summarize.
    ``workers > 1`` (or a Ray cluster in ``RAY_ADDRESS``): one vectorized shard of the tasks per
    Ray task, each publishing its own commit; shard k trains tasks k, k + N, ... (deterministic
    for a given config and N, not the same bytes as one process: the draws are per shard)."""
    import os

    if workers > 1 or os.environ.get("RAY_ADDRESS"):
        results = _build_ray(cfg, zoo_url, max(1, min(workers, cfg.tasks)), show_progress)
    else:
        results = [_build_shard(cfg, zoo_url, show_progress)]
    models = cfg.tasks * cfg.seeds
    final = torch.tensor([a for r in results for a in r["final_acc"]])
    seconds = max(r["seconds_train"] for r in results)  # shards train side by side
    out = {"models": models, "checkpoints": sum(r["checkpoints"] for r in results),
           "ingested": sum(r["ingested"] for r in results), "duplicate": sum(r["duplicate"] for r in results),
           "seconds_train": round(seconds, 3), "seconds_ingest": round(max(r["seconds_ingest"] for r in results), 3),
           "models_per_s": round(models / seconds, 2),
           "mean_final_test_acc": round(float(final.mean()), 4), "min_final_test_acc": round(float(final.min()), 4),
           "zoo_snapshot": Zoo(zoo_url, mode="r").snapshot_id()}
    return out if workers == 1 and not os.environ.get("RAY_ADDRESS") else {**out, "workers": len(results)}


def _build_shard(cfg: PopulationConfig, zoo_url: str, show_progress: bool = False, progress=None) -> dict:
    ckpts, seconds = train_population(cfg, show_progress=show_progress, progress=progress)
    t0 = time.perf_counter()
    res = Zoo(zoo_url).add(ckpts)
    last = max(c.step for c in ckpts)
    return {"checkpoints": len(ckpts), "ingested": len(res["ingested"]), "duplicate": len(res["duplicate"]),
            "seconds_train": seconds, "seconds_ingest": time.perf_counter() - t0,
            "final_acc": [c.metrics["test_acc"] for c in ckpts if c.step == last]}


def _build_ray(cfg: PopulationConfig, zoo_url: str, shards: int, show_progress: bool) -> list[dict]:
    """One Ray task per shard; steps done are reported through a queue to the driver's progress bar."""
    import os
    from pathlib import Path

    import ray
    from ray.util.queue import Empty, Queue
    from tqdm import tqdm

    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else shards, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
        started_here = True
    try:
        if "://" not in zoo_url:
            zoo_url = str(Path(zoo_url).resolve())  # workers may run in another cwd
        queue = Queue()
        task = ray.remote(num_cpus=1, max_retries=1)(
            lambda c, url, q: _build_shard(c, url, progress=lambda k: q.put_nowait(k)))
        refs = [task.remote(dataclasses.replace(cfg, shard=k, shards=shards), zoo_url, queue) for k in range(shards)]
        bar = tqdm(total=cfg.steps * shards, desc=f"train {cfg.tasks * cfg.seeds} x {cfg.arch} on {shards} workers",
                   unit="step", disable=not show_progress)
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            try:
                bar.update(sum(queue.get_nowait_batch(queue.qsize())))
            except Empty:
                pass
        bar.close()
        return ray.get(refs)
    finally:
        if started_here:
            ray.shutdown()


def _instructions(dataset: str) -> list[str]:
    """The training phrasings of a digit-subset task (weightgen.instructions); [] for other datasets."""
    from weightgen.instructions import digits_from_dataset, phrasings

    classes = digits_from_dataset(dataset)
    return phrasings(classes) if classes else []
