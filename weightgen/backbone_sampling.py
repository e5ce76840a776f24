"""``weightgen sample --arch vit-s``: a generated head on a stored backbone, as a transformers folder.

The same rules as :mod:`weightgen.sampling` for mlp-s: the user's labelled examples up to a cap
per class (the support) are only *read* — they condition the generator (through the backbone's
features), closed-form parts are fitted on them and best-of-n is chosen on them — and accuracy is
predicted on examples that did none of that. No gradient step is taken unless ``refine_steps``.

* ``head="fit"`` (default): the head is shrinkage LDA on the support's features with
  cross-validated shrinkage (:func:`weightgen.heads.fit_lda`), declared in the manifest
  (``closed_form``), with the generated head's support accuracy beside it;
* ``head="generated"``: the generator's own head (best of n on the support);
* with no trained head generator for the backbone, only the closed-form head exists: the manifest
  says so (``generator: null``) and ``head="generated"`` is an error.

Features come from the zoo's feature cache (:func:`weightgen.backbones.cached_features`), so a
repeated request does not run the backbone again. The output is a folder transformers loads
unchanged: config.json (``id2label`` from the dataset's class names), model.safetensors (backbone
+ head), preprocessor_config.json (the backbone's own), manifest.json.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from weightgen import __version__
from weightgen.backbones import FAMILIES, backbone_tensors, cached_features, family_of
from weightgen.data import load_dataset
from weightgen.encoders import group_support
from weightgen.generators import Condition
from weightgen.heads import fit_lda
from weightgen.support import SUPPORT_CAP, split_user_data, wilson_interval
from zoo.backbones import resolve_backbone


@dataclass
class HeadSample:
    head: dict[str, torch.Tensor]  # the classifier's tensors under the transformers keys
    backbone: dict  # the backbone's zoo record
    zoo_url: str
    class_names: list[str]
    manifest: dict


def _acc(w: torch.Tensor, b: torch.Tensor, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n,) accuracy of n linear heads w (n, K, D), b (n, K) on features f (N, D)."""
    if not len(y):
        return torch.full((w.shape[0],), float("nan"))
    return ((torch.einsum("nd,bkd->bnk", f, w) + b[:, None]).argmax(-1) == y).float().mean(-1)


