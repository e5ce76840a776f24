"""The Ray Serve application over real HTTP: one Serve instance on 127.0.0.1 for the module.

It serves its own copy of the tiny home (``serve_home``): tests here add generators or edit a zoo
record and undo it; nothing session-wide is written. Each guard test asserts the message of the
guard it names (.ci/guards/serving.yaml shows each failing with its guard removed)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import struct
from pathlib import Path
from urllib.parse import unquote

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import schemathesis
from conftest import reserved_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
DATASET = "digits:classes=0,1,2,3,4"
MAX_BODY = 1 << 20
MAX_UPLOAD = 2 << 20
# This module's limits. Classes and rows are far above the production defaults (100 classes) so
# that one request can be slow: HEAVY classes sample for ~50 s on 2 shared cores, ~4 s per layer call.
SERVE_ARGS = dict(torch_threads=1, max_body_bytes=MAX_BODY, max_upload_bytes=MAX_UPLOAD,
                  max_inflight_json_bytes=2 * MAX_BODY, request_timeout_s=8.0, body_grace_s=3.0,
                  max_classes=3000, max_rows=3000, max_rows_x_classes=7_000_000)
HEAVY = 2500


@pytest.fixture(scope="module")
def serve_home(tiny_home, tmp_path_factory):
    home = tmp_path_factory.mktemp("serve_home")
    shutil.copytree(tiny_home, home, dirs_exist_ok=True)
    return home


@pytest.fixture(scope="module")
def base_url(ray_session, serve_home):
    from ray import serve

    from serving.app import build_app

    with reserved_port() as port:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build_app({"home": str(serve_home), **SERVE_ARGS}), name="weightgen", route_prefix="/",
                      blocking=False)
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def replica(base_url):
    """A handle on the generator deployment (one replica), found through Serve."""
    from ray import serve

    handle = serve.get_deployment_handle("GeneratorDeployment", app_name="weightgen")
    assert handle.info.remote().result()["code"] == str(ROOT / "serving" / "generator.py")  # this checkout's code
    return handle


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def metadata(body: bytes) -> dict:
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8:8 + n]).get("__metadata__", {})


def accuracy(sd: dict, num_classes: int, x: torch.Tensor, y: torch.Tensor) -> float:
    from weightgen import build_model, get_arch

    model = build_model("mlp-s", num_classes, tuple(x.shape[1:]))
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return float((get_arch("mlp-s").logits(model, x).argmax(-1) == y).float().mean())


def check_weights(r, num_classes: int = 5, task=None) -> dict:
    """A 200 with loadable weights; with the request's ``task``, its support accuracy recomputed."""
    from safetensors.torch import load

    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(r.content).hexdigest() == r.headers["x-weightgen-sha256"]
    sd = load(r.content)
    meta = json.loads(metadata(r.content)["weightgen"])
    m = meta["manifest"]
    assert meta["arch"] == "mlp-s" and meta["num_classes"] == num_classes
    assert m["generator"] == r.headers["x-weightgen-generator"]
    assert float(r.headers["x-weightgen-support-accuracy"]) == pytest.approx(m["support_accuracy"], abs=1e-6)
    if task is not None:  # the accuracy it reports is the accuracy of these weights on that support set
        from weightgen.support import split_user_data

        split = split_user_data(task.x_train, task.y_train, num_classes, m["support_per_class"], m["seed"])
        assert m["support_accuracy"] == pytest.approx(accuracy(sd, num_classes, split.x, split.y), abs=1e-6)
        if m["predicted_accuracy"] is not None:
            assert m["predicted_accuracy"] == pytest.approx(accuracy(sd, num_classes, split.x_est, split.y_est), abs=1e-6)
    return meta


def registry_task():
    from weightgen.data import load_dataset

    return load_dataset(DATASET)


def support_rows(per_class: int = 15) -> dict:
    task = registry_task()
    idx = torch.cat([(task.y_train == c).nonzero().flatten()[:per_class] for c in range(task.num_classes)])
    return {"x": task.x_train[idx].tolist(), "y": task.y_train[idx].tolist()}


def test_generate_registry_dataset(client):
    r = client.post("/v1/generate", json={"arch": "mlp-s", "dataset": DATASET, "n": 4, "seed": 1,
                                          "generator": "d2nwg-tiny"})
    meta = check_weights(r, task=registry_task())
    assert r.headers["x-weightgen-generator"] == "d2nwg-tiny"
    assert meta["manifest"]["dataset"] == DATASET and "novelty" in meta["manifest"]
    again = client.post("/v1/generate", json={"arch": "mlp-s", "dataset": DATASET, "n": 4, "seed": 1,
                                              "generator": "d2nwg-tiny"})
    assert again.content == r.content  # same request, same bytes (no timestamps in the file)


