"""IGPG specifics: instructions (stored, parsed, held out), instruction-only requests, text versions."""
from __future__ import annotations

import json

import pytest

from weightgen.cli import main
from weightgen.instructions import EVAL_TEMPLATES, TRAIN_TEMPLATES, classes_from_instruction, phrase, phrasings


def test_every_phrasing_reads_back_as_its_classes_in_order():
    import random

    rng = random.Random(0)
    for _ in range(300):
        classes = rng.sample(range(10), rng.randint(2, 10))
        for text in phrasings(classes) + phrasings(classes, "eval"):
            assert classes_from_instruction(text) == classes, text
    assert classes_from_instruction("label 1 is a seven, label 0 is a 2") == [2, 7]
    assert classes_from_instruction("Tell apart NINE and 3") == [9, 3]
    for bad, says in (("classify handwritten 4", "fewer than two"), ("classify cats", "fewer than two"),
                      ("label 0 is a 1, label 2 is a 3", "labels must be 0..1")):
        with pytest.raises(ValueError, match=says):
            classes_from_instruction(bad)
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)


def test_the_zoo_stores_training_phrasings_only(tiny_home):
    from zoo import open_zoo

    recs = open_zoo(str(tiny_home / "zoo"), mode="r").query(tag="population")
    assert recs and all(r["instructions"] for r in recs)
    r = recs[0]
    classes = [int(c) for c in r["dataset"].split("classes=")[1].split(",")]
    assert r["instructions"] == phrasings(classes)
    held_out = {phrase(classes, t) for t in EVAL_TEMPLATES}
    assert not held_out & {i for r in recs for i in r["instructions"]}


