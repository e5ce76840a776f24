"""Ray Serve application: generated weights over HTTP.

Two deployments. ``Ingress`` is plain HTTP (FastAPI + pydantic; size limits, JSON parsing, error
bodies) and imports nothing from weightgen. ``GeneratorDeployment`` does the work: it loads
generators with ``@serve.multiplexed`` (LRU per replica), answers concurrent generate requests in
``@serve.batch`` batches (split per generator by Serve) and serves the catalogue (archs,
generators, zoo). Known errors come back as ``{"error", "status"}`` values, never as exceptions,
so bad input is always a 4xx. Replicas and resources live in ``serve_config.yaml``.

    serve run serving/serve_config.yaml        # or: weightgen serve --port 8000
"""

import asyncio
import io
import json
import logging
import math
import os
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from serving import metrics

MAX_N = 32
MAX_BODY_BYTES = 8 << 20  # JSON bodies
MAX_UPLOAD_BYTES = 64 << 20  # multipart .npz uploads
MAX_CONCURRENT_UPLOADS = 4  # per ingress replica: bounds the memory that uploads hold (503 past it)
UPLOAD_EXPANSION = 4  # an upload's arrays may inflate to this many times the upload limit
REQUEST_TIMEOUT_S = 60.0
MAX_MODELS_PER_REPLICA = 4  # generators a replica keeps loaded (LRU)
RESOLVE_TTL_S = 5.0  # how long the ingress trusts a generator choice (new generators show up after this)
BLOCKED_DATASET_KINDS = ("npz", "folder")  # they read server-side paths
BLOCKED_DATASET_ARGS = ("download", "dir")  # fetch from the internet / read a server-side directory
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError,
                DeploymentUnavailableError, ReplicaUnavailableError)


class SupportSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: list[list[float]] = Field(min_length=1, description="rows of features in model-input space")
    y: list[int] = Field(min_length=1, description="integer labels 0..K-1, one per row of x")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str
    dataset: str | None = Field(None, min_length=1, max_length=2000, description="registry name, e.g. digits:classes=0,1,2,3,4")
    support: SupportSet | None = None
    instruction: str | None = Field(None, max_length=2000)
    generator: str | None = Field(None, max_length=200)
    n: int = Field(8, ge=1, le=MAX_N)
    seed: int = Field(0, ge=0, lt=2**63)
    select: str = Field("best", pattern="^(best|none)$")
    novelty: bool = True
    timeout_s: float | None = Field(None, gt=0, description="give up after this many seconds (capped by the server's limit)")


class ErrorBody(BaseModel):
    error: Any = Field(description="what was wrong: a message, or a list of validation errors")


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
    (408, "the request took longer than its timeout"), (413, "body over the size limit"),
    (422, "malformed or invalid request"), (503, "no generator replica available right now; retry")]}


class GeneratorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


def _error(status: int, message: Any) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _err(status: int, message: str) -> dict:
    return {"error": message, "status": status}


def _classify(exc: Exception) -> dict:
    """Map the library's typed errors to HTTP statuses; anything else is a genuine 500."""
    from weightgen.archs import ShapeError
    from weightgen.data import DatasetError
    from weightgen.registry import UnknownNameError
    from weightgen.sampling import GeneratorMismatchError, NoGeneratorError
    from zoo.store import ZooError

    if isinstance(exc, GeneratorMismatchError):
        return _err(422, str(exc))
    if isinstance(exc, (NoGeneratorError, UnknownNameError, ZooError)):
        return _err(404, str(exc))
    if isinstance(exc, (DatasetError, ShapeError, ValueError)):
        return _err(422, str(exc))
    raise exc


