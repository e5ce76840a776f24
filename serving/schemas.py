"""What crosses the HTTP boundary: the request models, the error body, and ``ServeArgs``, the
typed ``args`` of ``build_app`` (every limit of the service, set in the Serve config).

The support set's ``x`` and ``y`` are validated straight into numpy arrays: pydantic's
``list[list[float]]`` built a Python float per value (8 MiB of ``0,0,0,...`` JSON became ~250 MB
in the ingress, measured with tracemalloc); ``np.array`` over the parsed JSON costs 8 bytes a value.
"""

import re
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema, model_validator

MAX_N = 32
MAX_SUPPORT_PER_CLASS = 4096
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _no_control(v: str) -> str:
    if CONTROL.search(v):
        raise ValueError("control characters (newline, tab, ...) are not allowed here")
    return v


# a name the server may echo in X-Weightgen-* headers: printable, no CR/LF or other controls
Name = Annotated[str, AfterValidator(_no_control)]


def _rows(v: Any) -> np.ndarray:
    try:
        a = np.array(v) if isinstance(v, list) and v else None
    except (ValueError, TypeError, OverflowError):  # ragged rows (numpy >= 1.24 refuses them)
        a = None
    if a is None or a.ndim != 2 or a.shape[1] == 0 or a.dtype.kind not in "iuf":
        raise ValueError("x must be a non-empty list of rows of numbers, all rows the same non-zero length")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("x contains NaN or Inf")
    return a


def _labels(v: Any) -> np.ndarray:
    try:
        a = np.array(v) if isinstance(v, list) and v else None
    except (ValueError, TypeError, OverflowError):
        a = None
    if a is None or a.ndim != 1 or a.dtype.kind not in "iu":  # bools, floats, strings, ints past int64
        raise ValueError("y must be a non-empty list of integer labels 0..K-1")
    return a.astype(np.int64, copy=False)


Rows = Annotated[Any, PlainValidator(_rows), WithJsonSchema(
    {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
     "description": "rows of features in model-input space"})]
Labels = Annotated[Any, PlainValidator(_labels), WithJsonSchema(
    {"type": "array", "minItems": 1, "items": {"type": "integer"}, "description": "integer labels 0..K-1, one per row of x"})]


class SupportSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: Rows
    y: Labels


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: Name
    dataset: Name | None = Field(None, min_length=1, max_length=2000, description="registry name, e.g. digits:classes=0,1,2,3,4")
    support: SupportSet | None = None
    instruction: str | None = Field(None, max_length=2000, description="what the weights should do; alone (no "
                                    "dataset or support) it asks a generator that reads text for its classes")
    text_encoder: Name | None = Field(None, max_length=200, description="encoder the instruction is embedded with "
                                      "(another than the generator's goes through an XBT projection)")
    head: str = Field("fit", pattern="^(fit|generated)$", description="fit: the closed-form head over the "
                      "generated units (declared in the manifest); generated: the generator's own head")
    # 256 = weightgen.support.SUPPORT_CAP, spelt out so the ingress need not import torch (tested)
    support_per_class: int = Field(256, ge=1, le=MAX_SUPPORT_PER_CLASS,
                                   description="labelled examples per class that condition, fit and select; "
                                               "the rest estimate the returned model's accuracy")
    generator: Name | None = Field(None, max_length=200)
    n: int = Field(8, ge=1, le=MAX_N)
    seed: int = Field(0, ge=0, lt=2**63)
    select: str = Field("best", pattern="^(best|none)$")
    novelty: bool = True
    parts: str = Field("all", pattern="^(all|task)$", description="backbone archs (vit-s, vit-t, resnet-18): all = "
                       "the whole model (backbone + generated head); task = only the generated tensors (the "
                       "X-Weightgen-Backbone header names the backbone, for clients that hold it)")
    backbone: str | None = Field(None, pattern="^[0-9a-f]{8,64}$", description="backbone archs: the zoo's backbone "
                                 "id (or a unique prefix); default: the only one of that arch")
    timeout_s: float | None = Field(None, gt=0, description="give up after this many seconds (capped by the server's limit)")


class ErrorBody(BaseModel):
    error: Any = Field(description="what was wrong: a message, or a list of validation errors")


class GeneratorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


UPLOAD_SCHEMA = {
    "type": "object", "required": ["request", "data"],
    "properties": {
        "request": {"type": "string", "description": "JSON of the generate request without 'dataset' and 'support'"},
        "data": {"type": "string", "format": "binary",
                 "description": ".npz with x (N, ...features) float, y (N,) int labels 0..K-1; optional x_test, y_test"},
    },
}
ERRORS = {code: {"model": ErrorBody, "description": why} for code, why in [
    (404, "unknown arch, generator, dataset or checkpoint (the message lists what exists)"),
    (408, "the request took longer than its timeout, or its body arrived too slowly"),
    (413, "body, support set or uploaded dataset over the server's size limits"),
    (422, "malformed or invalid request (also: more classes than the server's limit)"),
    (503, "the server is at its limit for concurrent uploads or request bodies, or no replica is up; "
          "retry after Retry-After seconds")]}


class ServeArgs(BaseModel):
    """``args`` of ``serving.app:build_app`` (the Serve config's ``applications[].args``); Serve
    validates them against this model, so a misspelt key is an error, not a silent default."""
    model_config = ConfigDict(extra="forbid")

    home: str | None = Field(None, description="WEIGHTGEN_HOME of the generator replicas (default: theirs)")
    torch_threads: int = Field(1, ge=1, description="torch threads per generator replica")
    generator_replicas: int = Field(1, ge=1, description="on CPU, one per core beats one with many threads")
    request_timeout_s: float = Field(60.0, gt=0, description="per generate request; 408 past it (a request may ask for less)")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="JSON request bodies (413 past it)")
    max_upload_bytes: int = Field(64 << 20, ge=1024, description="multipart .npz uploads (413 past it)")
    upload_expansion: int = Field(4, ge=1, description="an upload's arrays may inflate to this many times max_upload_bytes")
    max_concurrent_uploads: int = Field(4, ge=1, description="uploads in flight per ingress replica (503 past it)")
    max_inflight_json_bytes: int = Field(32 << 20, ge=1024,
                                         description="JSON body bytes in flight per ingress replica (503 past it)")
    min_body_rate: int = Field(64 << 10, ge=1, description="bytes/s a body must average after body_grace_s (408 below)")
    body_grace_s: float = Field(5.0, gt=0, description="seconds a body may take before min_body_rate applies")
    max_classes: int = Field(100, ge=2, description="classes a request may ask for (422 past it)")
    max_rows: int = Field(50_000, ge=1, description="rows of an inline support set or uploaded dataset (413 past it)")
    max_rows_x_classes: int = Field(1_000_000, ge=1, description="rows x classes of a request's dataset (413 past it)")
    show_server_paths: bool = Field(False, description="admin: include server filesystem paths in responses")

    @model_validator(mode="after")
    def _consistent(self) -> "ServeArgs":
        if self.max_inflight_json_bytes < self.max_body_bytes:
            raise ValueError("max_inflight_json_bytes must be at least max_body_bytes, or no full-size body is ever read")
        return self