def test_instruction_only_request(use_tiny_home, tmp_path, capsys):
    args = ["sample", "--arch", "mlp-s", "--instruction", "classify handwritten 2, 7 and 9", "--generator", "igpg-tiny",
            "--n", "3", "--no-novelty"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "no data was given" in err
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["num_classes"] == 3 and m["class_names"] == ["2", "7", "9"] and m["dataset"] is None
    assert m["instruction_used"] and m["predicted_accuracy"] is None
    # conditioned, fitted and selected on the generator's remembered training examples of 2, 7 and 9
    # (declared), with the pure generator's own head measured beside it
    assert m["support"]["source"] == "class memory" and m["head_used"] == "fit" and m["closed_form"]["head"]
    assert "remembered training examples" in m["selection_basis"] and 0 <= m["generated_head_support_accuracy"] <= 1
    assert m["selected_index"] == m["candidates_score"].index(max(m["candidates_score"]))
    import weightgen

    model = weightgen.load_model(tmp_path / "a")
    assert model.fcs[-1].out_features == 3
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_class_memory_holds_training_examples_only_and_refuses_unknown_classes(tiny_home):
    """The remembered examples come from the training tasks' train splits (never a test split, never a
    held-out task's data beyond what training tasks share); a class the generator never saw is an
    error naming the ones it knows; a generator without a memory falls back to its likelihood."""
    import torch

    from weightgen.data import load_dataset
    from weightgen.generators.class_memory import ClassMemory, UnknownClassError
    from weightgen.sampling import LIKELIHOOD, instruction_candidates, open_generator

    gen = open_generator(tiny_home / "generators" / "igpg-tiny").model
    tasks = json.loads((tiny_home / "generators" / "igpg-tiny" / "training_summary.json").read_text())["training_tasks"]
    assert gen.remembered_classes
    train = {n: set() for n in gen.remembered_classes}
    test = set()
    for t in tasks:
        data = load_dataset(t)
        names = [str(c) for c in t.split("classes=")[1].split(",")]
        for c, n in enumerate(names):
            train[n] |= {tuple(r) for r in data.x_train[data.y_train == c].tolist()}
        test |= {tuple(r) for r in data.x_test.tolist()}
    x, y = gen.remembered_support(gen.remembered_classes[:2])
    for label, name in enumerate(gen.remembered_classes[:2]):
        rows = {tuple(r) for r in x[y == label].tolist()}
        assert rows <= train[name] and not rows & test
    with pytest.raises(UnknownClassError, match="not among those this generator was trained on"):
        gen.remembered_support([gen.remembered_classes[0], "cat"])
    gen.memory = ClassMemory([], 1, (64,))  # as trained before it had one
    c = instruction_candidates(gen, "mlp-s", (64,), "classify handwritten 2 and 7", ["2", "7"], 2)
    assert c.score_basis == LIKELIHOOD and c.memory_per_class == 0 and torch.isfinite(c.score).all()


def test_instruction_requests_that_cannot_be_served_are_clear(use_tiny_home, tmp_path, capsys):
    cases = [(["--instruction", "classify handwritten 2, 7 and 9", "--generator", "d2nwg-tiny"],
              "reads instructions"),
             (["--instruction", "classify handwritten 2"], "fewer than two"),
             ([], "give --dataset")]
    for extra, says in cases:
        rc = main(["sample", "--arch", "mlp-s", "--out", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and says in err, (extra, err)
    # more classes than the prior has positions for is a mismatch (was an IndexError inside GPT-2)
    from weightgen.sampling import open_generator

    gen = open_generator(use_tiny_home / "generators" / "igpg-tiny").model
    assert "positions for" in gen.unfit_reason("mlp-s", (64,), 11) and gen.unfit_reason("mlp-s", (64,), 10) is None


def test_instruction_with_more_classes_than_its_training_tasks(use_tiny_home, tmp_path, capsys):
    """Trained on 5-class tasks, asked for more (positions exist up to 10): answered with a fitted
    head on the remembered examples, and flagged."""
    from weightgen.sampling import open_generator

    known = open_generator(use_tiny_home / "generators" / "igpg-tiny").model.remembered_classes
    assert len(known) > 5
    names = known[:7]
    rc = main(["sample", "--arch", "mlp-s", "--instruction", f"classify handwritten {', '.join(names)}",
               "--generator", "igpg-tiny", "--n", "2", "--no-novelty", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 0, err
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["num_classes"] == len(names) and m["class_names"] == names and m["head_used"] == "fit"
    assert any(f"{len(names)} classes requested from a generator trained on 5-class tasks" in w for w in m["warnings"])


def test_dataset_and_instruction_both_condition(use_tiny_home):
    from weightgen.sampling import sample

    both = sample("mlp-s", "digits:classes=4,2,8", generator="igpg-tiny", n=2, novelty=False,
                  instruction="classify handwritten 4, 2 and 8")
    data_only = sample("mlp-s", "digits:classes=4,2,8", generator="igpg-tiny", n=2, novelty=False, head="generated")
    assert both.manifest["instruction_used"] and not data_only.manifest["instruction_used"]


def test_igpg_records_its_text_encoder_and_codebook_usage(tiny_home):
    cfg = json.loads((tiny_home / "generators" / "igpg-tiny" / "config.json").read_text())
    assert cfg["text_encoder"] == "minilm-l6" and len(cfg["text_encoder_version"]) == 16
    summary = json.loads((tiny_home / "generators" / "igpg-tiny" / "training_summary.json").read_text())
    usage = summary["stage_metrics"]["vq"]["codebook_usage"]
    assert len(usage) == cfg["vq_levels"] and all(0 < u <= 1 for u in usage)


def test_one_igpg_makes_several_architectures(tmp_path, monkeypatch):
    """Trained on a zoo of mlp-s and cnn-s checkpoints at once; the request's arch picks the prefix."""
    import torch

    import weightgen
    from training.config import TrainConfig
    from training.train import train
    from weightgen.generators import Condition
    from weightgen.sampling import open_generator
    from zoo.population import PopulationConfig, build_population

    monkeypatch.setenv("WEIGHTGEN_HOME", str(tmp_path))
    for arch in ("mlp-s", "cnn-s"):
        build_population(PopulationConfig(arch=arch, tasks=4, seeds=1, steps=20, checkpoint_fractions=(1.0,)),
                         str(tmp_path / "zoo"), show_progress=False)
    summary = train(TrainConfig(name="igpg-multi", generator="igpg-tiny", arch="mlp-s", extra_archs=["cnn-s"],
                                stages={"vq": 4, "prior": 4}, batch_size=4, support_per_class=3, min_test_acc=0.0,
                                heldout_task_fraction=0.25, checkpoint_every=100, warmup_steps=1),
                    show_progress=False)
    assert set(summary["recon_gate"]["per_arch"]) == {"mlp-s", "cnn-s"}
    gen = open_generator(tmp_path / "generators" / "igpg-multi").model
    support = torch.rand(3, 2, 64)
    for arch in ("mlp-s", "cnn-s"):
        sd = gen.sample(Condition(support, arch=arch), 2, generator=torch.Generator().manual_seed(0))
        weightgen.build_model(arch, 3, (64,)).load_state_dict({k: v[0] for k, v in sd.items()}, strict=True)
    assert gen.unfit_reason("mlp-m", (64,), 3) is not None and gen.unfit_reason("cnn-s", (64,), 3) is None
    with pytest.raises(ValueError, match="makes one architecture"):
        train(TrainConfig(name="d-multi", generator="d2nwg-tiny", extra_archs=["cnn-s"], stages={"vae": 1, "diffusion": 1}))