# Requests wait in the replica's own batch queue (FIFO) rather than in the router, which backs off
# with sleeps when every replica is full.
@serve.deployment(max_ongoing_requests=64)
class GeneratorDeployment:
    async def __init__(self, home: str | None = None, torch_threads: int | None = None, preload: bool = True):
        if home:  # replicas do not see the driver's later env changes: the home comes in as an argument
            os.environ["WEIGHTGEN_HOME"] = str(home)
        import weightgen  # noqa: F401 - first: it sets the OpenMP wait policy before torch starts its threads
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if preload:
            # The multiplexer routes a generator's requests to replicas that hold it; preloading the
            # default ones on every replica spreads load from the first request on, instead of
            # piling onto the one replica that happened to load it first.
            from weightgen.sampling import default_generators

            for d in default_generators()[:MAX_MODELS_PER_REPLICA]:
                try:
                    await self.get_generator(d.name)
                except Exception as e:  # noqa: BLE001 - a broken generator must not keep the replica down
                    logging.getLogger("ray.serve").warning("not preloading generator %s: %s", d.name, e)

    # ---------------------------------------------------------------- generation

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_generator(self, generator_id: str):
        from weightgen.sampling import find_generator, open_generator

        # uncached (eviction frees it), and off the event loop (a load must not stall other requests)
        return await asyncio.to_thread(open_generator, find_generator("", (), generator_id))

    def resolve(self, req: dict) -> dict:
        """Check arch/dataset/generator names and pick the generator (its name is the multiplexed id)."""
        from weightgen.archs import ARCHS
        from weightgen.data import dataset_shape, split_name
        from weightgen.generators import trained_generators
        from weightgen.sampling import find_generator

        try:
            if req["arch"] not in ARCHS:
                return _err(404, f"Unknown arch {req['arch']!r}. Available: {', '.join(ARCHS.names())}")
            names = [g.name for g in trained_generators()]
            if req.get("generator") and req["generator"] not in names:
                return _err(404, f"Unknown generator {req['generator']!r}. Available: {', '.join(names) or 'none'}")
            if req.get("npz") is not None:
                from weightgen.data.files import npz_feature_shape

                shape = npz_feature_shape(io.BytesIO(req["npz"]))
            elif req.get("dataset"):
                kind, args = split_name(req["dataset"])
                keys = {part.partition("=")[0].strip() for part in args.split(";")}
                if kind in BLOCKED_DATASET_KINDS or keys & set(BLOCKED_DATASET_ARGS):
                    return _err(422, f"dataset {req['dataset']!r}: {', '.join(BLOCKED_DATASET_KINDS)} datasets and the "
                                     f"{', '.join(BLOCKED_DATASET_ARGS)} arguments are not served over HTTP; send the "
                                     f"examples inline as 'support' or upload an .npz")
                shape = dataset_shape(req["dataset"])[1]
            else:
                shape = (len(req["support"]["x"][0]),)
            return {"generator": find_generator(req["arch"], shape, req.get("generator")).name}
        except Exception as e:  # noqa: BLE001 - _classify re-raises what it does not know
            return _classify(e)

    # Concurrent requests arrive as a batch but are sampled one after another, not as one joint
    # call: joint would be up to 1.85x faster for n = 1 requests, but a request's bytes would then
    # depend on which requests shared its batch (float differences ~1e-7 with the batch size), and
    # the same request must give the same bytes. So nothing waits for company either (timeout 0).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def generate(self, reqs: list[dict]) -> list[dict]:
        out = []
        for req in reqs:
            if time.time() > req.get("deadline", float("inf")):  # its client got a 408 already: skip the work
                out.append(_err(408, "request timed out before it was sampled"))
                continue
            try:
                loaded = await self.get_generator(req["generator"])  # load (or LRU-hit) through the multiplexer
                out.append(await asyncio.to_thread(self._generate_one, loaded, req, len(reqs)))
            except Exception as e:  # noqa: BLE001
                out.append(_classify(e))
        return out

    def _generate_one(self, loaded, req: dict, batch_size: int) -> dict:
        import hashlib

        import numpy as np
        from safetensors.torch import save

        from weightgen.data.files import task_from_arrays, task_from_npz
        from weightgen.sampling import sample

        if req.get("npz") is not None:
            dataset = task_from_npz(f"upload:{req['upload_name']}", io.BytesIO(req["npz"]),
                                    max_bytes=req["max_array_bytes"], source="request")
        elif req.get("support"):
            x, y = np.asarray(req["support"]["x"], dtype=np.float64), np.asarray(req["support"]["y"])
            dataset = task_from_arrays("inline", x, y, source="request")
        else:
            dataset = req["dataset"]
        r = sample(req["arch"], dataset, generator=loaded, n=req["n"], select=req["select"],
                   seed=req["seed"], instruction=req.get("instruction"), novelty=req.get("novelty", True))
        manifest = {k: v for k, v in r.manifest.items() if k != "seconds"}  # same request, same bytes
        meta = {"weightgen": json.dumps({**r.config, "manifest": manifest}, sort_keys=True)}
        body = save({k: v.contiguous() for k, v in r.state_dict.items()}, metadata=meta)
        m = r.manifest
        headers = {
            "X-Weightgen-Sha256": hashlib.sha256(body).hexdigest(),
            "X-Weightgen-Generator": m["generator"], "X-Weightgen-Arch": m["arch"],
            "X-Weightgen-Dataset": m["dataset"], "X-Weightgen-Num-Classes": str(m["num_classes"]),
            "X-Weightgen-Input-Shape": json.dumps(m["input_shape"]), "X-Weightgen-Seed": str(m["seed"]),
            "X-Weightgen-Support-Accuracy": f"{m['support_accuracy']:.6f}",
            "X-Weightgen-Predicted-Accuracy": "" if m["predicted_accuracy"] is None else f"{m['predicted_accuracy']:.6f}",
            "X-Weightgen-Zoo-Snapshot": str(m.get("zoo_snapshot")), "X-Weightgen-Seconds": str(m["seconds"]),
            "X-Weightgen-Batch-Size": str(batch_size),
        }
        return {"body": body, "headers": {k: v.encode("ascii", "replace").decode() for k, v in headers.items()}}

    # ---------------------------------------------------------------- catalogue

    def archs(self) -> list[dict]:
        from weightgen.archs import ARCHS

        return [{"name": n, "description": ARCHS.get(n).description, "family": ARCHS.get(n).family,
                 "image_input": ARCHS.get(n).image_input} for n in ARCHS.names()]

    def generators(self) -> list[dict]:
        from weightgen.generators import trained_generators

        return [g.info() for g in trained_generators()]

    def zoo_query(self, arch: str | None, dataset: str | None, limit: int) -> dict:
        from zoo.store import open_zoo

        try:
            z = open_zoo(mode="r")
            recs = z.query(arch=arch, dataset=dataset, limit=limit)  # the page's records only (the index filters)
            total = z.count(arch=arch, dataset=dataset) if len(recs) == limit else len(recs)
        except Exception as e:  # noqa: BLE001
            return _classify(e)
        return {"total": total, "records": recs}

    def zoo_checkpoint(self, ckpt_id: str) -> dict:
        import hashlib

        from safetensors.torch import save

        from weightgen.archs import model_config
        from zoo.store import open_zoo

        try:
            zoo = open_zoo(mode="r")
            rec = zoo.get(ckpt_id)
            cfg = model_config(rec["arch"], rec["num_classes"], rec["input_shape"], dataset=rec["dataset"],
                               zoo_id=rec["id"])
            body = save(zoo.load(rec["id"]), metadata={"weightgen": json.dumps(cfg, sort_keys=True)})
        except Exception as e:  # noqa: BLE001
            return _classify(e)
        return {"body": body, "headers": {"X-Weightgen-Sha256": hashlib.sha256(body).hexdigest(),
                                          "X-Weightgen-Zoo-Id": rec["id"], "X-Weightgen-Arch": rec["arch"]}}


