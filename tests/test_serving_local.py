"""``weightgen serve`` as a user starts it (a subprocess with its own Ray), ``serve run
serving/serve_config.yaml`` on that Ray, and ``weightgen sample`` against the server's bytes.

The subprocess gets none of the test session's Ray settings (auth off, loopback, proxy callback):
what it does about them is its own doing. Its token is a file in a temp dir, not ~/.ray."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from conftest import reserved_port

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
DATASET = "digits:classes=4,2,8,1,0"
SAMPLE = {"arch": "mlp-s", "dataset": DATASET, "generator": "hypernet-tiny", "n": 4, "seed": 3}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def clean_env(tiny_home, token: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}
    return {**env, "WEIGHTGEN_HOME": str(tiny_home), "RAY_AUTH_TOKEN_PATH": str(token),
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra}


class Proc:
    """A subprocess whose output is collected by a thread (a full pipe would block it)."""

    def __init__(self, args: list[str], env: dict, cwd=ROOT):
        self.p = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.p.stdout.readline, "")), daemon=True).start()

    def find(self, pattern: str, seconds: float) -> re.Match:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert self.p.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in:\n" + "".join(self.lines)[-3000:])

    def stop(self, seconds: float = 60) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)  # weightgen serve shuts Serve and its Ray down on SIGTERM
            try:
                self.p.wait(seconds)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture(scope="module")
def server(tiny_home, tmp_path_factory):
    """`weightgen serve --replicas 1 --request-timeout 30` on a reserved port, and, started at the
    same time (both take seconds of imports), `weightgen sample` with OMP_NUM_THREADS=2."""
    tmp = tmp_path_factory.mktemp("local_serve")
    token = tmp / "auth_token"
    token.write_text(uuid.uuid4().hex)
    with reserved_port() as port:
        srv = Proc([sys.executable, "-m", "weightgen.cli", "serve", "--port", str(port), "--replicas", "1",
                    "--request-timeout", "30"], clean_env(tiny_home, token))
        args = [f"--{k}={v}" for k, v in SAMPLE.items()]
        cli = Proc([sys.executable, "-m", "weightgen.cli", "sample", *args, "--out", str(tmp / "cli")],
                   clean_env(tiny_home, token, OMP_NUM_THREADS="2"))
        try:
            gcs = srv.find(r"Ray at (\S+)", 180).group(1)
            url = f"http://127.0.0.1:{port}"
            end = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < end and srv.p.poll() is None, "".join(srv.lines)[-3000:]
                time.sleep(0.5)
            assert cli.p.wait(180) == 0, "".join(cli.lines)[-3000:]
            # a client of this Ray needs the loopback switch too, or it dials the host's address
            env = clean_env(tiny_home, token, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
            yield {"url": url, "gcs": gcs, "token": token, "proc": srv.p, "cli_out": tmp / "cli", "env": env}
        finally:
            cli.stop()
            srv.stop()


def listening(server) -> list[tuple[str, object]]:
    procs = [psutil.Process(server["proc"].pid)]
    procs += procs[0].children(recursive=True)
    return [(p.name(), c.laddr) for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


def test_ray_listens_on_loopback_only(server):
    """Every port of the server's Ray (GCS, raylet, object manager, workers, agents) and its HTTP
    proxy is bound to 127.0.0.1, with one exception Ray does not let us change: each Serve replica's
    inter-deployment gRPC server binds [::]:0 (ray/serve/_private/replica.py); it checks the token
    (test_ray_token_auth_is_on)."""
    assert server["gcs"].startswith("127.0.0.1:")
    socks = listening(server)
    assert len(socks) >= 8, socks  # GCS, raylet, agents, proxy, replicas: really looked at
    wide = [(name, addr) for name, addr in socks if addr.ip not in LOOPBACK]
    assert all(name.startswith("ray::ServeReplica:") and addr.ip == "::" for name, addr in wide), wide


def test_ray_token_auth_is_on(server):
    """A client without the token is refused by the GCS and by the replicas' gRPC servers (the
    ports not on loopback); with it, the GCS answers."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    bearer = [("authorization", f"Bearer {server['token'].read_text().strip()}")]
    with grpc.insecure_channel(server["gcs"]) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=30, metadata=bearer).cluster_id
    wide = [addr.port for _, addr in listening(server) if addr.ip not in LOOPBACK]
    assert wide, "expected the replicas' gRPC servers"
    for port in wide:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, port


def test_proxy_caps_headers(server):
    r = httpx.get(f"{server['url']}/healthz", headers={"x-big": "a" * (64 << 10)}, timeout=30)
    assert r.status_code == 431 and "headers over" in r.json()["error"]


def test_cli_and_http_give_the_same_weights(server):
    """`weightgen sample` and POST /v1/generate give the same tensors for the same (arch, dataset,
    generator, n, seed): the bytes depend on torch's thread count (~1e-6 from how float sums are
    split), and both sample with one thread. The CLI ran with OMP_NUM_THREADS=2, which would
    otherwise give it two."""
    import json

    from safetensors.torch import load, load_file

    r = httpx.post(f"{server['url']}/v1/generate", json={**SAMPLE, "novelty": False}, timeout=120)
    assert r.status_code == 200, r.text
    http, cli = load(r.content), load_file(str(server["cli_out"] / "model.safetensors"))
    assert http.keys() == cli.keys() and all(torch.equal(http[k], cli[k]) for k in cli)
    manifest = json.loads((server["cli_out"] / "manifest.json").read_text())
    assert manifest["torch_threads"] == 1
    assert float(r.headers["x-weightgen-support-accuracy"]) == pytest.approx(manifest["support_accuracy"], abs=1e-6)


def test_serve_config_yaml_serves_a_request(server):
    """`serve run serving/serve_config.yaml` (the README's other way to serve) deploys and serves.
    It runs on this server's Ray, whose proxy already holds the port: the file's http_options
    (port 8000) are not applied, its application is. The timeout message tells which app answers:
    the file's limit is 60 s, `weightgen serve --request-timeout 30` set 30 s."""
    def limit() -> str:
        r = httpx.post(f"{server['url']}/v1/generate", json={**SAMPLE, "timeout_s": 1e-4}, timeout=120)
        assert r.status_code == 408, r.text
        return re.search(r"server limit (\d+) s", r.json()["error"]).group(1)

    assert limit() == "30"
    serve_bin = str(Path(sys.executable).with_name("serve"))
    run = subprocess.run([serve_bin, "run", "--non-blocking", "-a", server["gcs"], "serving/serve_config.yaml"],
                         env=server["env"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    end = time.monotonic() + 180  # --non-blocking returns once the config is submitted
    while limit() != "60":
        assert time.monotonic() < end, "the config's application never answered"
        time.sleep(1)
    r = httpx.post(f"{server['url']}/v1/generate", json=SAMPLE, timeout=120)
    assert r.status_code == 200 and r.headers["x-weightgen-generator"] == "hypernet-tiny", r.text


def test_http_support_default_is_the_cli_default():
    """The schema spells the cap out (the ingress does not import torch); it must stay the CLI's."""
    from serving.schemas import GenerateRequest
    from weightgen.support import SUPPORT_CAP

    assert GenerateRequest.model_fields["support_per_class"].default == SUPPORT_CAP
