"""The evaluation harness: trained generators vs baselines on held-out digit tasks.

Mirrors the protocol of shared/research/feasibility.md §1-2 so numbers compare with it:

* tasks: ``SubsetFamily.heldout_tasks`` of both kinds, ``set`` (a class set never in the zoo) and
  ``tuple`` (a zoo class set in an unseen order); :func:`check_heldout` refuses any task that is in
  the zoo or in a generator's ``training_summary.json`` training tasks;
* every method (each trained generator of the arch, and :mod:`weightgen.baselines`) gets the same
  support set, ``task.support(support_per_class, seed)``: generators condition on it and best-of-n
  is chosen on it (feasibility.md chose on the whole train split; the support set is what
  ``weightgen sample`` can see). Zero-shot test accuracy: mean over samples, best-of-n, oracle best;
* fine-tuning curves on the train split (full-batch Adam, lr 1e-2) from the best-of-n sample and
  from sample 0 ("1 sample"), test accuracy at steps {0, 5, 10, 25, 50, 100}, all methods of a task
  trained at once; "steps to X" is read off that grid from the mean curve over tasks;
* autoencoder reconstruction (D2NWG ``reconstruct``) of weights trained from scratch on the
  held-out tasks, relative to their own accuracy; novelty of every generator's samples against the
  zoo it was trained on (``novelty_vs_zoo``: aligned distance to the nearest zoo checkpoint / the
  zoo's own NN distance, and that checkpoint's accuracy on the task); sampling speed (models/s,
  batch ``speed_n``, at each of ``speed_threads`` torch threads);
* a ``shifted`` variant: the same tasks with every 8x8 image rolled one pixel right (zero-shot only).

Everything runs with ``threads`` torch threads (default 1): the models are tiny, so extra threads
only add synchronisation, which costs ~1000x on cores shared with other jobs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from weightgen import baselines
from weightgen.align import align
from weightgen.archs import image_shape
from weightgen.baselines import Request, ZooIndex
from weightgen.data import TaskData, load_dataset
from weightgen.data.digits import get_family
from weightgen.encoders import group_support
from weightgen.evaluate import accuracy_many
from weightgen.generators import Condition
from weightgen.generators.common import decode_tokens
from weightgen.novelty import novelty_vs_zoo

FT_STEPS = (0, 5, 10, 25, 50, 100)
THRESHOLDS = (0.95, 0.975)


class HeldOutLeak(AssertionError):
    """A held-out task is in the zoo or in a generator's training tasks: the evaluation would lie."""


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
    shifted: bool = True
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


# --------------------------------------------------------------------------- setup


def _class_set(name: str):
    """``digits:classes=4,2,8`` -> ("digits", {2, 4, 8}); None for a name without a class list."""
    kind, _, args = name.partition(":")
    if not args.startswith("classes=") or ";" in args:
        return None
    try:
        return kind, frozenset(int(c) for c in args.removeprefix("classes=").split(","))
    except ValueError:
        return None


def check_heldout(tasks: dict[str, list[str]], zoo_tasks, generator_tasks: dict[str, set]) -> None:
    """A ``tuple`` task must not be in the zoo or a generator's training tasks; a ``set`` task's
    class *set* must not be there in any order (comparing names missed ``4,3,2,1,0`` vs ``0,1,2,3,4``)."""
    pools = {"in the zoo": set(zoo_tasks), **{f"a training task of generator {g!r}": set(seen)
                                              for g, seen in generator_tasks.items()}}
    sets = {where: {_class_set(p) for p in pool} - {None} for where, pool in pools.items()}
    for kind, names in tasks.items():
        for t in names:
            for where, pool in pools.items():
                if t in pool:
                    raise HeldOutLeak(f"held-out {kind} task {t!r} is {where}")
                if kind == "set" and _class_set(t) in sets[where]:
                    raise HeldOutLeak(f"held-out set task {t!r} has the class set of a task that is {where}")