def test_generate_inline_support(client):
    from weightgen.data.files import task_from_arrays

    rows = support_rows()
    r = client.post("/v1/generate", json={"arch": "mlp-s", "support": rows, "n": 4,
                                          "generator": "hypernet-tiny", "novelty": False})
    meta = check_weights(r, task=task_from_arrays("inline", np.array(rows["x"]), np.array(rows["y"])))
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
            check_weights(r)
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
    ("malformed JSON", {"content": b'{"arch": "mlp-s", ', "headers": {"content-type": "application/json"}}, 422),
    ("not an object", {"json": [1, 2]}, 422),
    ("missing arch", {"json": {"dataset": DATASET}}, 422),
    ("extra field", {"json": {**OK, "bogus": 1}}, 422),
    ("dataset and support", {"json": {**OK, "support": SUPPORT_GAP}}, 422),
    ("neither dataset nor support", {"json": {"arch": "mlp-s"}}, 422),
    ("labels not matching inputs", {"json": {"arch": "mlp-s", "support": SUPPORT_BAD_LABELS}}, 422),
    ("labels with a gap", {"json": {"arch": "mlp-s", "support": SUPPORT_GAP}}, 422),
    ("ragged rows", {"json": {"arch": "mlp-s", "support": {"x": [[0.0] * 64, [0.0] * 63], "y": [0, 1]}}}, 422),
    ("strings as features", {"json": {"arch": "mlp-s", "support": {"x": [["1"] * 64] * 2, "y": [0, 1]}}}, 422),
    ("float labels", {"json": {"arch": "mlp-s", "support": {"x": [[0.0] * 64] * 2, "y": [0.5, 1]}}}, 422),
    ("NaN input", {"content": b'{"arch": "mlp-s", "support": {"x": [[NaN, 1.0], [1.0, 2.0]], "y": [0, 1]}}'}, 422),
    ("Inf input", {"content": b'{"arch": "mlp-s", "support": {"x": [[Infinity, 1.0], [1.0, 2.0]], "y": [0, 1]}}'}, 422),
    ("float32 overflow", {"json": {"arch": "mlp-s", "n": 1, "support": {"x": [[1e39] * 64] * 4, "y": [0, 1, 0, 1]}}}, 422),
    ("n above max", {"json": {**OK, "n": 33}}, 422),
    ("n zero", {"json": {**OK, "n": 0}}, 422),
    ("bad select", {"json": {**OK, "select": "worst"}}, 422),
    ("no generator for the shape", {"json": {"arch": "mlp-s", "n": 1, "support": {"x": [[0.0] * 10] * 4, "y": [0, 1, 0, 1]}}}, 404),
    ("no generator for the arch", {"json": {**OK, "arch": "mlp-m"}}, 404),
    ("named generator, other arch", {"json": {**OK, "arch": "mlp-m", "generator": "d2nwg-tiny"}}, 422),
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


def test_no_generator_for_an_arch_says_what_exists(client):
    """Issue 8: the 404 named the server's generators directory and gave CLI advice."""
    err = client.post("/v1/generate", json={**OK, "arch": "mlp-m"}).json()["error"]
    assert "mlp-s for input shape (64,)" in err and "/v1/generators" in err
    assert "weightgen " not in err and "/" not in err.replace("/v1/generators", "")


