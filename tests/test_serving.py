"""The Ray Serve application over real HTTP: one Serve instance on 127.0.0.1 for the module."""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct

import pytest
import torch

pytestmark = pytest.mark.ray

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

DATASET = "digits:classes=0,1,2,3,4"
MAX_BODY = 1 << 20
MAX_UPLOAD = 2 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(ray_session, tiny_home):
    from ray import serve

    from serving.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"home": str(tiny_home), "torch_threads": 1, "max_body_bytes": MAX_BODY,
                             "max_upload_bytes": MAX_UPLOAD}),
                  name="weightgen", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def _metadata(body: bytes) -> dict:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8:8 + n]).get("__metadata__", {})


def _check_weights(r, num_classes: int = 5) -> dict:
    from safetensors.torch import load

    from weightgen import build_model

    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-weightgen-sha256"]
    sd = load(r.content)
    build_model("mlp-s", num_classes, (64,)).load_state_dict(sd, strict=True)
    meta = json.loads(_metadata(r.content)["weightgen"])
    assert meta["arch"] == "mlp-s" and meta["num_classes"] == num_classes
    assert meta["manifest"]["generator"] == r.headers["x-weightgen-generator"]
    assert 0.0 <= float(r.headers["x-weightgen-support-accuracy"]) <= 1.0
    return meta


def _support_rows(per_class: int = 15) -> dict:
    from weightgen.data import load_dataset

    task = load_dataset(DATASET)
    idx = torch.cat([(task.y_train == c).nonzero().flatten()[:per_class] for c in range(task.num_classes)])
    return {"x": task.x_train[idx].tolist(), "y": task.y_train[idx].tolist()}


def test_generate_registry_dataset(client):
    r = client.post("/v1/generate", json={"arch": "mlp-s", "dataset": DATASET, "n": 4, "seed": 1,
                                          "generator": "d2nwg-tiny"})
    meta = _check_weights(r)
    assert r.headers["x-weightgen-generator"] == "d2nwg-tiny"
    assert meta["manifest"]["dataset"] == DATASET and "novelty" in meta["manifest"]
    again = client.post("/v1/generate", json={"arch": "mlp-s", "dataset": DATASET, "n": 4, "seed": 1,
                                              "generator": "d2nwg-tiny"})
    assert again.content == r.content  # same request, same bytes (no timestamps in the file)


def test_generate_inline_support(client):
    r = client.post("/v1/generate", json={"arch": "mlp-s", "support": _support_rows(), "n": 4,
                                          "generator": "hypernet-tiny", "novelty": False})
    meta = _check_weights(r)
    assert meta["manifest"]["dataset"] == "inline" and r.headers["x-weightgen-generator"] == "hypernet-tiny"


def test_concurrent_requests_are_batched(base_url):
    """Concurrent requests share @serve.batch batches, and a request's bytes do not depend on
    which batch served it. Batches form only when requests queue behind a running one (the
    batch does not wait), so the burst is repeated until that happens."""
    async def burst():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as c:
            bodies = [{"arch": "mlp-s", "dataset": DATASET, "n": 8, "seed": i % 4, "novelty": False} for i in range(16)]
            return await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))

    sizes = []
    for _ in range(5):
        rs = asyncio.run(burst())
        for r in rs:
            _check_weights(r)
        for i in range(12):  # same seed, same bytes, whichever batch served it
            assert rs[i].headers["x-weightgen-sha256"] == rs[i + 4].headers["x-weightgen-sha256"]
        sizes = [int(r.headers["x-weightgen-batch-size"]) for r in rs]
        if max(sizes) > 1:
            break
    assert max(sizes) > 1, sizes


