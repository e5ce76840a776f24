"""Issue 10: backbones in the zoo, the feature cache, head generation and the transformers output
folder, on a tiny synthetic ``cifar-10-batches-py`` archive and tiny backbones built here."""
import json
import pickle

import numpy as np
import pytest
import torch

from weightgen.cli import main

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root, per_batch=40, seed=0):
    """The exact cifar-10-batches-py layout: pickled dicts of uint8 (N, 3072) rows, bytes keys.
    Each class has its own mean colour, so a head can learn it from backbone features."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    colours = rng.integers(0, 256, size=(10, 3))

    def batch(n):
        y = rng.integers(0, 10, size=n)
        img = colours[y][:, :, None] + rng.normal(0, 40, size=(n, 3, 1024))
        return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), y.tolist()

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = batch(per_batch)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": y, b"data": x, b"filenames": []}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in NAMES], b"num_vis": 3072, b"num_cases_per_batch": per_batch},
                    f, protocol=2)
    return root


def tiny_vit(path, seed=0, head=True):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=3)
    model = ViTForImageClassification(cfg)
    (model if head else model.vit).save_pretrained(path)  # .vit: a ViTModel
    return path


def _test_accuracy(model, out, dataset: str) -> float:
    """Accuracy of a transformers image classifier on the dataset's test split, preprocessed as the
    output folder's preprocessor_config says."""
    from weightgen.backbones import preprocess
    from weightgen.data import load_dataset

    task = load_dataset(dataset)
    x = preprocess(task.x_test, json.loads((out / "preprocessor_config.json").read_text()), 3)
    with torch.no_grad():
        return float((model.eval()(pixel_values=x).logits.argmax(-1) == task.y_test).float().mean())


def tiny_resnet(path, seed=0):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    ResNetModel(ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8)).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.4, 0.4, 0.4], "image_std": [0.25, 0.25, 0.25]}))
    return path


def add(tmp_path, src, arch="vit-s"):
    from weightgen.backbones import add_from_source
    from zoo import open_zoo

    return add_from_source(open_zoo(str(tmp_path / "zoo")), str(src), arch)


