"""``GeneratorDeployment``: the Serve replicas that generate weights and serve the catalogue.

Generators are loaded with ``@serve.multiplexed`` (LRU per replica); concurrent generate
requests arrive in ``@serve.batch`` batches and are sampled one after another. Before a request
is sampled, its dataset is checked against the server's work limits (classes, rows); while it is
sampled, every module of the generator checks the request's deadline, so a request whose client
already got its 408 stops within one layer call instead of computing on for minutes.

Known errors come back as ``{"error", "status"}`` values, never as exceptions, so bad input is
always a 4xx; their messages never carry server paths (``show_server_paths`` aside).
"""

import asyncio
import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from ray import serve

from serving.deadline import RequestExpired, deadline, stop_when_expired
from serving.limits import check_work, npz_rows
from serving.schemas import ServeArgs

MAX_MODELS_PER_REPLICA = 4  # generators a replica keeps loaded (LRU)
BLOCKED_DATASET_KINDS = ("npz", "folder")  # they read server-side paths
BLOCKED_DATASET_ARGS = ("download", "dir")  # fetch from the internet / read a server-side directory
BACKBONE_FAMILIES = ("vit", "resnet")  # archs made as a head on a stored backbone (weightgen.backbones)
BACKBONE_ID = "backbone:"  # multiplexed id prefix of those requests: "backbone:<backbone id>"


def _blocked(dataset: str) -> dict | None:
    """A 422 for dataset names that would read server-side paths or fetch from the internet."""
    from weightgen.data import split_name

    kind, args = split_name(dataset)
    keys = {part.partition("=")[0].strip() for part in args.split(";")}
    if kind in BLOCKED_DATASET_KINDS or keys & set(BLOCKED_DATASET_ARGS):
        return _err(422, f"dataset {dataset!r}: {', '.join(BLOCKED_DATASET_KINDS)} datasets and the "
                         f"{', '.join(BLOCKED_DATASET_ARGS)} arguments are not served over HTTP; send the "
                         f"examples inline as 'support' or upload an .npz")
    return None


def _err(status: int, message: str) -> dict:
    return {"error": message, "status": status}


