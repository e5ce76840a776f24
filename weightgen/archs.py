"""Architecture registry: name -> builder, and each architecture described as data.

An :class:`ArchSpec` builds a ``torch.nn.Module`` for a (num_classes, input_shape) pair and
describes its state dict: parameter names, shapes, dtypes and which tensors a generator
produces in each mode (``full``: every floating tensor; ``head``: the classifier plus the
affine parameters of normalization layers). The names are the module's own state-dict keys
(transformers' keys for ``vit-*`` and ``resnet-*``), so they are also the zoo keys and the
safetensors keys, and generated weights load in the source library unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import nn

from weightgen.registry import Registry

MODES = ("full", "head")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class ShapeError(ValueError):
    """The dataset's input shape is one the architecture cannot take."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_param: bool  # False for buffers (BatchNorm running statistics, counters)
    modes: frozenset[str]  # generation modes that produce this tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: how to build it, how to run it, and where its classifier lives."""

    name: str
    build_fn: Callable[[int, tuple[int, ...]], nn.Module]
    classifier: str  # module-name prefix of the classification head
    description: str = ""
    image_input: bool = False  # needs (C, H, W); flat square vectors are reshaped to (1, s, s)
    family: str = "mlp"

    def check_input(self, input_shape: tuple[int, ...]) -> None:
        if self.image_input:
            image_shape(input_shape, self.name)

    def build(self, num_classes: int, input_shape, *, device=None, dtype=None) -> nn.Module:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        input_shape = tuple(int(s) for s in input_shape)
        self.check_input(input_shape)
        with torch.device(device or "cpu"):
            model = self.build_fn(num_classes, input_shape)
        if dtype is not None:
            model = model.to(dtype)
        return model

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``model`` on a batch in dataset layout (B, *input_shape) and return (B, K) logits."""
        if self.image_input:
            c, h, w = image_shape(tuple(x.shape[1:]), self.name)
            out = model(x.reshape(x.shape[0], c, h, w))
        else:
            out = model(x)
        return out.logits if hasattr(out, "logits") else out

    def tensors(self, num_classes: int, input_shape) -> list[TensorSpec]:
        return list(_describe(self.name, int(num_classes), tuple(int(s) for s in input_shape)))

    def generated_keys(self, num_classes: int, input_shape, mode: str = "full") -> list[str]:
        if mode not in MODES:
            raise ValueError(f"Unknown generation mode {mode!r}. Available: {', '.join(MODES)}")
        return [t.name for t in self.tensors(num_classes, input_shape) if mode in t.modes]

    def num_params(self, num_classes: int, input_shape) -> int:
        return sum(t.numel for t in self.tensors(num_classes, input_shape) if t.is_param)


ARCHS: Registry[ArchSpec] = Registry("arch")


def register_arch(name: str, *, classifier: str, description: str = "", image_input=False, family="mlp"):
    def deco(fn):
        ARCHS.add(name, ArchSpec(name, fn, classifier, description, image_input, family))
        return fn

    return deco


def get_arch(name: str) -> ArchSpec:
    return ARCHS.get(name)


def build_model(arch: str, num_classes: int, input_shape, *, device=None, dtype=None) -> nn.Module:
    """Public API: the freshly initialised module for ``arch`` on a task of this shape."""
    return get_arch(arch).build(num_classes, input_shape, device=device, dtype=dtype)


@lru_cache(maxsize=64)
def _describe(arch: str, num_classes: int, input_shape: tuple[int, ...]) -> tuple[TensorSpec, ...]:
    spec = ARCHS.get(arch)
    model = spec.build(num_classes, input_shape, device="meta")  # no memory, no init cost
    head_modules = {
        n for n, m in model.named_modules()
        if n == spec.classifier or n.startswith(spec.classifier + ".") or isinstance(m, _NORM_TYPES)
    }
    params = {n for n, _ in model.named_parameters()}
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        floating = t.dtype.is_floating_point
        modes = set()
        if floating and name in params:
            modes.add("full")
            if owner in head_modules:
                modes.add("head")
        out.append(TensorSpec(name, tuple(t.shape), t.dtype, name in params, frozenset(modes)))
    return tuple(out)


def flat_dim(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def image_shape(input_shape: tuple[int, ...], arch: str = "this arch") -> tuple[int, int, int]:
    """(C, H, W) for an image input; a flat vector of square length s*s is read as (1, s, s)."""
    if len(input_shape) == 3:
        return tuple(input_shape)  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, *input_shape)  # type: ignore[return-value]
    if len(input_shape) == 1:
        s = math.isqrt(input_shape[0])
        if s * s == input_shape[0]:
            return (1, s, s)
    raise ShapeError(
        f"{arch} needs image input (C, H, W) or a flat vector of square length; "
        f"got input shape {tuple(input_shape)}"
    )


# --------------------------------------------------------------------------- MLPs and CNNs


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks; ``fc{i}`` keys keep the state dict readable."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        dims = (in_dim, *hidden, num_classes)
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, fc in enumerate(self.fcs):
            x = fc(x)
            if i < len(self.fcs) - 1:
                x = torch.relu(x)
        return x


@register_arch("mlp-s", classifier="fcs.1", description="Linear-ReLU-Linear, hidden 32")
def _mlp_s(num_classes, input_shape):
    return MLP(flat_dim(input_shape), (32,), num_classes)


@register_arch("mlp-m", classifier="fcs.2", description="two hidden layers of 128 and 64")
def _mlp_m(num_classes, input_shape):
    return MLP(flat_dim(input_shape), (128, 64), num_classes)


class SmallCNN(nn.Module):
    """conv3x3(16) - ReLU - conv3x3(32, stride 2) - ReLU - global average pool - Linear."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):  # (B, C, H, W)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.classifier(x.mean(dim=(2, 3)))


