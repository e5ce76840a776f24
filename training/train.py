"""Train a weight generator on the zoo: one readable accelerate loop.

    accelerate launch -m training.train --config training/configs/d2nwg_digits.yaml
    weightgen train --config training/configs/d2nwg_digits.yaml [--resume] [key=value ...]

Stages run in the generator's order (its ``stages``; e.g. an autoencoder, then a prior over its
latents); the config must give every stage a step count. Device and precision come from
accelerate only. ``save_state`` checkpoints every ``checkpoint_every`` steps; ``--resume``
continues from the newest one (restoring the stage, step, optimizers, EMA and RNG). A generator
that can reconstruct weights is gated after its ``gate_after`` stage on zoo tasks held out from
training: reconstructions must keep ``gate_min_recon_ratio`` of the original weights' accuracy
(shared/research/feasibility.md §3: the prior cannot beat its autoencoder). The loop knows
generators only through ``weightgen.generators.base.WeightGenerator``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from training.config import TrainConfig, parse_override
from weightgen.data import load_dataset
from weightgen.evaluate import accuracy_many
from weightgen.generators import get_generator_class, resolve_preset
from weightgen.generators.common import decode_tokens
from weightgen.generators.zoo_data import ZooMixture, ZooWeights
from weightgen.novelty import save_reference
from weightgen.paths import default_zoo, generators_dir, home
from weightgen.shift import input_profile
from zoo import open_zoo


class Progress:
    """Where training is (stage index, step): checkpointed with the rest so resume is exact."""

    def __init__(self):
        self.stage, self.step, self.gate = 0, 0, None

    def state_dict(self):
        return {"stage": self.stage, "step": self.step, "gate": json.dumps(self.gate)}

    def load_state_dict(self, d):
        self.stage, self.step, self.gate = int(d["stage"]), int(d["step"]), json.loads(d["gate"])


def ema_update(decay: float, warmup: bool):
    """AveragedModel's update: EMA with ``decay``, or with warmup ``min(decay, (1 + n) / (10 + n))``
    after n updates (as diffusers' EMAModel), so a short run's average is not dominated by the
    weights it started from (at 0.999 without warmup, 37 % of a 1,000-step average is step 0)."""
    @torch.no_grad()
    def update(ema_params, params, num_averaged) -> None:
        d = min(decay, (1 + float(num_averaged)) / (10 + float(num_averaged))) if warmup else decay
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1 - d)
        else:
            for e, p in zip(ema_params, params):
                e.copy_(e * d + p * (1 - d))
    return update


def recon_gate(model, data, max_tasks: int = 10) -> dict:
    """Accuracy of autoencoder reconstructions vs the original weights on (held-out) zoo tasks' test
    splits; for several architectures, pooled over them (each one's share is in ``per_arch``)."""
    if not model.capabilities.reconstruct or not len(data.ids):
        return {}
    if hasattr(data, "parts"):
        per = {p.arch: recon_gate(model, p, max_tasks) for p in data.parts if len(p.ids)}
        o, r = sum(g["orig_acc"] for g in per.values()) / len(per), sum(g["recon_acc"] for g in per.values()) / len(per)
        return {"orig_acc": o, "recon_acc": r, "ratio": r / max(o, 1e-8), "tasks": sum(g["tasks"] for g in per.values()),
                "per_arch": per}
    orig_acc, rec_acc = [], []
    for ti in sorted(set(data.task_index.tolist()))[:max_tasks]:
        rows = (data.task_index == ti).nonzero().flatten()
        task = load_dataset(data.tasks[ti])
        support = data.support(rows, model.support_per_class, torch.Generator().manual_seed(0))
        rec = model.reconstruct(data.tokens[rows], data.num_classes, support, **(
            {"arch": data.arch} if model.capabilities.multi_arch else {}))
        rec_sd = decode_tokens(data.layout, rec, model.weight_stats(data.arch))
        orig_sd = {k: v[rows] for k, v in data.weights.items()}
        orig_acc.append(accuracy_many(data.arch, data.num_classes, data.input_shape, orig_sd, task.x_test, task.y_test))
        rec_acc.append(accuracy_many(data.arch, data.num_classes, data.input_shape, rec_sd, task.x_test, task.y_test))
    o, r = torch.cat(orig_acc).mean().item(), torch.cat(rec_acc).mean().item()
    return {"orig_acc": o, "recon_acc": r, "ratio": r / max(o, 1e-8), "tasks": min(max_tasks, len(set(data.task_index.tolist())))}


def train(cfg: TrainConfig, resume: bool = False, show_progress: bool = True) -> dict:
    out_dir = Path(cfg.out_dir or generators_dir() / cfg.name)
    run_dir = Path(cfg.run_dir or home() / "runs" / cfg.name)
    accelerator = Accelerator(
        project_config=ProjectConfiguration(project_dir=str(run_dir), automatic_checkpoint_naming=True, total_limit=2),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    t0 = time.time()
    zoo = open_zoo(cfg.zoo or default_zoo(), mode="r")
    gen_name, preset_cfg = resolve_preset(cfg.generator)
    cls = get_generator_class(gen_name)
    if cfg.extra_archs and not cls.capabilities.multi_arch:
        raise ValueError(f"generator {gen_name!r} makes one architecture; extra_archs {cfg.extra_archs} needs one "
                         f"that declares multi_arch")
    parts = []
    for a in [cfg.arch, *cfg.extra_archs]:  # one token size for all: the first arch's
        parts.append(ZooWeights.from_zoo(zoo, a, cfg.num_classes, tuple(cfg.input_shape), cfg.dataset_prefix, cfg.mode,
                                         min_test_acc=cfg.min_test_acc, max_checkpoints=cfg.max_checkpoints,
                                         token_dim=parts[0].layout.token_dim if parts else None))
    full = parts[0] if len(parts) == 1 else ZooMixture(parts)
    train_data, gate_data = full.split(cfg.heldout_task_fraction, seed=cfg.seed) if cfg.heldout_task_fraction else (full, full._subset(torch.zeros(len(full.ids), dtype=torch.bool)))
    # the generator samples with the support size it was trained with (it is saved in its config)
    model = cls.from_zoo(
        train_data, **{**preset_cfg, "support_per_class": cfg.support_per_class, **cfg.generator_overrides})
    check_stages(cfg.stages, model.stages, gen_name)
    stages = [(name, params, int(cfg.stages[name])) for name, params in model.stages.items()]
    caps = model.capabilities
    # foreach: one kernel per op over all tensors (the per-tensor CPU path took 0.27 s of a 0.75 s step of the
    # autoregressive generator)
    optimizers = [torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
                  for _, params, _ in stages]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, _cosine(cfg.warmup_steps, max(n, 1))) for o, (_, _, n) in zip(optimizers, stages)]
    model, *optimizers = accelerator.prepare(model, *optimizers)
    schedulers = [accelerator.prepare(s) for s in schedulers]
    raw = accelerator.unwrap_model(model)
    ema = AveragedModel(raw, multi_avg_fn=ema_update(cfg.ema_decay, cfg.ema_warmup), use_buffers=True) if cfg.ema_decay else None
    progress = Progress()
    stage_metrics: dict = {}
    accelerator.register_for_checkpointing(progress)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if resume:
        latest = _latest_checkpoint(run_dir)
        if latest is not None:
            accelerator.load_state(str(latest))
            # accelerate does not restore its checkpoint counter (huggingface/accelerate#3306)
            accelerator.project_configuration.iteration = int(latest.name.split("_")[-1]) + 1
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "loss.jsonl", "a")
    if accelerator.is_main_process:
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    for si, (stage, _, n_steps) in enumerate(stages):
        if si < progress.stage:
            continue
        opt, sched = optimizers[si], schedulers[si]
        bar = tqdm(total=n_steps, initial=progress.step, desc=f"{cfg.name}:{stage}",
                   disable=not (show_progress and accelerator.is_local_main_process))
        model.train()
        while progress.step < n_steps:
            # the batch is a function of (seed, stage, step, process): resuming replays the same data
            g = torch.Generator().manual_seed(hash((cfg.seed, si, progress.step, accelerator.process_index)) % 2**62)
            # varying support sizes teach the set encoder that more examples are better estimates
            m = cfg.support_per_class if not cfg.support_per_class_min else \
                int(torch.randint(cfg.support_per_class_min, cfg.support_per_class + 1, (1,), generator=g))
            batch = train_data.batch(cfg.batch_size, m, g)
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with accelerator.accumulate(model):
                out = model({**batch, "stage": stage})
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if ema is not None and (caps.ema_stages is None or stage in caps.ema_stages):
                ema.update_parameters(raw)
            progress.step += 1
            bar.update(1)
            if progress.step % cfg.log_every == 0 or progress.step == n_steps:
                row = {"stage": stage, "step": progress.step, **{k: float(v.detach()) for k, v in out.items()}}
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if accelerator.is_main_process:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            if progress.step % cfg.checkpoint_every == 0 and progress.step < n_steps:
                accelerator.save_state()
        bar.close()
        raw.eval()
        stage_metrics[stage] = raw.on_stage_end(stage, train_data, seed=cfg.seed)
        if stage == caps.gate_after:
            progress.gate = recon_gate(raw, gate_data) or None
            if progress.gate and accelerator.is_main_process:
                passed = progress.gate["ratio"] >= cfg.gate_min_recon_ratio
                progress.gate["passed"] = passed
                msg = (f"{stage} gate: reconstructions of held-out-task weights keep {progress.gate['ratio']:.3f} "
                       f"of accuracy ({progress.gate['recon_acc']:.3f} vs {progress.gate['orig_acc']:.3f}); "
                       f"need {cfg.gate_min_recon_ratio}")
                print(("PASSED " if passed else "FAILED ") + msg)
                if not passed and cfg.strict_gate:
                    raise RuntimeError(msg + " — not training the next stage (strict_gate)")
        progress.stage, progress.step = si + 1, 0
        accelerator.save_state()
    log.close()

    summary = {"name": cfg.name, "generator": gen_name, "seconds": time.time() - t0, "zoo": zoo.url,
               "zoo_snapshot": full.snapshot, "checkpoints": len(train_data.ids),
               "training_tasks": sorted({train_data.tasks[i] for i in train_data.task_index.tolist()}),
               "gate_tasks": sorted({gate_data.tasks[i] for i in gate_data.task_index.tolist()}),
               "recon_gate": progress.gate, "stage_metrics": stage_metrics, "config": cfg.to_dict()}
    if accelerator.is_main_process:
        final = ema.module if ema is not None and ema.n_averaged.item() > 0 else raw
        final.save_pretrained(str(out_dir))
        # what requests are compared with: the training inputs (weightgen.shift) and zoo (weightgen.novelty)
        summary["input_profile"] = input_profile(train_data.task_inputs())
        summary["novelty_reference"] = save_reference(final, zoo.url, cfg.arch, cfg.num_classes, cfg.input_shape, out_dir)
        (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=1))
    accelerator.wait_for_everyone()
    return summary


def check_stages(configured: dict, stages: dict, generator: str) -> None:
    """Every configured stage exists and every stage has a step count (0 to skip): a misspelled
    stage name would otherwise train 0 steps without a word."""
    unknown, missing = sorted(set(configured) - set(stages)), [s for s in stages if s not in configured]
    if unknown or missing:
        raise ValueError(f"training config stages {dict(configured)} do not match generator {generator!r}, whose "
                         f"stages are {', '.join(stages)}" + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + (f"; missing: {', '.join(missing)} (give 0 to skip)" if missing else ""))


def _cosine(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.9 + 0.1
    return f


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    return ckpts[-1] if ckpts else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weightgen train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML training config (see training/configs)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (YAML values)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = TrainConfig.from_yaml(a.config, **dict(parse_override(o) for o in a.overrides))
    summary = train(cfg, resume=a.resume, show_progress=not a.no_progress)
    print(json.dumps({k: summary[k] for k in ("name", "generator", "seconds", "checkpoints", "recon_gate")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
