"""The tasks the eval harness measures on: held-out checks and the unseen input distributions.

Held-out tasks are class sets (or orders) never in the zoo nor in a generator's training tasks;
the variants change the inputs in ways the zoo and all tuning never saw (see weightgen.harness).
"""
from __future__ import annotations

import dataclasses

import torch

from weightgen.archs import image_shape
from weightgen.data import TaskData, load_dataset

VARIANTS = ("heldout", "shifted", "elastic", "mnist8")


class HeldOutLeak(AssertionError):
    """A held-out task is in the zoo or in a generator's training tasks: the evaluation would lie."""


def _class_set(name: str):
    """``digits:classes=4,2,8`` -> ("digits", {2, 4, 8}); None for a name without a class list."""
    kind, _, args = name.partition(":")
    if not args.startswith("classes=") or ";" in args:
        return None
    try:
        return kind, frozenset(int(c) for c in args.removeprefix("classes=").split(","))
    except ValueError:
        return None


def check_heldout(tasks: dict[str, list[str]], zoo_tasks, generator_tasks: dict[str, set]) -> None:
    """A ``tuple`` task must not be in the zoo or a generator's training tasks; a ``set`` task's
    class *set* must not be there in any order (comparing names missed ``4,3,2,1,0`` vs ``0,1,2,3,4``)."""
    pools = {"in the zoo": set(zoo_tasks), **{f"a training task of generator {g!r}": set(seen)
                                              for g, seen in generator_tasks.items()}}
    sets = {where: {_class_set(p) for p in pool} - {None} for where, pool in pools.items()}
    for kind, names in tasks.items():
        for t in names:
            for where, pool in pools.items():
                if t in pool:
                    raise HeldOutLeak(f"held-out {kind} task {t!r} is {where}")
                if kind == "set" and _class_set(t) in sets[where]:
                    raise HeldOutLeak(f"held-out set task {t!r} has the class set of a task that is {where}")


def shift_task(task: TaskData, pixels: int = 1) -> TaskData:
    """The task with every image rolled ``pixels`` to the right (wrapping)."""
    shape = image_shape(task.input_shape)
    roll = lambda x: x.reshape(len(x), *shape).roll(pixels, -1).reshape(x.shape)  # noqa: E731
    return dataclasses.replace(task, name=f"{task.name}+roll{pixels}", x_train=roll(task.x_train),
                               x_test=roll(task.x_test))


def elastic_task(task: TaskData, alpha: float = 0.25, sigma: float = 1.5, seed: int = 0) -> TaskData:
    """Every image displaced by its own smooth random field (Simard et al. 2003): ``alpha`` pixels
    of displacement (std), Gaussian-smoothed with ``sigma``; bilinear, zero outside. An 8x8 pixel
    is a 4x4 block of the original bitmap, so warps are severe fast: the severity was set from
    scratch training alone, on a zoo class set (alpha 1.0: 49 %, 0.5: 83 %, 0.25: 95 %), never from
    a generator's or baseline's score."""
    c, h, w = image_shape(task.input_shape)
    g = torch.Generator().manual_seed(seed)
    r = int(3 * sigma)
    k1 = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    k1 = k1 / k1.sum()

    def warp(x):
        im = x.reshape(len(x), c, h, w)
        field = torch.rand(len(x), 2, h, w, generator=g) * 2 - 1
        field = torch.nn.functional.conv2d(field.reshape(-1, 1, h, w), k1.view(1, 1, 1, -1), padding=(0, r))
        field = torch.nn.functional.conv2d(field, k1.view(1, 1, -1, 1), padding=(r, 0)).reshape(len(x), 2, h, w)
        field = field / field.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None] * alpha
        ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        gx = (xs + field[:, 0]) / (w - 1) * 2 - 1
        gy = (ys + field[:, 1]) / (h - 1) * 2 - 1
        out = torch.nn.functional.grid_sample(im, torch.stack([gx, gy], -1), align_corners=True)
        return out.reshape(x.shape).clamp(0, 1)
    return dataclasses.replace(task, name=f"{task.name}+elastic", x_train=warp(task.x_train), x_test=warp(task.x_test))


def variant_task(name: str, variant: str) -> TaskData:
    if variant == "heldout":
        return load_dataset(name)
    if variant == "shifted":
        return shift_task(load_dataset(name))
    if variant == "elastic":
        return elastic_task(load_dataset(name))
    if variant == "mnist8":  # the same class tuple, from MNIST in the 8x8 digits format
        return load_dataset("mnist:size=8;classes=" + name.split("classes=", 1)[1])
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