def shift_task(task: TaskData, pixels: int = 1) -> TaskData:
    """The task with every image rolled ``pixels`` to the right (wrapping)."""
    shape = image_shape(task.input_shape)
    roll = lambda x: x.reshape(len(x), *shape).roll(pixels, -1).reshape(x.shape)  # noqa: E731
    return dataclasses.replace(task, name=f"{task.name}+roll{pixels}", x_train=roll(task.x_train),
                               x_test=roll(task.x_test))


def find_generators(root: Path, arch: str, k: int, input_shape) -> dict[str, tuple]:
    """name -> (generator, info) for every trained full-mode generator in ``root`` that can
    generate ``arch`` for k classes of this input shape."""
    from weightgen.sampling import load_generator

    out = {}
    for d in sorted(p for p in Path(root).glob("*") if (p / "config.json").is_file()):
        c = json.loads((d / "config.json").read_text())
        fits = c.get("arch") == arch and tuple(c.get("input_shape", ())) == tuple(input_shape)
        if not fits or c.get("mode", "full") != "full":
            continue
        loaded = load_generator(str(d))
        gen = loaded.model
        try:  # e.g. a hypernet trained for another class count
            gen.sample(Condition(torch.zeros(k, 2, *input_shape)), 1, generator=torch.Generator().manual_seed(0))
        except ValueError:
            continue
        summary = d / "training_summary.json"
        info = {**loaded.info, "training_tasks": json.loads(summary.read_text()).get("training_tasks", [])
                if summary.is_file() else []}
        out[d.name] = (gen, info)
    return out


def generator_source(gen, per_class: int):
    """A generator as a weight source: condition on the request's support set, sample n."""
    def source(req: Request):
        g = torch.Generator().manual_seed(req.seed)
        support = group_support(req.support_x, req.support_y, req.task.num_classes, per_class, g)
        return gen.sample(Condition(support), req.n, generator=torch.Generator().manual_seed(req.seed))
    return source


# --------------------------------------------------------------------------- measuring


def zero_shot(cfg: EvalConfig, task: TaskData, sx, sy, sd) -> dict:
    k, shape = task.num_classes, task.input_shape
    test = accuracy_many(cfg.arch, k, shape, sd, task.x_test, task.y_test)
    sup = accuracy_many(cfg.arch, k, shape, sd, sx, sy)
    return {"mean": float(test.mean()), "best": float(test[int(sup.argmax())]), "oracle": float(test.max()),
            "n": len(test), "pick": int(sup.argmax())}


def fine_tune(cfg: EvalConfig, task: TaskData, starts: dict[str, dict]) -> dict[str, dict[int, float]]:
    """name -> {step: test acc}, every start stacked and trained at once (full-batch Adam)."""
    names = list(starts)
    stack = {k: torch.cat([starts[m][k] for m in names]) for k in starts[names[0]]}
    _, curve = baselines.train_stack(cfg.arch, task, stack, max(cfg.ft_steps), cfg.ft_lr, record_at=cfg.ft_steps)
    return {m: {s: float(curve[s][i]) for s in cfg.ft_steps} for i, m in enumerate(names)}


def reconstruction(gen, arch: str, task: TaskData, sd: dict) -> dict:
    """Test accuracy of ``sd`` and of its autoencoder reconstruction (aligned, standardized, tokenized)."""
    k, shape = task.num_classes, task.input_shape
    keys = list(gen.stats.stat_names)
    al, _ = align({n: sd[n] for n in keys}, arch, ref=gen.stats.align_ref() or None)
    layout = gen.layout(k)
    tokens = layout.tokenize(gen.stats.standardizer().normalize(al))
    per_class = int(getattr(gen.config, "support_per_class", 10))
    sx, sy = task.support(per_class, 0)
    support = group_support(sx, sy, k, per_class, torch.Generator().manual_seed(0))[None]
    rec = {**sd, **decode_tokens(layout, gen.reconstruct(tokens, k, support), gen.stats)}
    acc = lambda w: float(accuracy_many(arch, k, shape, w, task.x_test, task.y_test).mean())  # noqa: E731
    return {"orig": acc(sd), "recon": acc(rec)}