def test_vit_s_is_the_whole_model_or_just_the_generated_part(client, serve_home):
    """Issue 10: `arch: vit-s` returns the whole model (backbone + head) a transformers class loads,
    and with `parts: "task"` only the generated tensors, the backbone named in a header."""
    from safetensors.torch import load
    from test_backbones import NAMES, tiny_vit, write_cifar
    from transformers import ViTForImageClassification

    from weightgen.backbones import add_from_source
    from zoo import open_zoo

    # the replica's data directory is its home's data/ ($WEIGHTGEN_DATA unset when Ray started)
    write_cifar(serve_home / "data")
    bid, _ = add_from_source(open_zoo(str(serve_home / "zoo")), str(tiny_vit(serve_home / "vit-src")), "vit-s")
    try:
        req = {"arch": "vit-s", "dataset": "cifar10", "n": 2, "support_per_class": 8}
        whole = client.post("/v1/generate", json=req)
        assert whole.status_code == 200, whole.text
        h = whole.headers
        assert h["x-weightgen-backbone"] == bid and h["x-weightgen-parts"] == "all" and h["x-weightgen-head"] == "closed_form"
        meta = json.loads(metadata(whole.content)["weightgen"])
        assert meta["config"]["id2label"] == {str(i): n for i, n in enumerate(NAMES)}
        sd = load(whole.content)
        folder = serve_home / "vit-http"  # what a client does with the response: a folder transformers loads
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(whole.content)
        (folder / "config.json").write_text(json.dumps(meta["config"]))
        model = ViTForImageClassification.from_pretrained(str(folder))
        assert torch.equal(model.classifier.weight.detach(), sd["classifier.weight"])
        assert model(pixel_values=torch.zeros(1, 3, 32, 32)).logits.shape == (1, len(NAMES))
        assert meta["preprocessor_config"]["image_mean"] == [0.5, 0.5, 0.5] and meta["manifest"]["backbone"]["id"] == bid

        task = client.post("/v1/generate", json={**req, "parts": "task", "backbone": bid[:12]})
        assert task.status_code == 200, task.text
        part = load(task.content)
        assert sorted(part) == ["classifier.bias", "classifier.weight"] and len(task.content) < len(whole.content) / 20
        assert all(torch.equal(part[k], sd[k]) for k in part), "the same request's head, bit for bit"
        assert task.headers["x-weightgen-parts"] == "task" and task.headers["x-weightgen-backbone"] == bid

        inline = client.post("/v1/generate", json={"arch": "vit-s", "support": support_rows(2)})
        assert inline.status_code == 422 and "stored backbone" in inline.json()["error"]
        missing = client.post("/v1/generate", json={**req, "backbone": "deadbeef"})
        assert missing.status_code == 404 and "/" not in missing.json()["error"]
    finally:
        shutil.rmtree(serve_home / "zoo" / "backbones", ignore_errors=True)


def test_other_class_count(client):
    """The tiny generators were trained on 5-class tasks; a 10-class request still gets loadable
    weights, and is flagged (manifest and header) as a request the generator was not trained for."""
    r = client.post("/v1/generate", json={**OK, "dataset": "digits"})
    warnings = check_weights(r, num_classes=10)["manifest"]["warnings"]
    assert any("10 classes requested" in w for w in warnings)
    assert json.loads(unquote(r.headers["x-weightgen-warnings"])) == warnings


def test_request_options_reach_the_sampler(client):
    """head, support_per_class: the same options as the CLI, with the same manifest."""
    base = {**OK, "generator": "d2nwg-tiny", "seed": 3}
    fit = client.post("/v1/generate", json={**base, "head": "fit", "support_per_class": 3})
    m = check_weights(fit, task=registry_task())["manifest"]
    assert m["head"] == "fit" and m["closed_form"] and m["support_per_class"] == 3 and m["support_size"] == 15
    gen = client.post("/v1/generate", json={**base, "head": "generated", "support_per_class": 3})
    g = check_weights(gen, task=registry_task())["manifest"]
    assert g["head"] == "generated" and g["closed_form"] == {} and gen.content != fit.content
    for bad in [{"head": "ridge"}, {"support_per_class": 0}, {"support_per_class": 10**6}]:
        r = client.post("/v1/generate", json={**base, **bad})
        assert r.status_code == 422 and r.json()["error"], (bad, r.text)


def test_instruction_alone(client, serve_home):
    """No data: a generator that reads text makes weights for the classes the instruction names;
    no accuracy is claimed, and the manifest and headers say so. Another text encoder goes through
    an XBT projection once one is fitted (before: a 422 saying how to fit one)."""
    from safetensors.torch import load

    req = {"arch": "mlp-s", "instruction": "classify handwritten 2, 7 and 9", "n": 2, "novelty": False}
    r = client.post("/v1/generate", json=req)
    assert r.status_code == 200, r.text
    m = json.loads(metadata(r.content)["weightgen"])["manifest"]
    assert r.headers["x-weightgen-generator"] == "igpg-tiny" and m["num_classes"] == 3
    assert m["support"]["source"] == "class memory" and m["head_used"] == "fit"  # declared, as from the CLI
    assert r.headers["x-weightgen-predicted-accuracy"] == "" and r.headers["x-weightgen-support-accuracy"] == ""
    assert any("no data was given" in w for w in json.loads(unquote(r.headers["x-weightgen-warnings"])))
    from weightgen import build_model

    build_model("mlp-s", 3, (64,)).load_state_dict(load(r.content), strict=True)
    for bad, status, says in [({"instruction": "make it good"}, 422, "class"),
                              ({"generator": "d2nwg-tiny"}, 404, "instructions"),
                              ({"text_encoder": "paraphrase-minilm-l3"}, 422, "projection"),
                              ({"text_encoder": "no-such-encoder"}, 404, "no-such-encoder")]:
        e = client.post("/v1/generate", json={**req, **bad})
        assert e.status_code == status and says in json.dumps(e.json()), (bad, e.status_code, e.text)
    from weightgen.xbt import fit

    fit("minilm-l6", "paraphrase-minilm-l3", serve_home / "xbt" / "paraphrase-minilm-l3__to__minilm-l6", steps=30,
        tasks=10, max_sentences=20, show_progress=False)  # where the replicas look: their home's xbt/
    p = client.post("/v1/generate", json={**req, "text_encoder": "paraphrase-minilm-l3"})
    assert p.status_code == 200, p.text
    text = json.loads(metadata(p.content)["weightgen"])["manifest"]["conditions"]["text"]
    assert text["text_encoder"]["name"] == "paraphrase-minilm-l3"
    assert text["projection"]["from"] == "paraphrase-minilm-l3" and text["projection"]["to"] == "minilm-l6"


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
    assert json.loads(metadata(r.content)["weightgen"])["zoo_id"] == one["id"]
    for bad, status in [("/v1/zoo/0000000000000000", 404), ("/v1/zoo?limit=abc", 422), ("/v1/zoo?limit=0", 422),
                        ("/v1/nope", 404)]:
        b = client.get(bad)
        assert b.status_code == status and b.json()["error"], (bad, b.text)


