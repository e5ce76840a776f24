"""From a request to ready-to-load weights: find a generator, sample, validate, select, write.

``weightgen sample`` never trains on the user's data behind their back: the support set is
only *read* (conditioning, and measuring candidates for best-of-n selection). Gradient steps
on it (``refine``) are an explicit option, off by default, and declared in the manifest.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from weightgen import __version__
from weightgen.archs import get_arch, model_config
from weightgen.data import TaskData, load_dataset
from weightgen.encoders import group_support
from weightgen.evaluate import accuracy_many
from weightgen.generators import Condition, GENERATORS, _load_all
from weightgen.paths import generators_dir


class NoGeneratorError(LookupError):
    """No trained generator fits the request; the message says how to make one."""


class GeneratorMismatchError(NoGeneratorError, ValueError):
    """The generator asked for exists but makes another arch or input shape (a bad request)."""


def _generator_dirs() -> list[Path]:
    root = generators_dir()
    return sorted(p for p in root.glob("*") if (p / "config.json").is_file()) if root.is_dir() else []


def find_generator(arch: str, input_shape, name: str | None = None) -> Path:
    """The trained generator directory for this arch and input shape (or the one named)."""
    dirs = _generator_dirs()
    if name:
        p = Path(name)
        hits = [p] if (p / "config.json").is_file() else [d for d in dirs if d.name == name]
        if not hits:
            raise NoGeneratorError(f"No trained generator named {name!r} in {generators_dir()}. "
                                   f"Available: {', '.join(d.name for d in dirs) or 'none'}")
        if arch:
            check_fits(generator_info(hits[0]), arch, input_shape)
        return hits[0]
    fits, seen = [], []
    for d in dirs:
        c = json.loads((d / "config.json").read_text())
        seen.append(f"{d.name} ({c.get('arch')}, input {tuple(c.get('input_shape', ()))})")
        if c.get("arch") == arch and tuple(c.get("input_shape", ())) == tuple(input_shape):
            fits.append(d)
    if not fits:
        raise NoGeneratorError(
            f"No trained generator for {arch} with input shape {tuple(input_shape)} in {generators_dir()} "
            f"(trained: {', '.join(seen) or 'none'}). Make one with `weightgen quickstart` (digits, mlp-s) or "
            f"`weightgen train --config training/configs/d2nwg_digits.yaml` on a zoo of {arch} checkpoints.")
    return _preferred(fits)


def check_fits(info: dict, arch: str, input_shape) -> None:
    """A generator makes one arch for one input shape; asking it for another is the caller's mistake."""
    made = (info.get("arch"), tuple(info.get("input_shape") or ()))
    if made != (arch, tuple(input_shape)):
        raise GeneratorMismatchError(f"Generator {info.get('name')!r} makes {made[0]} for input shape {made[1]}, "
                               f"not {arch} for input shape {tuple(input_shape)}; name another generator or "
                               f"leave it out to pick one that fits.")


def _preferred(fits: list[Path]) -> Path:
    pref = [d for d in fits if json.loads((d / "config.json").read_text()).get("_class_name") == "D2NWG"]
    return (pref or fits)[0]


def default_generators() -> list[Path]:
    """For each (arch, input shape) with a trained generator, the one ``find_generator`` picks when
    the request names none: what a server preloads."""
    groups: dict[tuple, list[Path]] = {}
    for d in _generator_dirs():
        c = json.loads((d / "config.json").read_text())
        groups.setdefault((c.get("arch"), tuple(c.get("input_shape", ()))), []).append(d)
    return [_preferred(fits) for fits in groups.values()]


@dataclass(frozen=True)
class LoadedGenerator:
    """A trained generator in memory, with where it came from (for the manifest)."""
    path: Path
    model: torch.nn.Module
    info: dict

    @property
    def name(self) -> str:
        return self.path.name


def open_generator(path: str | Path) -> LoadedGenerator:
    """Load a trained generator from its directory (config.json + safetensors; never a pickle).

    Uncached: a server that evicts it (``@serve.multiplexed``) gets the memory back."""
    _load_all()
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    classes = {GENERATORS.get(n).__name__: GENERATORS.get(n) for n in GENERATORS.names()}
    cls = classes.get(cfg.get("_class_name"))
    if cls is None:
        raise NoGeneratorError(f"{path}: unknown generator class {cfg.get('_class_name')!r}")
    return LoadedGenerator(path, cls.from_pretrained(str(path)).eval(), generator_info(path))


@lru_cache(maxsize=8)
def load_generator(path: str) -> LoadedGenerator:
    """``open_generator`` behind a small cache, for the CLI and the eval harness."""
    return open_generator(path)


def generator_info(path: Path) -> dict:
    summary = path / "training_summary.json"
    s = json.loads(summary.read_text()) if summary.is_file() else {}
    cfg = json.loads((path / "config.json").read_text())
    return {"name": path.name, "class": cfg.get("_class_name"), "arch": cfg.get("arch"),
            "input_shape": cfg.get("input_shape"), "mode": cfg.get("mode"), "zoo_snapshot": s.get("zoo_snapshot"),
            "zoo": s.get("zoo"), "trained_seconds": s.get("seconds"), "vae_gate": s.get("vae_gate")}