def test_add_backbone_is_stored_once_by_content_and_read_back_exactly(tmp_path, capsys):
    from zoo import open_zoo
    from zoo.backbones import list_backbones, load_backbone

    src = tiny_vit(tmp_path / "vit")
    assert main(["zoo", "add-backbone", str(src), "--arch", "vit-s", "--zoo", str(tmp_path / "zoo")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["stored"] is True
    # the same weights saved as ViTModel (no head, pooler dropped) are the same backbone
    again = tiny_vit(tmp_path / "vit2", head=False)
    bid, fresh = add(tmp_path, again)
    assert bid == first["id"] and fresh is False
    z = open_zoo(str(tmp_path / "zoo"), mode="r")
    assert [r["id"] for r in list_backbones(z)] == [bid]
    rec, tensors = load_backbone(z, bid[:10])
    from safetensors.torch import load_file

    orig = load_file(str(src / "model.safetensors"))
    assert set(tensors) == {k[len("vit."):] for k in orig if k.startswith("vit.")}
    assert all(torch.equal(tensors[k[4:]], v) for k, v in orig.items() if k.startswith("vit."))
    assert rec["preprocessing"]["size"] == {"height": 32, "width": 32}  # config default: ViT image size
    assert rec["size_matches_arch"] is False  # a 32-wide ViT stored as vit-s: allowed, and recorded
    assert rec["preprocessing"]["image_mean"] == [0.5, 0.5, 0.5]


def test_bad_backbone_sources_are_clear_errors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["zoo", "add-backbone", str(tmp_path / "nope"), "--arch", "vit-s", *zoo]) == 2
    assert "no such folder" in capsys.readouterr().err
    src = tiny_vit(tmp_path / "vit")
    assert main(["zoo", "add-backbone", str(src), "--arch", "resnet-18", *zoo]) == 2
    assert "model_type 'vit'" in capsys.readouterr().err
    assert main(["zoo", "add-backbone", str(src), "--arch", "mlp-s", *zoo]) == 2
    assert "takes no pretrained backbone" in capsys.readouterr().err
    sd = load_file(str(src / "model.safetensors"))
    sd["vit.embeddings.cls_token"] = torch.zeros(1, 1, 16)
    save_file(sd, str(src / "model.safetensors"))
    assert main(["zoo", "add-backbone", str(src), "--arch", "vit-s", *zoo]) == 2
    assert "does not match its config.json (shape of embeddings.cls_token" in capsys.readouterr().err
    (src / "config.json").write_text("[1]")
    assert main(["zoo", "add-backbone", str(src), "--arch", "vit-s", *zoo]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_corrupt_backbone_data_is_detected_on_read(tmp_path):
    from zoo import ZooError, open_zoo
    from zoo.backbones import load_backbone

    bid, _ = add(tmp_path, tiny_vit(tmp_path / "vit"))
    z = open_zoo(str(tmp_path / "zoo"))
    rec = z.root[f"backbones/{bid}/commit"].attrs.asdict()
    arr = z.root[f"backbones/{bid}/{rec['data']}/embeddings.cls_token"]
    arr[...] = arr[...] + 1
    with pytest.raises(ZooError, match="corrupt"):
        load_backbone(z, bid)


def test_features_are_computed_once_then_read_from_the_zoo(tmp_path, monkeypatch):
    import weightgen.backbones as bb
    from zoo import open_zoo

    bid, _ = add(tmp_path, tiny_vit(tmp_path / "vit"))
    z = open_zoo(str(tmp_path / "zoo"))
    x, y = torch.rand(10, 3, 32, 32), torch.arange(10) % 2
    calls = []
    real = bb.compute_features
    monkeypatch.setattr(bb, "compute_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    f1, hit1 = bb.cached_features(z, bid, x, y, progress=False, batch_size=4)
    f2, hit2 = bb.cached_features(open_zoo(str(tmp_path / "zoo"), mode="r"), bid, x, y, progress=False)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and torch.equal(f1, f2) and f1.shape == (10, 32)
    # the features are exactly what the transformers classifier reads ([CLS] after the final norm)
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(str(tmp_path / "vit")).eval()
    seen = {}
    model.classifier.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0]))
    with torch.no_grad():
        model(pixel_values=(x - 0.5) / 0.5)
    assert torch.allclose(seen["x"], f1, atol=1e-5)


def _check_folder(out, arch_cls, names):
    import transformers
    from PIL import Image

    model, info = arch_cls.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert [model.config.id2label[i] for i in range(len(names))] == names
    proc = transformers.AutoImageProcessor.from_pretrained(str(out))
    img = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    assert proc(img, return_tensors="pt")["pixel_values"].shape[-2:] == (32, 32)
    pipe = transformers.pipeline("image-classification", model=str(out))
    preds = pipe(img, top_k=len(names))
    assert {p["label"] for p in preds} == set(names)
    return model


def test_sample_vit_s_on_cifar10_writes_a_folder_transformers_loads(tmp_path, monkeypatch, capsys):
    from transformers import ViTForImageClassification, ViTImageProcessor

    monkeypatch.setenv("WEIGHTGEN_DATA", str(write_cifar(tmp_path / "data")))
    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["zoo", "add-backbone", str(tiny_vit(tmp_path / "vit")), "--arch", "vit-s", *zoo]) == 0
    capsys.readouterr()
    out = tmp_path / "d"
    assert main(["sample", "--arch", "vit-s", "--dataset", "cifar10", "--out", str(out), *zoo]) == 0
    cap = capsys.readouterr()
    assert "closed-form only" in cap.err and "head closed_form" in cap.out
    m = json.loads((out / "manifest.json").read_text())
    assert m["closed_form"]["head"]["method"].startswith("shrinkage LDA") and m["generator"] is None
    assert m["backbone"]["arch"] == "vit-s" and m["zero_shot"] and m["refine_steps"] == 0
    assert m["generated_part"] == ["classifier.bias", "classifier.weight"]
    model = _check_folder(out, ViTForImageClassification, NAMES)
    assert list(ViTImageProcessor.from_pretrained(str(out)).image_mean) == [0.5, 0.5, 0.5]
    # the output classifies the archive's test split above chance (4 colour-coded classes) and above
    # the stored backbone's untouched head (the source folder's own classifier)
    acc = _test_accuracy(model, out, "cifar10")
    base = _test_accuracy(ViTForImageClassification.from_pretrained(str(tmp_path / "vit")), out, "cifar10")
    assert acc > 0.3 and acc > base + 0.1, (acc, base)
    # the backbone is the stored one, bit for bit
    from safetensors.torch import load_file

    got, src = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "vit" / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in src.items() if not k.startswith("classifier"))