# ---------------------------------------------------------------- .npz uploads (multipart)


def npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def upload(client, data: bytes | None, request: dict | str | None = None, name: str = "mine.npz"):
    """A multipart upload; either part may be left out (it is multipart all the same)."""
    parts = {} if request is None else {"request": (None, request if isinstance(request, str) else json.dumps(request))}
    if data is not None:
        parts["data"] = (name, data, "application/octet-stream")
    return client.post("/v1/generate", files=parts)


def test_upload_npz_dataset(client):
    """A whole training set as an .npz: the weights load, their support accuracy is what the
    header says, the predicted accuracy is their accuracy on the uploaded train examples outside
    the support set, and novelty names a real zoo checkpoint with its real accuracy."""
    from safetensors.torch import load

    from weightgen.data.files import task_from_arrays

    t = registry_task()
    data = npz(x=t.x_train.numpy(), y=t.y_train.numpy(), x_test=t.x_test.numpy(), y_test=t.y_test.numpy())
    r = upload(client, data, {"arch": "mlp-s", "n": 4, "seed": 2, "generator": "d2nwg-tiny"}, name="my digits!.npz")
    task = task_from_arrays("upload", t.x_train.numpy(), t.y_train.numpy(), t.x_test.numpy(), t.y_test.numpy())
    m = check_weights(r, task=task)["manifest"]
    assert m["dataset"] == "upload:my_digits_.npz" and r.headers["x-weightgen-dataset"] == "upload:my_digits_.npz"
    from weightgen.support import split_user_data

    sd = load(r.content)
    split = split_user_data(task.x_train, task.y_train, 5, m["support_per_class"], m["seed"])
    assert 0 < len(split.y_est) and m["support_size"] == len(split.y)
    predicted = accuracy(sd, 5, split.x_est, split.y_est)
    assert m["predicted_accuracy"] == pytest.approx(predicted, abs=1e-6)
    assert float(r.headers["x-weightgen-predicted-accuracy"]) == pytest.approx(predicted, abs=1e-6)
    nov = m["novelty"]
    assert nov["ratio"] == pytest.approx(nov["distance_to_nearest"] / nov["zoo_nn_distance"], rel=1e-6)
    assert float(r.headers["x-weightgen-novelty"]) == pytest.approx(nov["ratio"], abs=1e-6)
    near = client.get(f"/v1/zoo/{nov['nearest_zoo_id']}")
    assert near.status_code == 200  # a real zoo checkpoint, with the accuracy novelty reports for it
    assert nov["nearest_zoo_accuracy"] == pytest.approx(accuracy(load(near.content), 5, task.x_test, task.y_test),
                                                        abs=1e-6)


def header_only_npz(rows: int) -> bytes:
    """An .npz whose x header says ``rows`` rows but holds one: loading it fails, reading its header does not."""
    import io
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (rows, 64)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", head.getvalue() + np.zeros(64, np.float32).tobytes())
        y = io.BytesIO()
        np.save(y, np.arange(rows) % 4)
        z.writestr("y.npy", y.getvalue())
    return buf.getvalue()


