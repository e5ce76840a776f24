"""`weightgen sample` end to end: files, determinism, honesty, errors."""
import hashlib
import json

import numpy as np
import pytest
from safetensors.torch import load_file

import weightgen
from weightgen.cli import main
from weightgen.data import load_dataset


def _run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_sample_writes_loadable_weights_config_and_manifest(use_tiny_home, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, _ = _run(["sample", "--arch", "mlp-s", "--dataset", "digits:classes=4,2,8,1,0", "--n", "4",
                          "--generator", "d2nwg-tiny", "--out", str(out), "--json"], capsys)
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(stdout) == manifest
    assert manifest["sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    for key in ("generator", "weightgen_version", "zoo_snapshot", "seed", "support_accuracy", "predicted_accuracy", "novelty"):
        assert manifest[key] is not None, key
    assert manifest["refine_steps"] == 0 and manifest["zero_shot"] is True
    assert {"ratio", "nearest_zoo_accuracy", "distance_to_nearest"} <= set(manifest["novelty"])
    cfg = json.loads((out / "config.json").read_text())
    model = weightgen.build_model(cfg["arch"], cfg["num_classes"], cfg["input_shape"])
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    loaded = weightgen.load_model(out)
    task = load_dataset("digits:classes=4,2,8,1,0")
    assert manifest["condition_per_class"] == 5, "the generator reads as many examples per class as it was trained on"
    from weightgen.support import split_user_data

    split = split_user_data(task.x_train, task.y_train, 5, manifest["support_per_class"], seed=0)
    assert manifest["support_size"] == len(split.y) and manifest["predicted_accuracy_n"] == len(split.y_est) > 0
    assert manifest["support_size"] + manifest["predicted_accuracy_n"] == len(task.y_train), "all the data is used"
    arch = weightgen.get_arch("mlp-s")
    acc = (arch.logits(loaded, split.x).argmax(-1) == split.y).float().mean().item()
    assert abs(acc - manifest["support_accuracy"]) < 1e-6, "the manifest's support accuracy is measured"
    est = (arch.logits(loaded, split.x_est).argmax(-1) == split.y_est).float().mean().item()
    assert abs(est - manifest["predicted_accuracy"]) < 1e-6, "predicted on the examples set aside"
    lo, hi = manifest["predicted_accuracy_interval"]
    assert lo <= manifest["predicted_accuracy"] <= hi and hi - lo < 0.3
    assert manifest["head"] == "fit" and manifest["closed_form"]["head"]["method"].startswith("shrinkage LDA")


def test_same_seed_same_bytes(use_tiny_home, tmp_path, capsys):
    args = ["sample", "--arch", "mlp-s", "--dataset", "digits:classes=0,1,2,3,4", "--generator", "d2nwg-tiny",
            "--n", "6", "--no-novelty"]
    assert _run(args + ["--out", str(tmp_path / "a")], capsys)[0] == 0
    assert _run(args + ["--out", str(tmp_path / "b")], capsys)[0] == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert _run(args + ["--out", str(tmp_path / "c"), "--seed", "1"], capsys)[0] == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


SELECTION_SEED = 2  # a seed whose first candidate is not the best (seeds 0, 1: it ties the best)


def test_best_of_n_keeps_the_candidate_best_on_the_support_set(use_trained_home):
    """This compared the reported accuracy with the max of the same tensor it was picked from."""
    import torch

    from weightgen.encoders import group_support
    from weightgen.generators import Condition
    from weightgen.sampling import find_generator, load_generator, sample

    from weightgen.support import split_user_data

    seed = SELECTION_SEED
    kw = dict(generator="d2nwg-trained", n=6, seed=seed, novelty=False, head="generated", support_per_class=10)
    res = sample("mlp-s", "digits:classes=0,1,2,3,4", **kw)
    none = sample("mlp-s", "digits:classes=0,1,2,3,4", select="none", **kw)
    assert none.manifest["selected_index"] == 0
    # the candidates again, each measured on the support set here with its own nn.Module (not with
    # the accuracies sample() reports): best-of-n must keep the best one, and it must not be the first
    gen = load_generator(str(find_generator("mlp-s", (64,), "d2nwg-trained"))).model
    task = load_dataset("digits:classes=0,1,2,3,4")
    split = split_user_data(task.x_train, task.y_train, 5, 10, seed)
    sx, sy = split.x, split.y
    per_class = gen.support_per_class
    cands = gen.sample(Condition(group_support(sx, sy, 5, per_class, torch.Generator().manual_seed(seed))), 6,
                       generator=torch.Generator().manual_seed(seed))
    accs = []
    for i in range(6):
        model = weightgen.build_model("mlp-s", 5, (64,))
        model.load_state_dict({k: v[i] for k, v in cands.items()}, strict=True)
        accs.append(float((model(sx).argmax(-1) == sy).float().mean()))
    best = accs.index(max(accs))
    assert accs[0] < max(accs), f"seed {seed} must make selection matter, got {accs}"
    assert res.manifest["selected_index"] == best
    assert all(torch.equal(res.state_dict[k], cands[k][best]) for k in cands)
    assert res.manifest["support_accuracy"] == pytest.approx(max(accs), abs=1e-6)
    assert all(torch.equal(none.state_dict[k], cands[k][0]) for k in cands)


def test_refine_is_opt_in_and_declared(use_tiny_home, tmp_path, capsys):
    from weightgen.sampling import sample

    zero = sample("mlp-s", "digits:classes=0,1,2,3,4", generator="d2nwg-tiny", n=2, novelty=False, head="generated")
    tuned = sample("mlp-s", "digits:classes=0,1,2,3,4", generator="d2nwg-tiny", n=2, novelty=False, refine_steps=30,
                   head="generated")
    assert zero.manifest["refine_steps"] == 0 and zero.manifest["zero_shot"]
    assert tuned.manifest["refine_steps"] == 30 and not tuned.manifest["zero_shot"]
    assert tuned.manifest["support_accuracy"] > zero.manifest["support_accuracy"]


def test_user_npz_dataset_never_seen(use_tiny_home, tmp_path, capsys):
    task = load_dataset("digits:classes=9,7,5,3,1")
    path = tmp_path / "my_task.npz"
    np.savez(path, x=task.x_train.numpy(), y=task.y_train.numpy(), x_test=task.x_test.numpy(), y_test=task.y_test.numpy())
    rc, _, err = _run(["sample", "--arch", "mlp-s", "--dataset", f"npz:{path}", "--out", str(tmp_path / "o"),
                       "--n", "2"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["dataset"] == f"npz:{path}"


def test_clear_errors(use_tiny_home, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):  # argparse lists the choices
        main(["sample", "--arch", "vit-xl", "--dataset", "digits", "--out", str(tmp_path / "x")])
    rc, _, err = _run(["sample", "--arch", "mlp-s", "--dataset", "nope", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "Unknown dataset 'nope'" in err and "digits" in err
    rc, _, err = _run(["sample", "--arch", "vit-s", "--dataset", "npz:/does/not/exist.npz", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "not found" in err
    bad = tmp_path / "flat.npz"
    np.savez(bad, x=np.random.rand(20, 63).astype("float32"), y=np.arange(20) % 2)
    rc, _, err = _run(["sample", "--arch", "cnn-s", "--dataset", f"npz:{bad}", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "needs image input" in err
    rc, _, err = _run(["sample", "--arch", "mlp-s", "--dataset", "mnist", "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "No trained generator for mlp-s with input shape (1, 28, 28)" in err and "weightgen train" in err
    import weightgen.sampling as sampling

    # a named generator for another arch is refused from its config, before it is loaded
    monkeypatch.setattr(sampling, "load_generator", lambda *a, **k: pytest.fail("loaded a generator for another arch"))
    rc, _, err = _run(["sample", "--arch", "mlp-m", "--dataset", "digits", "--generator", "d2nwg-tiny",
                       "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "'d2nwg-tiny' makes mlp-s" in err and "not mlp-m" in err
    assert not (tmp_path / "x").exists(), "nothing written on error"


def test_a_dropped_generator_is_freed(use_tiny_home):
    """What a server's LRU (``@serve.multiplexed``) relies on: once it lets go of a generator,
    nothing else (novelty's prepared zoo, caches) keeps the model alive."""
    import gc
    import weakref

    from weightgen.sampling import find_generator, open_generator, sample

    loaded = open_generator(find_generator("mlp-s", (64,), "d2nwg-tiny"))
    r = sample("mlp-s", "digits:classes=0,1,2,3,4", generator=loaded, n=2)
    assert r.manifest["generator"] == "d2nwg-tiny" and "ratio" in r.manifest["novelty"]
    alive = weakref.ref(loaded.model)
    del loaded
    gc.collect()
    assert alive() is None


def test_class_count_and_input_shift_are_flagged(use_tiny_home, tmp_path, capsys):
    """A request the generator was not trained for is answered with a warning (CLI and manifest)
    that names what it was trained on and what was measured on the user's data."""
    rc, _, err = _run(["sample", "--arch", "mlp-s", "--dataset", "digits:classes=0,1,2", "--n", "2",
                       "--generator", "d2nwg-tiny", "--out", str(tmp_path / "k3")], capsys)
    assert rc == 0 and "warning: 3 classes requested from a generator trained on 5-class tasks" in err
    m = json.loads((tmp_path / "k3" / "manifest.json").read_text())
    assert m["trained_on"]["num_classes"] == 5 and m["warnings"] and "cross-validated" in m["warnings"][0]
    from weightgen.harness import shift_task
    from weightgen.sampling import sample

    rolled = sample("mlp-s", shift_task(load_dataset("digits:classes=4,2,8,1,0"), 2), generator="d2nwg-tiny", n=2,
                    novelty=False)
    assert rolled.manifest["trained_on"]["input_shift"]["shifted"]
    assert any("inputs differ from those the generator was trained on" in w for w in rolled.manifest["warnings"])
    same = sample("mlp-s", "digits:classes=4,2,8,1,0", generator="d2nwg-tiny", n=2, novelty=False)
    assert same.manifest["warnings"] == [] and not same.manifest["trained_on"]["input_shift"]["shifted"]


def test_head_choice_and_support_size_are_declared(use_tiny_home, tmp_path):
    from weightgen.sampling import sample

    fit = sample("mlp-s", "digits:classes=4,2,8,1,0", generator="d2nwg-tiny", n=3, novelty=False)
    pure = sample("mlp-s", "digits:classes=4,2,8,1,0", generator="d2nwg-tiny", n=3, novelty=False, head="generated")
    assert fit.manifest["head"] == "fit" and fit.manifest["closed_form"]["head"]["cv_folds"] == 5
    assert pure.manifest["head"] == "generated" and pure.manifest["closed_form"] == {}
    assert pure.manifest["support_accuracy"] == pytest.approx(pure.manifest["generated_head_support_accuracy"])
    assert fit.manifest["predicted_accuracy"] > pure.manifest["predicted_accuracy"] + 0.2, "the tiny generator is untrained"
    assert "cross-validated" in fit.manifest["selection_basis"] and "support accuracy" in pure.manifest["selection_basis"]
    # a user with only a few examples per class: no accuracy is made up from the examples that fitted the model
    task = load_dataset("digits:classes=9,7,5")
    few = tmp_path / "few.npz"
    idx = task.support_indices(3, 0)
    np.savez(few, x=task.x_train[idx].numpy(), y=task.y_train[idx].numpy(), x_test=task.x_test.numpy(),
             y_test=task.y_test.numpy())
    r = sample("mlp-s", f"npz:{few}", generator="d2nwg-tiny", n=2, novelty=False)
    assert r.manifest["predicted_accuracy"] is None and r.manifest["predicted_accuracy_basis"].startswith("none")
    assert r.manifest["support_size"] == 9 and r.manifest["support_cv_accuracy"] is not None
    small = sample("mlp-s", "digits:classes=4,2,8,1,0", generator="d2nwg-tiny", n=2, novelty=False,
                   support_per_class=7)
    assert small.manifest["support_size"] == 35 and "beyond the support cap" in small.manifest["predicted_accuracy_basis"]
    with pytest.raises(ValueError, match="head must be one of"):
        sample("mlp-s", "digits:classes=4,2,8,1,0", generator="d2nwg-tiny", head="magic")


def test_one_example_per_class_keeps_the_generated_head_only_for_familiar_inputs(use_tiny_home, tmp_path):
    from weightgen.harness import shift_task
    from weightgen.sampling import sample

    same = sample("mlp-s", "digits:classes=4,2,8,1,0", generator="d2nwg-tiny", n=2, novelty=False, support_per_class=1)
    assert same.manifest["head_used"] == "generated" and "one example per class" in same.manifest["selection_basis"]
    rolled = sample("mlp-s", shift_task(load_dataset("digits:classes=4,2,8,1,0"), 2), generator="d2nwg-tiny", n=2,
                    novelty=False, support_per_class=1)
    assert rolled.manifest["head_used"] == "fit" and rolled.manifest["closed_form"]["head"]["cv_folds"] == 0


@pytest.mark.parametrize("flag,value", [("--n", "0"), ("--n", "-3"), ("--seed", str(10**22)), ("--seed", str(-10**20))])
def test_bad_n_and_seed_are_argument_errors_before_any_work(flag, value, tmp_path, capsys, monkeypatch):
    import weightgen.sampling

    monkeypatch.setattr(weightgen.sampling, "sample", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(SystemExit) as e:
        main(["sample", "--arch", "mlp-s", "--dataset", "digits:classes=0,1,2,3,4", flag, value, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_unusable_out_is_an_error_before_sampling(tmp_path, capsys, monkeypatch):
    import os

    import weightgen.sampling

    monkeypatch.setattr(weightgen.sampling, "sample", lambda *a, **k: pytest.fail("sampling started"))
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", "exists and is not a directory"), ("/proc/x", "cannot write in /proc")]
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        cases.append((ro / "out", "cannot write in"))
    for out, msg in cases:
        rc, _, err = _run(["sample", "--arch", "mlp-s", "--dataset", "digits:classes=0,1,2,3,4", "--out", str(out)], capsys)
        assert rc == 2 and msg in err and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "x"


def test_outputs_replace_symlinks_and_follow_the_umask(use_tiny_home, tmp_path, capsys):
    """`sample --out d` with d/config.json a symlink overwrote the symlink's target; model.safetensors
    was written 0600 beside 0644 configs."""
    import os
    import stat

    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("config.json", "manifest.json", "model.safetensors"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("keep me")
        (out / name).symlink_to(victims[name])
    rc, _, err = _run(["sample", "--arch", "mlp-s", "--dataset", "digits:classes=0,1,2,3,4", "--generator", "d2nwg-tiny",
                       "--n", "2", "--no-novelty", "--out", str(out)], capsys)
    assert rc == 0, err
    assert all(v.read_text() == "keep me" for v in victims.values())
    assert not any((out / n).is_symlink() for n in victims)
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE((out / n).stat().st_mode) for n in victims} == {0o666 & ~umask}
    assert sorted(p.name for p in out.iterdir()) == sorted(victims), "no temp files left"
    weightgen.load_model(out)