def test_trained_head_generator_makes_heads_that_beat_chance_on_heldout_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTGEN_DATA", str(write_cifar(tmp_path / "data", per_batch=60)))
    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["zoo", "add-backbone", str(tiny_vit(tmp_path / "vit")), "--arch", "vit-s", *zoo]) == 0
    assert main(["heads", "train", "--dataset", "cifar10", "--arch", "vit-s", "--classes", "0,1,2,3,4,5",
                 "--max-classes", "4", "--tasks", "30", "--per-class", "8", "--steps", "60", "--hidden", "32",
                 "--no-progress", *zoo]) == 0
    capsys.readouterr()
    out = tmp_path / "d"
    # held-out classes 6..9: never in the head zoo
    assert main(["sample", "--arch", "vit-s", "--dataset", "cifar10:classes=6,7,8,9", "--head", "generated",
                 "--out", str(out), *zoo]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator"].startswith("feature-head-vit-s") and m["head_used"] == "generated" and m["closed_form"] == {}
    assert m["generated_head_support_accuracy"] > 0.4 and m["predicted_accuracy"] > 0.4  # chance: 0.25
    from transformers import ViTForImageClassification

    _check_folder(out, ViTForImageClassification, NAMES[6:])
    # the default keeps the closed-form head and reports the generated one beside it
    assert main(["sample", "--arch", "vit-s", "--dataset", "cifar10:classes=6,7,8,9", "--out", str(tmp_path / "e"),
                 *zoo]) == 0
    m2 = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert m2["head_used"] == "closed_form" and m2["generated_head_support_accuracy"] is not None
    # a support far from the training features is flagged, one like them is not
    from weightgen.generators import trained_generators
    from weightgen.sampling import open_generator

    gen = open_generator(trained_generators()[0].path).model
    shift = m2["trained_on"]["input_shift"]
    assert shift["limit"] == gen.config.shift_limit and shift["score"] < 3 * shift["limit"]
    assert gen.shift_score(gen.feat_mean[None] + 5 * gen.feat_std) > 3 * gen.config.shift_limit


def test_resnet_18_backbone_folder(tmp_path, monkeypatch, capsys):
    from transformers import ResNetForImageClassification

    monkeypatch.setenv("WEIGHTGEN_DATA", str(write_cifar(tmp_path / "data")))
    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["zoo", "add-backbone", str(tiny_resnet(tmp_path / "rn")), "--arch", "resnet-18", *zoo]) == 0
    out = tmp_path / "d"
    assert main(["sample", "--arch", "resnet-18", "--dataset", "cifar10:classes=0,1,2", "--out", str(out), *zoo]) == 0
    model = _check_folder(out, ResNetForImageClassification, NAMES[:3])
    assert _test_accuracy(model, out, "cifar10:classes=0,1,2") > 0.45  # chance: 1/3
    prep = json.loads((out / "preprocessor_config.json").read_text())
    assert prep["image_mean"] == [0.4, 0.4, 0.4]  # exactly the backbone's own processor config
    # gradient steps only when asked, and then declared
    assert json.loads((out / "manifest.json").read_text())["zero_shot"] is True
    assert main(["sample", "--arch", "resnet-18", "--dataset", "cifar10:classes=0,1,2", "--refine", "5",
                 "--out", str(tmp_path / "r"), *zoo]) == 0
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["refine_steps"] == 5 and m["zero_shot"] is False