class Executes:
    """Unpickling this runs os.makedirs(path): a stand-in for any code an upload could smuggle in."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.makedirs, (self.path,)


def pickled_npz(marker) -> bytes:
    import io

    buf = io.BytesIO()
    x = np.empty((40, 64), dtype=object)
    x[:] = Executes(marker)
    np.savez(buf, x=x, y=np.arange(40) % 4)
    return buf.getvalue()


@pytest.mark.parametrize("case,data,request_part,status,says", [
    ("no file part", None, {"arch": "mlp-s"}, 422, "multipart upload needs"),
    ("no request part", "ok", None, 422, "multipart upload needs"),
    ("request part not JSON", "ok", "{arch", 422, "malformed JSON"),
    ("request part also names a dataset", "ok", {"arch": "mlp-s", "dataset": DATASET}, 422, "must not also give"),
    ("not a zip", b"definitely not an npz", {"arch": "mlp-s"}, 422, "not a readable .npz"),
    ("no x array", "no-x", {"arch": "mlp-s"}, 422, "no array 'x'"),
    ("object arrays (pickles)", "pickle", {"arch": "mlp-s"}, 422, "allow_pickle=False"),
    ("labels not matching rows", "short-y", {"arch": "mlp-s"}, 422, "y must have shape"),
    ("NaN in x", "nan", {"arch": "mlp-s"}, 422, "NaN or Inf"),
    ("decompression bomb", "bomb", {"arch": "mlp-s"}, 422, "bytes uncompressed, over the"),
    ("upload over the limit", "big", {"arch": "mlp-s"}, 413, "over"),
    ("more rows than the server takes", "rows", {"arch": "mlp-s"}, 413, "(max_rows)"),
    ("more rows, refused from the header before loading", "header-rows", {"arch": "mlp-s"}, 413, "(max_rows)"),
    ("rows x classes over the limit", "rows-x-classes", {"arch": "mlp-s", "n": 1}, 413, "(max_rows_x_classes)"),
    ("unknown arch", "ok", {"arch": "nope"}, 404, "Unknown arch"),
])
def test_bad_uploads_are_4xx_json(client, serve_home, case, data, request_part, status, says):
    """Each case is refused by the guard it names (the message says which)."""
    x, y = np.random.default_rng(0).random((40, 64), dtype=np.float32), np.arange(40) % 4
    marker = serve_home / "unpickled"
    bomb = np.zeros(MAX_UPLOAD + 1, np.float32)  # another array: a few kB compressed, past 4x the upload limit inflated
    data = {
        "ok": lambda: npz(x=x, y=y), "no-x": lambda: npz(y=y), "short-y": lambda: npz(x=x, y=y[:-1]),
        "pickle": lambda: pickled_npz(marker), "nan": lambda: npz(x=np.where(x > 0.9, np.nan, x), y=y),
        "bomb": lambda: npz(x=x, y=y, z=bomb),
        "big": lambda: np.random.default_rng(1).bytes(MAX_UPLOAD + 1),
        "rows": lambda: npz(x=np.zeros((SERVE_ARGS["max_rows"] + 1, 64), np.float32), y=np.arange(3001) % 4),
        "header-rows": lambda: header_only_npz(SERVE_ARGS["max_rows"] + 1),
        "rows-x-classes": lambda: npz(x=np.zeros((2700, 64), np.float32), y=np.arange(2700)),
    }.get(data, lambda: data)() if isinstance(data, str) else data
    r = upload(client, data, request_part)
    assert r.status_code == status, (case, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json") and says in r.json()["error"], (case, r.text)
    assert not marker.exists()  # nothing was unpickled
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("kind", ["npz", "folder", "dir=", "download="])
def test_server_side_datasets_are_refused(client, serve_home, tmp_path, kind):
    """Datasets that would read the server's files are refused as such, even when the file exists
    and is a valid dataset (npz:/etc/passwd was refused only because it is not an .npz)."""
    from PIL import Image

    t = registry_task()
    if kind == "npz":
        (serve_home / "data").mkdir(exist_ok=True)
        path = serve_home / "data" / "task.npz"
        np.savez(path, x=t.x_train.numpy(), y=t.y_train.numpy())
        name = f"npz:{path}"
    elif kind == "folder":
        for c in ("a", "b"):
            (tmp_path / c).mkdir()
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
        name = f"folder:{tmp_path}"
    else:
        name = "mnist:dir=/tmp" if kind == "dir=" else "cifar10:download=1"
    r = client.post("/v1/generate", json={**OK, "dataset": name})
    assert r.status_code == 422 and "not served over HTTP" in r.json()["error"], r.text


# ---------------------------------------------------------------- metrics, schema


def test_metrics_count_requests(client):
    before = _metric(client, "weightgen_models_generated_total", 'arch="mlp-s"')
    check_weights(client.post("/v1/generate", json=OK))
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
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_fuzz_never_5xx(case, base_url):
    """Schemathesis drives every route with schema-shaped (and schema-breaking) input: never a 5xx."""
    from schemathesis.checks import not_a_server_error

    case.call_and_validate(base_url=base_url, checks=[not_a_server_error], timeout=120)


# ---------------------------------------------------------------- more generators than a replica keeps loaded


def test_more_generators_than_the_multiplexer_holds(client, replica, serve_home):
    """A replica keeps 4 generators (LRU): after four others, the first is loaded again (the
    replica counts its loads) and gives the same bytes as before."""
    from serving.app import MAX_MODELS_PER_REPLICA

    gens = serve_home / "generators"
    names = [f"d2nwg-tiny-copy{i}" for i in range(MAX_MODELS_PER_REPLICA)]
    try:
        for name in names:
            shutil.copytree(gens / "d2nwg-tiny", gens / name)
        body = {**OK, "seed": 3}
        first = client.post("/v1/generate", json={**body, "generator": "d2nwg-tiny"})
        check_weights(first)
        loads = replica.info.remote().result()["loads"].get("d2nwg-tiny", 0)
        for name in names:  # 1 + 4 distinct generators through a 4-slot LRU
            r = client.post("/v1/generate", json={**body, "generator": name})
            assert r.status_code == 200 and r.headers["x-weightgen-generator"] == name, r.text
        again = client.post("/v1/generate", json={**body, "generator": "d2nwg-tiny"})
        assert again.status_code == 200 and again.content == first.content
        assert replica.info.remote().result()["loads"]["d2nwg-tiny"] == loads + 1  # it was evicted, then reloaded
    finally:
        for name in names:
            shutil.rmtree(gens / name, ignore_errors=True)


# ---------------------------------------------------------------- no server paths, no NaN


def test_no_server_paths_in_responses(client, serve_home):
    """Clients get names and ids; the server's directories (its home, generators, zoo) never show."""
    gen = client.post("/v1/generate", json={**OK, "novelty": True})
    check_weights(gen)
    ckpt = client.get("/v1/zoo", params={"limit": 1}).json()["records"][0]["id"]
    responses = [
        gen, client.get(f"/v1/zoo/{ckpt}"), client.get("/v1/generators"), client.get("/v1/zoo", params={"limit": 1000}),
        client.post("/v1/generate", json={**OK, "arch": "mlp-m"}),  # no generator for the arch
        client.post("/v1/generate", json={**OK, "generator": "nope"}),
        client.post("/v1/generate", json={**OK, "dataset": "digits:classes=a"}),
        client.get("/v1/zoo/0123456789abcdef"), upload(client, b"not an npz", {"arch": "mlp-s"}),
    ]
    for r in responses:
        text = (r.content + json.dumps(dict(r.headers)).encode()).decode("latin-1")
        assert str(serve_home) not in text and "/tmp" not in text, (r.request.url, text[:500])
    assert all("source" not in rec for rec in client.get("/v1/zoo").json()["records"])
    assert all("zoo" not in g for g in client.get("/v1/generators").json())


