"""The evaluation harness and its baselines, on a tiny zoo and tiny (untrained) generators."""
from __future__ import annotations

import json

import pytest
import torch

from weightgen import baselines
from weightgen.archs import build_model, get_arch
from weightgen.data import load_dataset
from weightgen.harness import EvalConfig, HeldOutLeak, _threads, check_heldout, run_eval, write_report

K, SHAPE = 5, (64,)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 4-task x 2-seed zoo and a d2nwg-tiny and a hypernet-tiny generator built on it (not trained:
    the harness, not generator quality, is under test)."""
    from weightgen.generators import get_generator_class, resolve_preset
    from weightgen.generators.zoo_data import ZooWeights
    from zoo import open_zoo
    from zoo.population import PopulationConfig, build_population

    root = tmp_path_factory.mktemp("harness")
    zoo_url = str(root / "zoo")
    with _threads(1):
        build_population(PopulationConfig(tasks=4, seeds=2, steps=40, checkpoint_fractions=(0.5, 1.0)), zoo_url,
                         show_progress=False)
        zoo = open_zoo(zoo_url, mode="r")
        data = ZooWeights.from_zoo(zoo, "mlp-s", K, SHAPE, "digits:")
        for preset in ("d2nwg-tiny", "hypernet-tiny"):
            torch.manual_seed(0)
            name, overrides = resolve_preset(preset)
            out = root / "generators" / preset
            get_generator_class(name).from_zoo(data, **overrides).save_pretrained(str(out))
            (out / "training_summary.json").write_text(json.dumps({"zoo": zoo_url, "training_tasks": data.tasks}))
    return {"zoo": zoo_url, "generators": str(root / "generators"), "zoo_tasks": data.tasks,
            "index": baselines.ZooIndex(zoo, "mlp-s", K, SHAPE)}


def _request(setup, n=3):
    task = load_dataset("digits:classes=4,2,8,1,0")
    sx, sy = task.support(10, 0)
    return baselines.Request("mlp-s", task, sx, sy, n, seed=0, zoo=setup["index"])


def test_baselines_return_loadable_weights(setup):
    req = _request(setup)
    spec = {t.name: t.shape for t in get_arch("mlp-s").tensors(K, SHAPE)}
    expected_n = {"zoo_mean": 1, "nearest_avg": 2}  # one mean; one average per init seed the zoo has
    with _threads(1):
        for name, source in baselines.BASELINES.items():
            sd = source(req) if name != "scratch" else baselines.scratch(req, steps=5)
            n = expected_n.get(name, req.n)
            assert {k: tuple(v.shape) for k, v in sd.items()} == {k: (n, *s) for k, s in spec.items()}, name
            assert all(torch.isfinite(v).all() for v in sd.values()), name
            build_model("mlp-s", K, SHAPE).load_state_dict({k: v[0] for k, v in sd.items()}, strict=True)
    assert 0.5 < baselines.prototype(req) <= 1.0


def test_nearest_retrieves_the_nearest_zoo_task(setup):
    task = load_dataset(setup["zoo_tasks"][2])
    sx, sy = task.support(10, 0)
    req = baselines.Request("mlp-s", task, sx, sy, 2, zoo=setup["index"])
    rows = setup["index"].rows_of(setup["index"].tasks.index(task.name))
    got = baselines.nearest(req)
    assert all(torch.equal(got[k], setup["index"].weights[k][rows]) for k in got)


def test_scratch_training_learns_digits(setup):
    req = _request(setup, n=2)
    with _threads(1):
        sd = baselines.scratch(req)
    acc = baselines.accuracy_many("mlp-s", K, SHAPE, sd, req.task.x_test, req.task.y_test)
    assert (acc > 0.8).all(), acc


def test_quick_run_end_to_end(setup, tmp_path):
    cfg = EvalConfig(quick=True, tasks=1, n=2, zoo=setup["zoo"], generators=setup["generators"], speed_n=4,
                     speed_threads=(1,), support_sizes=(1, 10), class_counts=(3,))
    res = run_eval(cfg)
    assert set(res["generators"]) == {"d2nwg-tiny", "hypernet-tiny"}
    assert {"random", "nearest", "zoo_mean", "scratch", "lda", "logreg", "ncm", "d2nwg-tiny",
            "d2nwg-tiny/generated"} <= set(res["methods"])
    assert not set(res["tasks"]["set"] + res["tasks"]["tuple"]) & set(setup["zoo_tasks"])
    rows = {(r["variant"], r["method"], r["split"]): r for r in res["summary"] if "table" not in r}
    assert rows[("heldout", "scratch", "all")]["mean"] > 0.8
    assert rows[("heldout", "lda", "all")]["mean"] > 0.7 and rows[("heldout", "ncm", "all")]["mean"] > 0.7
    assert set(rows[("heldout", "random", "set")]["ft"]) == set(cfg.ft_steps)
    for variant in ("shifted", "elastic", "mnist8"):
        assert (variant, "d2nwg-tiny", "tuple") in rows and (variant, "ncm", "all") in rows
    # the fitted head reads the support: far above the untrained tiny generator's own head
    assert rows[("heldout", "d2nwg-tiny", "all")]["mean"] > rows[("heldout", "d2nwg-tiny/generated", "all")]["mean"] + 0.2
    sweep = {(r["variant"], r["per_class"], r["method"]) for r in res["summary"] if r.get("table") == "support_sweep"}
    assert {("heldout", 1, "d2nwg-tiny"), ("mnist8", 10, "scratch"), ("heldout", 10, "ncm")} <= sweep
    counts = {(r["num_classes"], r["method"]) for r in res["summary"] if r.get("table") == "class_counts"}
    assert (3, "d2nwg-tiny") in counts and (3, "hypernet-tiny") not in counts, "a hypernet makes one class count"
    assert res["recon"] and res["novelty"][0]["ratio"] is not None and res["speed"]["d2nwg-tiny"]["models_per_s"] > 0
    assert res["speed"]["d2nwg-tiny"]["fit_models_per_s"] > 0
    out = write_report(res, tmp_path / "eval")
    report = (out / "report.md").read_text()
    assert "| d2nwg-tiny | set |" in report and "steps to 97.5%" in report and "Unseen input distributions" in report
    assert "Support size" in report and "Class counts" in report
    for png in ("ft_curves", "novelty", "support_size"):
        assert (out / f"{png}.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["summary"]


def test_heldout_assertion_fires(setup):
    leaked = setup["zoo_tasks"][0]
    with pytest.raises(HeldOutLeak, match="in the zoo"):
        run_eval(EvalConfig(zoo=setup["zoo"], generators=setup["generators"], heldout={"set": [leaked], "tuple": []}))
    with pytest.raises(HeldOutLeak, match="training task of generator"):
        check_heldout({"tuple": ["digits:classes=0,1,2,3,4"]}, [], {"g": {"digits:classes=0,1,2,3,4"}})
    # a held-out class *set* in another order is the same set: caught in the zoo and in training tasks
    with pytest.raises(HeldOutLeak, match="class set of a task that is in the zoo"):
        check_heldout({"set": ["digits:classes=4,3,2,1,0"]}, ["digits:classes=0,1,2,3,4"], {})
    with pytest.raises(HeldOutLeak, match="class set of a task that is a training task of generator 'g'"):
        check_heldout({"set": ["digits:classes=4,3,2,1,0"]}, [], {"g": {"digits:classes=1,0,2,3,4"}})
    # an unseen *order* of a zoo class set is exactly what a tuple task is; other sets pass
    check_heldout({"tuple": ["digits:classes=4,3,2,1,0"], "set": ["digits:classes=5,6,7,8,9"]},
                  ["digits:classes=0,1,2,3,4", "mnist:classes=5,6,7,8,9"], {"g": {"digits:classes=0,1,2,3,5"}})
