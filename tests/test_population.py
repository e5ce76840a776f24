"""The population builder (``zoo.population``): vectorized training of tasks x seeds models, ingested.

Tiny configs (3 tasks x 2 seeds x 30 steps); the shared build runs once per module.
"""
from __future__ import annotations

import json

import pytest
import torch

from weightgen.archs import build_model, get_arch
from weightgen.data import load_dataset
from zoo import Zoo
from zoo.population import PopulationConfig, _adamw_, build_population, train_population

TINY = dict(tasks=3, seeds=2, steps=30)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny populations gain nothing from threads, and on a shared CI box a second busy-waiting OpenMP
    thread can stall each op for a scheduler slice (10x slower); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("pop") / "zoo")
    cfg = PopulationConfig(**TINY)
    return cfg, url, build_population(cfg, url, show_progress=False)


def _accuracy(rec, tensors) -> float:
    model = build_model(rec["arch"], rec["num_classes"], rec["input_shape"])
    model.load_state_dict(tensors, strict=True)
    task = load_dataset(rec["dataset"])
    with torch.no_grad():
        pred = get_arch(rec["arch"]).logits(model, task.x_test).argmax(-1)
    return float((pred == task.y_test).float().mean())


def test_models_learn_and_are_all_ingested(built):
    cfg, url, s = built
    m = cfg.tasks * cfg.seeds
    assert s["models"] == m and s["checkpoints"] == m * len(cfg.checkpoint_fractions) == s["ingested"]
    assert s["duplicate"] == 0 and len(Zoo(url, mode="r")) == s["ingested"]
    assert s["mean_final_test_acc"] > 0.8 and s["min_final_test_acc"] > 0.5  # chance is 0.2


def test_records_carry_metadata(built):
    cfg, url, _ = built
    recs = Zoo(url, mode="r").query(tag="population")
    assert {r["step"] for r in recs} == {3, 15, 30}
    r = next(r for r in recs if r["step"] == 30)
    assert r["arch"] == "mlp-s" and r["num_classes"] == 5 and r["input_shape"] == [64]
    assert r["dataset"].startswith("digits:classes=") and r["source"] == "weightgen zoo build"
    assert r["tags"] == ["population", "digits-subsets"]
    assert set(r["metrics"]) == {"train_acc", "test_acc", "train_loss", "test_loss"}
    tc = r["train_config"]
    assert tc["optimizer"] == "adamw" and tc["batch_size"] == 64 and tc["steps"] == 30 and tc["shared_init"]
    assert 3e-3 <= tc["lr"] <= 3e-2 and tc["weight_decay"] in (0.0, 1e-4, 1e-3) and tc["init_seed"] == r["seed"]
    assert r["run_id"] == f"digits-subsets-{r['run_id'].split('-')[2]}-s{r['seed']}-{cfg.digest()}"
    assert len({(x["run_id"], x["step"]) for x in recs}) == len(recs)
    assert len({x["dataset"] for x in recs}) == cfg.tasks


def test_reloaded_models_reproduce_recorded_accuracy(built):
    _, url, _ = built
    zoo = Zoo(url, mode="r")
    for r in zoo.query(step=30):
        tensors = zoo.load(r["id"])
        assert all(t.is_contiguous() for t in tensors.values())
        n_test = len(load_dataset(r["dataset"]).y_test)
        assert abs(_accuracy(r, tensors) - r["metrics"]["test_acc"]) <= 1.0 / n_test + 1e-6


def test_rebuild_is_deterministic_and_idempotent(built):
    cfg, url, first = built
    again = build_population(cfg, url, show_progress=False)
    assert again["ingested"] == 0 and again["duplicate"] == first["checkpoints"]
    assert again["zoo_snapshot"] == first["zoo_snapshot"]  # nothing new was committed


