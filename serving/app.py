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
import json
import math
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

MAX_N = 32
MAX_BODY_BYTES = 8 << 20
BLOCKED_DATASET_KINDS = ("npz", "folder")  # they read server-side paths


class SupportSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: list[list[float]] = Field(min_length=1, description="rows of features in model-input space")
    y: list[int] = Field(min_length=1, description="integer labels 0..K-1, one per row of x")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str
    dataset: str | None = Field(None, description="registry name, e.g. digits:classes=0,1,2,3,4")
    support: SupportSet | None = None
    instruction: str | None = Field(None, max_length=2000)
    generator: str | None = Field(None, max_length=200)
    n: int = Field(8, ge=1, le=MAX_N)
    seed: int = Field(0, ge=0, lt=2**63)
    select: str = Field("best", pattern="^(best|none)$")
    novelty: bool = True


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
    from weightgen.sampling import NoGeneratorError
    from zoo.store import ZooError

    if isinstance(exc, (NoGeneratorError, UnknownNameError, ZooError)):
        return _err(404, str(exc))
    if isinstance(exc, (DatasetError, ShapeError, ValueError)):
        return _err(422, str(exc))
    raise exc


@serve.deployment(max_ongoing_requests=16)
class GeneratorDeployment:
    def __init__(self, home: str | None = None, torch_threads: int | None = None):
        if home:  # replicas do not see the driver's later env changes: the home comes in as an argument
            os.environ["WEIGHTGEN_HOME"] = str(home)
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))

    # ---------------------------------------------------------------- generation

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_generator(self, generator_id: str):
        from weightgen.sampling import find_generator, load_generator

        return load_generator(str(find_generator("", (), generator_id)))

    def resolve(self, req: dict) -> dict:
        """Check arch/dataset/generator names and pick the generator (its name is the multiplexed id)."""
        from weightgen.archs import ARCHS
        from weightgen.data import dataset_shape, split_name
        from weightgen.sampling import _generator_dirs, find_generator

        try:
            if req["arch"] not in ARCHS:
                return _err(404, f"Unknown arch {req['arch']!r}. Available: {', '.join(ARCHS.names())}")
            names = [d.name for d in _generator_dirs()]
            if req.get("generator") and req["generator"] not in names:
                return _err(404, f"Unknown generator {req['generator']!r}. Available: {', '.join(names) or 'none'}")
            if req.get("dataset"):
                kind, args = split_name(req["dataset"])
                if kind in BLOCKED_DATASET_KINDS or "download" in args:
                    return _err(422, f"dataset {req['dataset']!r}: {kind}: and download are not served over HTTP; "
                                     f"send the examples inline as 'support'")
                shape = dataset_shape(req["dataset"])[1]
            else:
                shape = (len(req["support"]["x"][0]),)
            return {"generator": find_generator(req["arch"], shape, req.get("generator")).name}
        except Exception as e:  # noqa: BLE001 - _classify re-raises what it does not know
            return _classify(e)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, reqs: list[dict]) -> list[dict]:
        out = []
        for req in reqs:
            try:
                await self.get_generator(req["generator"])  # load (or LRU-hit) through the multiplexer
                out.append(await asyncio.to_thread(self._generate_one, req, len(reqs)))
            except Exception as e:  # noqa: BLE001
                out.append(_classify(e))
        return out

    def _generate_one(self, req: dict, batch_size: int) -> dict:
        import hashlib

        import numpy as np
        from safetensors.torch import save

        from weightgen.data.files import task_from_arrays
        from weightgen.sampling import sample

        if req.get("support"):
            x, y = np.asarray(req["support"]["x"], dtype=np.float64), np.asarray(req["support"]["y"])
            if not np.all(np.isfinite(x)):
                return _err(422, "support.x contains NaN or Inf")
            dataset = task_from_arrays("inline", x, y, source="request")
        else:
            dataset = req["dataset"]
        r = sample(req["arch"], dataset, generator=req["generator"], n=req["n"], select=req["select"],
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
        from weightgen.sampling import _generator_dirs, generator_info

        return [generator_info(d) for d in _generator_dirs()]

    def zoo_query(self, arch: str | None, dataset: str | None, limit: int) -> dict:
        from zoo.store import open_zoo

        try:
            recs = open_zoo(mode="r").query(arch=arch, dataset=dataset)
        except Exception as e:  # noqa: BLE001
            return _classify(e)
        return {"total": len(recs), "records": recs[:limit]}

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


app = FastAPI(title="weightgen", version="1")


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, json.loads(json.dumps(exc.errors(), default=str)))


