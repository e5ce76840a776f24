"""What may enter the zoo: tensors checked against their architecture, and record metadata.

Two checks, both pure (no I/O), both returning every problem as ``(reason, detail)`` pairs so
ingestion can report a row and move on:

* :func:`check_declared` compares tensor *names, shapes and dtypes* with the arch spec. It takes
  what a file's header declares, so a checkpoint of the wrong shape is refused before a byte of
  its data is read (a 4 KB sparse file declaring 3 GiB cost 8.9 GB and 33 s when the data was
  read first). :func:`validate_tensors` adds the checks that need the data (finite values).
* :func:`check_metadata` checks a record's fields by type and range: every value a manifest
  line or a ``config.json`` can carry was once a traceback after a partial write (``tags: 5``,
  ``metrics: {"acc": "high"}``, ``input_shape: 64``, ``num_classes: 1``, ...). NaN and Inf
  metrics are refused: they pass every ``--metric`` filter and are not JSON.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass

import torch

from weightgen.archs import ShapeError, get_arch

STORABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                   torch.uint8, torch.bool)
MAX_INPUT_DIMS = 4
MAX_TAGS = 1000


def arch_spec(arch: str, num_classes: int, input_shape) -> dict:
    """name -> TensorSpec for this arch at this shape; a shape the arch cannot take is a ValueError."""
    try:
        return {t.name: t for t in get_arch(arch).tensors(num_classes, input_shape)}
    except (ShapeError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{arch} cannot be built for {num_classes} classes and input shape "
                         f"{tuple(input_shape)}: {e}") from None


def check_declared(declared: dict[str, tuple[tuple[int, ...], torch.dtype]], spec: dict) -> list[tuple[str, str]]:
    """Problems with ``{name: (shape, dtype)}`` as an instance of ``spec`` (see :func:`arch_spec`)."""
    problems = []
    missing = sorted(set(spec) - set(declared))
    extra = sorted(set(declared) - set(spec))
    if missing:
        problems.append(("missing_keys", f"{len(missing)} missing, e.g. {missing[:3]}"))
    if extra:
        problems.append(("unexpected_keys", f"{len(extra)} unexpected, e.g. {extra[:3]}"))
    for name in sorted(set(spec) & set(declared)):
        shape, dtype = declared[name]
        s = spec[name]
        if tuple(shape) != s.shape:
            problems.append(("shape_mismatch", f"{name}: expected {list(s.shape)}, got {list(shape)}"))
        if dtype not in STORABLE_DTYPES or s.dtype.is_floating_point != dtype.is_floating_point:
            problems.append(("bad_dtype", f"{name}: expected {s.dtype}, got {dtype}"))
    return problems


def validate_tensors(tensors: dict[str, torch.Tensor], arch: str, num_classes: int, input_shape) -> list[tuple[str, str]]:
    """Every way ``tensors`` fails to be a checkpoint of this arch, as (reason, detail) pairs.

    Names must match the arch's state-dict keys exactly; shapes must match; floating tensors must
    be a floating dtype and finite; integer buffers keep their integer dtype."""
    try:
        spec = arch_spec(arch, num_classes, input_shape)
    except ValueError as e:
        return [("bad_shape", str(e))]
    problems, declared = [], {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            declared[name] = (tuple(t.shape), t.dtype)
        elif name in spec:
            problems.append(("not_a_tensor", f"{name} is {type(t).__name__}"))
            declared[name] = (spec[name].shape, spec[name].dtype)  # reported once, above
        else:
            declared[name] = ((), torch.float32)  # reported as unexpected
    problems += check_declared(declared, spec)
    for name in sorted(set(spec) & set(tensors)):
        t = tensors[name]
        if (isinstance(t, torch.Tensor) and t.dtype.is_floating_point and tuple(t.shape) == spec[name].shape
                and not bool(torch.isfinite(t).all())):
            problems.append(("non_finite", f"{name} contains NaN or Inf"))
    return problems


HEAD_PART = "head"  # train_config["part"] of a task part stored apart from its backbone (issue 10)


def validate_head(tensors: dict, arch: str, num_classes: int, train_config: dict) -> list[tuple[str, str]]:
    """A task part of a backbone arch: only its classifier, ``(K, D)`` weight and ``(K,)`` bias,
    where D is the backbone's feature width (``train_config["feature_dim"]``) and
    ``train_config["backbone_id"]`` names the stored backbone it belongs to. The rest of the model
    is the backbone, stored once (``zoo.backbones``), so a head zoo costs kilobytes per entry."""
    from weightgen.backbones import FAMILIES, BackboneError, family_of

    try:
        wkey = FAMILIES[family_of(arch)][2]
    except (BackboneError, ValueError) as e:
        return [("bad_part", f"only backbone archs have task parts: {e}")]
    bid, dim = train_config.get("backbone_id"), train_config.get("feature_dim")
    if not (isinstance(bid, str) and 8 <= len(bid) <= 64 and all(c in "0123456789abcdef" for c in bid)):
        return [("bad_part", f"train_config.backbone_id must be a backbone id (hex), got {bid!r}")]
    if not _is_int(dim) or dim < 1:
        return [("bad_part", f"train_config.feature_dim must be a positive int, got {dim!r}")]
    spec = {wkey: _Spec((num_classes, dim), torch.float32), wkey[:-len("weight")] + "bias": _Spec((num_classes,), torch.float32)}
    bad = [("not_a_tensor", f"{n} is {type(t).__name__}") for n, t in tensors.items() if not isinstance(t, torch.Tensor)]
    problems = bad + check_declared({n: (tuple(t.shape), t.dtype) for n, t in tensors.items()
                                     if isinstance(t, torch.Tensor)}, spec)
    for n, t in tensors.items():
        if n in spec and isinstance(t, torch.Tensor) and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            problems.append(("non_finite", f"{n} contains NaN or Inf"))
    return problems


@dataclass(frozen=True)
class _Spec:  # the two fields of weightgen.archs.TensorSpec that check_declared reads
    shape: tuple
    dtype: torch.dtype


# --------------------------------------------------------------------------- metadata


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_problem(v) -> str | None:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def check_metadata(arch=None, num_classes=None, input_shape=None, *, dataset="", seed=None, run_id=None, step=None,
                   train_config=None, metrics=None, tags=None, instructions=None, source="") -> list[tuple[str, str]]:
    """Problems with one record's metadata (reason ``bad_metadata``), by field.

    ``None`` for arch/num_classes/input_shape means "not known yet" and is not checked, so a
    manifest line can be checked before its file's config is read."""
    bad = []

    def no(field, why, value):
        bad.append(("bad_metadata", f"{field} {why}, got {value!r}"[:300]))

    if arch is not None and not (isinstance(arch, str) and arch):
        no("arch", "must be an architecture name (a string)", arch)
    if num_classes is not None and not (_is_int(num_classes) and num_classes >= 2):
        no("num_classes", "must be an integer >= 2 (a classifier needs two classes)", num_classes)
    if input_shape is not None and not (isinstance(input_shape, (list, tuple)) and 1 <= len(input_shape) <= MAX_INPUT_DIMS
                                        and all(_is_int(s) and s >= 1 for s in input_shape)):
        no("input_shape", f"must be a list of 1..{MAX_INPUT_DIMS} positive integers", input_shape)
    if not isinstance(dataset, str):
        no("dataset", "must be a dataset name (a string)", dataset)
    for field, v in (("seed", seed), ("step", step)):
        if v is not None and not (_is_int(v) and v >= 0):
            no(field, "must be a non-negative integer or null", v)
    for field, v in (("run_id", run_id), ("source", source)):
        if v is not None and not isinstance(v, str):
            no(field, "must be a string or null", v)
    if train_config is not None:
        if not isinstance(train_config, dict):
            no("train_config", "must be a JSON object", train_config)
        elif (why := _json_problem(train_config)) is not None:
            no("train_config", f"must be plain JSON without NaN/Inf ({why})", train_config)
    if metrics is not None:
        if not isinstance(metrics, dict):
            no("metrics", "must be an object of name -> number", metrics)
        else:
            for k, v in metrics.items():
                if not isinstance(k, str) or not k:
                    no("metrics", "names must be non-empty strings", k)
                elif not isinstance(v, numbers.Real) or isinstance(v, bool):
                    no(f"metrics[{k!r}]", "must be a number", v)
                elif not math.isfinite(v):
                    no(f"metrics[{k!r}]", "must be finite (NaN/Inf pass every --metric filter)", v)
    for field, v in (("tags", tags), ("instructions", instructions)):
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) <= MAX_TAGS and all(isinstance(s, str) for s in v)):
            no(field, "must be a list of strings", v)
    return bad