def test_shared_init_is_shared_across_tasks():
    cfg = PopulationConfig(**TINY, checkpoint_fractions=(0.0, 1.0))
    ckpts, _ = train_population(cfg)
    init = [c for c in ckpts if c.step == 0]
    assert len(init) == cfg.tasks * cfg.seeds and len({c.id for c in init}) == cfg.seeds  # one init per seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        ref = build_model("mlp-s", 5, (64,)).state_dict()
    got = next(c for c in init if c.seed == 1).tensors
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert len({c.id for c in ckpts if c.step == 30}) == cfg.tasks * cfg.seeds  # trained models all differ

    unshared, _ = train_population(PopulationConfig(**TINY, checkpoint_fractions=(0.0,), shared_init=False))
    assert len({c.id for c in unshared}) == cfg.tasks * cfg.seeds


def test_hand_written_adamw_matches_torch():
    torch.manual_seed(0)
    w0 = torch.randn(2, 4, 3)
    grads = [torch.randn(2, 4, 3) for _ in range(5)]
    lr, wd = torch.tensor([1e-2, 3e-3]), torch.tensor([0.0, 1e-2])
    params, state = {"w": w0.clone()}, {"w": (torch.zeros_like(w0), torch.zeros_like(w0))}
    for step, g in enumerate(grads, 1):
        _adamw_(params, {"w": g}, state, lr, wd, step, (0.9, 0.999))
    for m in range(2):
        p = torch.nn.Parameter(w0[m].clone())
        opt = torch.optim.AdamW([p], lr=float(lr[m]), weight_decay=float(wd[m]))
        for g in grads:
            p.grad = g[m].clone()
            opt.step()
        torch.testing.assert_close(params["w"][m], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch,k", [("cnn-s", 5), ("mlp-m", 3)])
def test_other_archs_and_class_counts(tmp_path, arch, k):
    cfg = PopulationConfig(arch=arch, k=k, tasks=2, seeds=2, steps=60, checkpoint_fractions=(1.0,))
    s = build_population(cfg, str(tmp_path / "z"), show_progress=False)
    assert s["ingested"] == 4 and s["mean_final_test_acc"] > 2.0 / k
    zoo = Zoo(str(tmp_path / "z"), mode="r")
    for r in zoo.query():
        assert r["arch"] == arch and r["num_classes"] == k and len(r["dataset"].split("=")[1].split(",")) == k
        assert abs(_accuracy(r, zoo.load(r["id"])) - r["metrics"]["test_acc"]) <= 0.01


def test_cli_zoo_build(tmp_path, capsys):
    from weightgen.cli import main

    rc = main(["zoo", "build", "--arch", "mlp-s", "--tasks", "2", "--seeds", "2", "--steps", "20",
               "--zoo", str(tmp_path / "z"), "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"] == 4 and summary["ingested"] == 12 and len(Zoo(str(tmp_path / "z"))) == 12


@pytest.mark.ray
def test_build_with_ray_workers_one_commit_per_shard(tmp_path, ray_session):
    """`zoo build --workers N`: each Ray task trains one vectorized shard of the tasks and commits it."""
    cfg = PopulationConfig(tasks=4, seeds=2, steps=20, checkpoint_fractions=(1.0,))
    url = str(tmp_path / "z")
    s = build_population(cfg, url, show_progress=False, workers=2)
    assert s["workers"] == 2 and s["models"] == s["ingested"] == s["checkpoints"] == 8 and s["mean_final_test_acc"] > 0.4
    z = Zoo(url, mode="r")
    recs = z.query()
    assert z.stats()["commits"] == 2 and len(recs) == 8
    from weightgen.data.digits import get_family

    assert sorted({r["dataset"] for r in recs}) == sorted(get_family(cfg.family).train_tasks(4))
    assert sorted({r["run_id"].rsplit("-s", 1)[0] for r in recs}) == [f"{cfg.family}-{t}" for t in range(4)]
    again = build_population(cfg, url, show_progress=False, workers=2)  # deterministic per (config, workers)
    assert again["duplicate"] == 8 and again["ingested"] == 0