def _refine(w, b, f, y, steps: int, lr: float = 1e-2):
    """Explicit, opt-in: full-batch Adam on the head only, over the support's features."""
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(f @ w.T + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def find_head_generator(backbone_id: str, arch: str, name: str | None = None):
    """The trained head generator for this backbone (or the one named), or None when there is none."""
    from weightgen.generators import trained_generators
    from weightgen.sampling import GeneratorMismatchError, NoGeneratorError, load_generator

    gens = trained_generators()
    if name:
        hits = [g for g in gens if g.name == name or str(g.path) == name]
        if not hits:
            raise NoGeneratorError(f"No trained generator named {name!r}. Available: "
                                   f"{', '.join(g.name for g in gens) or 'none'}")
        if hits[0].config.get("backbone_id") != backbone_id or hits[0].arch != arch:
            raise GeneratorMismatchError(f"Generator {name!r} makes heads for backbone "
                                         f"{str(hits[0].config.get('backbone_id'))[:12]} ({hits[0].arch}), "
                                         f"not {backbone_id[:12]} ({arch})")
        return load_generator(str(hits[0].path))
    fits = [g for g in gens if g.config.get("backbone_id") == backbone_id and g.arch == arch]
    return load_generator(str(min(fits, key=lambda g: g.name).path)) if fits else None


def sample_on_backbone(arch: str, dataset: str, *, zoo_url: str | None = None, backbone: str | None = None,
                       generator: str | None = None, n: int = 8, select: str = "best", seed: int = 0,
                       head: str = "fit", support_per_class: int = SUPPORT_CAP, refine_steps: int = 0,
                       progress: bool = True, device: str = "cpu") -> HeadSample:
    """Generate (or fit, declared) the classifier of ``arch`` for ``dataset`` on a stored backbone."""
    from weightgen.paths import default_zoo
    from weightgen.sampling import NoGeneratorError, _check_request
    from zoo import open_zoo

    t0 = time.time()
    fam = family_of(arch)
    _check_request(n, seed, select)
    if head not in ("fit", "generated"):
        raise ValueError(f"head must be fit or generated, got {head!r}")
    task = load_dataset(dataset)
    z = open_zoo(zoo_url or default_zoo())
    if backbone is None and generator:  # a named generator names its backbone
        from weightgen.generators import trained_generators

        named = [g for g in trained_generators() if g.name == generator]
        backbone = named[0].config.get("backbone_id") if named else None
    rec = resolve_backbone(z, backbone, arch)
    loaded = find_head_generator(rec["id"], arch, generator)
    if loaded is None and head == "generated":
        raise NoGeneratorError(f"No trained head generator for backbone {rec['id'][:12]} ({arch}); train one with "
                               f"`weightgen heads train --backbone {rec['id'][:12]} --dataset DATASET`, or use --head fit")
    k = task.num_classes
    split = split_user_data(task.x_train, task.y_train, k, support_per_class, seed)
    fs, _ = cached_features(z, rec["id"], split.x, split.y, progress=progress, device=device)
    fe, _ = cached_features(z, rec["id"], split.x_est, split.y_est, progress=progress, device=device) \
        if len(split.y_est) else (torch.zeros(0, fs.shape[1]), True)
    sy = split.y
    warnings, gen_info, gen_w = [], None, None
    gen_acc = torch.zeros(0)
    if loaded is not None:
        gen = loaded.model
        m = gen.support_per_class
        support = group_support(fs, sy, k, m, torch.Generator().manual_seed(seed))  # (K, m, D)
        raw = gen.sample(Condition(support, class_names=task.class_names or None, arch=arch), n,
                         generator=torch.Generator().manual_seed(seed))
        wkey = FAMILIES[fam][2]
        gen_w, gen_b = raw[wkey], raw[wkey[:-len("weight")] + "bias"]
        gen_acc = _acc(gen_w, gen_b, fs, sy)
        lo, hi = gen.config.train_class_counts
        if not lo <= k <= hi:
            warnings.append(f"{k} classes requested from a generator trained on {lo}..{hi}-class tasks; "
                            f"measured on your data: support accuracy {float(gen_acc.max()):.3f}")
        limit = gen.config.get("shift_limit")
        shift = None if limit is None else {"score": round(gen.shift_score(fs), 4), "limit": limit}
        if shift:
            shift["shifted"] = shift["score"] > limit
            if shift["shifted"]:
                warnings.append(f"your images' features differ from those the generator was trained on (shift score "
                                f"{shift['score']:.2f}, training supports at most {limit:.2f}); generated heads may "
                                f"not fit them — generated head support accuracy {float(gen_acc.max()):.3f}")
        gen_info = {"name": loaded.name, "class": loaded.info["class"], "zoo_snapshot": loaded.info["zoo_snapshot"],
                    "trained_on": {"class_counts": [lo, hi], "tasks": loaded.training_tasks,
                                   "backbone_id": gen.config.backbone_id, "input_shift": shift}}
    else:
        warnings.append(f"no trained head generator for backbone {rec['id'][:12]}: the head is closed-form only "
                        f"(shrinkage LDA on your support's features); train one with `weightgen heads train`")
    closed = {}
    if head == "fit":
        w, b, fit = fit_lda(fs[None], sy, k, 0, seed=seed)
        w, b = w[0], b[0]
        pick = 0
        closed = {"head": {**fit.describe(0), "method": "shrinkage LDA over the backbone's features"}}
        basis = "closed-form head (one candidate); generated candidates scored by support accuracy"
        scores = gen_acc
    else:
        pick = int(torch.argmax(gen_acc)) if select == "best" else 0
        w, b = gen_w[pick], gen_b[pick]
        basis, scores = "support accuracy", gen_acc
    if refine_steps:
        w, b = _refine(w, b, fs, sy, refine_steps)
    est_n = len(split.y_est)
    correct = round(float(_acc(w[None], b[None], fe, split.y_est)[0]) * est_n) if est_n else 0
    wkey = FAMILIES[fam][2]
    head_sd = {wkey: w.float().contiguous(), wkey[:-len("weight")] + "bias": b.float().contiguous()}
    names = [str(c) for c in (task.class_names or range(k))]
    manifest = {
        "weightgen_version": __version__, "generator": gen_info["name"] if gen_info else None,
        "generator_class": gen_info["class"] if gen_info else None,
        "zoo_snapshot": gen_info["zoo_snapshot"] if gen_info else None, "arch": arch, "dataset": task.name,
        "dataset_fingerprint": task.fingerprint(), "num_classes": k, "input_shape": list(task.input_shape),
        "class_names": names, "seed": seed, "n": n, "select": select, "selected_index": pick,
        "backbone": {"id": rec["id"], "arch": rec["arch"], "size_matches_arch": rec.get("size_matches_arch"),
                     "source": rec.get("source"),
                     "num_params": rec.get("num_params"), "weights_sha256": rec.get("weights_sha256")},
        "generated_part": sorted(head_sd), "mode": "head",
        "conditions": {"features": "backbone class means of the support (cached in the zoo)"},
        "trained_on": gen_info["trained_on"] if gen_info else None, "warnings": warnings,
        "support_per_class": support_per_class, "support_size": len(sy),
        "support_class_counts": torch.bincount(sy, minlength=k).tolist(),
        "condition_per_class": loaded.model.support_per_class if loaded else None,
        "head": head, "head_used": "closed_form" if head == "fit" else "generated", "closed_form": closed,
        "selection_basis": basis, "candidates_score": [round(float(s), 4) for s in scores],
        "support_accuracy": float(_acc(w[None], b[None], fs, sy)[0]),
        "support_cv_accuracy": closed["head"]["cv_accuracy"] if closed else None,
        "generated_head_support_accuracy": float(gen_acc.max()) if len(gen_acc) else None,
        "generated_head_estimate_accuracy": (float(_acc(gen_w[int(torch.argmax(gen_acc))][None],
                                                        gen_b[int(torch.argmax(gen_acc))][None], fe, split.y_est)[0])
                                             if gen_w is not None and est_n else None),
        "predicted_accuracy": correct / est_n if est_n else None,
        "predicted_accuracy_interval": list(wilson_interval(correct, est_n)) if est_n else None,
        "predicted_accuracy_n": est_n, "predicted_accuracy_basis": split.basis,
        "refine_steps": refine_steps, "zero_shot": refine_steps == 0, "seconds": round(time.time() - t0, 3)}
    return HeadSample(head_sd, rec, z.url, names, manifest)


def model_files(res: HeadSample) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """What a transformers folder holds: (tensors of the whole model, backbone + head, under the
    model's keys; config.json as a dict, with ``id2label``; preprocessor_config.json, the backbone's own)."""
    from weightgen.backbones import _config_cls

    fam = family_of(res.backbone["arch"])
    prefix = FAMILIES[fam][1]
    cfg = _config_cls(fam).from_dict(res.backbone["config"])
    cfg.id2label = {i: n for i, n in enumerate(res.class_names)}
    cfg.label2id = {n: i for i, n in enumerate(res.class_names)}
    cfg.architectures = ["ViTForImageClassification" if fam == "vit" else "ResNetForImageClassification"]
    tensors = {prefix + k: v for k, v in backbone_tensors(res.zoo_url, res.backbone["id"]).items()}
    dtype = next(iter(tensors.values())).dtype
    tensors.update({k: v.to(dtype) for k, v in res.head.items()})
    return tensors, json.loads(cfg.to_json_string(use_diff=False)), res.backbone["preprocessing"]


def write_folder(res: HeadSample, out_dir: str | Path) -> Path:
    """config.json, model.safetensors (backbone + head), preprocessor_config.json, manifest.json;
    each written whole through a temp file (``weightgen.outputs``)."""
    from safetensors.torch import save

    from weightgen.outputs import make_out_dir, write_file

    out = make_out_dir(out_dir)
    tensors, cfg, prep = model_files(res)
    data = save(tensors, metadata={"format": "pt"})
    write_file(out / "model.safetensors", data)
    res.manifest["sha256"] = hashlib.sha256(data).hexdigest()
    write_file(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True).encode())
    write_file(out / "preprocessor_config.json", json.dumps(prep, indent=2).encode())
    write_file(out / "manifest.json", json.dumps(res.manifest, indent=1).encode())
    return out