def test_admin_flag_shows_server_paths(use_tiny_home):
    """``show_server_paths: true`` (an operator's server) keeps the paths the default hides."""
    from serving.generator import GeneratorDeployment
    from serving.schemas import ServeArgs

    cls = GeneratorDeployment.func_or_class
    dep = cls.__new__(cls)
    dep.args = ServeArgs(show_server_paths=True)
    assert all("zoo" in g for g in dep.generators())
    assert str(use_tiny_home) in dep._scrub(f"{use_tiny_home}/generators")
    dep.args = ServeArgs()
    assert all("zoo" not in g for g in dep.generators()) and dep._scrub(f"{use_tiny_home}/generators/x") == "<generators>/x"


def test_nan_metric_in_the_zoo_is_null_not_500(client, serve_home):
    """A stored record with a NaN metric (the zoo-integrity issue stops new ones) does not take
    GET /v1/zoo down: the value comes back as null."""
    commit = next(p for p in (serve_home / "zoo").rglob("zarr.json") if '"records"' in p.read_text())
    original = commit.read_text()
    doc = json.loads(original)
    rec = doc["attributes"]["records"][0]
    rec["metrics"] = {**rec["metrics"], "test_acc": float("nan")}
    try:
        commit.write_text(json.dumps(doc))  # json writes the NaN literal
        r = client.get("/v1/zoo", params={"limit": 10_000})
        assert r.status_code == 200, r.text
        (got,) = [x for x in r.json()["records"] if x["id"] == rec["id"]]
        assert got["metrics"]["test_acc"] is None
    finally:
        commit.write_text(original)


