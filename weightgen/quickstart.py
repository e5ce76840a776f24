"""``weightgen quickstart``: the embedded default, end to end, idempotently.

Builds the default zoo (mlp-s on the digits task family, from scikit-learn's shipped digits)
and trains the default generators — D2NWG, the hypernetwork baseline it is compared with, and
IGPG (weights from an instruction alone) — into ``$WEIGHTGEN_HOME``; ``--without igpg`` skips
IGPG. Steps whose output exists are skipped, so re-running is cheap.

Measured on 2 quiet cores (2026-12-03): the whole quickstart 14 min 32 s — zoo about 1 min,
D2NWG 4.8 min, hypernetwork 0.7 min, IGPG 8.8 min (VQ 2,500 + prior 1,200 steps). IGPG was opt-in
while it trained in 29 min with the cores shared three ways; under such load the whole run can
pass 20 min, hence ``--without igpg``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import training
from weightgen.paths import default_zoo, generators_dir

CONFIGS = Path(training.__file__).parent / "configs"
POPULATION = dict(arch="mlp-s", family="digits-subsets", tasks=200, seeds=5, steps=300, k=5)
GENERATOR_CONFIGS = ("d2nwg_digits.yaml", "hypernet_digits.yaml", "igpg_digits.yaml")
OPTIONAL_CONFIGS = {"igpg": "igpg_digits.yaml"}  # quickstart --without NAME (--with NAME: kept for old scripts)
FAST = {"population": dict(tasks=40, seeds=3, steps=150), "stage_scale": 0.1, "suffix": "-fast"}


def quickstart(fast: bool = False, show_progress: bool = True, extra: tuple[str, ...] = (),
               without: tuple[str, ...] = ()) -> dict:
    from training.config import TrainConfig
    from training.train import train
    from zoo import open_zoo
    from zoo.population import PopulationConfig, build_population

    for flag, names in (("--with", extra), ("--without", without)):
        unknown = sorted(set(names) - set(OPTIONAL_CONFIGS))
        if unknown:
            raise ValueError(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(OPTIONAL_CONFIGS)}")
    skip = {OPTIONAL_CONFIGS[w] for w in without}
    configs = [c for c in dict.fromkeys((*GENERATOR_CONFIGS, *(OPTIONAL_CONFIGS[e] for e in extra))) if c not in skip]
    t0 = time.time()
    pop = {**POPULATION, **(FAST["population"] if fast else {})}
    zoo_url = default_zoo()
    cfg = PopulationConfig(**pop)
    have = open_zoo(zoo_url).count(arch=cfg.arch, tag="population", dataset=f"{cfg.family.split('-')[0]}:*")
    report: dict = {"zoo": zoo_url}
    if have >= cfg.tasks * cfg.seeds:
        print(f"[quickstart] zoo: {have} population checkpoints already in {zoo_url}; skipping the build")
    else:
        print(f"[quickstart] zoo: training {cfg.tasks * cfg.seeds} {cfg.arch} models on {cfg.tasks} {cfg.family} tasks")
        report["population"] = build_population(cfg, zoo_url, show_progress=show_progress)
    for name in configs:
        tc = TrainConfig.from_yaml(CONFIGS / name)
        if fast:
            tc.name += FAST["suffix"]
            tc.stages = {k: max(10, int(v * FAST["stage_scale"])) for k, v in tc.stages.items()}
        out = generators_dir() / tc.name
        if (out / "config.json").is_file():
            print(f"[quickstart] generator {tc.name}: already trained in {out}; skipping")
            continue
        print(f"[quickstart] training generator {tc.name} ({tc.generator}, stages {tc.stages})")
        s = train(tc, show_progress=show_progress)
        report[tc.name] = {k: s[k] for k in ("seconds", "checkpoints", "recon_gate")}
    report["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=1))
    print("[quickstart] done. Next: weightgen sample --arch mlp-s --dataset digits:classes=4,2,8,1,0 "
          "&& weightgen eval --quick")
    return report
