"""Serving under attack: memory of every Serve process, /healthz and normal requests while the
service is abused. Loopback only, every attack bounded in time.

    python benchmarks/abuse.py [--seconds 15] [--replicas 2]

Needs trained generators in ``$WEIGHTGEN_HOME`` (``weightgen quickstart``). Starts Ray and Serve
as ``weightgen serve`` does (127.0.0.1, token auth, the proxy's header cap) with the production
limits (``ServeArgs`` defaults = serving/serve_config.yaml), then runs each attack for at most
``--seconds`` (plus the time its last requests take to be answered). Throughout, a sampler reads
the RSS of every Serve process (proxy, controller, ingress, generator replicas; found in this
process's tree, not by scanning the machine) every 0.1 s, and a prober sends a normal request
(n = 1, timeout_s 10) and GET /healthz every 0.5 s.

Prints one table and rewrites the "## Serving under attack" section of RESULTS.md (``--results``).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import runpy
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and "serving" would import benchmarks/serving.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

SECTION = "## Serving under attack (issue 15)"
DATASET = "digits:classes=4,2,8,1,0"
NORMAL = {"arch": "mlp-s", "dataset": DATASET, "n": 1, "timeout_s": 10}
TAGS = {"ProxyActor": "proxy", "ServeController": "controller", "ServeReplica:weightgen:Ingress": "ingress",
        "ServeReplica:weightgen:GeneratorDeployment": "generator"}
update_section = runpy.run_path(str(Path(__file__).resolve().parent / "results_md.py"))["update_section"]


def serve_processes() -> dict[int, str]:
    """pid -> kind, for the Serve processes of the Ray this process started (its children)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            name = " ".join(p.cmdline()[:1])
        except psutil.Error:
            continue
        for tag, kind in TAGS.items():
            if tag in name:
                out[p.pid] = kind
    return out


class RssSampler:
    """Peak RSS (MiB) per kind of Serve process (summed over replicas of a kind), every 0.1 s."""

    def __init__(self):
        self.peak: dict[str, float] = {}
        self.peak_private: dict[str, float] = {}
        self._stop = threading.Event()
        self._procs = {pid: psutil.Process(pid) for pid in serve_processes()}
        self._kinds = serve_processes()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, p in list(self._procs.items()):
            try:
                m = p.memory_info()
            except psutil.Error:  # a replica that died: Serve starts another
                self._procs.pop(pid)
                continue
            kind = self._kinds[pid]
            out[kind] = out.get(kind, 0.0) + m.rss / 2**20
            out[kind + " shared"] = out.get(kind + " shared", 0.0) + m.shared / 2**20
        return out

    def _run(self):
        while not self._stop.wait(0.1):
            now = self.now()
            for k, v in now.items():
                self.peak[k] = max(self.peak.get(k, 0.0), v)
            for k in TAGS.values():  # the sample at which private memory (RSS less shared) peaks
                if k in now and now[k] - now.get(k + " shared", 0) > self.peak_private.get(k, 0) - self.peak_private.get(k + " shared", 0):
                    self.peak_private[k], self.peak_private[k + " shared"] = now[k], now.get(k + " shared", 0.0)

    def reset(self):
        self.peak = self.now()
        self.peak_private = dict(self.peak)

    def stop(self):
        self._stop.set()


