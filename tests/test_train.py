"""The accelerate training loop: stages, the VAE gate, checkpoints and exact resume."""
import json

import pytest
import torch

from training.config import TrainConfig
from training.train import main as train_main
from training.train import train
from weightgen.cli import main as cli_main


def _cfg(tiny_home, tmp_path, name, **kw):
    base = dict(name=name, generator="d2nwg-tiny", zoo=str(tiny_home / "zoo"), min_test_acc=0.0,
                stages={"vae": 12, "diffusion": 12}, batch_size=4, support_per_class=3, checkpoint_every=5,
                log_every=4, warmup_steps=1, heldout_task_fraction=0.25,
                out_dir=str(tmp_path / name / "out"), run_dir=str(tmp_path / name / "run"))
    return TrainConfig(**{**base, **kw})


def _weights(path):
    from weightgen.generators.d2nwg import D2NWG

    return D2NWG.from_pretrained(path).state_dict()


def test_interrupted_training_resumes_to_the_same_weights(tiny_home, tmp_path, monkeypatch):
    full = _cfg(tiny_home, tmp_path, "full")
    train(full, show_progress=False)
    interrupted = _cfg(tiny_home, tmp_path, "cut")
    from weightgen.generators import zoo_data

    real_batch, calls = zoo_data.ZooWeights.batch, {"n": 0}

    def dying_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 20 and not calls.get("crashed"):  # step 8 of the diffusion stage, once
            calls["crashed"] = True
            raise KeyboardInterrupt("simulated crash")
        return real_batch(self, *a, **k)

    monkeypatch.setattr(zoo_data.ZooWeights, "batch", dying_batch)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, show_progress=False)
    ckpts = sorted((tmp_path / "cut" / "run" / "checkpoints").glob("checkpoint_*"))
    assert ckpts, "save_state wrote checkpoints before the crash"
    calls["n"] = 0  # count the steps the resumed run takes
    train(interrupted, resume=True, show_progress=False)  # must not hit 'checkpoint_N already exists' (#3306)
    monkeypatch.setattr(zoo_data.ZooWeights, "batch", real_batch)
    # Everything is seeded, so a restart from step 0 also ends on the same weights: what shows a
    # resume is that only the steps after the last checkpoint (diffusion step 5 of 12) ran again,
    # and that they still end where the uninterrupted run did (optimizer, EMA and RNG restored).
    assert calls["n"] == 12 - 5, f"the resumed run took {calls['n']} steps, not the 7 after its checkpoint"
    logged = [(r["stage"], r["step"]) for r in map(json.loads, (tmp_path / "cut" / "run" / "loss.jsonl").read_text().splitlines())]
    assert logged == [("vae", 4), ("vae", 8), ("vae", 12), ("diffusion", 4), ("diffusion", 8), ("diffusion", 12)]
    a, b = _weights(full.out_dir), _weights(interrupted.out_dir)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "resume replays the same data, RNG and optimizer state"
    summary = json.loads((tmp_path / "cut" / "out" / "training_summary.json").read_text())
    assert summary["recon_gate"] and 0 <= summary["recon_gate"]["ratio"] and "passed" in summary["recon_gate"]
    assert not set(summary["training_tasks"]) & set(summary["gate_tasks"]), "gate tasks are held out of training"
    losses = [json.loads(line) for line in (tmp_path / "full" / "run" / "loss.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in losses} == {"vae", "diffusion"} and all(r["loss"] == r["loss"] for r in losses)


def test_strict_gate_stops_before_diffusion(tiny_home, tmp_path):
    cfg = _cfg(tiny_home, tmp_path, "strict", strict_gate=True, gate_min_recon_ratio=1.01)
    with pytest.raises(RuntimeError, match="vae gate"):
        train(cfg, show_progress=False)


@pytest.mark.parametrize("stages, says", [({"vae": 3, "difusion": 3}, "unknown: difusion"),
                                          ({"vae": 3}, "missing: diffusion")])
def test_stage_names_must_match_the_generator(tiny_home, tmp_path, stages, says):
    """A misspelled or forgotten stage used to train 0 steps without a word."""
    cfg = _cfg(tiny_home, tmp_path, "stages")
    cfg.stages = stages
    with pytest.raises(ValueError, match=says):
        train(cfg, show_progress=False)


def test_cli_and_module_entry_points_with_overrides(tiny_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTGEN_HOME", str(tiny_home))
    args = ["--config", "training/configs/d2nwg_tiny.yaml", "--no-progress", "name=cli-run", "stages={vae: 3, diffusion: 3}",
            f"out_dir={tmp_path / 'g'}", f"run_dir={tmp_path / 'r'}"]
    assert cli_main(["train", *args]) == 0
    assert (tmp_path / "g" / "config.json").exists()
    with pytest.raises(ValueError, match="Unknown training config keys"):
        train_main(["--config", "training/configs/d2nwg_tiny.yaml", "bogus=1"])


def test_ema_warmup_does_not_keep_the_starting_weights():
    """Plain EMA at 0.999 keeps 0.999^n of the weights it started from (37 % after 1,000 steps);
    with warmup (decay min(0.999, (1 + n) / (10 + n))) the start is forgotten quickly."""
    import torch

    from training.train import ema_update

    for warmup, expect in ((False, 0.999 ** 1000), (True, None)):
        avg, update = [torch.zeros(1)], ema_update(0.999, warmup)
        for n in range(1, 1001):  # AveragedModel counts the initial copy as update 0
            update(avg, [torch.ones(1)], torch.tensor(n))
        left = 1 - float(avg[0])  # share of the starting weights (0) still in the average
        if expect is not None:
            assert abs(left - expect) < 1e-4
        else:
            assert left < 1e-3