def _chunked(total: int):
    for _ in range(total // 65536 + 1):
        yield b" " * 65536


OK = {"arch": "mlp-s", "dataset": DATASET, "n": 2, "novelty": False}
SUPPORT_BAD_LABELS = {"x": [[0.0] * 64] * 4, "y": [0, 1, 0]}
SUPPORT_GAP = {"x": [[0.0] * 64] * 4, "y": [0, 2, 0, 2]}


@pytest.mark.parametrize("case,kwargs,status", [
    ("unknown arch", {"json": {**OK, "arch": "nope"}}, 404),
    ("empty dataset name", {"json": {**OK, "dataset": ""}}, 422),  # found by schemathesis: was a 500
    ("unknown generator", {"json": {**OK, "generator": "nope"}}, 404),
    ("generator as a path", {"json": {**OK, "generator": "/etc"}}, 404),
    ("unknown dataset kind", {"json": {**OK, "dataset": "nosuch:x"}}, 404),
    ("bad dataset args", {"json": {**OK, "dataset": "digits:classes=a,b"}}, 422),
    ("server-side file dataset", {"json": {**OK, "dataset": "npz:/etc/passwd"}}, 422),
    ("malformed JSON", {"content": b'{"arch": "mlp-s", ', "headers": {"content-type": "application/json"}}, 422),
    ("not an object", {"json": [1, 2]}, 422),
    ("missing arch", {"json": {"dataset": DATASET}}, 422),
    ("extra field", {"json": {**OK, "bogus": 1}}, 422),
    ("dataset and support", {"json": {**OK, "support": SUPPORT_GAP}}, 422),
    ("neither dataset nor support", {"json": {"arch": "mlp-s"}}, 422),
    ("labels not matching inputs", {"json": {"arch": "mlp-s", "support": SUPPORT_BAD_LABELS}}, 422),
    ("labels with a gap", {"json": {"arch": "mlp-s", "support": SUPPORT_GAP}}, 422),
    ("ragged rows", {"json": {"arch": "mlp-s", "support": {"x": [[0.0] * 64, [0.0] * 63], "y": [0, 1]}}}, 422),
    ("NaN input", {"content": b'{"arch": "mlp-s", "support": {"x": [[NaN, 1.0], [1.0, 2.0]], "y": [0, 1]}}'}, 422),
    ("Inf input", {"content": b'{"arch": "mlp-s", "support": {"x": [[Infinity, 1.0], [1.0, 2.0]], "y": [0, 1]}}'}, 422),
    ("float32 overflow", {"json": {"arch": "mlp-s", "n": 1, "support": {"x": [[1e39] * 64] * 4, "y": [0, 1, 0, 1]}}}, 422),
    ("n above max", {"json": {**OK, "n": 33}}, 422),
    ("n zero", {"json": {**OK, "n": 0}}, 422),
    ("bad select", {"json": {**OK, "select": "worst"}}, 422),
    ("no generator for the shape", {"json": {"arch": "mlp-s", "n": 1, "support": {"x": [[0.0] * 10] * 4, "y": [0, 1, 0, 1]}}}, 404),
    ("no generator for the arch", {"json": {**OK, "arch": "mlp-m"}}, 404),
    ("named generator, other arch", {"json": {**OK, "arch": "mlp-m", "generator": "d2nwg-tiny"}}, 422),
    ("server-side directory", {"json": {**OK, "dataset": "mnist:dir=/etc"}}, 422),
    ("download over HTTP", {"json": {**OK, "dataset": "cifar10:download=1"}}, 422),
    ("deeply nested JSON", {"content": b"[" * 100_000}, 422),
    ("a huge label", {"json": {"arch": "mlp-s", "n": 1, "support": {"x": [[0.0] * 64] * 2, "y": [0, 2**62]}}}, 422),
    ("body over the limit", {"content": b" " * (MAX_BODY + 1), "headers": {"content-type": "application/json"}}, 413),
    ("chunked body over the limit", {"chunked": MAX_BODY + 1}, 413),
])
def test_bad_requests_are_4xx_json(client, case, kwargs, status):
    if "chunked" in kwargs:  # a generator body: no Content-Length, sent chunked
        kwargs = {"content": _chunked(kwargs["chunked"])}
    if "content" in kwargs:
        kwargs.setdefault("headers", {"content-type": "application/json"})
    r = client.post("/v1/generate", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"], case
    assert client.get("/healthz").json() == {"status": "ok"}


def test_other_class_count(client):
    """The tiny generators were trained on 5-class tasks; a 10-class request still gets loadable weights."""
    r = client.post("/v1/generate", json={**OK, "dataset": "digits"})
    _check_weights(r, num_classes=10)


def test_catalogue(client):
    archs = client.get("/v1/archs").json()
    assert "mlp-s" in [a["name"] for a in archs]
    gens = {g["name"]: g for g in client.get("/v1/generators").json()}
    assert {"d2nwg-tiny", "hypernet-tiny"} <= set(gens) and gens["d2nwg-tiny"]["arch"] == "mlp-s"
    assert client.get("/healthz").json() == {"status": "ok"}


def test_zoo_endpoints(client):
    from safetensors.torch import load

    from weightgen import build_model
    from zoo.store import checkpoint_id

    page = client.get("/v1/zoo", params={"arch": "mlp-s", "limit": 3}).json()
    assert page["total"] >= 3 and len(page["records"]) == 3
    one = page["records"][0]
    ds = client.get("/v1/zoo", params={"dataset": one["dataset"]}).json()
    assert ds["total"] >= 1 and all(r["dataset"] == one["dataset"] for r in ds["records"])
    r = client.get(f"/v1/zoo/{one['id']}")
    assert r.status_code == 200 and r.headers["x-weightgen-zoo-id"] == one["id"]
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-weightgen-sha256"]
    sd = load(r.content)
    assert checkpoint_id(sd) == one["id"]  # bit-exact
    build_model(one["arch"], one["num_classes"], one["input_shape"]).load_state_dict(sd, strict=True)
    assert json.loads(_metadata(r.content)["weightgen"])["zoo_id"] == one["id"]
    for bad, status in [("/v1/zoo/0000000000000000", 404), ("/v1/zoo?limit=abc", 422), ("/v1/zoo?limit=0", 422),
                        ("/v1/nope", 404)]:
        b = client.get(bad)
        assert b.status_code == status and b.json()["error"], (bad, b.text)


# ---------------------------------------------------------------- .npz uploads (multipart)


def _npz(**arrays) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _upload(client, data: bytes | None, request: dict | str | None = None, name: str = "mine.npz"):
    fields = {} if request is None else {"request": request if isinstance(request, str) else json.dumps(request)}
    files = None if data is None else {"data": (name, data, "application/octet-stream")}
    return client.post("/v1/generate", data=fields, files=files)


def test_upload_npz_dataset(client):
    """A whole training set (not just a support set) as an .npz: weights load, and the predicted
    accuracy is measured on the uploaded examples that did not condition or select them."""
    from weightgen.data import load_dataset

    task = load_dataset(DATASET)
    data = _npz(x=task.x_train.numpy(), y=task.y_train.numpy(), x_test=task.x_test.numpy(), y_test=task.y_test.numpy())
    r = _upload(client, data, {"arch": "mlp-s", "n": 4, "seed": 2, "generator": "d2nwg-tiny"}, name="my digits!.npz")
    meta = _check_weights(r)
    m = meta["manifest"]
    assert m["dataset"] == "upload:my_digits_.npz" and m["predicted_accuracy"] is not None
    assert m["support_size"] < len(task.y_train)
    assert r.headers["x-weightgen-dataset"] == "upload:my_digits_.npz"


@pytest.mark.parametrize("case,data,request_part,status", [
    ("no file part", None, {"arch": "mlp-s"}, 422),
    ("no request part", "ok", None, 422),
    ("request part not JSON", "ok", "{arch", 422),
    ("request part also names a dataset", "ok", {"arch": "mlp-s", "dataset": DATASET}, 422),
    ("not a zip", b"definitely not an npz", {"arch": "mlp-s"}, 422),
    ("no x array", "no-x", {"arch": "mlp-s"}, 422),
    ("object arrays (pickles)", "pickle", {"arch": "mlp-s"}, 422),
    ("labels not matching rows", "short-y", {"arch": "mlp-s"}, 422),
    ("NaN in x", "nan", {"arch": "mlp-s"}, 422),
    ("decompression bomb", "bomb", {"arch": "mlp-s"}, 422),
    ("upload over the limit", "big", {"arch": "mlp-s"}, 413),
    ("unknown arch", "ok", {"arch": "nope"}, 404),
])
def test_bad_uploads_are_4xx_json(client, case, data, request_part, status):
    import numpy as np

    x, y = np.random.default_rng(0).random((40, 64), dtype=np.float32), np.arange(40) % 4
    data = {
        "ok": lambda: _npz(x=x, y=y), "no-x": lambda: _npz(y=y), "short-y": lambda: _npz(x=x, y=y[:-1]),
        "pickle": lambda: _pickled_npz(), "nan": lambda: _npz(x=np.where(x > 0.9, np.nan, x), y=y),
        "bomb": lambda: _npz(x=np.zeros((4 * MAX_UPLOAD // 256 + 1, 64), np.float32), y=np.zeros(4 * MAX_UPLOAD // 256 + 1, np.int64)),
        "big": lambda: np.random.default_rng(1).bytes(MAX_UPLOAD + 1),
    }.get(data, lambda: data)() if isinstance(data, str) else data
    r = _upload(client, data, request_part)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"], case
    assert client.get("/healthz").json() == {"status": "ok"}


def _pickled_npz() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    return buf.getvalue()


# ---------------------------------------------------------------- timeouts, metrics, schema


def test_request_past_its_timeout_is_408(client):
    r = client.post("/v1/generate", json={**OK, "timeout_s": 1e-4})
    assert r.status_code == 408 and "timeout" in r.json()["error"]
    assert client.post("/v1/generate", json={**OK, "timeout_s": 0}).status_code == 422
    _check_weights(client.post("/v1/generate", json=OK))  # and the next request is served


def test_metrics_count_requests(client):
    before = _metric(client, "weightgen_models_generated_total", 'arch="mlp-s"')
    _check_weights(client.post("/v1/generate", json=OK))
    client.post("/v1/generate", json={**OK, "arch": "nope"})
    text = client.get("/metrics").text
    assert _metric(client, "weightgen_models_generated_total", 'arch="mlp-s"') == before + 1
    assert 'route="/v1/generate",status="200"' in text and 'route="/v1/generate",status="404"' in text
    assert "weightgen_http_request_seconds_bucket" in text
    client.get("/no/such/path/12345")
    assert "/no/such/path" not in client.get("/metrics").text  # unmatched paths share one label


def _metric(client, name: str, label: str) -> float:
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(name) and label in ln]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


@pytest.fixture(scope="module")
def api_schema(base_url):
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_fuzz_never_5xx(case, base_url):
    """Schemathesis drives every route with schema-shaped (and schema-breaking) input: never a 5xx."""
    from schemathesis.checks import not_a_server_error

    case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=120)


# ---------------------------------------------------------------- more generators than a replica keeps loaded


def test_more_generators_than_the_multiplexer_holds(client, tiny_home):
    """A replica keeps 4 generators (LRU); a fifth evicts one, and asking for the evicted one
    again reloads it and gives the same bytes as before."""
    import shutil

    from serving.app import MAX_MODELS_PER_REPLICA

    gens = tiny_home / "generators"
    names = [f"d2nwg-tiny-copy{i}" for i in range(MAX_MODELS_PER_REPLICA)]
    try:
        for name in names:
            shutil.copytree(gens / "d2nwg-tiny", gens / name)
        body = {**OK, "seed": 3}
        first = client.post("/v1/generate", json={**body, "generator": "d2nwg-tiny"})
        _check_weights(first)
        for name in names:  # 1 + 4 distinct generators through a 4-slot LRU
            r = client.post("/v1/generate", json={**body, "generator": name})
            assert r.status_code == 200 and r.headers["x-weightgen-generator"] == name, r.text
        again = client.post("/v1/generate", json={**body, "generator": "d2nwg-tiny"})
        assert again.status_code == 200 and again.content == first.content
    finally:
        for name in names:
            shutil.rmtree(gens / name, ignore_errors=True)


# ---------------------------------------------------------------- a replica dies under load (last: it restarts one)


def _replica_pids() -> set[int]:
    import psutil

    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:weightgen:GeneratorDeployment" in cmd:
            out.add(p.pid)
    return out


def test_replica_killed_under_load_recovers(base_url):
    import os
    import signal
    import time

    (pid,) = _replica_pids()

    async def load(stop_at: float, statuses: list, after_kill: list, killed: list):
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as c:
            while time.monotonic() < stop_at and not (killed and len(after_kill) >= 3):
                r = await c.post("/v1/generate", json={**OK, "n": 1})
                statuses.append(r.status_code)
                if killed and r.status_code == 200 and time.monotonic() > killed[0]:
                    after_kill.append(r)

    async def go():
        statuses, after_kill, killed = [], [], []
        stop_at = time.monotonic() + 120
        tasks = [asyncio.create_task(load(stop_at, statuses, after_kill, killed)) for _ in range(4)]
        while len(statuses) < 8:
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        killed.append(time.monotonic())
        await asyncio.gather(*tasks)
        return statuses, after_kill

    statuses, after_kill = asyncio.run(go())
    assert set(statuses) <= {200, 503}, statuses  # a dead replica is "retry later", never a 500
    assert len(after_kill) >= 3, "no successful request after the replica was killed"
    for r in after_kill:
        _check_weights(r)
    new = _replica_pids()
    assert new and pid not in new
