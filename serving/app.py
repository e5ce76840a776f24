"""Ray Serve application: generated weights over HTTP.

Two deployments. ``Ingress`` (here) is plain HTTP: FastAPI + pydantic, the limits of
``serving.limits`` (body size and rate, bytes in flight, work per request), parsing, status codes
and error bodies; it imports nothing from weightgen. ``GeneratorDeployment``
(``serving.generator``) does the work. Every limit is an argument of ``build_app`` (``ServeArgs``),
set in ``serve_config.yaml``; so are replicas and resources. The HTTP proxy's own header cap is
``serving.proxy``.

    serve run serving/serve_config.yaml        # or: weightgen serve --port 8000
"""

import asyncio
import json
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException

from serving import metrics
from serving.generator import MAX_MODELS_PER_REPLICA, GeneratorDeployment
from serving.limits import ByteBudget, busy, check_work, error, header_value, json_safe, read_body
from serving.schemas import ERRORS, UPLOAD_SCHEMA, GenerateRequest, GeneratorInfo, ServeArgs

RESOLVE_TTL_S = 5.0  # how long the ingress trusts a generator choice (new generators show up after this)
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError,
                DeploymentUnavailableError, ReplicaUnavailableError)
__all__ = ["build_app", "Ingress", "GeneratorDeployment", "MAX_MODELS_PER_REPLICA", "ServeArgs"]

app = FastAPI(title="weightgen", version="1",
              description="Generated neural-network weights: name an architecture and a dataset, get safetensors.")

app.add_middleware(metrics.MetricsMiddleware)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, json.loads(json.dumps(json_safe(exc.errors()), default=str)))


@app.exception_handler(HTTPException)
async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, exc.detail)


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


def _check_request(raw: Any, upload: bool, args: ServeArgs) -> GenerateRequest | JSONResponse:
    try:
        req = GenerateRequest.model_validate(raw)
    except ValidationError as e:
        return error(422, json.loads(e.json(include_url=False, include_input=False)))
    if upload:
        if req.dataset is not None or req.support is not None:
            return error(422, "with an .npz upload, the 'request' part must not also give 'dataset' or 'support'")
        return req
    if req.dataset is not None and req.support is not None:
        return error(422, "give one of 'dataset' (a registry name) or 'support' ({x, y}), not both")
    if req.dataset is None and req.support is None and not req.instruction:
        return error(422, "give 'dataset' (a registry name) or 'support' ({x, y}), upload an .npz as "
                          "multipart/form-data, or give an 'instruction' alone for a generator that reads text")
    if req.support is not None:
        s = req.support
        if len(s.y) != len(s.x):
            return error(422, f"support.y has {len(s.y)} labels for {len(s.x)} rows of support.x")
        if s.y.min() < 0:
            return error(422, "support.y labels must be 0..K-1")
        # bounded before any replica starts on it (the replica checks every kind of dataset again)
        too_much = check_work(len(s.y), int(s.y.max()) + 1, args.max_rows, args.max_classes, args.max_rows_x_classes)
        if too_much:
            return error(*too_much)
    return req


