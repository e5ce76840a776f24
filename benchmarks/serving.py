"""Serving benchmark: HTTP latency and throughput against calling the sampler in-process.

    python benchmarks/serving.py [--seconds 10] [--clients 1,8,32] [--memory-requests 1000]

Needs trained generators in ``$WEIGHTGEN_HOME`` (``weightgen quickstart``). Starts one local Ray
Serve instance on 127.0.0.1 (the same ``build_app`` as ``weightgen serve``), then for each request
kind (n = 1 and the API default n = 8, best-of-n, novelty on):

* in-process: ``weightgen.sample`` called in this process, with the replica's torch threads;
* HTTP: ``c`` closed-loop httpx clients for ``--seconds`` each (c = 1, 8, 32), every response
  checked (status 200 and a safetensors body whose sha256 matches its header), errors counted;
* memory: RSS of every Serve process (proxy, ingress, generator replicas) after a warm-up and
  after ``--memory-requests`` more requests.

Prints one table and rewrites the "## Serving" section of RESULTS.md (``--results``).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import runpy
import socket
import sys
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and "serving" would import this file, not the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

SECTION = "## Serving (issue: serving)"
DATASET = "digits:classes=4,2,8,1,0"
update_section = runpy.run_path(str(Path(__file__).resolve().parent / "results_md.py"))["update_section"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def in_process(n: int, seconds: float, threads: int) -> dict:
    from weightgen.sampling import sample

    torch.set_num_threads(threads)
    sample("mlp-s", DATASET, n=n)  # load the generator, the dataset and the prepared zoo once
    lat, t0, i = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        sample("mlp-s", DATASET, n=n, seed=i)
        lat.append(time.perf_counter() - t)
        i += 1
    return {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "rps": len(lat) / (time.perf_counter() - t0), "count": len(lat)}


async def http_load(url: str, n: int, clients: int, seconds: float = 0.0, total: int = 0) -> dict:
    """Closed loop: each client sends its next request when the last one is answered."""
    lat, errors, sent = [], {}, [0]
    stop = time.perf_counter() + seconds if seconds else float("inf")

    async def client(c: httpx.AsyncClient, cid: int):
        while time.perf_counter() < stop and (not total or sent[0] < total):
            sent[0] += 1
            body = {"arch": "mlp-s", "dataset": DATASET, "n": n, "seed": sent[0] % 1000}
            t = time.perf_counter()
            try:
                r = await c.post("/v1/generate", json=body)
                ok = r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == r.headers.get("x-weightgen-sha256")
                key = None if ok else f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                key = type(e).__name__
            if key:
                errors[key] = errors.get(key, 0) + 1
            else:
                lat.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "rps": len(lat) / wall, "count": len(lat),
            "errors": sum(errors.values()), "error_kinds": errors}


def reserve_port() -> socket.socket:
    """A socket bound to a free port, kept open (SO_REUSEPORT) so no one else takes the port before
    Serve's proxy binds it too (it sets SO_REUSEPORT by default)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    return s