def sampling_speed(gen, cond: Condition, n: int, repeats: int, threads_list=(1, 2)) -> dict:
    """models/s of ``gen.sample`` (best of ``repeats``) at each thread count, and the best of them."""
    out = {}
    for threads in threads_list:
        with _threads(threads):
            gen.sample(cond, 2, generator=torch.Generator().manual_seed(0))  # warm-up
            best = float("inf")
            for r in range(repeats):
                t0 = time.perf_counter()
                gen.sample(cond, n, generator=torch.Generator().manual_seed(r))
                best = min(best, time.perf_counter() - t0)
        out[f"models_per_s_{threads}t"] = n / best
    out["models_per_s"] = max(out.values())
    return out


# --------------------------------------------------------------------------- the run


def run_eval(cfg: EvalConfig) -> dict:
    from weightgen.paths import default_zoo, generators_dir
    from zoo import open_zoo

    t_start = time.time()
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
        methods = {name: generator_source(g, cfg.support_per_class) for name, (g, _) in gens.items()}
        methods.update(baselines.BASELINES)
        methods["scratch"] = lambda req: baselines.scratch(req, steps=cfg.scratch_steps)
        res = {"config": dataclasses.asdict(cfg), "tasks": tasks, "zoo": zoo.url, "zoo_checkpoints": len(index.ids),
               "generators": {n: info for n, (_, info) in gens.items()}, "methods": list(methods),
               "per_task": [], "ncm": [], "recon": [], "novelty": [], "speed": {}}
        variants = ("heldout", "shifted") if cfg.shifted else ("heldout",)
        for variant in variants:
            for i, (kind, name) in enumerate((kd, t) for kd, ts in tasks.items() for t in ts):
                task = load_dataset(name) if variant == "heldout" else shift_task(load_dataset(name))
                _eval_task(cfg, res, methods, gens, index, variant, kind, task, seed=cfg.seed * 1000 + i)
                if cfg.verbose:
                    print(f"[eval] {variant} {kind} {name} ({time.time() - t_start:.0f} s)", flush=True)
        first = load_dataset(next(t for ts in tasks.values() for t in ts))
        sx, sy = first.support(cfg.support_per_class, cfg.seed)
        for name, (gen, _) in gens.items():
            cond = Condition(group_support(sx, sy, k, cfg.support_per_class, torch.Generator().manual_seed(0)))
            speed = sampling_speed(gen, cond, cfg.speed_n, 1 if cfg.quick else 3, cfg.speed_threads)
            res["speed"][name] = {"n": cfg.speed_n, **speed}
    res["summary"] = summarize(res, cfg.ft_steps)
    res["seconds"] = round(time.time() - t_start, 1)
    return res


def _eval_task(cfg, res, methods, gens, index, variant, kind, task, seed) -> None:
    sx, sy = task.support(cfg.support_per_class, cfg.seed)
    key = {"variant": variant, "kind": kind, "task": task.name}
    sds, rows = {}, {}
    for name, source in methods.items():
        t0 = time.perf_counter()
        sd = source(Request(cfg.arch, task, sx, sy, cfg.n, seed, index))
        secs = time.perf_counter() - t0
        sds[name] = sd
        n = len(next(iter(sd.values())))
        rows[name] = {**key, "method": name, **zero_shot(cfg, task, sx, sy, sd), "s_per_model": secs / n}
    res["ncm"].append({**key, "acc": baselines.prototype(Request(cfg.arch, task, sx, sy, cfg.n, seed))})
    if variant == "heldout":
        starts = {}
        for m, sd in sds.items():
            if m != "scratch":
                starts[m] = {k_: v[rows[m]["pick"]][None] for k_, v in sd.items()}
                starts[m + "/1"] = {k_: v[:1] for k_, v in sd.items()}
        curves = fine_tune(cfg, task, starts)
        for m in rows:
            if m != "scratch":
                rows[m]["ft"], rows[m]["ft_one"] = curves[m], curves[m + "/1"]
        for name, (gen, info) in gens.items():
            if hasattr(gen, "reconstruct"):
                res["recon"].append({**key, "generator": name, **reconstruction(gen, cfg.arch, task, sds["scratch"])})
            nov = novelty_vs_zoo(gen, info, cfg.arch, task.num_classes, task.input_shape, sds[name], task) or {}
            res["novelty"].append({**key, "generator": name, "acc": rows[name]["mean"],
                                   **{f: nov.get(f) for f in ("ratio", "nearest_zoo_accuracy", "error")}})
    res["per_task"].extend(rows.values())