app = FastAPI(title="weightgen", version="1",
              description="Generated neural-network weights: name an architecture and a dataset, get safetensors.")

app.add_middleware(metrics.MetricsMiddleware)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, json.loads(json.dumps(exc.errors(), default=str)))


@app.exception_handler(HTTPException)
async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail)


def _openapi() -> dict:
    """FastAPI's schema plus the generate request body, which the route reads by hand (two
    content types, size limits before parsing) and so cannot declare as a typed parameter."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        body = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(body.pop("$defs", {}))
        comps["GenerateRequest"], comps["UploadRequest"] = body, UPLOAD_SCHEMA
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi
BINARY = {200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                "description": "safetensors; config and manifest in its metadata and X-Weightgen-* headers"}}
GENERATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/UploadRequest"}}}}}
UPLOAD_NAME = re.compile(r"[^A-Za-z0-9._-]+")


async def _read_capped(request: Request, limit: int) -> bytes | JSONResponse:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return _error(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():  # also caps chunked bodies that declare no length
        body += chunk
        if len(body) > limit:
            return _error(413, f"request body over {limit} bytes")
    return bytes(body)


def _check_request(raw: Any, upload: bool) -> GenerateRequest | JSONResponse:
    try:
        req = GenerateRequest.model_validate(raw)
    except ValidationError as e:
        return _error(422, json.loads(e.json(include_url=False, include_input=False)))
    if upload:
        if req.dataset is not None or req.support is not None:
            return _error(422, "with an .npz upload, the 'request' part must not also give 'dataset' or 'support'")
        return req
    if (req.dataset is None) == (req.support is None):
        return _error(422, "give exactly one of 'dataset' (a registry name) or 'support' ({x, y}), "
                           "or upload an .npz as multipart/form-data")
    if req.support is not None:
        s = req.support
        if len(s.y) != len(s.x):
            return _error(422, f"support.y has {len(s.y)} labels for {len(s.x)} rows of support.x")
        if len({len(row) for row in s.x}) != 1 or not s.x[0]:
            return _error(422, "support.x rows must all have the same, non-zero length")
        if not all(math.isfinite(v) for row in s.x for v in row):
            return _error(422, "support.x contains NaN or Inf")
    return req


async def _parse_upload(request: Request, body: bytes) -> tuple[Any, str, bytes] | JSONResponse:
    """(request JSON, file name, npz bytes) from a multipart body already read under the cap."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=1) as form:
            meta, data = form.get("request"), form.get("data")
            if not isinstance(meta, str) or data is None or isinstance(data, str):
                return _error(422, "multipart upload needs a text part 'request' (JSON) and a file part 'data' (.npz)")
            name = UPLOAD_NAME.sub("_", data.filename or "data.npz")[:100]
            npz = await data.read()
    except HTTPException as e:  # malformed multipart, too many parts (starlette's own 400s)
        return _error(422, f"malformed multipart body: {e.detail}")
    try:
        raw = json.loads(meta)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        return _error(422, f"malformed JSON in the 'request' part: {e}")
    return raw, name, npz