# ---------------------------------------------------------------- control characters and header values


@pytest.mark.parametrize("field,value", [
    ("dataset", "digits:classes=4,2,8,1,\n0"), ("dataset", "digits:classes=4,2,8,1,\r0"),
    ("dataset", "digits:classes=4,2,8,1,\v0"), ("dataset", "digits:classes=4,2,8,1,\f0"),
    ("dataset", "digits:classes=4,2,8,1,0\x85"), ("arch", "mlp-s\r\nX-Evil: 1"), ("generator", "d2nwg-tiny\n"),
], ids=["LF", "CR", "VT", "FF", "NEL", "arch-CRLF", "generator-LF"])
def test_control_characters_are_refused(client, field, value):
    """A dataset name like "...,\\n0" was accepted (int() strips the newline) and then broke the
    X-Weightgen-Dataset header: the client got an empty reply."""
    r = client.post("/v1/generate", json={**OK, field: value})
    assert r.status_code == 422 and "control characters" in r.text, r.text
    assert client.get("/healthz").status_code == 200


def test_header_values_are_percent_encoded(client):
    """A name the server echoes in a header with characters HTTP headers cannot carry (here an
    Arabic-Indic digit, which int() reads as 0) is percent-encoded, and decodes to the name."""
    from urllib.parse import unquote

    name = "digits:classes=4,2,8,1,\u0660"
    r = client.post("/v1/generate", json={**OK, "dataset": name})
    check_weights(r)
    assert r.headers["x-weightgen-dataset"] == "digits:classes=4,2,8,1,%D9%A0"
    assert unquote(r.headers["x-weightgen-dataset"]) == name


# ---------------------------------------------------------------- work, bodies and headers within bounds


def support_of(rows: int, classes: int) -> dict:
    """A support set of one-feature rows (tiny JSON): the work limits are checked before its width."""
    return {"arch": "mlp-s", "n": 1, "support": {"x": [[0]] * rows, "y": [i % classes for i in range(rows)]}}


@pytest.mark.parametrize("rows,classes,status,says", [
    (3001, 3001, 422, "(max_classes)"), (3001, 2, 413, "(max_rows)"), (2700, 2700, 413, "(max_rows_x_classes)"),
])
def test_work_per_request_is_bounded(client, rows, classes, status, says):
    """Classes, rows and rows x classes over the server's limits are refused before any work
    (two 3,000-class requests once kept every replica busy for minutes)."""
    r = client.post("/v1/generate", json=support_of(rows, classes))
    assert r.status_code == status and says in r.json()["error"], r.text


def raw_request(base_url: str, head: bytes, body: bytes = b""):
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(base_url)
    s = socket.create_connection((u.hostname, u.port), timeout=30)
    s.sendall(head + body)
    return s


def raw_status(s) -> tuple[int, bytes]:
    """The status and the bytes of the response read from a raw socket (then closed)."""
    data = b""
    try:
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            length = [int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                      if k.lower() == b"content-length"]
            if sep and len(body) >= (length or [0])[0]:
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    return (int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0), data


def trickler(base_url: str, multipart: bool):
    """A request that declares a full-size body, sends 1 kB of it and then nothing."""
    kind = b"multipart/form-data; boundary=b" if multipart else b"application/json"
    size = MAX_UPLOAD if multipart else MAX_BODY
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: " + kind + b"\r\nContent-Length: "
            + str(size).encode() + b"\r\n\r\n")
    return raw_request(base_url, head, (b"--b\r\n" if multipart else b"{") + b" " * 1024)


def until_status(send, status: int, seconds: float):
    """send() until it answers ``status``. The raw requests reach the ingress ~0.1 s after they are
    sent; a send() before that would take the slot they are meant to fill, so the first waits."""
    import time

    time.sleep(0.5)
    end = time.monotonic() + seconds
    while True:
        r = send()
        if r.status_code == status or time.monotonic() > end:
            return r
        time.sleep(0.1)


def test_trickling_uploads_lose_their_own_slots(client, base_url):
    """Four uploads that send 1 kB and then trickle hold the four upload slots: a fifth upload gets
    503 + Retry-After (the README's promise). Once their grace (3 s here) has passed below the
    minimum rate, they get 408 and their slots are free again."""
    x, y = np.random.default_rng(0).random((40, 64), dtype=np.float32), np.arange(40) % 4
    socks = [trickler(base_url, multipart=True) for _ in range(4)]
    fifth = until_status(lambda: upload(client, npz(x=x, y=y), {"arch": "mlp-s", "n": 1}), 503, 2)
    assert fifth.status_code == 503 and int(fifth.headers["retry-after"]) > 0, fifth.text[:300]
    for s in socks:
        status, data = raw_status(s)
        assert status == 408 and b"too slowly" in data, data
    check_weights(upload(client, npz(x=x, y=y), {"arch": "mlp-s", "n": 1}), num_classes=4)