def test_generated_head_without_a_generator_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTGEN_DATA", str(write_cifar(tmp_path / "data")))
    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["sample", "--arch", "vit-s", "--dataset", "cifar10", "--out", str(tmp_path / "d"), *zoo]) == 2
    assert "no vit-s backbone" in capsys.readouterr().err
    add(tmp_path, tiny_vit(tmp_path / "vit"))
    assert main(["sample", "--arch", "vit-s", "--dataset", "cifar10", "--head", "generated",
                 "--out", str(tmp_path / "d"), *zoo]) == 2
    assert "No trained head generator" in capsys.readouterr().err


def test_feature_head_contract_loss_falls_samples_reload_and_follow_class_order(tmp_path):
    from training.heads import build_head_zoo, task_batch
    from weightgen.generators import Condition, get_generator_class, resolve_preset

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 12, generator=g) * 2
    y = torch.arange(6).repeat_interleave(40)
    f = centres[y] + torch.randn(len(y), 12, generator=g)
    hz = build_head_zoo(f, y, list(range(6)), arch="vit-s", input_shape=(3, 32, 32), backbone_id="ab" * 32,
                        tasks=20, class_counts=(2, 4), per_class=8, progress=False)
    _, cfg = resolve_preset("feature-head-tiny")
    torch.manual_seed(0)
    gen = get_generator_class("feature-head").from_zoo(hz, **cfg)
    batch = task_batch(hz, 8, 8, 16, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    before = float(gen.loss(batch)["loss"].detach())
    for _ in range(40):
        out = gen.loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(gen.loss(batch)["loss"].detach()) < 0.8 * before
    gen.eval()
    support = torch.stack([f[y == c][:8] for c in (3, 1, 4)])  # (K, M, D)
    a = gen.sample(Condition(support), 3, generator=torch.Generator().manual_seed(2))
    assert a["classifier.weight"].shape == (3, 3, 12) and a["classifier.bias"].shape == (3, 3)
    gen.save_pretrained(str(tmp_path / "fh"))
    again = get_generator_class("feature-head").from_pretrained(str(tmp_path / "fh")).eval()
    b = again.sample(Condition(support), 3, generator=torch.Generator().manual_seed(2))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="support of backbone features"):  # raw images: a clear error
        gen.sample(Condition(torch.zeros(3, 2, 3, 32, 32)), 1)
    # the first sample reads the whole support: permuting the classes permutes the rows
    perm = torch.tensor([2, 0, 1])
    c = gen.sample(Condition(support[perm]), 1)
    assert torch.allclose(c["classifier.weight"][0], a["classifier.weight"][0][perm], atol=1e-5)


def test_feature_head_reads_class_means_through_the_source_covariance(tmp_path, whiten=None):
    """Features whose classes differ along low-variance directions while a shared, strongly
    correlated noise dominates (as backbone features do): nearest class mean is fooled by the noise,
    the shared-covariance rule is not. The generator learns the within-class covariance from its
    source classes (shrinkage chosen on source tasks only) and its untrained heads for *held-out*
    classes beat nearest class mean; the covariance survives save and reload."""
    from training.heads import build_head_zoo
    from weightgen.generators import Condition, get_generator_class, resolve_preset

    g = torch.Generator().manual_seed(0)
    d, classes = 16, 10
    mix = torch.randn(d, d, generator=g) * torch.logspace(1, -1, d)  # anisotropic shared noise
    centres = torch.randn(classes, d, generator=g)
    y = torch.arange(classes).repeat_interleave(120)
    f = centres[y] + torch.randn(len(y), d, generator=g) @ mix.T
    src, held = list(range(6)), [6, 7, 8, 9]
    keep = torch.isin(y, torch.tensor(src))
    hz = build_head_zoo(f[keep], y[keep], src, arch="vit-s", input_shape=(3, 32, 32), backbone_id="cd" * 32,
                        tasks=20, class_counts=(2, 4), per_class=16, progress=False)
    _, cfg = resolve_preset("feature-head-tiny")
    extra = {} if whiten is None else {"whiten_shrinkage": whiten}  # whiten=0.0: without it (must fail)
    gen = get_generator_class("feature-head").from_zoo(hz, **cfg, support_per_class=16, **extra).eval()
    sup = torch.stack([f[y == c][:16] for c in held])
    qry, qy = torch.cat([f[y == c][16:] for c in held]), torch.arange(4).repeat_interleave(104)
    out = gen.sample(Condition(sup), 1)
    w, b = out["classifier.weight"][0], out["classifier.bias"][0]
    generated = float(((qry @ w.T + b).argmax(-1) == qy).float().mean())
    ncm = float((torch.cdist(qry, sup.mean(1)).argmin(-1) == qy).float().mean())
    assert generated > ncm + 0.1, (generated, ncm)
    assert gen.config.whiten_shrinkage > 0
    gen.save_pretrained(str(tmp_path / "fh"))
    again = get_generator_class("feature-head").from_pretrained(str(tmp_path / "fh")).eval()
    assert torch.equal(again.whiten, gen.whiten) and again.config.whiten_shrinkage == gen.config.whiten_shrinkage