async def _parse_upload(request: Request, body: bytearray) -> tuple[Any, str, bytes] | JSONResponse:
    """(request JSON, file name, npz bytes) from a multipart body already read under the cap."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=1) as form:
            meta, data = form.get("request"), form.get("data")
            if not isinstance(meta, str) or data is None or isinstance(data, str):
                return error(422, "multipart upload needs a text part 'request' (JSON) and a file part 'data' (.npz)")
            name = UPLOAD_NAME.sub("_", data.filename or "data.npz")[:100]
            npz = await data.read()
    except HTTPException as e:  # malformed multipart, too many parts (starlette's own 400s)
        return error(422, f"malformed multipart body: {e.detail}")
    try:
        raw = json.loads(meta)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        return error(422, f"malformed JSON in the 'request' part: {e}")
    return raw, name, npz


# I/O only: no cores of its own, and many requests in flight (Serve's default of 5 would make the
# proxy queue and back off in front of an idle ingress: measured 3× lower throughput at 32 clients)
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress(app)
class Ingress:
    """HTTP only: limits, parsing, status codes, metrics. The work happens in GeneratorDeployment."""

    def __init__(self, generator, args: dict | None = None):
        self.gen = generator
        self.args = ServeArgs.model_validate(args or {})
        self._resolved: dict[tuple, tuple[float, dict]] = {}
        self._uploads = asyncio.Semaphore(self.args.max_concurrent_uploads)
        self._json_bytes = ByteBudget(self.args.max_inflight_json_bytes)

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
        a = self.args
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            if self._uploads.locked():  # each upload holds up to ~3x its size here until it is answered
                return busy(f"{a.max_concurrent_uploads} uploads are being processed; retry")
            async with self._uploads:
                return await self._generate_request(request, True)
        declared = request.headers.get("content-length", "")
        # what this body may cost: its declared length, or the cap when it declares none (chunked)
        cost = min(int(declared), a.max_body_bytes) if declared.isdigit() else a.max_body_bytes
        if not self._json_bytes.take(cost):
            return busy(f"{self._json_bytes.used} bytes of request bodies are being processed; retry")
        try:
            return await self._generate_request(request, False)
        finally:
            self._json_bytes.give(cost)

    async def _generate_request(self, request: Request, upload: bool):
        a = self.args
        body = await read_body(request, a.max_upload_bytes if upload else a.max_body_bytes, a.min_body_rate,
                               a.body_grace_s)
        if isinstance(body, JSONResponse):
            return body
        extra = {}
        if upload:
            parsed = await _parse_upload(request, body)
            if isinstance(parsed, JSONResponse):
                return parsed
            raw, name, npz = parsed
            extra = {"npz": npz, "upload_name": name, "max_array_bytes": a.upload_expansion * a.max_upload_bytes}
        else:
            try:
                raw = json.loads(body)  # NaN/Infinity literals parse; they are rejected below
            except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
                return error(422, f"malformed JSON: {str(e)[:200]}")
        del body
        req = _check_request(raw, upload, a)
        del raw  # the parsed JSON: the request holds its support set as arrays
        if isinstance(req, JSONResponse):
            return req
        timeout = min(req.timeout_s or a.request_timeout_s, a.request_timeout_s)
        # the replica skips a request whose deadline has passed, and stops one that passes it mid-way
        payload = {**req.model_dump(), **extra, "deadline": time.time() + timeout}
        try:
            out = await asyncio.wait_for(self._generate(payload), timeout)
        except asyncio.TimeoutError:
            metrics.TIMEOUTS.inc()
            return error(408, f"generation took longer than the {timeout:g} s timeout; retry, ask for a smaller n, "
                              f"or raise timeout_s (server limit {a.request_timeout_s:g} s)")
        except REPLICA_GONE as e:
            return busy(f"no generator replica available right now ({type(e).__name__}); retry")
        if "error" in out:
            return error(out["status"], out["error"])
        gen_name = out["headers"]["X-Weightgen-Generator"]
        metrics.GENERATED.labels(gen_name, out["headers"]["X-Weightgen-Arch"]).inc()
        metrics.CANDIDATES.labels(gen_name).inc(req.n)
        return Response(out["body"], media_type="application/octet-stream",
                        headers={k: header_value(v) for k, v in out["headers"].items()})

    async def _generate(self, payload: dict) -> dict:
        picked = await self._resolve(payload)
        if "error" in picked:
            return picked
        # backbone archs: the multiplexed id names the backbone; a generator the client named is the head's
        payload["head_generator"], payload["generator"] = payload.get("generator"), picked["generator"]
        return await self.gen.options(multiplexed_model_id=picked["generator"]).generate.remote(payload)

    async def _resolve(self, payload: dict) -> dict:
        """Which generator serves this request (the multiplexed id). The answer depends only on
        the arch, the dataset name or input width and the generator name, so it is cached for a
        few seconds: a repeated request costs one call to the generator deployment, not two."""
        if payload.get("npz") is not None:
            return await self.gen.resolve.remote(payload)
        data = (payload["dataset"] if payload["dataset"] is not None else None if payload["support"] is None
                else f"support:{len(payload['support']['x'][0])}")
        key, now = (payload["arch"], data, payload.get("generator"), payload.get("backbone")), time.monotonic()
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
        return JSONResponse(json_safe(await self.gen.archs.remote()))

    @app.get("/v1/generators")
    async def generators(self) -> list[GeneratorInfo]:
        return JSONResponse(json_safe(await self.gen.generators.remote()))

    @app.get("/v1/zoo", responses=ERRORS)
    async def zoo(self, arch: str | None = None, dataset: str | None = None, limit: int = 100):
        if not 1 <= limit <= 10_000:
            return error(422, "limit must be in 1..10000")
        out = await self.gen.zoo_query.remote(arch, dataset, limit)
        # one stored NaN metric must not take the page down (JSON has no NaN: it becomes null)
        return error(out["status"], out["error"]) if "error" in out else JSONResponse(json_safe(out))

    @app.get("/v1/zoo/{ckpt_id}", response_class=Response, responses={**BINARY, **ERRORS})
    async def zoo_checkpoint(self, ckpt_id: str):
        out = await self.gen.zoo_checkpoint.remote(ckpt_id)
        if "error" in out:
            return error(out["status"], out["error"])
        return Response(out["body"], media_type="application/octet-stream",
                        headers={k: header_value(v) for k, v in out["headers"].items()})


def build_app(args: ServeArgs) -> Application:
    """Entry point for ``serve run serving.app:build_app home=...`` and the Serve config; ``args``
    are ``ServeArgs`` (a dict is validated into one). On CPU, one generator replica per core with
    ``torch_threads: 1`` beats one replica with many threads: see benchmarks/RESULTS.md."""
    a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    gen = GeneratorDeployment.options(num_replicas=a.generator_replicas, ray_actor_options={"num_cpus": a.torch_threads})
    return Ingress.bind(gen.bind(a.home, a.torch_threads, True, a.model_dump()), a.model_dump())