def test_json_bodies_in_flight_are_capped(client, base_url):
    """Two full-size JSON bodies in flight take the ingress's budget (2 MiB here): a third request
    gets 503 + Retry-After, /healthz still answers, and when the slow bodies get their 408 the
    budget is free again."""
    socks = [trickler(base_url, multipart=False) for _ in range(2)]
    third = until_status(lambda: client.post("/v1/generate", json=OK), 503, 2)
    assert third.status_code == 503 and int(third.headers["retry-after"]) > 0 and "bytes" in third.text, third.text
    assert client.get("/healthz").json() == {"status": "ok"}
    for s in socks:
        assert raw_status(s)[0] == 408
    check_weights(client.post("/v1/generate", json=OK))


def test_headers_over_the_cap_are_431(client, base_url):
    """The proxy answers a request head over 32 KiB with 431 instead of buffering it (one 100 MB
    header grew the proxy by 1.2 GB), and keeps serving."""
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n"
    status, data = raw_status(raw_request(base_url, big))
    assert status == 431 and b"headers over" in data, data
    small = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * (8 << 10) + b"\r\nConnection: close\r\n\r\n"
    assert raw_status(raw_request(base_url, small))[0] == 200


def test_proxy_caps_bodies_in_flight(client, base_url):
    """Serve's proxy reads every body as it arrives, whatever the ingress does with it: it refuses
    a body over its cap (3 MiB here, conftest) and, while 4 uploads and 2 JSON bodies fill its
    budget (10 MiB), any further body, before reading either (413 / 503 + Retry-After)."""
    head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    status, data = raw_status(raw_request(base_url, head % (4 << 20), b"{"))
    assert status == 413 and b"over 3145728 bytes" in data, data
    socks = [trickler(base_url, multipart=True) for _ in range(4)] + [trickler(base_url, multipart=False) for _ in range(2)]
    r = until_status(lambda: client.post("/v1/generate", json=OK), 503, 2)
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0 and "as many request bodies" in r.text, r.text
    for s in socks:
        assert raw_status(s)[0] == 408
    check_weights(client.post("/v1/generate", json=OK))


# ---------------------------------------------------------------- timeouts; a replica dies (both leave it serving)


def heavy(n: int = 8, **extra) -> dict:
    """HEAVY classes of one row each: tens of seconds of sampling (the classes' attention is quadratic)."""
    return {"arch": "mlp-s", "support": {"x": [[0] * 64] * HEAVY, "y": list(range(HEAVY))}, "n": n, "novelty": False,
            **extra}


def test_timeout_is_capped_and_an_expired_request_stops(client, replica):
    """timeout_s is capped at the server's limit (8 s here), and once it passes, the replica stops
    sampling that request (it counts it) instead of computing on for a client that has gone."""
    import time

    stopped = replica.info.remote().result()["stopped"]
    r = client.post("/v1/generate", json=heavy(timeout_s=1e6))
    assert r.status_code == 408 and "the 8 s timeout" in r.json()["error"], r.text
    deadline = time.monotonic() + 30
    while replica.info.remote().result()["stopped"] == stopped:
        assert time.monotonic() < deadline, "the replica is still sampling the expired request"
        time.sleep(0.2)
    check_weights(client.post("/v1/generate", json=OK))
    assert client.post("/v1/generate", json={**OK, "timeout_s": 0}).status_code == 422


def test_replica_killed_mid_request_is_503_and_recovers(client, replica):
    """The replica (found through Serve) is killed while it samples a request: that request gets
    503 with Retry-After, and Serve's new replica serves the next ones."""
    import os
    import signal
    import threading
    import time

    pid = replica.info.remote().result()["pid"]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", client.post("/v1/generate", json=heavy(timeout_s=60))))
    t.start()
    time.sleep(1.5)  # it is being sampled (tens of seconds of work)
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    r = out["r"]
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0 and "retry" in r.json()["error"], r.text
    deadline = time.monotonic() + 120
    while True:  # the requests that wait for the new replica are 503 or 408, never a 500
        r = client.post("/v1/generate", json=OK)
        if r.status_code == 200:
            break
        assert r.status_code in (503, 408) and time.monotonic() < deadline, r.text
    check_weights(r)
    assert replica.info.remote().result()["pid"] != pid
