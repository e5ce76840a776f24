"""``weightgen backbone train``: a backbone for users who have no pretrained one (issue 10).

    weightgen backbone train --arch vit-s --dataset cifar10 [--epochs 30] [--size tiny] [--out DIR]

One readable accelerate loop (device and precision from accelerate; CPU works for small sizes):
the registry's architecture (``--size full``; ``tiny`` is hidden 32, 2 layers, for smoke tests)
trained with AdamW + cosine schedule and light augmentation (random crop with padding, horizontal
flip) on the dataset's train split, normalized as its preprocessor config says. Before training
it times a few steps and prints how long the whole run will take on this device. The result is a
transformers folder (config.json, model.safetensors, preprocessor_config.json) added to the zoo
as a backbone, so ``weightgen sample`` can use it at once.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

TINY = {"vit": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        "resnet": {"hidden_sizes": [8, 16], "depths": [1, 1], "embedding_size": 8}}


def build(arch: str, num_classes: int, input_shape, size: str) -> torch.nn.Module:
    from weightgen.archs import get_arch
    from weightgen.backbones import family_of

    model = get_arch(arch).build(num_classes, input_shape)
    if size == "tiny":
        cfg = model.config.to_dict()
        cfg.update(TINY[family_of(arch)])
        model = type(model)(type(model.config).from_dict(cfg))
    return model


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2,), generator=g).tolist()
    out = padded[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_backbone(arch: str, dataset: str, *, epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
                   size: str = "full", out: str | Path | None = None, zoo_url: str | None = None, seed: int = 0,
                   progress: bool = True) -> dict:
    from accelerate import Accelerator
    from tqdm import tqdm

    from weightgen.archs import image_shape
    from weightgen.backbones import FAMILIES, add_from_source, default_preprocessing, family_of, preprocess
    from weightgen.data import load_dataset
    from weightgen.paths import default_zoo, home
    from zoo import open_zoo

    fam = family_of(arch)
    task = load_dataset(dataset)
    c, h, w = image_shape(task.input_shape, arch)
    torch.manual_seed(seed)
    model = build(arch, task.num_classes, (c, h, w), size)
    prep = default_preprocessing(fam, model.config.to_dict())
    prep["size"] = {"height": h, "width": w}  # trained at the dataset's resolution
    x = preprocess(task.x_train, prep, c)
    acc = Accelerator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model, opt, sched = acc.prepare(model, opt, sched)
    g = torch.Generator().manual_seed(seed)
    t0, done = time.time(), 0
    model.train()
    bar = tqdm(total=steps, desc=f"backbone {arch} ({size}) on {task.name}", disable=not progress)
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            xb = augment(x[idx], g).to(acc.device)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=xb).logits, task.y_train[idx].to(acc.device))
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
            sched.step()
            done += 1
            bar.update(1)
            if done == 5:  # say how long this will take before most of it is spent
                est = (time.time() - t0) / 5 * steps
                print(f"backbone train: {steps} steps on {acc.device}, about {est / 60:.1f} min", file=sys.stderr)
    bar.close()
    model = acc.unwrap_model(model).eval()
    with torch.no_grad():
        xt = preprocess(task.x_test, prep, c)
        test_acc = float(torch.cat([model(pixel_values=xt[i:i + 256].to(acc.device)).logits.argmax(-1).cpu()
                                    for i in range(0, len(xt), 256)]).eq(task.y_test).float().mean())
    out = Path(out) if out else home() / "backbones" / f"{arch}-{size}-{task.name.replace(':', '_')}-seed{seed}"
    model.config.id2label = {i: n for i, n in enumerate(task.class_names or map(str, range(task.num_classes)))}
    model.config.label2id = {n: i for i, n in model.config.id2label.items()}
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
    bid, _ = add_from_source(open_zoo(zoo_url or default_zoo()), str(out), arch)
    return {"backbone": bid, "folder": str(out), "arch": arch, "size": size, "model_type": FAMILIES[fam][0],
            "dataset": task.name, "epochs": epochs, "steps": steps, "test_acc": round(test_acc, 4),
            "seconds": round(time.time() - t0, 1), "device": str(acc.device)}