@register_arch("cnn-s", classifier="classifier", description="2-conv net, 16/32 channels",
               image_input=True, family="cnn")
def _cnn_s(num_classes, input_shape):
    c, _, _ = image_shape(input_shape, "cnn-s")
    return SmallCNN(c, num_classes)


# --------------------------------------------------------------------------- transformers models


def _vit(hidden, layers, heads, num_classes, input_shape, name):
    from transformers import ViTConfig, ViTForImageClassification

    c, h, w = image_shape(input_shape, name)
    if h != w:
        raise ShapeError(f"{name} needs square images, got {h}x{w}")
    patch = max(1, h // 8)  # 32x32 -> 4 (64 patches, the usual CIFAR ViT); 8x8 -> 1
    if h % patch:
        raise ShapeError(f"{name}: image size {h} is not divisible by patch size {patch}")
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * hidden, image_size=h, patch_size=patch, num_channels=c,
                    num_labels=num_classes)
    return ViTForImageClassification(cfg)


@register_arch("vit-t", classifier="classifier", description="ViT-Tiny (transformers): 192 wide, 12 layers, 3 heads",
               image_input=True, family="vit")
def _vit_t(num_classes, input_shape):
    return _vit(192, 12, 3, num_classes, input_shape, "vit-t")


@register_arch("vit-s", classifier="classifier", description="ViT-Small (transformers): 384 wide, 12 layers, 6 heads",
               image_input=True, family="vit")
def _vit_s(num_classes, input_shape):
    return _vit(384, 12, 6, num_classes, input_shape, "vit-s")


@register_arch("resnet-18", classifier="classifier", description="ResNet-18 (transformers ResNetConfig, basic blocks)",
               image_input=True, family="resnet")
def _resnet18(num_classes, input_shape):
    from transformers import ResNetConfig, ResNetForImageClassification

    c, _, _ = image_shape(input_shape, "resnet-18")
    cfg = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                       num_channels=c, num_labels=num_classes)
    return ResNetForImageClassification(cfg)


def model_config(arch: str, num_classes: int, input_shape, **extra) -> dict:
    """The ``config.json`` beside every weights file: what :func:`build_model` needs."""
    return {"arch": arch, "num_classes": int(num_classes), "input_shape": [int(s) for s in input_shape], **extra}