# --------------------------------------------------------------------------- summary and report


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def steps_to(curve: dict, threshold: float):
    """First grid step whose accuracy reaches ``threshold`` (None: not within the grid)."""
    return next((s for s in sorted(curve) if curve[s] >= threshold), None)


def _select(rows: list[dict], variant: str, split: str) -> list[dict]:
    return [r for r in rows if r["variant"] == variant and split in (r["kind"], "all")]


def summarize(res: dict, ft_steps) -> list[dict]:
    """Means over tasks per (variant, method, split); split "all" pools both kinds."""
    out = []
    variants = dict.fromkeys(r["variant"] for r in res["per_task"])
    for variant in variants:
        for split in [*res["tasks"], "all"]:
            for m in res["methods"]:
                rows = [r for r in _select(res["per_task"], variant, split) if r["method"] == m]
                s = {"variant": variant, "method": m, "split": split, "tasks": len(rows),
                     **{f: _mean(r[f] for r in rows) for f in ("mean", "best", "oracle", "s_per_model")}}
                if rows and "ft" in rows[0]:
                    for f in ("ft", "ft_one"):
                        s[f] = {st: _mean(r[f][st] for r in rows) for st in ft_steps}
                    for th in THRESHOLDS:
                        s[f"steps_to_{th}"] = steps_to(s["ft"], th)
                out.append(s)
            ncm = _mean(r["acc"] for r in _select(res["ncm"], variant, split))
            out.append({"variant": variant, "method": "ncm", "split": split, "mean": ncm})
            if variant == "heldout":
                for g in dict.fromkeys(r["generator"] for r in res["recon"] + res["novelty"]):
                    rec = [r for r in _select(res["recon"], variant, split) if r["generator"] == g]
                    nov = [r for r in _select(res["novelty"], variant, split) if r["generator"] == g]
                    out.append({"variant": variant, "method": g, "split": split, "table": "recon_novelty",
                                **{f: _mean(r[f] for r in rec) for f in ("orig", "recon")},
                                **{f: _mean(r[f] for r in nov) for f in ("ratio", "nearest_zoo_accuracy", "acc")}})
    return out


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _curve(d) -> dict[int, float]:  # step keys are str after a JSON round trip
    return {int(k): v for k, v in (d or {}).items()}


def _steps(x):
    return ">100" if x is None else str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _zero_cells(r: dict) -> list[str]:
    return [r["method"], r["split"], _pct(r["mean"]), _pct(r.get("best")), _pct(r.get("oracle"))]


