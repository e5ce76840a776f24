"""From a request to ready-to-load weights: find a generator, sample, validate, select, write.

``weightgen sample`` never trains on the user's data behind their back: the support set (the
user's labelled examples up to a cap per class, :mod:`weightgen.support`) is only *read*: it
conditions the generator, closed-form parts are computed from it, and best-of-n is chosen on it.
By default (``head="fit"``) the generated classifier is replaced by a closed-form head fitted on
the support's class statistics under the generated backbone (:mod:`weightgen.heads`): declared in
the manifest (``closed_form``), with the pure generated head's support accuracy beside it;
``head="generated"`` returns the generator's own output. Accuracy is predicted on examples that
did none of the above, with an interval. Gradient steps on the support (``refine``) are an
explicit option, off by default, and declared in the manifest.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from weightgen import __version__
from weightgen.archs import get_arch, model_config
from weightgen.data import TaskData, load_dataset
from weightgen.encoders import group_support
from weightgen.evaluate import accuracy_many
from weightgen.generators import Condition, TrainedGenerator, class_by_name, read_trained, trained_generators
from weightgen.generators.class_memory import UnknownClassError
from weightgen.heads import HeadFit, fit_head
from weightgen.registry import UnknownNameError
from weightgen.shift import check_inputs
from weightgen.support import SUPPORT_CAP, split_user_data, wilson_interval


class NoGeneratorError(LookupError):
    """No trained generator fits the request; the message says how to make one."""


class RequestError(ValueError):
    """A request with nothing to condition on, or an instruction that cannot be read."""


class GeneratorMismatchError(NoGeneratorError, ValueError):
    """The generator asked for exists but makes another arch or input shape (a bad request)."""


def find_generator(arch: str, input_shape, name: str | None = None) -> Path:
    """The trained generator directory for this arch and input shape (or the one named)."""
    trained = trained_generators()
    if name:
        p = Path(name)
        hits = [read_trained(p)] if (p / "config.json").is_file() else [g for g in trained if g.name == name]
        if not hits:
            raise NoGeneratorError(f"No trained generator named {name!r}. "
                                   f"Available: {', '.join(g.name for g in trained) or 'none'}")
        if arch:
            check_fits(hits[0].info(), arch, input_shape)
        return hits[0].path
    fits = [g for g in trained if (arch, tuple(input_shape)) in g.makes]
    if not fits:
        seen = [f"{g.name} ({g.arch}, input {g.input_shape})" for g in trained]
        raise NoGeneratorError(
            f"No trained generator for {arch} with input shape {tuple(input_shape)} "
            f"(trained: {', '.join(seen) or 'none'}). Make one with `weightgen quickstart` (digits, mlp-s) or "
            f"`weightgen train --config training/configs/d2nwg_digits.yaml` on a zoo of {arch} checkpoints.")
    return _preferred(fits).path


def check_fits(info: dict, arch: str, input_shape) -> None:
    """A generator makes given archs for given input shapes; asking it for another is the caller's mistake."""
    made = (info.get("arch"), tuple(info.get("input_shape") or ()))
    if (arch, tuple(input_shape)) not in [(a, tuple(s)) for a, s in info.get("makes") or [made]]:
        raise GeneratorMismatchError(f"Generator {info.get('name')!r} makes {made[0]} for input shape {made[1]}, "
                               f"not {arch} for input shape {tuple(input_shape)}; name another generator or "
                               f"leave it out to pick one that fits.")


def _preferred(fits: list[TrainedGenerator]) -> TrainedGenerator:
    """The default among generators that fit: highest declared priority, then name."""
    return sorted(fits, key=lambda g: (-g.priority, g.name))[0]


def default_generators() -> list[Path]:
    """For each (arch, input shape) with a trained generator, the one ``find_generator`` picks when
    the request names none: what a server preloads."""
    groups: dict[tuple, list[TrainedGenerator]] = {}
    for g in trained_generators():
        for made in g.makes:
            groups.setdefault(made, []).append(g)
    return [_preferred(fits).path for fits in groups.values()]


@dataclass(frozen=True)
class LoadedGenerator:
    """A trained generator in memory, with where it came from (for the manifest)."""
    path: Path
    model: torch.nn.Module
    info: dict
    input_profile: dict | None = None  # what its training inputs looked like (weightgen.shift)
    training_tasks: int = 0

    @property
    def name(self) -> str:
        return self.path.name