async def raw(port: int, head: bytes, body_parts=(), pause: float = 0.0, until: float = 0.0) -> int:
    """Send ``head`` and then ``body_parts`` with ``pause`` between them (no later than ``until``);
    the status of the answer, or 0 when the server closed the connection without one."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    try:
        for chunk in [head, *body_parts]:
            if until and time.monotonic() > until:
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 30)
            if pause:
                try:  # answered already (e.g. 408, 431)?
                    line = await asyncio.wait_for(reader.readline(), pause)
                    return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else 0
                except asyncio.TimeoutError:
                    pass
        line = await asyncio.wait_for(reader.readline(), 60)
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else 0
    except (OSError, asyncio.TimeoutError, IndexError, ValueError):
        return 0
    finally:
        writer.close()


def big_header(mb: int) -> list[bytes]:
    return [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "] + [b"a" * (1 << 20)] * mb + [b"\r\n\r\n"]


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def multipart(request: dict, data: bytes) -> tuple[bytes, bytes]:
    body = (b"--b\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n" + json.dumps(request).encode()
            + b"\r\n--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a.npz\"\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--b--\r\n")
    return b"multipart/form-data; boundary=b", body


def post_head(content_type: bytes, length: int) -> bytes:
    return (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
            + str(length).encode() + b"\r\nConnection: close\r\n\r\n")


def attacks(max_body: int, max_upload: int) -> dict:
    """name -> (what, coroutine factory(port, until) returning statuses)."""
    rows = (max_body - 200) // (64 * 2 + 2 + 2)  # "[0,0,...]," rows and "0," labels: the JSON that inflates most
    zeros_json = json.dumps({"arch": "mlp-s", "support": {"x": [[0] * 64] * rows, "y": [0] * rows}},
                            separators=(",", ":")).encode()
    assert len(zeros_json) <= max_body
    many_classes = json.dumps({"arch": "mlp-s", "n": 1, "support": {"x": [[0.5] * 64] * 3000,
                                                                    "y": list(range(3000))}}).encode()
    heavy = json.dumps({"arch": "mlp-s", "n": 32, "timeout_s": 2, "support": {
        "x": np.random.default_rng(0).random((1000, 64)).round(3).tolist(), "y": [i % 100 for i in range(1000)]}}).encode()
    # random float32, stored: an upload just under the cap that loads into arrays (past max_rows: 413 once loaded)
    n_big = (max_upload - 8192) // (64 * 4 + 8)
    buf = io.BytesIO()
    np.savez(buf, x=np.random.default_rng(1).random((n_big, 64), dtype=np.float32), y=np.arange(n_big) % 5)
    big_ct, big_upload = multipart({"arch": "mlp-s", "n": 1}, buf.getvalue())
    small = np.random.default_rng(2).random((40, 64), dtype=np.float32)  # a valid task, and 1 GiB of zeros beside it
    bomb_ct, bomb = multipart({"arch": "mlp-s", "n": 1}, npz_bytes(x=small, y=np.arange(40) % 5,
                                                                   z=np.zeros(1 << 28, np.float32)))
    trickle_ct, _ = multipart({}, b"")
    nl = json.dumps({**NORMAL, "dataset": "digits:classes=4,2,8,1,\n0"}).encode()

    def repeat(concurrency: int, one):
        async def run(port, until):
            out = []

            async def worker():
                while time.monotonic() < until:
                    out.append(await one(port, until))
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return out
        return run

    def once(concurrency: int, one):
        async def run(port, until):
            return list(await asyncio.gather(*(one(port, until) for _ in range(concurrency))))
        return run

    return {
        "one 100 MB header": (once(1, lambda p, u: raw(p, b"", big_header(100)))),
        "10 concurrent 50 MB headers, repeated": (repeat(10, lambda p, u: raw(p, b"", big_header(50), until=u))),
        "2 concurrent 3,000-class support sets (1.1 MB JSON), repeated": (repeat(2, lambda p, u: raw(
            p, post_head(b"application/json", len(many_classes)), [many_classes]))),
        "2 concurrent requests at the work limit (100 classes, 1,000 rows, n = 32, timeout_s 2), repeated": (
            repeat(2, lambda p, u: raw(p, post_head(b"application/json", len(heavy)), [heavy]))),
        "4 uploads trickling 1 byte / 5 s after 1 kB": (once(4, lambda p, u: raw(
            p, post_head(trickle_ct, max_upload), [b"--b\r\n" + b" " * 1024] + [b" "] * 1000, pause=5, until=u))),
        "dataset names with a newline, repeated": (repeat(2, lambda p, u: raw(p, post_head(b"application/json", len(nl)), [nl]))),
        "50 slow connections (a partial request line, then nothing)": (once(50, lambda p, u: raw(
            p, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", [b"X-A: 1\r\n"] * 1000, pause=5, until=u))),
        "6 concurrent 8 MiB JSON bodies of zeros, repeated": (repeat(6, lambda p, u: raw(
            p, post_head(b"application/json", len(zeros_json)), [zeros_json]))),
        "4 concurrent decompression bombs (1 GiB inflated), repeated": (repeat(4, lambda p, u: raw(
            p, post_head(bomb_ct, len(bomb)), [bomb]))),
        "6 concurrent 64 MiB uploads (incompressible), repeated": (repeat(6, lambda p, u: raw(
            p, post_head(big_ct, len(big_upload)), [big_upload]))),
    }


async def probe(url: str, until: float) -> tuple[list[float], Counter]:
    """/healthz latencies and the statuses of normal requests, every 0.5 s."""
    lat, statuses = [], Counter()
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while time.monotonic() < until:
            t = time.perf_counter()
            try:
                await c.get("/healthz")
                lat.append(time.perf_counter() - t)
                statuses[(await c.post("/v1/generate", json=NORMAL)).status_code] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
            await asyncio.sleep(0.5)
    return lat, statuses


async def run_attack(url: str, port: int, attack, seconds: float):
    until = time.monotonic() + seconds
    (lat, normal), statuses = await asyncio.gather(probe(url, until), attack(port, until))
    return lat, normal, Counter(statuses)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="per attack")
    p.add_argument("--replicas", type=int, default=2, help="generator replicas (one per core)")
    p.add_argument("--only", default="", help="attacks whose name contains this")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    a = p.parse_args(argv)

    from serving.cli import LOCAL_RAY_ENV

    for k, v in LOCAL_RAY_ENV.items():  # the Ray that weightgen serve starts: loopback, token auth, header cap
        os.environ.setdefault(k, v)
    import ray
    import torch
    from ray import serve

    from serving.app import build_app
    from serving.proxy import BODY_BUDGET, MAX_HEADER_BYTES
    from serving.schemas import ServeArgs
    from weightgen.paths import home
    from weightgen.sampling import find_generator

    gen = find_generator("mlp-s", (64,)).name
    args = ServeArgs(home=str(home()), generator_replicas=a.replicas)
    t_start = time.time()
    ray.init(include_dashboard=False, log_to_driver=False)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # held until Serve's proxy binds it too
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="weightgen", route_prefix="/", blocking=False)
        for _ in range(10):
            httpx.post(f"{url}/v1/generate", json=NORMAL, timeout=60)
        sampler = RssSampler()
        time.sleep(1)
        idle = sampler.now()
        print("idle MiB:", {k: round(v) for k, v in idle.items()}, flush=True)
        for name, attack in attacks(args.max_body_bytes, args.max_upload_bytes).items():
            if a.only not in name:
                continue
            sampler.reset()
            t0 = time.monotonic()
            lat, normal, statuses = asyncio.run(run_attack(url, port, attack, a.seconds))
            wall = time.monotonic() - t0
            time.sleep(1)
            after = sampler.now()
            row = {"attack": name, "wall": wall, "statuses": statuses, "normal": normal,
                   "healthz_p50": float(np.median(lat)) if lat else float("nan"), "healthz_max": max(lat, default=float("nan")),
                   "peak": dict(sampler.peak), "peak_private": dict(sampler.peak_private), "after": after}
            rows.append(row)
            print(f"{name}: {dict(statuses)}; normal {dict(normal)}; /healthz max {1e3 * row['healthz_max']:.0f} ms; peak "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sampler.peak.items() if "shared" not in k), flush=True)
        sampler.stop()
    finally:
        serve.shutdown()
        ray.shutdown()
        sock.close()

    # The bound on private memory, from the limits (MiB over idle). Proxy: the bodies it holds in
    # flight (its budget, serving/proxy.py), heads capped. Ingress: each upload ~4x its size (the
    # batch fetched from the proxy, pickled and unpickled; the assembled body; the copy sent on),
    # each JSON body ~10x (parsed lists of Python ints, then float64). Generator replica: one
    # request's arrays at a time (max upload_expansion x max_upload_bytes), the uploads queued for it.

    mib = 1 / 2**20
    bound = {"proxy": BODY_BUDGET * mib, "controller": 64.0,
             "ingress": (4 * args.max_concurrent_uploads * args.max_upload_bytes + 10 * args.max_inflight_json_bytes) * mib,
             "generator": (args.upload_expansion + args.max_concurrent_uploads) * args.max_upload_bytes * mib * a.replicas}
    kinds = [k for k in ("proxy", "controller", "ingress", "generator") if k in idle]

    def private(d: dict, k: str) -> float:  # RSS less the shared pages (libraries, Ray's object store)
        return d.get(k, 0.0) - d.get(k + " shared", 0.0)

    held = {k: all(private(r["peak_private"], k) - private(idle, k) <= bound[k] for r in rows) for k in kinds}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, generator `{gen}`"
    cmd = "python benchmarks/abuse.py" + ("" if argv is None else " " + " ".join(argv))
    lines = [SECTION, "", f"`{cmd}` | {time.strftime('%Y-%m-%d')} | {machine} | {time.time() - t_start:.0f} s", "",
             f"One Serve instance on 127.0.0.1 as `weightgen serve` starts it (Ray on loopback, token auth, proxy caps: "
             f"heads {MAX_HEADER_BYTES // 1024} KiB, bodies {BODY_BUDGET >> 20} MiB in flight), production limits "
             f"(`ServeArgs` defaults = serving/serve_config.yaml), {a.replicas} generator replicas × 1 thread. Each attack "
             f"runs {a.seconds:g} s (plus its last answers) from this machine; meanwhile a prober sends a normal request "
             "(n = 1, timeout_s 10) and GET /healthz every 0.5 s. Memory: MiB over idle at the attack's peak, summed over "
             "a kind's processes, as RSS / private (RSS less shared pages: the shared ones are mostly Ray's object store, "
             "through which request payloads travel, bounded by its own size). Idle RSS: "
             + ", ".join(f"{k} {idle[k]:.0f}" for k in kinds) + ".", "",
             "| attack | answers | normal requests | /healthz p50 / max | " + " | ".join(f"{k} RSS / private" for k in kinds) + " |",
             "|---" * (4 + len(kinds)) + "|"]
    for r in rows:
        ans = ", ".join(f"{k or 'closed'}×{v}" for k, v in sorted(r["statuses"].items(), key=str))
        nor = ", ".join(f"{k}×{v}" for k, v in sorted(r["normal"].items(), key=str))
        lines.append(f"| {r['attack']} | {ans} | {nor} | {1e3 * r['healthz_p50']:.0f} / {1e3 * r['healthz_max']:.0f} ms | "
                     + " | ".join(f"{r['peak'].get(k, 0) - idle[k]:+.0f} / {private(r['peak_private'], k) - private(idle, k):+.0f}"
                                  for k in kinds) + " |")
    lines += ["", "`closed`: the server closed the connection without an answer the client read (a client still "
              "writing a refused body, or a head that never ends). The floods of large bodies run last: Python keeps "
              "much of the memory it freed, so a peak includes what earlier attacks left behind.", "",
              "Bound on private memory (MiB over idle, from the limits: proxy = its body budget "
              "(WEIGHTGEN_PROXY_BODY_BYTES); ingress = 4 × max_concurrent_uploads × max_upload_bytes + 10 × "
              "max_inflight_json_bytes; generator = (upload_expansion + max_concurrent_uploads) × max_upload_bytes per "
              "replica; controller 64): "
              + ", ".join(f"{k} ≤ {bound[k]:.0f}: {'holds' if held[k] else 'EXCEEDED'}" for k in kinds) + ".", ""]
    text = "\n".join(lines) + "\n"
    update_section(Path(a.results), SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