def format_tables(res: dict) -> str:
    """The report's markdown tables (means over tasks; accuracies in %)."""
    c = res["config"]
    ft = list(c["ft_steps"])[1:]
    rows = [r for r in res["summary"] if r["split"] != "all" and "table" not in r]
    body = []
    for r in (r for r in rows if r["variant"] == "heldout"):
        f, f1 = _curve(r.get("ft")), _curve(r.get("ft_one"))
        tail = ([f"{_pct(f1.get(10))} / {_pct(f1.get(50))}", _steps(r["steps_to_0.95"]), _steps(r["steps_to_0.975"])]
                if f else ["–"] * 3)
        secs = "–" if r.get("s_per_model") is None else f"{r['s_per_model']:.4f}"
        body.append(_zero_cells(r) + [_pct(f.get(s)) for s in ft] + tail + [secs])
    lines = [f"### Held-out tasks: zero-shot and fine-tuning (test accuracy %, n = {c['n']} samples, "
             f"{len(res['tasks']['set'])} + {len(res['tasks'].get('tuple', []))} set + tuple tasks)", ""]
    lines += _table(["method", "split", "0-step mean", "best-of-n (support-sel)", "oracle best"]
                    + [f"FT{s}" for s in ft]
                    + ["FT10 / FT50 (1 sample)", "steps to 95%", "steps to 97.5%", "s / model"], body)
    if any(r["variant"] == "shifted" for r in rows):
        lines += ["", "### Shifted tasks (images rolled one pixel): zero-shot (test accuracy %)", ""]
        lines += _table(["method", "split", "0-step mean", "best-of-n", "oracle best"],
                        [_zero_cells(r) for r in rows if r["variant"] == "shifted"])
    rn = [r for r in res["summary"] if r.get("table") == "recon_novelty" and r["split"] != "all"]
    if rn:
        lines += ["", "### Autoencoder reconstruction of held-out scratch weights; novelty of samples", ""]
        lines += _table(["generator", "split", "scratch acc", "reconstructed acc", "ratio",
                         "novelty (NN dist / zoo NN dist)", "nearest zoo ckpt acc", "generated acc (mean)"],
                        [[r["method"], r["split"], _pct(r["orig"]), _pct(r["recon"]),
                          "–" if r["recon"] is None else f"{r['recon'] / max(r['orig'], 1e-8):.3f}",
                          "–" if r["ratio"] is None else f"{r['ratio']:.2f}", _pct(r["nearest_zoo_accuracy"]),
                          _pct(r["acc"])] for r in rn])
    if res["speed"]:
        ts = list(c["speed_threads"])
        lines += ["", f"### Sampling speed (models/s, batch {c['speed_n']}, this machine)", ""]
        lines += _table(["generator"] + [f"{t} torch thread(s)" for t in ts],
                        [[g] + [f"{s[f'models_per_s_{t}t']:.0f}" for t in ts] for g, s in res["speed"].items()])
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir) -> Path:
    """OUT/report.md, OUT/results.json, OUT/ft_curves.png, OUT/novelty.png; returns OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(f"# weightgen eval ({results['config']['arch']})\n\n" + format_tables(results))
    kinds = list(results["tasks"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for r in results["summary"]:
            if r["variant"] == "heldout" and r["split"] == kind and "ft" in r:
                curve = _curve(r["ft"])
                ax.plot(sorted(curve), [100 * curve[s] for s in sorted(curve)], marker="o", label=r["method"])
            if r["variant"] == "heldout" and r["split"] == kind and r["method"] == "scratch":
                ax.axhline(100 * r["mean"], color="gray", ls="--", lw=1, label="scratch (300 steps)")
        steps = list(results["config"]["ft_steps"])
        ax.set_xscale("symlog", linthresh=5)
        ax.set(title=f"held-out {kind}: fine-tuning from best-of-n", xlabel="full-batch Adam steps",
               ylabel="test accuracy (%)", ylim=(0, 100), xlim=(0, max(steps) * 1.1), xticks=steps, xticklabels=steps)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ft_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in dict.fromkeys(r["generator"] for r in results["novelty"]):
        pts = [r for r in results["novelty"] if r["generator"] == g and r["ratio"] is not None]
        sc = ax.scatter([r["ratio"] for r in pts], [100 * r["acc"] for r in pts], label=f"{g}: samples (mean)")
        ax.scatter([r["ratio"] for r in pts], [100 * (r["nearest_zoo_accuracy"] or 0) for r in pts], facecolors="none",
                   edgecolors=sc.get_facecolor(), label=f"{g}: nearest zoo ckpt")
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set(xlabel="novelty (distance to nearest zoo ckpt / zoo NN distance)", ylabel="test accuracy (%)",
           title="accuracy vs novelty, per held-out task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "novelty.png", dpi=110)
    plt.close(fig)
    return out