def test_backbone_train_on_cpu_adds_a_usable_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTGEN_DATA", str(write_cifar(tmp_path / "data")))
    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["backbone", "train", "--arch", "vit-s", "--dataset", "cifar10:classes=0,1,2", "--size", "tiny",
                 "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path / "bb"), "--no-progress", *zoo]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] > 0 and 0 <= res["test_acc"] <= 1
    from transformers import ViTForImageClassification

    assert ViTForImageClassification.from_pretrained(str(tmp_path / "bb")).config.hidden_size == 32
    assert main(["sample", "--arch", "vit-s", "--dataset", "cifar10:classes=3,4", "--backbone", res["backbone"][:12],
                 "--out", str(tmp_path / "d"), *zoo]) == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["backbone"]["id"] == res["backbone"]


def test_a_writer_that_loses_the_commit_race_reports_a_duplicate_and_leaves_no_data(tmp_path, monkeypatch):
    from zoo import open_zoo

    bid, _ = add(tmp_path, tiny_vit(tmp_path / "vit"))
    z = open_zoo(str(tmp_path / "zoo"))
    monkeypatch.setattr(z, "_exists", lambda key: False)  # it listed the zoo before the other writer committed
    from weightgen.backbones import read_source
    from zoo.backbones import add_backbone

    tensors, config, prep, where = read_source(str(tmp_path / "vit"), "vit-s")
    assert add_backbone(z, tensors, "vit-s", config, prep, source=where) == (bid, False)
    assert len([k for k in z.root[f"backbones/{bid}"].group_keys() if k.startswith("data-")]) == 1


def test_quickstart_vit_s_with_a_backbone_then_sample(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTGEN_DATA", str(write_cifar(tmp_path / "data")))
    src = tiny_vit(tmp_path / "vit")
    argv = ["quickstart", "--arch", "vit-s", "--dataset", "cifar10", "--backbone", str(src), "--fast", "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 0  # idempotent
    assert "already in the zoo" in capsys.readouterr().err
    assert main(["sample", "--arch", "vit-s", "--dataset", "cifar10", "--out", str(tmp_path / "d")]) == 0
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["generator"].startswith("feature-head-vit-s-") and m["generated_head_support_accuracy"] > 0.1


def test_head_zoo_entries_name_their_backbone_and_feed_heads_train(tmp_path, monkeypatch, capsys):
    """Issue 10 item 3: `zoo build --arch vit-s --backbone ID --family cifar10-subsets` stores heads as
    zoo entries (just the classifier, the backbone by id); `heads train` trains on what the zoo
    holds for that backbone, held-out classes left out."""
    from zoo import Checkpoint, open_zoo

    monkeypatch.setenv("WEIGHTGEN_DATA", str(write_cifar(tmp_path / "data", per_batch=60)))
    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["zoo", "add-backbone", str(tiny_vit(tmp_path / "vit")), "--arch", "vit-s", *zoo]) == 0
    bid = json.loads(capsys.readouterr().out)["id"]
    build = ["zoo", "build", "--arch", "vit-s", "--backbone", bid[:12], "--family", "cifar10-subsets", "--tasks", "5",
             "--seeds", "2", "--classes", "0,1,2,3,4,5", "--max-classes", "4", "--per-class", "6", "--no-progress", *zoo]
    assert main(build) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ingested"] == 10 and report["backbone"] == bid
    z = open_zoo(str(tmp_path / "zoo"), mode="r")
    recs = z.query(tag=f"backbone:{bid[:12]}")
    assert len(recs) == 10 and all(r["train_config"]["part"] == "head" and r["train_config"]["backbone_id"] == bid
                                   for r in recs)
    r = recs[0]
    sd = z.load(r["id"])
    assert sorted(sd) == ["classifier.bias", "classifier.weight"] and sd["classifier.weight"].shape == (r["num_classes"], 32)
    assert all(int(c) < 6 for r in recs for c in r["dataset"].split("=")[1].split(","))
    assert main(build) == 0 and json.loads(capsys.readouterr().out)["duplicate"] == 10  # same heads: stored once

    # a head part is checked against its backbone's width and arch family
    good = {"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.zeros(3)}
    cfg = {"part": "head", "backbone_id": bid, "feature_dim": 32}
    assert Checkpoint(good, "vit-s", 3, (3, 32, 32), train_config=cfg).problems() == []
    assert Checkpoint(good, "vit-s", 3, (3, 32, 32), train_config={**cfg, "feature_dim": 16}).problems()[0][0] == "shape_mismatch"
    assert Checkpoint({**good, "x": torch.zeros(1)}, "vit-s", 3, (3, 32, 32), train_config=cfg).problems()[0][0] == "unexpected_keys"
    assert Checkpoint(good, "mlp-s", 3, (64,), train_config=cfg).problems()[0][0] == "bad_part"
    bad = {"classifier.weight": torch.full((3, 32), float("nan")), "classifier.bias": torch.zeros(3)}
    assert Checkpoint(bad, "vit-s", 3, (3, 32, 32), train_config=cfg).problems()[0][0] == "non_finite"

    # heads train: the zoo's heads plus its own (held-out classes 6..9 in none of them)
    assert main(["heads", "train", "--dataset", "cifar10", "--arch", "vit-s", "--classes", "0,1,2,3,4,5",
                 "--max-classes", "4", "--tasks", "4", "--per-class", "6", "--steps", "5", "--hidden", "16",
                 "--seed", "7", "--no-progress", *zoo]) == 0  # seed 0 would redraw zoo build's first heads: duplicates
    trained = json.loads(capsys.readouterr().out)
    assert trained["head_zoo_tasks"] == 14
    assert len(open_zoo(str(tmp_path / "zoo"), mode="r").query(tag=f"backbone:{bid[:12]}")) == 14


def test_folder_images_go_through_the_backbones_preprocessing(tmp_path, monkeypatch, capsys):
    """Issue 10 item 5: `folder:PATH` image datasets work with backbone archs, through the backbone's
    own preprocessing (the same tensors ViTImageProcessor makes from the same images)."""
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    from weightgen.backbones import preprocess
    from weightgen.data import load_dataset

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    colours = {"apple": (200, 30, 30), "grass": (30, 200, 30), "sky": (30, 30, 200)}
    for split, n in (("train", 12), ("test", 6)):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                px = np.clip(np.array(rgb)[None, None] + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / name / f"{i}.png")
    zoo = ["--zoo", str(tmp_path / "zoo")]
    assert main(["zoo", "add-backbone", str(tiny_vit(tmp_path / "vit")), "--arch", "vit-s", *zoo]) == 0
    out = tmp_path / "d"
    assert main(["sample", "--arch", "vit-s", "--dataset", f"folder:{root}", "--out", str(out), *zoo]) == 0
    capsys.readouterr()
    model = _check_folder(out, ViTForImageClassification, sorted(colours))
    proc = ViTImageProcessor.from_pretrained(str(out))
    task = load_dataset(f"folder:{root}")
    files = sorted((root / "test").glob("*/*.png"))
    theirs = proc([Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    ours = preprocess(task.x_test, json.loads((out / "preprocessor_config.json").read_text()), 3)
    assert torch.allclose(ours, theirs, atol=1e-5)  # the same model inputs, whichever way the images come in
    with torch.no_grad():
        acc = float((model(pixel_values=theirs).logits.argmax(-1) == task.y_test).float().mean())
    assert acc > 0.6  # three colour-coded classes: chance is 1/3