# I/O only: no cores of its own, and many requests in flight (Serve's default of 5 would make the
# proxy queue and back off in front of an idle ingress: measured 3× lower throughput at 32 clients)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    """HTTP only: limits, parsing, status codes, metrics. The work happens in GeneratorDeployment."""

    def __init__(self, generator, max_body_bytes: int = MAX_BODY_BYTES, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 request_timeout_s: float = REQUEST_TIMEOUT_S):
        self.gen = generator
        self.max_body_bytes, self.max_upload_bytes = int(max_body_bytes), int(max_upload_bytes)
        self.request_timeout_s = float(request_timeout_s)
        self._resolved: dict[tuple, tuple[float, dict]] = {}
        self._uploads = asyncio.Semaphore(MAX_CONCURRENT_UPLOADS)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}})
    async def prometheus(self):
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    @app.post("/v1/generate", response_class=Response, responses={**BINARY, **ERRORS}, openapi_extra=GENERATE_BODY)
    async def generate(self, request: Request):
        """JSON ``GenerateRequest`` (a registry dataset or an inline support set), or multipart
        with a ``request`` JSON part and a ``data`` .npz file part for larger datasets."""
        upload = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
        if not upload:
            return await self._generate_request(request, upload)
        if self._uploads.locked():  # each upload holds up to ~3x its size here until it is answered
            return JSONResponse({"error": f"{MAX_CONCURRENT_UPLOADS} uploads are being processed; retry"},
                                status_code=503, headers={"Retry-After": "5"})
        async with self._uploads:
            return await self._generate_request(request, upload)

    async def _generate_request(self, request: Request, upload: bool):
        body = await _read_capped(request, self.max_upload_bytes if upload else self.max_body_bytes)
        if isinstance(body, JSONResponse):
            return body
        extra = {}
        if upload:
            parsed = await _parse_upload(request, body)
            if isinstance(parsed, JSONResponse):
                return parsed
            raw, name, npz = parsed
            extra = {"npz": npz, "upload_name": name, "max_array_bytes": UPLOAD_EXPANSION * self.max_upload_bytes}
        else:
            try:
                raw = json.loads(body)  # NaN/Infinity literals parse; they are rejected below
            except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
                return _error(422, f"malformed JSON: {str(e)[:200]}")
        req = _check_request(raw, upload)
        if isinstance(req, JSONResponse):
            return req
        timeout = min(req.timeout_s or self.request_timeout_s, self.request_timeout_s)
        # the replica skips a request whose deadline has passed (Serve cancels only queued ones)
        payload = {**req.model_dump(), **extra, "deadline": time.time() + timeout}
        try:
            out = await asyncio.wait_for(self._generate(payload), timeout)
        except asyncio.TimeoutError:
            metrics.TIMEOUTS.inc()
            return _error(408, f"generation took longer than the {timeout:g} s timeout; retry, ask for a smaller n, "
                               f"or raise timeout_s (server limit {self.request_timeout_s:g} s)")
        except REPLICA_GONE as e:
            return JSONResponse({"error": f"no generator replica available right now ({type(e).__name__}); retry"},
                                status_code=503, headers={"Retry-After": "5"})
        if "error" in out:
            return _error(out["status"], out["error"])
        gen_name = out["headers"]["X-Weightgen-Generator"]
        metrics.GENERATED.labels(gen_name, out["headers"]["X-Weightgen-Arch"]).inc()
        metrics.CANDIDATES.labels(gen_name).inc(req.n)
        return Response(out["body"], media_type="application/octet-stream", headers=out["headers"])

    async def _generate(self, payload: dict) -> dict:
        picked = await self._resolve(payload)
        if "error" in picked:
            return picked
        payload["generator"] = picked["generator"]
        return await self.gen.options(multiplexed_model_id=picked["generator"]).generate.remote(payload)

    async def _resolve(self, payload: dict) -> dict:
        """Which generator serves this request (the multiplexed id). The answer depends only on
        the arch, the dataset name or input width and the generator name, so it is cached for a
        few seconds: a repeated request costs one call to the generator deployment, not two."""
        if payload.get("npz") is not None:
            return await self.gen.resolve.remote(payload)
        data = payload["dataset"] if payload["dataset"] is not None else f"support:{len(payload['support']['x'][0])}"
        key, now = (payload["arch"], data, payload.get("generator")), time.monotonic()
        hit = self._resolved.get(key)
        if hit and now - hit[0] < RESOLVE_TTL_S:
            return hit[1]
        slim = {**payload, "support": {"x": payload["support"]["x"][:1], "y": []}} if payload["support"] else payload
        picked = await self.gen.resolve.remote(slim)  # resolve needs the width of one row, not the rows
        if "error" not in picked:
            if len(self._resolved) > 4096:
                self._resolved.clear()
            self._resolved[key] = (now, picked)
        return picked

    @app.get("/v1/archs")
    async def archs(self) -> list[dict]:
        return await self.gen.archs.remote()

    @app.get("/v1/generators")
    async def generators(self) -> list[GeneratorInfo]:
        return await self.gen.generators.remote()

    @app.get("/v1/zoo", responses=ERRORS)
    async def zoo(self, arch: str | None = None, dataset: str | None = None, limit: int = 100):
        if not 1 <= limit <= 10_000:
            return _error(422, "limit must be in 1..10000")
        out = await self.gen.zoo_query.remote(arch, dataset, limit)
        return _error(out["status"], out["error"]) if "error" in out else out

    @app.get("/v1/zoo/{ckpt_id}", response_class=Response, responses={**BINARY, **ERRORS})
    async def zoo_checkpoint(self, ckpt_id: str):
        out = await self.gen.zoo_checkpoint.remote(ckpt_id)
        if "error" in out:
            return _error(out["status"], out["error"])
        return Response(out["body"], media_type="application/octet-stream", headers=out["headers"])


def build_app(args: dict) -> Application:
    """Entry point for ``serve run serving.app:build_app home=...`` and the YAML config.

    args: ``home`` (the WEIGHTGEN_HOME for replicas; default: theirs), ``torch_threads``,
    ``max_body_bytes`` (JSON), ``max_upload_bytes`` (multipart .npz), ``request_timeout_s``,
    ``generator_replicas`` (default 1; on CPU, one replica per core with ``torch_threads: 1``
    beats one replica with many threads: see benchmarks/RESULTS.md)."""
    threads = int(args.get("torch_threads") or 1)
    gen = GeneratorDeployment.options(num_replicas=int(args.get("generator_replicas", 1)),
                                      ray_actor_options={"num_cpus": threads}).bind(args.get("home"), threads)
    return Ingress.bind(gen, int(args.get("max_body_bytes", MAX_BODY_BYTES)),
                        int(args.get("max_upload_bytes", MAX_UPLOAD_BYTES)),
                        float(args.get("request_timeout_s", REQUEST_TIMEOUT_S)))