def serve_rss_mb() -> dict[str, float]:
    """RSS of the Serve processes of the Ray this process started (its children, not every
    process on a machine where someone else may run Serve too)."""
    out = {}
    for p in psutil.Process().children(recursive=True):
        try:
            cmd, rss = " ".join(p.cmdline()), p.memory_info().rss
        except psutil.Error:
            continue
        for tag in ("ServeReplica:weightgen:GeneratorDeployment", "ServeReplica:weightgen:Ingress", "ProxyActor"):
            if tag in cmd:
                out[tag.split(":")[-1]] = out.get(tag.split(":")[-1], 0.0) + rss / 2**20
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per concurrency level and request kind")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--ns", default="1,8", help="candidates per request (best-of-n) to measure")
    p.add_argument("--memory-requests", type=int, default=1000)
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per generator replica")
    p.add_argument("--replicas", type=int, default=2, help="generator replicas (one per core by default)")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    a = p.parse_args(argv)
    clients, ns = [int(c) for c in a.clients.split(",")], [int(n) for n in a.ns.split(",")]
    from serving.cli import LOCAL_RAY_ENV

    for k, v in LOCAL_RAY_ENV.items():  # the Ray that weightgen serve starts: loopback, token auth, header cap
        os.environ.setdefault(k, v)
    import ray
    from ray import serve

    from serving.app import build_app
    from weightgen.paths import home
    from weightgen.sampling import find_generator

    gen = find_generator("mlp-s", (64,)).name  # fails with instructions when there is none
    t_start = time.time()
    ref = {n: in_process(n, a.seconds, a.torch_threads) for n in ns}  # one replica's view: same threads
    torch.set_num_threads(1)  # leave the cores to the server from here on

    ray.init(include_dashboard=False, log_to_driver=False)
    port_socket = reserve_port()
    port = port_socket.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"home": str(home()), "torch_threads": a.torch_threads, "generator_replicas": a.replicas}),
              name="weightgen",
              route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        rows = []
        for n in ns:
            asyncio.run(http_load(url, n, 1, total=5))  # warm: multiplexer load, dataset cache
            for c in clients:
                r = asyncio.run(http_load(url, n, c, seconds=a.seconds))
                rows.append({"n": n, "clients": c, **r})
                print(f"n={n} clients={c}: p50 {1e3 * r['p50']:.1f} ms, p99 {1e3 * r['p99']:.1f} ms, "
                      f"{r['rps']:.1f} req/s, {r['errors']} errors", flush=True)
        asyncio.run(http_load(url, 1, 8, total=100))
        trace, mem_ok, mem_err = [serve_rss_mb()], 0, 0  # RSS after each quarter of the requests
        for _ in range(4):
            r = asyncio.run(http_load(url, 1, 8, total=a.memory_requests // 4))
            mem_ok, mem_err = mem_ok + r["count"], mem_err + r["errors"]
            trace.append(serve_rss_mb())
    finally:
        serve.shutdown()
        ray.shutdown()
        port_socket.close()

    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, generator `{gen}`, "
               f"{a.replicas} generator replica(s) × {a.torch_threads} torch thread(s); clients on the same machine")
    cmd = "python benchmarks/serving.py" + ("" if argv is None else " " + " ".join(argv))
    lines = [SECTION, "", f"`{cmd}` | {time.strftime('%Y-%m-%d')} | {machine} | {time.time() - t_start:.0f} s", "",
             f"Request: `POST /v1/generate` `{{arch: mlp-s, dataset: {DATASET}, n}}` (best-of-n on the support set, "
             "predicted accuracy and novelty computed per request, as by default). One Serve instance on "
             f"127.0.0.1: proxy → Ingress (FastAPI) → GeneratorDeployment ({a.replicas} replicas). Closed-loop clients, "
             f"{a.seconds:g} s per row; every 200 is checked (sha256 of the body vs its header).", "",
             "\"HTTP − in-process\" is the HTTP overhead at 1 client; with more clients it is mostly queueing "
             f"(compare throughput: in-process is one process with {a.torch_threads} thread(s), the server runs "
             f"{a.replicas} replicas).", "",
             "| n | clients | in-process p50 | HTTP p50 | HTTP − in-process p50 | HTTP p99 | HTTP req/s | in-process req/s "
             "| requests | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ref[r["n"]]
        lines.append(f"| {r['n']} | {r['clients']} | {1e3 * base['p50']:.1f} ms | {1e3 * r['p50']:.1f} ms | "
                     f"{1e3 * (r['p50'] - base['p50']):+.1f} ms | {1e3 * r['p99']:.1f} ms | {r['rps']:.1f} | "
                     f"{base['rps']:.1f} | {r['count']} | {r['errors']} {r['error_kinds'] or ''} |")
    procs = list(trace[0])
    lines += ["", f"Memory over {mem_ok} more requests after a 100-request warm-up (n = 1, 8 clients, {mem_err} errors): "
              "RSS MiB of each Serve process after each quarter:", "",
              "| process | " + " | ".join(f"{q}/4" if q else "start" for q in range(len(trace))) + " | growth, 2nd half |",
              "|---" * (len(trace) + 2) + "|"]
    late = {k: trace[-1].get(k, 0) - trace[len(trace) // 2].get(k, 0) for k in procs}
    for k in procs:
        lines.append(f"| {k} | " + " | ".join(f"{t.get(k, 0):.0f}" for t in trace) + f" | {late[k]:+.0f} |")
    lines.append("")
    one = next((r for r in rows if r["clients"] == 1 and r["n"] == ns[0]), None)
    top = [r for r in rows if r["clients"] == max(clients)]
    lines += ["Targets:", ""]
    if one:
        over = 1e3 * (one["p50"] - ref[one["n"]]["p50"])
        lines.append(f"- HTTP overhead vs in-process ≤ 20 ms at p50 (n = {one['n']}, 1 client): "
                     f"{'PASS' if over <= 20 else 'FAIL'} ({over:+.1f} ms)")
    for r in top:
        lines.append(f"- p99 ≤ 1 s at {r['clients']} clients with 0 errors (n = {r['n']}): "
                     f"{'PASS' if r['p99'] <= 1.0 and r['errors'] == 0 else 'FAIL'} ({1e3 * r['p99']:.0f} ms, "
                     f"{r['errors']} errors)")
    flat = all(g <= 10 for g in late.values())
    lines.append(f"- memory flat over {mem_ok} requests (no process grows > 10 MiB over the second half): "
                 f"{'PASS' if flat else 'FAIL'} (" + ", ".join(f"{k} {g:+.0f} MiB" for k, g in late.items()) + ")")
    text = "\n".join(lines) + "\n\n"
    update_section(Path(a.results), SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