@dataclass
class SampleResult:
    state_dict: dict[str, torch.Tensor]
    config: dict
    manifest: dict
    candidates_support_acc: list[float]


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


def sample(arch: str, dataset: str | TaskData, generator: str | LoadedGenerator | None = None, n: int = 8, select: str = "best",
           seed: int = 0, instruction: str | None = None, refine_steps: int = 0, novelty: bool = True) -> SampleResult:
    """Generate weights of ``arch`` for ``dataset``; see the module docstring for what is and is not done."""
    t0 = time.time()
    spec = get_arch(arch)
    task = dataset if isinstance(dataset, TaskData) else load_dataset(dataset)
    spec.check_input(task.input_shape)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if select not in ("best", "none"):
        raise ValueError(f"select must be 'best' or 'none', got {select!r}")
    if isinstance(generator, LoadedGenerator):
        loaded = generator
        check_fits(loaded.info, arch, task.input_shape)
    else:
        loaded = load_generator(str(find_generator(arch, task.input_shape, generator)))
    gen, info = loaded.model, loaded.info
    k, shape = task.num_classes, task.input_shape
    per_class = int(getattr(gen.config, "support_per_class", 10))
    sx, sy = task.support(per_class=per_class, seed=seed)  # only read: conditioning and selection
    support = group_support(sx, sy, k, per_class, torch.Generator().manual_seed(seed))
    samples = gen.sample(Condition(support, instruction), n, generator=torch.Generator().manual_seed(seed))
    samples = {name: v.contiguous() for name, v in samples.items()}
    sup_acc = accuracy_many(arch, k, shape, samples, sx, sy)
    pick = int(torch.argmax(sup_acc)) if select == "best" else 0  # argmax: first of ties, deterministic
    sd = {name: v[pick].clone().contiguous() for name, v in samples.items()}
    if refine_steps:
        sd = refine(arch, k, shape, sd, sx, sy, refine_steps)
    # an honest estimate: accuracy on train examples that neither conditioned nor selected the sample
    rest = torch.ones(len(task.y_train), dtype=torch.bool)
    rest[task.support_indices(per_class, seed)] = False
    one = {name: v[None] for name, v in sd.items()}
    predicted = float(accuracy_many(arch, k, shape, one, task.x_train[rest], task.y_train[rest])) if rest.any() else None
    manifest = {
        "weightgen_version": __version__, "generator": info["name"], "generator_class": info["class"],
        "zoo_snapshot": info["zoo_snapshot"], "arch": arch, "dataset": task.name, "dataset_fingerprint": task.fingerprint(),
        "num_classes": k, "input_shape": list(shape), "seed": seed, "n": n, "select": select, "selected_index": pick,
        "instruction": instruction, "instruction_used": False,
        "support_per_class": per_class, "support_size": int(len(sy)),
        "support_accuracy": float(sup_acc[pick]) if not refine_steps else float(accuracy_many(arch, k, shape, one, sx, sy)),
        "predicted_accuracy": predicted, "predicted_accuracy_basis": "train examples outside the support set",
        "refine_steps": refine_steps, "zero_shot": refine_steps == 0, "seconds": round(time.time() - t0, 3),
        "torch_threads": torch.get_num_threads(),  # the bytes depend on it (~1e-6): part of what reproduces them
    }
    if novelty:
        from weightgen.novelty import novelty_vs_zoo

        manifest["novelty"] = novelty_vs_zoo(gen, info, arch, k, shape, one, task)
    cfg = model_config(arch, k, shape, dataset=task.name)
    return SampleResult(sd, cfg, manifest, [float(a) for a in sup_acc])


def write(result: SampleResult, out_dir: str | Path) -> Path:
    """DIR/model.safetensors (config in its metadata, no timestamps: same seed, same bytes),
    DIR/config.json and DIR/manifest.json (with the sha256 of model.safetensors)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors stores metadata in a hash map, so several keys come out in random order
    meta = {"weightgen": json.dumps({**result.config, "generator": result.manifest["generator"],
                                     "seed": result.manifest["seed"]}, sort_keys=True)}
    tmp = out / ".model.safetensors.partial"
    save_file(result.state_dict, str(tmp), metadata=meta)
    tmp.replace(out / "model.safetensors")
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    result.manifest["sha256"] = digest
    (out / "config.json").write_text(json.dumps(result.config, indent=1))
    (out / "manifest.json").write_text(json.dumps(result.manifest, indent=1))
    return out


def load_model(path: str | Path, device=None) -> torch.nn.Module:
    """The ready ``nn.Module`` from a directory written by ``weightgen sample`` or ``zoo export``."""
    from weightgen.archs import build_model

    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    model = build_model(cfg["arch"], cfg["num_classes"], cfg["input_shape"], device=device)
    model.load_state_dict(load_file(str(p / "model.safetensors"), device=str(device or "cpu")), strict=True)
    return model.eval()


__all__ = ["sample", "write", "load_model", "find_generator", "load_generator", "open_generator",
           "LoadedGenerator", "NoGeneratorError",
           "GeneratorMismatchError"]