def open_generator(path: str | Path) -> LoadedGenerator:
    """Load a trained generator from its directory (config.json + safetensors; never a pickle).

    Uncached: a server that evicts it (``@serve.multiplexed``) gets the memory back."""
    g = read_trained(path)
    try:
        cls = class_by_name(g.class_name)
    except UnknownNameError as e:
        raise NoGeneratorError(f"generator {g.name!r}: {e}") from None
    return LoadedGenerator(g.path, cls.from_pretrained(str(g.path)).eval(), g.info(), g.summary.get("input_profile"),
                           len(g.summary.get("training_tasks", [])))


@lru_cache(maxsize=8)
def load_generator(path: str) -> LoadedGenerator:
    """``open_generator`` behind a small cache, for the CLI and the eval harness."""
    return open_generator(path)


def generator_info(path: Path) -> dict:
    return read_trained(path).info()


@dataclass
class SampleResult:
    state_dict: dict[str, torch.Tensor]
    config: dict
    manifest: dict
    candidates_score: list[float]  # what best-of-n chose on, per candidate (support only)


def refine(arch, k, shape, sd, x, y, steps: int, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """Explicit, opt-in fine-tuning on the support set (full-batch Adam)."""
    model = get_arch(arch).build(k, shape)
    model.load_state_dict(sd, strict=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(get_arch(arch).logits(model, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k_: v.detach().contiguous() for k_, v in model.state_dict().items()}


HEADS = ("fit", "generated")


@dataclass
class Candidates:
    """n candidate weight sets for one support set, and what best-of-n selects them by."""
    sd: dict[str, torch.Tensor]  # stacked (n, ...)
    score: torch.Tensor  # (n,) selection score, measured on the support only
    score_basis: str
    generated_support_accuracy: torch.Tensor  # (n,) the pure generated weights on the support
    condition_per_class: int
    fit: HeadFit | None = None
    head_used: str = "fit"
    memory_per_class: int = 0  # > 0: the support was the generator's class memory, not the user's data


def candidates(gen, arch: str, k: int, shape, x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0,
               head: str = "fit", instruction: str | None = None, input_profile: dict | None = None,
               class_names: list[str] | None = None, text_encoder: str | None = None) -> Candidates:
    """Condition ``gen`` on the support (x, y), draw n weight sets, and (head="fit") replace their
    classifier by the closed-form head of :mod:`weightgen.heads`. The generator reads as many
    examples per class as it was trained to (drawn from the support, seeded); the head and the
    selection score use the whole support. Shared by ``sample`` and the eval harness.

    With a single example in some class nothing can be cross-validated, and then the generator's
    own head is kept when the inputs look like its training inputs (``input_profile``): on zoo
    training tasks with 1 example per class it scored 75.6 % against 71.7 % for the fitted head,
    while on shifted inputs the fitted head kept 71.9 % against 34.3 %."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    m = gen.support_per_class
    support = group_support(x, y, k, m, torch.Generator().manual_seed(seed))
    cond = Condition(support, instruction, class_names=class_names, arch=arch, extra={"text_encoder": text_encoder})
    raw = gen.sample(cond, n, generator=torch.Generator().manual_seed(seed))
    raw = {name: v.contiguous() for name, v in raw.items()}
    gen_acc = accuracy_many(arch, k, shape, raw, x, y)
    if head == "fit" and int(torch.bincount(y, minlength=k).min()) < 2:
        shift = check_inputs(input_profile, x)
        if shift is not None and not shift["shifted"]:
            return Candidates(raw, gen_acc, "support accuracy (one example per class, inputs like the generator's "
                              "training inputs: its own head)", gen_acc, m, head_used="generated")
    if head == "generated":
        return Candidates(raw, gen_acc, "support accuracy", gen_acc, m, head_used="generated")
    sd, fit = fit_head(arch, k, shape, raw, x, y, seed=seed)
    sd = {name: v.contiguous() for name, v in sd.items()}
    if fit.folds:
        return Candidates(sd, fit.cv_accuracy, f"{fit.folds}-fold cross-validated accuracy on the support",
                          gen_acc, m, fit)
    return Candidates(sd, accuracy_many(arch, k, shape, sd, x, y),
                      "support accuracy (too few examples per class to cross-validate)", gen_acc, m, fit)


def _check_request(n: int, seed: int, select: str) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= seed < 2**63:  # what torch.Generator.manual_seed takes (and the HTTP API's range)
        raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed}")
    if select not in ("best", "none"):
        raise ValueError(f"select must be 'best' or 'none', got {select!r}")


def text_conditions(gen, instruction: str | None, text_encoder: str | None) -> dict | None:
    """Which text encoder embeds the instruction, and the XBT projection into the generator's
    encoder when they differ (raises NoProjectionError before any work when there is none)."""
    if not instruction or not gen.capabilities.text:
        return None
    from weightgen.xbt import encode_for

    return encode_for([instruction], gen.config.text_encoder, text_encoder)[1]


def sample(arch: str, dataset: str | TaskData | None, generator: str | LoadedGenerator | None = None, n: int = 8,
           select: str = "best", seed: int = 0, instruction: str | None = None, refine_steps: int = 0,
           novelty: bool = True, head: str = "fit", support_per_class: int = SUPPORT_CAP,
           text_encoder: str | None = None) -> SampleResult:
    """Generate weights of ``arch`` for ``dataset``; see the module docstring for what is and is not done.
    With no dataset, an instruction alone conditions a generator that reads text; ``text_encoder``
    embeds it with another encoder than the generator's, through an XBT projection."""
    if dataset is None:
        return sample_from_instruction(arch, instruction, generator, n, select, seed, novelty, text_encoder)
    t0 = time.time()
    spec = get_arch(arch)
    task = dataset if isinstance(dataset, TaskData) else load_dataset(dataset)
    spec.check_input(task.input_shape)
    _check_request(n, seed, select)
    if isinstance(generator, LoadedGenerator):
        loaded = generator
        check_fits(loaded.info, arch, task.input_shape)
    else:
        loaded = load_generator(str(find_generator(arch, task.input_shape, generator)))
    gen, info = loaded.model, loaded.info
    k, shape = task.num_classes, task.input_shape
    why = gen.unfit_reason(arch, shape, k)
    if why:
        raise GeneratorMismatchError(f"Generator {info['name']!r} {why}; name another generator or leave it out.")
    split = split_user_data(task.x_train, task.y_train, k, support_per_class, seed)
    sx, sy = split.x, split.y  # only read: conditioning, closed-form parts, selection
    text = text_conditions(gen, instruction, text_encoder)
    cands = candidates(gen, arch, k, shape, sx, sy, n, seed, head, instruction, loaded.input_profile,
                       class_names=task.class_names or None, text_encoder=text_encoder)
    pick = int(torch.argmax(cands.score)) if select == "best" else 0  # argmax: first of ties, deterministic
    sd = {name: v[pick].clone().contiguous() for name, v in cands.sd.items()}
    if refine_steps:
        sd = refine(arch, k, shape, sd, sx, sy, refine_steps)
    one = {name: v[None] for name, v in sd.items()}
    est_n = len(split.y_est)
    correct = int(round(float(accuracy_many(arch, k, shape, one, split.x_est, split.y_est)) * est_n)) if est_n else 0
    trained = gen.trained_for()
    warnings = _class_count_warning(gen, k, cands, f"measured on your data: {cands.score_basis} "
                                    f"{float(cands.score[pick]):.3f}")
    shift = check_inputs(loaded.input_profile, sx)
    if shift and shift["shifted"]:
        warnings.append(f"your inputs differ from those the generator was trained on (shift score {shift['score']:.2f}, "
                        f"training tasks at most {shift['limit']:.2f}); generated features may not fit them — "
                        f"{cands.score_basis}: {float(cands.score[pick]):.3f}")
    manifest = {
        "weightgen_version": __version__, "generator": info["name"], "generator_class": info["class"],
        "zoo_snapshot": info["zoo_snapshot"], "arch": arch, "dataset": task.name, "dataset_fingerprint": task.fingerprint(),
        "num_classes": k, "input_shape": list(shape), "seed": seed, "n": n, "select": select, "selected_index": pick,
        "instruction": instruction, "instruction_used": bool(instruction) and gen.capabilities.text,
        "conditions": {"features": gen.config.get("feature", "raw"), "text": text},
        "trained_on": {"num_classes": trained["num_classes"], "any_class_count": trained["any_class_count"],
                       "input_shape": trained["input_shape"], "tasks": loaded.training_tasks,
                       "input_shift": shift},
        "warnings": warnings,
        "support_per_class": support_per_class, "support_size": len(sy),
        "support_class_counts": torch.bincount(sy, minlength=k).tolist(),
        "condition_per_class": cands.condition_per_class,
        "head": head, "head_used": cands.head_used,
        "closed_form": {"head": cands.fit.describe(pick)} if cands.fit else {},
        "selection_basis": cands.score_basis, "candidates_score": [round(float(s), 4) for s in cands.score],
        "support_accuracy": float(accuracy_many(arch, k, shape, one, sx, sy)),
        "support_cv_accuracy": (float(cands.fit.cv_accuracy[pick]) if cands.fit and cands.fit.folds else None),
        "generated_head_support_accuracy": float(cands.generated_support_accuracy[pick]),
        "predicted_accuracy": correct / est_n if est_n else None,
        "predicted_accuracy_interval": list(wilson_interval(correct, est_n)) if est_n else None,
        "predicted_accuracy_n": est_n, "predicted_accuracy_basis": split.basis,
        "refine_steps": refine_steps, "zero_shot": refine_steps == 0, "seconds": round(time.time() - t0, 3),
        "torch_threads": torch.get_num_threads(),  # the bytes depend on it (~1e-6): part of what reproduces them
    }
    if novelty:
        from weightgen.novelty import novelty_vs_zoo

        manifest["novelty"] = novelty_vs_zoo(gen, info, arch, k, shape, one, task, ref_dir=loaded.path)
    cfg = model_config(arch, k, shape, dataset=task.name)
    return SampleResult(sd, cfg, manifest, [float(s) for s in cands.score])


def find_text_generator(arch: str, generator: str | None = None):
    """The trained generator that makes ``arch`` from an instruction alone (by name or path, or the
    preferred one); NoGeneratorError naming what to do when there is none."""
    named = [read_trained(generator)] if generator and (Path(generator) / "config.json").is_file() else None
    texts = [g for g in (named or trained_generators()) if arch in [a for a, _ in g.makes] and g.reads_text
             and (named or generator in (None, g.name))]
    if not texts:
        raise NoGeneratorError(f"No trained generator that reads instructions makes {arch}"
                               + (f" under the name {generator!r}" if generator else "")
                               + "; `weightgen quickstart` trains one, or give a dataset")
    return _preferred(texts)


def _class_count_warning(gen, k: int, c: Candidates, measured: str | None = None) -> list[str]:
    """A request for another class count than the generator's training tasks had is flagged."""
    trained = gen.trained_for()["num_classes"]
    if not trained or k == trained:
        return []
    return [f"{k} classes requested from a generator trained on {trained}-class tasks"
            + (f"; {measured}" if measured else "")
            + (" (the head was fitted in closed form)" if c.fit else " (its own head)")]


LIKELIHOOD = "the generator's own mean log-likelihood of the sample (no data to measure on)"


def instruction_candidates(gen, arch: str, shape, instruction: str | None, names: list[str], n: int, seed: int = 0,
                           head: str = "fit", text_encoder: str | None = None) -> Candidates:
    """n candidates for a task given as class names (and an instruction) without data. A generator
    with a class memory is conditioned on its remembered examples of those classes, which also fit
    the closed-form head (``head="fit"``) and score best-of-n, as a user's support would; one
    without is sampled from the words alone and scored by its own likelihood. Shared by
    ``sample_from_instruction`` and the eval harness."""
    mem = gen.remembered_support(names)
    if mem is not None:
        c = candidates(gen, arch, len(names), shape, *mem, n, seed, head, instruction, class_names=names,
                       text_encoder=text_encoder)
        c.score_basis += " of the generator's remembered training examples of these classes"
        c.memory_per_class = int(len(mem[1]) // len(names))
        return c
    cond = Condition(None, instruction, class_names=names, arch=arch, extra={"text_encoder": text_encoder})
    sd, loglik = gen.sample_with_likelihood(cond, n, generator=torch.Generator().manual_seed(seed))
    return Candidates(sd, loglik, LIKELIHOOD, torch.full_like(loglik, float("nan")), 0, head_used="generated")


def sample_from_instruction(arch: str, instruction: str | None, generator: str | LoadedGenerator | None = None,
                            n: int = 8, select: str = "best", seed: int = 0, novelty: bool = True,
                            text_encoder: str | None = None) -> SampleResult:
    """Weights from an instruction alone ("classify handwritten 2, 7 and 9"): its classes, in the order
    named, are the labels. There is no data to fit, select or measure on, so best-of-n keeps the
    sample the generator itself finds most likely (mean log-likelihood of its codes) — the only
    honest score there is — and the manifest predicts no accuracy."""
    from weightgen.instructions import classes_from_instruction

    t0 = time.time()
    if not instruction:
        raise RequestError("give --dataset, or an --instruction for a generator that reads text")
    _check_request(n, seed, select)
    try:
        classes = classes_from_instruction(instruction)
    except ValueError as e:
        raise RequestError(str(e)) from None
    loaded = generator if isinstance(generator, LoadedGenerator) else load_generator(
        str(find_text_generator(arch, generator).path))
    gen, info = loaded.model, loaded.info
    if not gen.capabilities.text:
        raise GeneratorMismatchError(f"Generator {info['name']!r} does not read instructions; give --dataset")
    shape = next(s for a, s in read_trained(loaded.path).makes if a == arch)
    k = len(classes)
    why = gen.unfit_reason(arch, shape, k)
    if why:
        raise GeneratorMismatchError(f"Generator {info['name']!r} {why}")
    text = text_conditions(gen, instruction, text_encoder)
    names = [str(c) for c in classes]
    try:
        c = instruction_candidates(gen, arch, shape, instruction, names, n, seed, "fit", text_encoder)
    except UnknownClassError as e:
        raise GeneratorMismatchError(f"Generator {info['name']!r}: {e}") from None
    pick = int(torch.argmax(c.score)) if select == "best" else 0
    one = {name: v[pick][None].contiguous() for name, v in c.sd.items()}
    remembered = c.memory_per_class > 0
    manifest = {
        "weightgen_version": __version__, "generator": info["name"], "generator_class": info["class"],
        "zoo_snapshot": info["zoo_snapshot"], "arch": arch, "dataset": None, "num_classes": k,
        "input_shape": list(shape), "class_names": names, "seed": seed, "n": n, "select": select,
        "selected_index": pick, "instruction": instruction, "instruction_used": True,
        "conditions": {"features": gen.config.get("feature", "raw") if remembered else None, "text": text},
        "support": ({"source": "class memory", "what": "examples of the named classes kept from the generator's "
                     "training tasks' train splits (not your data)", "examples_per_class": c.memory_per_class}
                    if remembered else None),
        "selection_basis": c.score_basis, "candidates_score": [round(float(s), 4) for s in c.score],
        "head": "fit" if c.fit else "generated", "head_used": c.head_used,
        "closed_form": {"head": c.fit.describe(pick)} if c.fit else {},
        "generated_head_support_accuracy": float(c.generated_support_accuracy[pick]) if remembered else None,
        "trained_on": {**gen.trained_for(), "tasks": loaded.training_tasks},
        "warnings": ["no data was given: the weights were generated from the instruction" +
                     (" and the generator's remembered training examples of these classes (its fitted head and "
                      "selection used those, not your data)" if remembered else " alone") +
                     "; no accuracy is predicted for your data; give --dataset to condition, fit and measure on "
                     "examples"] + _class_count_warning(gen, k, c),
        "support_size": 0, "support_accuracy": None, "predicted_accuracy": None, "predicted_accuracy_interval": None,
        "predicted_accuracy_n": 0, "predicted_accuracy_basis": "none: no data", "refine_steps": 0, "zero_shot": True,
        "seconds": round(time.time() - t0, 3)}
    if novelty:
        from weightgen.novelty import novelty_vs_zoo

        manifest["novelty"] = novelty_vs_zoo(gen, info, arch, k, shape, one, None, ref_dir=loaded.path)
    cfg = model_config(arch, k, shape, dataset=None, class_names=names)
    return SampleResult({name: v[0] for name, v in one.items()}, cfg, manifest, [float(s) for s in c.score])


def write(result: SampleResult, out_dir: str | Path) -> Path:
    """DIR/model.safetensors (config in its metadata, no timestamps: same seed, same bytes),
    DIR/config.json and DIR/manifest.json (with the sha256 of model.safetensors), each written
    whole through a temp file and never through an existing symlink (``weightgen.outputs``)."""
    from safetensors.torch import save

    from weightgen.outputs import make_out_dir, write_file

    out = make_out_dir(out_dir)
    # one metadata key: safetensors stores metadata in a hash map, so several keys come out in random order
    meta = {"weightgen": json.dumps({**result.config, "generator": result.manifest["generator"],
                                     "seed": result.manifest["seed"]}, sort_keys=True)}
    data = save(result.state_dict, metadata=meta)
    write_file(out / "model.safetensors", data)
    result.manifest["sha256"] = hashlib.sha256(data).hexdigest()
    write_file(out / "config.json", json.dumps(result.config, indent=1).encode())
    write_file(out / "manifest.json", json.dumps(result.manifest, indent=1).encode())
    return out


def load_model(path: str | Path, device=None) -> torch.nn.Module:
    """The ready ``nn.Module`` from a directory written by ``weightgen sample`` or ``zoo export``."""
    from weightgen.archs import build_model

    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    model = build_model(cfg["arch"], cfg["num_classes"], cfg["input_shape"], device=device)
    model.load_state_dict(load_file(str(p / "model.safetensors"), device=str(device or "cpu")), strict=True)
    return model.eval()


__all__ = [
    "GeneratorMismatchError",
    "LoadedGenerator",
    "NoGeneratorError",
    "find_generator",
    "load_generator",
    "load_model",
    "open_generator",
    "sample",
    "write",
]