@app.exception_handler(HTTPException)
async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, exc.detail)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, generator, max_body_bytes: int = MAX_BODY_BYTES):
        self.gen = generator
        self.max_body_bytes = int(max_body_bytes)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.post("/v1/generate", response_class=Response,
              responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors"}})
    async def generate(self, request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return _error(413, f"request body over {self.max_body_bytes} bytes")
        body = b""
        async for chunk in request.stream():  # also caps chunked bodies that declare no length
            body += chunk
            if len(body) > self.max_body_bytes:
                return _error(413, f"request body over {self.max_body_bytes} bytes")
        try:
            raw = json.loads(body)  # NaN/Infinity literals parse; they are rejected below
        except (ValueError, UnicodeDecodeError) as e:
            return _error(422, f"malformed JSON: {e}")
        try:
            req = GenerateRequest.model_validate(raw)
        except ValidationError as e:
            return _error(422, json.loads(e.json(include_url=False, include_input=False)))
        if (req.dataset is None) == (req.support is None):
            return _error(422, "give exactly one of 'dataset' (a registry name) or 'support' ({x, y})")
        if req.support is not None:
            s = req.support
            if len(s.y) != len(s.x):
                return _error(422, f"support.y has {len(s.y)} labels for {len(s.x)} rows of support.x")
            if len({len(row) for row in s.x}) != 1 or not s.x[0]:
                return _error(422, "support.x rows must all have the same, non-zero length")
            if not all(math.isfinite(v) for row in s.x for v in row):
                return _error(422, "support.x contains NaN or Inf")
        payload = req.model_dump()
        picked = await self.gen.resolve.remote(payload)
        if "error" in picked:
            return _error(picked["status"], picked["error"])
        payload["generator"] = picked["generator"]
        out = await self.gen.options(multiplexed_model_id=picked["generator"]).generate.remote(payload)
        if "error" in out:
            return _error(out["status"], out["error"])
        return Response(out["body"], media_type="application/octet-stream", headers=out["headers"])

    @app.get("/v1/archs")
    async def archs(self) -> list[dict]:
        return await self.gen.archs.remote()

    @app.get("/v1/generators")
    async def generators(self) -> list[GeneratorInfo]:
        return await self.gen.generators.remote()

    @app.get("/v1/zoo")
    async def zoo(self, arch: str | None = None, dataset: str | None = None, limit: int = 100):
        if not 1 <= limit <= 10_000:
            return _error(422, "limit must be in 1..10000")
        out = await self.gen.zoo_query.remote(arch, dataset, limit)
        return _error(out["status"], out["error"]) if "error" in out else out

    @app.get("/v1/zoo/{ckpt_id}", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors"}})
    async def zoo_checkpoint(self, ckpt_id: str):
        out = await self.gen.zoo_checkpoint.remote(ckpt_id)
        if "error" in out:
            return _error(out["status"], out["error"])
        return Response(out["body"], media_type="application/octet-stream", headers=out["headers"])


def build_app(args: dict) -> Application:
    """Entry point for ``serve run serving.app:build_app home=...`` and the YAML config.

    args: ``home`` (the WEIGHTGEN_HOME for replicas; default: theirs), ``torch_threads``,
    ``max_body_bytes``."""
    gen = GeneratorDeployment.bind(args.get("home"), args.get("torch_threads"))
    return Ingress.bind(gen, int(args.get("max_body_bytes", MAX_BODY_BYTES)))