# Requests wait in the replica's own batch queue (FIFO) rather than in the router, which backs off
# with sleeps when every replica is full.
@serve.deployment(max_ongoing_requests=64)
class GeneratorDeployment:
    async def __init__(self, home: str | None = None, torch_threads: int | None = None, preload: bool = True,
                       args: dict | None = None):
        if home:  # replicas do not see the driver's later env changes: the home comes in as an argument
            os.environ["WEIGHTGEN_HOME"] = str(home)
        import weightgen  # noqa: F401 - first: it sets the OpenMP wait policy before torch starts its threads
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.args = ServeArgs.model_validate(args or {})
        self.loads: Counter = Counter()  # generator loads (each miss of the multiplexer's LRU)
        self.stopped = 0  # requests abandoned at their deadline
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

    def info(self) -> dict:
        """For operators and tests, through a Serve handle (not HTTP): who and what this replica is."""
        return {"pid": os.getpid(), "loads": dict(self.loads), "stopped": self.stopped, "code": __file__}

    # ---------------------------------------------------------------- errors without server paths

    def _roots(self) -> list[tuple[str, str]]:
        """(server path, what to say instead), longest first."""
        from weightgen.data import data_dir
        from weightgen.paths import generators_dir, home

        zoo = os.environ.get("WEIGHTGEN_ZOO") or str(home() / "zoo")
        roots = {str(generators_dir()): "<generators>", zoo: "<zoo>", str(data_dir()): "<data>", str(home()): "<home>",
                 str(Path.home()): "~"}
        return sorted(((p, r) for p, r in roots.items() if len(p) > 1), key=lambda pr: -len(pr[0]))

    def _scrub(self, text: str) -> str:
        if self.args.show_server_paths:
            return text
        for path, instead in self._roots():
            text = text.replace(path, instead)
        return text

    def _classify(self, exc: Exception) -> dict:
        """Map the library's typed errors to HTTP statuses; anything else is a genuine 500."""
        from weightgen.archs import ShapeError
        from weightgen.data import DatasetError
        from weightgen.registry import UnknownNameError
        from weightgen.sampling import GeneratorMismatchError, NoGeneratorError
        from weightgen.text import NoProjectionError
        from zoo.store import ZooError

        if isinstance(exc, RequestExpired):
            return _err(408, "the request's timeout passed while it was sampled; it was stopped")
        if isinstance(exc, GeneratorMismatchError):
            return _err(422, self._scrub(str(exc)))
        if isinstance(exc, NoProjectionError):  # another text encoder than the generator's, and no XBT map to it
            return _err(422, self._scrub(str(exc)))
        if isinstance(exc, (NoGeneratorError, UnknownNameError, ZooError)):
            return _err(404, self._scrub(str(exc)))
        if isinstance(exc, (DatasetError, ShapeError, ValueError)):
            return _err(422, self._scrub(str(exc)))
        raise exc

    def _no_generator(self, arch: str, shape: tuple) -> str:
        """What a client can ask for instead: what the generators served here make (no paths, no CLI advice)."""
        made = sorted({(g["arch"], tuple(g.get("input_shape") or ())) for g in self.generators()})
        offer = "; ".join(f"{a} for input shape {s}" for a, s in made) or "nothing yet"
        return (f"No generator served here makes {arch} for input shape {tuple(shape)}. The generators here make: "
                f"{offer}. Ask for one of those (GET /v1/generators lists them by name).")

    # ---------------------------------------------------------------- generation

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_generator(self, generator_id: str):
        from weightgen.sampling import find_generator, open_generator

        # uncached (eviction frees it), and off the event loop (a load must not stall other requests)
        loaded = await asyncio.to_thread(open_generator, find_generator("", (), generator_id))
        for m in loaded.model.modules():
            m.register_forward_pre_hook(stop_when_expired)
        self.loads[generator_id] += 1
        return loaded

    def resolve(self, req: dict) -> dict:
        """Check arch/dataset/generator names and pick the generator (its name is the multiplexed id)."""
        from weightgen.archs import ARCHS
        from weightgen.data import dataset_shape
        from weightgen.generators import trained_generators
        from weightgen.sampling import GeneratorMismatchError, NoGeneratorError, find_generator, find_text_generator

        try:
            if req["arch"] not in ARCHS:
                return _err(404, f"Unknown arch {req['arch']!r}. Available: {', '.join(ARCHS.names())}")
            if ARCHS.get(req["arch"]).family in BACKBONE_FAMILIES:
                return self._resolve_backbone(req)
            names = [g.name for g in trained_generators()]
            if req.get("generator") and req["generator"] not in names:
                return _err(404, f"Unknown generator {req['generator']!r}. Available: {', '.join(names) or 'none'}")
            if req.get("npz") is not None:
                from weightgen.data.files import npz_feature_shape

                shape = npz_feature_shape(io.BytesIO(req["npz"]))
            elif not req.get("dataset") and not req.get("support"):  # an instruction alone
                return {"generator": find_text_generator(req["arch"], req.get("generator")).name}
            elif req.get("dataset"):
                blocked = _blocked(req["dataset"])
                if blocked:
                    return blocked
                shape = dataset_shape(req["dataset"])[1]
            else:
                shape = (len(req["support"]["x"][0]),)
            try:
                return {"generator": find_generator(req["arch"], shape, req.get("generator")).name}
            except NoGeneratorError as e:
                if isinstance(e, GeneratorMismatchError):
                    raise
                return _err(404, self._no_generator(req["arch"], shape))
        except Exception as e:  # noqa: BLE001 - _classify re-raises what it does not know
            return self._classify(e)

    def _resolve_backbone(self, req: dict) -> dict:
        """A backbone arch: the head is made on a stored backbone from a dataset the server has
        (images as JSON rows or uploads are not taken); the multiplexed id names the backbone, so a
        replica keeps its tensors once for every request (``weightgen.backbones``)."""
        from weightgen.paths import default_zoo
        from zoo import open_zoo
        from zoo.backbones import resolve_backbone

        if req.get("npz") is not None or req.get("support") or not req.get("dataset"):
            return _err(422, f"{req['arch']} is made on a stored backbone from a dataset the server has (e.g. "
                             f"'cifar10'); images as inline rows or uploads are not taken for it")
        blocked = _blocked(req["dataset"])
        if blocked:
            return blocked
        rec = resolve_backbone(open_zoo(default_zoo(), mode="r"), req.get("backbone"), req["arch"])
        return {"generator": f"{BACKBONE_ID}{rec['id']}"}

    def _generate_backbone(self, req: dict, batch_size: int) -> dict:
        """``sample_on_backbone`` over HTTP: the whole model's safetensors, or (``parts: task``)
        just the generated tensors; config, preprocessing and manifest in the safetensors metadata."""
        from safetensors.torch import save

        from weightgen.backbone_sampling import model_files, sample_on_backbone
        from weightgen.support import SUPPORT_CAP

        bid = req["generator"][len(BACKBONE_ID):]
        t0 = time.time()
        try:
            with deadline(req.get("deadline")):
                r = sample_on_backbone(req["arch"], req["dataset"], backbone=bid, generator=req.get("head_generator"),
                                       n=req["n"], select=req["select"], seed=req["seed"], head=req.get("head", "fit"),
                                       support_per_class=req.get("support_per_class", SUPPORT_CAP), progress=False)
        except RequestExpired:
            self.stopped += 1
            return _err(408, f"the request's timeout passed after {time.time() - t0:.1f} s of sampling; it was stopped")
        tensors, cfg, prep = model_files(r)
        if req.get("parts") == "task":
            tensors = {k: v for k, v in tensors.items() if k in r.head}
        manifest = {k: v for k, v in r.manifest.items() if k != "seconds"}  # same request, same bytes
        meta = {"weightgen": self._scrub(json.dumps({"config": cfg, "preprocessor_config": prep, "manifest": manifest,
                                                     "parts": req.get("parts", "all")}, sort_keys=True))}
        body = save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
        return {"body": body, "headers": {**self._headers(body, r.manifest, batch_size),
                                          "X-Weightgen-Backbone": bid, "X-Weightgen-Parts": req.get("parts", "all"),
                                          "X-Weightgen-Head": r.manifest["head_used"]}}

    def _headers(self, body: bytes, m: dict, batch_size: int) -> dict:
        """The X-Weightgen-* headers every generated response carries (raw values; the ingress
        encodes them for HTTP), from its manifest ``m``."""
        def acc(key):
            return "" if m.get(key) is None else f"{m[key]:.6f}"

        return {
            "X-Weightgen-Sha256": hashlib.sha256(body).hexdigest(),
            "X-Weightgen-Generator": m["generator"] or "", "X-Weightgen-Arch": m["arch"],
            "X-Weightgen-Dataset": m["dataset"], "X-Weightgen-Num-Classes": str(m["num_classes"]),
            "X-Weightgen-Input-Shape": json.dumps(m["input_shape"]), "X-Weightgen-Seed": str(m["seed"]),
            "X-Weightgen-Support-Accuracy": acc("support_accuracy"),
            "X-Weightgen-Predicted-Accuracy": acc("predicted_accuracy"),
            "X-Weightgen-Seconds": str(m["seconds"]), "X-Weightgen-Batch-Size": str(batch_size),
            # what the generator was not trained for (class count, input distribution): flagged, not hidden
            "X-Weightgen-Warnings": json.dumps([self._scrub(w) for w in m.get("warnings", [])]),
        }

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
                if req["generator"].startswith(BACKBONE_ID):  # a head on a stored backbone (its own caches)
                    out.append(await asyncio.to_thread(self._generate_backbone, req, len(reqs)))
                    continue
                loaded = await self.get_generator(req["generator"])  # load (or LRU-hit) through the multiplexer
                out.append(await asyncio.to_thread(self._generate_one, loaded, req, len(reqs)))
            except Exception as e:  # noqa: BLE001
                out.append(self._classify(e))
        return out

    def _task(self, req: dict):
        """The request's dataset as a TaskData, or an error when it asks for more work than allowed."""
        import numpy as np

        from weightgen.data import load_dataset
        from weightgen.data.files import task_from_arrays, task_from_npz

        a = self.args
        if req.get("npz") is not None:
            rows = npz_rows(req["npz"])  # from the arrays' headers: refused before they are loaded
            if rows > a.max_rows:
                return _err(*check_work(rows, 1, a.max_rows, a.max_classes, a.max_rows_x_classes))
            task = task_from_npz(f"upload:{req['upload_name']}", io.BytesIO(req["npz"]),
                                 max_bytes=req["max_array_bytes"], source="request")
        elif req.get("support"):
            x, y = np.asarray(req["support"]["x"], dtype=np.float64), np.asarray(req["support"]["y"])
            task = task_from_arrays("inline", x, y, source="request")
        elif req.get("dataset"):
            task = load_dataset(req["dataset"])
        else:
            return None  # an instruction alone: no data to bound
        too_much = check_work(len(task.y_train) + len(task.y_test), task.num_classes, a.max_rows, a.max_classes,
                              a.max_rows_x_classes)
        return _err(*too_much) if too_much else task

    def _generate_one(self, loaded, req: dict, batch_size: int) -> dict:
        from safetensors.torch import save

        from weightgen.sampling import sample
        from weightgen.support import SUPPORT_CAP

        task = self._task(req)
        if isinstance(task, dict):
            return task
        t0 = time.time()
        try:
            with deadline(req.get("deadline")):
                r = sample(req["arch"], task, generator=loaded, n=req["n"], select=req["select"],
                           seed=req["seed"], instruction=req.get("instruction"), novelty=req.get("novelty", True),
                           head=req.get("head", "fit"), support_per_class=req.get("support_per_class", SUPPORT_CAP),
                           text_encoder=req.get("text_encoder"))
        except RequestExpired:
            self.stopped += 1
            return _err(408, f"the request's timeout passed after {time.time() - t0:.1f} s of sampling; it was stopped")
        manifest = {k: v for k, v in r.manifest.items() if k != "seconds"}  # same request, same bytes
        meta = {"weightgen": self._scrub(json.dumps({**r.config, "manifest": manifest}, sort_keys=True))}
        body = save({k: v.contiguous() for k, v in r.state_dict.items()}, metadata=meta)
        m = r.manifest
        novelty = (m.get("novelty") or {}).get("ratio")
        headers = {**self._headers(body, m, batch_size),
                   "X-Weightgen-Novelty": "" if novelty is None else f"{novelty:.6f}",
                   "X-Weightgen-Zoo-Snapshot": str(m.get("zoo_snapshot"))}
        return {"body": body, "headers": headers}

    # ---------------------------------------------------------------- catalogue

    def archs(self) -> list[dict]:
        from weightgen.archs import ARCHS

        return [{"name": n, "description": ARCHS.get(n).description, "family": ARCHS.get(n).family,
                 "image_input": ARCHS.get(n).image_input} for n in ARCHS.names()]

    def generators(self) -> list[dict]:
        from weightgen.generators import trained_generators

        infos = [g.info() for g in trained_generators()]
        return infos if self.args.show_server_paths else [{k: v for k, v in g.items() if k != "zoo"} for g in infos]

    def zoo_query(self, arch: str | None, dataset: str | None, limit: int) -> dict:
        from zoo.store import open_zoo

        try:
            z = open_zoo(mode="r")
            recs = z.query(arch=arch, dataset=dataset, limit=limit)  # the page's records only (the index filters)
            total = z.count(arch=arch, dataset=dataset) if len(recs) == limit else len(recs)
        except Exception as e:  # noqa: BLE001
            return self._classify(e)
        if not self.args.show_server_paths:  # where a checkpoint was ingested from is the server's business
            recs = [{k: v for k, v in r.items() if k != "source"} for r in recs]
        return {"total": total, "records": recs}

    def zoo_checkpoint(self, ckpt_id: str) -> dict:
        from safetensors.torch import save

        from weightgen.archs import model_config
        from zoo.store import open_zoo

        try:
            zoo = open_zoo(mode="r")
            rec = zoo.get(ckpt_id)
            cfg = model_config(rec["arch"], rec["num_classes"], rec["input_shape"], dataset=rec["dataset"],
                               zoo_id=rec["id"])
            body = save(zoo.load(rec["id"]), metadata={"weightgen": self._scrub(json.dumps(cfg, sort_keys=True))})
        except Exception as e:  # noqa: BLE001
            return self._classify(e)
        return {"body": body, "headers": {"X-Weightgen-Sha256": hashlib.sha256(body).hexdigest(),
                                          "X-Weightgen-Zoo-Id": rec["id"], "X-Weightgen-Arch": rec["arch"]}}
