"""Measuring weights: vectorized accuracy of many models of one architecture on one task."""
from __future__ import annotations

import threading

import torch
from torch.func import functional_call, stack_module_state, vmap

from weightgen.archs import get_arch


def complete(arch: str, num_classes: int, input_shape, partial: dict[str, torch.Tensor],
             backbone: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A stacked partial state dict (e.g. head mode) filled up to a full one from ``backbone``."""
    spec_names = [t.name for t in get_arch(arch).tensors(num_classes, input_shape)]
    missing = [n for n in spec_names if n not in partial]
    if not missing:
        return partial
    if backbone is None:
        raise ValueError(f"{len(missing)} tensors not generated (e.g. {missing[:2]}) and no backbone given")
    n = next(iter(partial.values())).shape[0]
    return {**{k: backbone[k].expand(n, *backbone[k].shape) for k in missing}, **partial}


@torch.no_grad()
def logits_many(arch: str, num_classes: int, input_shape, sd: dict[str, torch.Tensor], x: torch.Tensor,
                chunk: int = 512) -> torch.Tensor:
    """(n, N, K) logits of n stacked models on x (N, *input_shape)."""
    spec = get_arch(arch)
    base = _template(arch, num_classes, tuple(input_shape))
    keys = [t.name for t in spec.tensors(num_classes, input_shape)]
    n = sd[keys[0]].shape[0]
    outs = []
    if spec.family in ("mlp", "cnn"):
        def one(params, xb):
            return spec.logits(_Bound(base, params), xb)

        for i in range(0, n, chunk):
            params = {k: sd[k][i:i + chunk].float() for k in keys}
            outs.append(vmap(one, in_dims=(0, None))(params, x))
        return torch.cat(outs)
    model = spec.build(num_classes, input_shape).eval()  # big models: one at a time
    for i in range(n):
        model.load_state_dict({k: sd[k][i] for k in keys}, strict=True)
        outs.append(spec.logits(model, x)[None])
    return torch.cat(outs)


_TEMPLATES = threading.local()


def _template(arch: str, num_classes: int, input_shape: tuple) -> torch.nn.Module:
    """A weightless (meta) module to run stacked parameters through, built once per thread:
    ``functional_call`` swaps parameters into it for the duration of a call, so threads (a Serve
    replica samples for two generators at once) must not share one."""
    cache = _TEMPLATES.__dict__.setdefault("modules", {})
    key = (arch, num_classes, input_shape)
    if key not in cache:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = get_arch(arch).build(num_classes, input_shape, device="meta")
    return cache[key]


class _Bound(torch.nn.Module):
    """A module whose forward runs ``base`` with the given parameters (for vmap)."""

    def __init__(self, base, params):
        super().__init__()
        self.__dict__["base"], self.__dict__["params"] = base, params

    def __call__(self, x):
        return functional_call(self.base, self.params, (x,))


@torch.no_grad()
def accuracy_many(arch: str, num_classes: int, input_shape, sd: dict[str, torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """(n,) accuracy of n stacked models on (x, y)."""
    return (logits_many(arch, num_classes, input_shape, sd, x).argmax(-1) == y).float().mean(-1)


def stack_models(models: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    params, buffers = stack_module_state(models)
    return {**{k: v.detach() for k, v in params.items()}, **buffers}


def prototype_accuracy(x_support: torch.Tensor, y_support: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       num_classes: int) -> float:
    """The nearest-class-mean classifier on the support set: a non-neural reference."""
    protos = torch.stack([x_support[y_support == c].flatten(1).mean(0) for c in range(num_classes)])
    pred = torch.cdist(x.flatten(1), protos).argmin(-1)
    return float((pred == y).float().mean())


@torch.no_grad()
def penultimate_many(arch: str, num_classes: int, input_shape, sd: dict[str, torch.Tensor], x: torch.Tensor,
                     per_model_x: bool = False) -> torch.Tensor:
    """What n stacked models feed their classifier: (n, N, D) features of x (N, *input_shape),
    or of per-model inputs x (n, N, *input_shape) when ``per_model_x``. Used to condition a head
    on the backbone it will sit on (generated, or stored in the zoo)."""
    spec = get_arch(arch)
    base = spec.build(num_classes, input_shape, device="meta")
    _replace_module(base, spec.classifier, torch.nn.Identity())
    keys = [t.name for t in spec.tensors(num_classes, input_shape)
            if not (t.name.startswith(spec.classifier + ".") or t.name == spec.classifier)]
    params = {k: sd[k].float() for k in keys}
    if spec.family in ("mlp", "cnn"):
        def one(p, xb):
            return spec.logits(_Bound(base, p), xb).flatten(1)

        return vmap(one, in_dims=(0, 0 if per_model_x else None))(params, x)
    n = params[keys[0]].shape[0]
    model = spec.build(num_classes, input_shape).eval()
    _replace_module(model, spec.classifier, torch.nn.Identity())
    out = []
    for i in range(n):
        model.load_state_dict({k: params[k][i] for k in keys}, strict=True)
        out.append(spec.logits(model, x[i] if per_model_x else x).flatten(1))
    return torch.stack(out)


def _replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
