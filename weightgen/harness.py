"""The evaluation harness: trained generators vs baselines on held-out digit tasks.

Mirrors the protocol of shared/research/feasibility.md §1-2 so numbers compare with it:

* tasks: ``SubsetFamily.heldout_tasks`` of both kinds, ``set`` (a class set never in the zoo) and
  ``tuple`` (a zoo class set in an unseen order); :func:`check_heldout` refuses any task that is in
  the zoo or in a generator's ``training_summary.json`` training tasks;
* variants of every task, zero-shot: ``heldout`` (as is), and three the zoo and all tuning never
  saw (report them apart): ``shifted`` (every image rolled one pixel right), ``elastic`` (a smooth
  random displacement of every image) and ``mnist8`` (the same class tuples from MNIST, averaged
  down to the 8x8 digits format: a source the zoo never saw);
* every method gets the same support set, ``task.support(support_per_class, seed)``; generators
  run through ``weightgen.sampling.candidates`` exactly as ``weightgen sample`` does, each twice:
  ``NAME`` (the default: closed-form head fitted on the support, declared) and ``NAME/generated``
  (the pure generator). Best-of-n is chosen on the support only (cross-validated accuracy for
  fitted heads, support accuracy otherwise); mean over samples, best-of-n and oracle best;
* baselines (:mod:`weightgen.baselines`) including the support-set rules a generator must beat:
  nearest class mean, and shrinkage-LDA and logistic-regression probes on the inputs;
* fine-tuning curves on the train split (full-batch Adam, lr 1e-2) from the best-of-n sample and
  from sample 0, test accuracy at steps {0, 5, 10, 25, 50, 100} (``heldout`` only);
* a support-size sweep (per class 1, 5, 10, 50, 200) and a class-count check (2-10 classes);
* autoencoder reconstruction (generators that declare ``reconstruct``) of weights trained from
  scratch, novelty against the training zoo, sampling speed (pure, and with the fitted head).

Everything runs with ``threads`` torch threads (default 1): the models are tiny, so extra threads
only add synchronisation, which costs ~1000x on cores shared with other jobs.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from weightgen import baselines
from weightgen.align import align
from weightgen.archs import get_arch
from weightgen.baselines import Request, ZooIndex
from weightgen.data import TaskData, load_dataset
from weightgen.data.digits import get_family
from weightgen.encoders import group_support
from weightgen.eval_report import format_tables, summarize, write_report  # noqa: F401  (re-exported)
from weightgen.eval_tasks import (VARIANTS, HeldOutLeak, check_heldout, elastic_task, shift_task,  # noqa: F401
                                  variant_task)
from weightgen.evaluate import accuracy_many
from weightgen.generators import Condition
from weightgen.generators.common import decode_tokens
from weightgen.instructions import EVAL_TEMPLATES, digits_from_dataset, phrase
from weightgen.novelty import novelty_vs_zoo
from weightgen.sampling import candidates, instruction_candidates

FT_STEPS = (0, 5, 10, 25, 50, 100)
@dataclass
class EvalConfig:
    arch: str = "mlp-s"
    family: str = "digits-subsets"
    tasks: int | None = None  # per kind; default 10, or 3 with quick
    n: int = 8  # samples per method and task
    quick: bool = False
    zoo: str | None = None  # default: $WEIGHTGEN_ZOO or $WEIGHTGEN_HOME/zoo
    generators: str | None = None  # directory of trained generators; default $WEIGHTGEN_HOME/generators
    support_per_class: int = 10
    seed: int = 0
    task_seed: int = 1
    ft_steps: tuple = FT_STEPS
    ft_lr: float = 1e-2
    scratch_steps: int = 300
    speed_n: int = 64
    speed_threads: tuple = (1, 2)  # torch threads to time sampling at (2 is slow on cores shared with other jobs)
    variants: tuple = VARIANTS
    support_sizes: tuple = (1, 5, 10, 50, 100, 200)  # per class, for the support-size sweep (() skips it)
    class_counts: tuple = (2, 3, 7, 10)  # class counts the zoo never had (it has 5), 3 tasks each
    threads: int | None = 1
    heldout: dict | None = None  # explicit {"set": [...], "tuple": [...]} instead of drawing them
    verbose: bool = False

    @property
    def n_tasks(self) -> int:
        return self.tasks or (3 if self.quick else 10)


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- generators as sources


def find_generators(root: Path, arch: str, k: int, input_shape) -> dict[str, tuple]:
    """name -> (generator, info) for every trained full-mode generator in ``root`` that can
    generate ``arch`` for k classes of this input shape."""
    from weightgen.generators import trained_generators
    from weightgen.sampling import load_generator

    out = {}
    for g in trained_generators(root):
        if (arch, tuple(input_shape)) not in g.makes or g.config.get("mode", "full") != "full":
            continue
        loaded = load_generator(str(g.path))
        if loaded.model.unfit_reason(arch, input_shape, k) is not None:  # e.g. a hypernet for another class count
            continue
        out[g.name] = (loaded.model, {**loaded.info, "training_tasks": g.summary.get("training_tasks", []),
                                      "dir": str(g.path), "input_profile": loaded.input_profile})
    return out


def _eval_instruction(task: TaskData, seed: int) -> str | None:
    """A phrasing of the task that no generator was trained on (``EVAL_TEMPLATES``), or None."""
    classes = digits_from_dataset(task.name)
    return phrase(classes, EVAL_TEMPLATES[seed % len(EVAL_TEMPLATES)]) if classes else None


def generator_source(gen, head: str, input_profile: dict | None = None):
    """A generator as a weight source, exactly as ``weightgen sample`` runs it: (stacked sd, selection
    score). Generators that read text also get the task in words, in a held-out phrasing."""
    def source(req: Request):
        instruction = _eval_instruction(req.task, req.seed) if gen.capabilities.text else None
        c = candidates(gen, req.arch, req.task.num_classes, req.shape, req.support_x, req.support_y, req.n,
                       seed=req.seed, head=head, input_profile=input_profile, instruction=instruction,
                       class_names=req.task.class_names or None)
        return c.sd, c.score
    return source


def instruction_source(gen, head: str = "fit"):
    """A text-reading generator given only the task in words (held-out phrasing), no data, as
    ``weightgen sample`` without --dataset runs it: conditioned on its class memory where it keeps
    one (``head="generated"``: the pure generator's own head on that), else best by its likelihood."""
    def source(req: Request):
        names = [str(c) for c in digits_from_dataset(req.task.name)]
        c = instruction_candidates(gen, req.arch, req.shape, _eval_instruction(req.task, req.seed), names, req.n,
                                   req.seed, head)
        return c.sd, c.score
    return source


def methods_for(cfg: EvalConfig, gens: dict) -> dict:
    methods = {}
    for name, (g, info) in gens.items():
        methods[name] = generator_source(g, "fit", info.get("input_profile"))
        methods[name + "/generated"] = generator_source(g, "generated")
        if g.capabilities.text:
            methods[name + "/instruction"] = instruction_source(g)
            if g.remembered_classes:
                methods[name + "/instruction/generated"] = instruction_source(g, "generated")
    methods.update(baselines.BASELINES)
    if get_arch(cfg.arch).family != "mlp":  # the probes embed a linear rule in an MLP's ReLU units
        methods.pop("lda"), methods.pop("logreg")
    methods["scratch"] = lambda req: baselines.scratch(req, steps=cfg.scratch_steps)
    return methods


# --------------------------------------------------------------------------- measuring


def zero_shot(cfg: EvalConfig, task: TaskData, sx, sy, sd, score=None) -> dict:
    k, shape = task.num_classes, task.input_shape
    test = accuracy_many(cfg.arch, k, shape, sd, task.x_test, task.y_test)
    sel = accuracy_many(cfg.arch, k, shape, sd, sx, sy) if score is None else score
    pick = int(torch.argmax(sel))
    return {"mean": float(test.mean()), "best": float(test[pick]), "oracle": float(test.max()), "n": len(test),
            "pick": pick}


def fine_tune(cfg: EvalConfig, task: TaskData, starts: dict[str, dict]) -> dict[str, dict[int, float]]:
    """name -> {step: test acc}, every start stacked and trained at once (full-batch Adam)."""
    names = list(starts)
    stack = {k: torch.cat([starts[m][k] for m in names]) for k in starts[names[0]]}
    _, curve = baselines.train_stack(cfg.arch, task, stack, max(cfg.ft_steps), cfg.ft_lr, record_at=cfg.ft_steps)
    return {m: {s: float(curve[s][i]) for s in cfg.ft_steps} for i, m in enumerate(names)}


def reconstruction(gen, arch: str, task: TaskData, sd: dict) -> dict:
    """Test accuracy of ``sd`` and of its autoencoder reconstruction (aligned, standardized, tokenized)."""
    k, shape = task.num_classes, task.input_shape
    stats = gen.weight_stats(arch)
    keys = list(stats.stat_names)
    al, _ = align({n: sd[n] for n in keys}, arch, ref=stats.align_ref() or None)
    layout = gen.layout(k)
    tokens = layout.tokenize(stats.standardizer().normalize(al))
    per_class = gen.support_per_class
    sx, sy = task.support(per_class, 0)
    support = group_support(sx, sy, k, per_class, torch.Generator().manual_seed(0))[None]
    rec = {**sd, **decode_tokens(layout, gen.reconstruct(tokens, k, support), stats)}
    acc = lambda w: float(accuracy_many(arch, k, shape, w, task.x_test, task.y_test).mean())  # noqa: E731
    return {"orig": acc(sd), "recon": acc(rec)}


def sampling_speed(gen, arch: str, sx, sy, k: int, n: int, repeats: int, threads_list=(1, 2)) -> dict:
    """models/s of the pure ``gen.sample`` and of ``candidates`` with the fitted head (best of
    ``repeats``) at each thread count."""
    out = {}
    cond = Condition(group_support(sx, sy, k, gen.support_per_class, torch.Generator().manual_seed(0)))
    shape = tuple(sx.shape[1:])
    runs = {"": lambda r: gen.sample(cond, n, generator=torch.Generator().manual_seed(r)),
            "fit_": lambda r: candidates(gen, arch, k, shape, sx, sy, n, seed=r)}
    for threads in threads_list:
        with _threads(threads):
            for tag, run in runs.items():
                run(0)  # warm-up
                best = float("inf")
                for r in range(repeats):
                    t0 = time.perf_counter()
                    run(r)
                    best = min(best, time.perf_counter() - t0)
                out[f"{tag}models_per_s_{threads}t"] = n / best
    out["models_per_s"] = max(v for k_, v in out.items() if not k_.startswith("fit_"))
    out["fit_models_per_s"] = max(v for k_, v in out.items() if k_.startswith("fit_"))
    return out


def _support_task(task: TaskData, sx, sy) -> TaskData:
    """The task with its train split replaced by the support: 'scratch on the same examples'."""
    return dataclasses.replace(task, x_train=sx, y_train=sy)


def _probe_rows(cfg, task, sx, sy, key, methods: dict, seed: int) -> list[dict]:
    """Zero-shot rows of ``methods`` (name -> source) on one support set."""
    rows = []
    for name, source in methods.items():
        out = source(Request(cfg.arch, task, sx, sy, cfg.n, seed, None))
        sd, score = out if isinstance(out, tuple) else (out, None)
        rows.append({**key, "method": name, **zero_shot(cfg, task, sx, sy, sd, score)})
    rows.append({**key, "method": "ncm", "mean": baselines.prototype(Request(cfg.arch, task, sx, sy, cfg.n, seed))})
    return rows


# --------------------------------------------------------------------------- the run


def run_eval(cfg: EvalConfig) -> dict:
    from weightgen.paths import default_zoo, generators_dir
    from zoo import open_zoo

    t_start = time.time()
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    fam = get_family(cfg.family)
    k, shape = fam.k, load_dataset(fam.base).input_shape
    zoo = open_zoo(cfg.zoo or default_zoo(), mode="r")
    with _threads(cfg.threads):
        gens = find_generators(Path(cfg.generators or generators_dir()), cfg.arch, k, shape)
        zoo_tasks = {r["dataset"] for r in zoo.query()}
        gen_tasks = {name: set(info["training_tasks"]) for name, (_, info) in gens.items()}
        tasks = cfg.heldout or fam.heldout_tasks(cfg.n_tasks, seed=cfg.task_seed,
                                                 zoo_tasks=zoo_tasks | set().union(*gen_tasks.values()))
        check_heldout(tasks, zoo_tasks, gen_tasks)
        index = ZooIndex(zoo, cfg.arch, k, shape, cfg.support_per_class, cfg.seed)
        methods = methods_for(cfg, gens)
        res = {"config": dataclasses.asdict(cfg), "tasks": tasks, "zoo": zoo.url, "zoo_checkpoints": len(index.ids),
               "generators": {n: info for n, (_, info) in gens.items()}, "methods": [*methods, "ncm"],
               "per_task": [], "recon": [], "novelty": [], "speed": {}, "support_sweep": [], "class_counts": []}
        for variant in cfg.variants:
            for i, (kind, name) in enumerate((kd, t) for kd, ts in tasks.items() for t in ts):
                _eval_task(cfg, res, methods, gens, index, variant, kind, variant_task(name, variant),
                           seed=cfg.seed * 1000 + i)
                _log(cfg, t_start, f"{variant} {kind} {name}")
        _support_sweep(cfg, res, gens, tasks, t_start)
        _class_counts(cfg, res, gens, t_start)
        first = load_dataset(next(t for ts in tasks.values() for t in ts))
        sx, sy = first.support(cfg.support_per_class, cfg.seed)
        for name, (gen, _) in gens.items():
            speed = sampling_speed(gen, cfg.arch, sx, sy, k, cfg.speed_n, 1 if cfg.quick else 3, cfg.speed_threads)
            res["speed"][name] = {"n": cfg.speed_n, **speed}
    res["summary"] = summarize(res, cfg.ft_steps)
    res["seconds"] = round(time.time() - t_start, 1)
    return res


def _log(cfg, t_start, what):
    if cfg.verbose:
        print(f"[eval] {what} ({time.time() - t_start:.0f} s)", flush=True)


def _eval_task(cfg, res, methods, gens, index, variant, kind, task, seed) -> None:
    sx, sy = task.support(cfg.support_per_class, cfg.seed)
    key = {"variant": variant, "kind": kind, "task": task.name}
    sds, rows = {}, {}
    for name, source in methods.items():
        t0 = time.perf_counter()
        out = source(Request(cfg.arch, task, sx, sy, cfg.n, seed, index))
        secs = time.perf_counter() - t0
        sd, score = out if isinstance(out, tuple) else (out, None)
        sds[name] = sd
        n = len(next(iter(sd.values())))
        rows[name] = {**key, "method": name, **zero_shot(cfg, task, sx, sy, sd, score), "s_per_model": secs / n}
    rows["ncm"] = {**key, "method": "ncm", "mean": baselines.prototype(Request(cfg.arch, task, sx, sy, cfg.n, seed))}
    if variant == "heldout":
        starts = {}
        for m, sd in sds.items():
            if m != "scratch":
                starts[m] = {k_: v[rows[m]["pick"]][None] for k_, v in sd.items()}
                starts[m + "/1"] = {k_: v[:1] for k_, v in sd.items()}
        curves = fine_tune(cfg, task, starts)
        for m in sds:
            if m != "scratch":
                rows[m]["ft"], rows[m]["ft_one"] = curves[m], curves[m + "/1"]
        for name, (gen, info) in gens.items():
            if gen.capabilities.reconstruct:
                res["recon"].append({**key, "generator": name, **reconstruction(gen, cfg.arch, task, sds["scratch"])})
            for m in [m for m in (name, name + "/generated", name + "/instruction") if m in sds]:
                nov = novelty_vs_zoo(gen, info, cfg.arch, task.num_classes, task.input_shape, sds[m], task,
                                     ref_dir=info.get("dir")) or {}
                res["novelty"].append({**key, "generator": m, "acc": rows[m]["mean"],
                                       **{f: nov.get(f) for f in ("ratio", "nearest_zoo_accuracy", "error")}})
    res["per_task"].extend(rows.values())


def _sweep_methods(cfg, gens, k: int | None = None, input_shape=(64,)) -> dict:
    m = {}
    for name, (g, info) in gens.items():
        if k is not None and g.unfit_reason(cfg.arch, input_shape, k) is not None:
            continue  # e.g. a hypernet trained for one class count
        m[name] = generator_source(g, "fit", info.get("input_profile"))
        m[name + "/generated"] = generator_source(g, "generated")
    if get_arch(cfg.arch).family == "mlp":
        m["lda"], m["logreg"] = baselines.lda_probe, baselines.logreg_probe
    return m


def _support_sweep(cfg, res, gens, tasks, t_start) -> None:
    """Zero-shot test accuracy against support examples per class, on the held-out class sets and
    on MNIST (the unseen source); scratch is trained on the same examples."""
    methods = _sweep_methods(cfg, gens)
    methods["scratch"] = lambda req: baselines.scratch(req, steps=cfg.scratch_steps)
    for variant in [v for v in ("heldout", "mnist8") if v in cfg.variants]:
        for i, name in enumerate(tasks.get("set", [])):
            task = variant_task(name, variant)
            for size in cfg.support_sizes:
                sx, sy = task.support(size, cfg.seed)
                key = {"variant": variant, "kind": "set", "task": task.name, "per_class": size}
                sub = _support_task(task, sx, sy)  # scratch sees only the support
                for row in _probe_rows(cfg, sub, sx, sy, key, methods, seed=cfg.seed * 1000 + i):
                    res["support_sweep"].append(row)
            _log(cfg, t_start, f"support sweep {variant} {name}")


def _class_counts(cfg, res, gens, t_start) -> None:
    """Any class count from one generator: k-class digit tasks (the zoo has only 5-class ones)."""
    rng = np.random.default_rng(cfg.task_seed)
    for k in cfg.class_counts:
        methods = _sweep_methods(cfg, gens, k, load_dataset("digits").input_shape)
        methods["scratch"] = lambda req: baselines.scratch(req, steps=cfg.scratch_steps)
        for j in range(1 if cfg.quick else 3):
            classes = rng.permutation(10)[:k].tolist()
            task = load_dataset("digits:classes=" + ",".join(map(str, classes)))
            sx, sy = task.support(cfg.support_per_class, cfg.seed)
            key = {"variant": "classes", "kind": str(k), "task": task.name, "num_classes": k}
            res["class_counts"].extend(_probe_rows(cfg, task, sx, sy, key, methods, seed=cfg.seed * 1000 + j))
        _log(cfg, t_start, f"class count {k}")
