"""Zoo at scale: open, query, ls, load, stack, novelty and ingest on zoos of 10k to 1M checkpoints.

    python benchmarks/zoo_scale.py [--sizes 10000,100000,1000000] [--small 100000] [--s3 10000,100000]
                                   [--quick] [--results benchmarks/RESULTS.md]

Zoos of ``mlp-s`` (5 classes, 64 inputs) rows written by the store's own API (``Zoo.add``, hashing
and validating every row): 1,000 real initialisations plus per-row noise, 200 digit tasks, tags,
instructions and metrics like a population build's. Each size is written in 100 commits (few
large); ``--small`` is also written in commits of 10 (many small), read, compacted (``zoo
compact``) and read again. Every read runs in a fresh process (time and its peak RSS, which
includes ~0.4 GB of imports: the "imports only" row), on local disk and on the S3-compatible
test server (moto, as tests/test_zoo_s3.py) for ``--s3`` sizes. Novelty: ``weightgen sample``
with a generator trained on a 1,000-model zoo, its stored zoo reference removed so the zoo is
read, with $WEIGHTGEN_ZOO the 1,000-model zoo (exact path) or the big one (its novelty index).
Zoos are deleted as soon as they are measured. Rewrites only its RESULTS.md section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Zoo at scale (issue: million checkpoints)"
S3_OPTS = {"key": "test", "secret": "test", "client_kwargs": {"region_name": "us-east-1"}}
update_section = runpy.run_path(str(Path(__file__).resolve().parent / "results_md.py"))["update_section"]


# --------------------------------------------------------------------------- writing zoos


def _base(n_base: int = 1000):
    import torch

    from weightgen import build_model
    from weightgen.data.digits import get_family

    sds = []
    for s in range(n_base):
        torch.manual_seed(s)
        sds.append({k: v.contiguous() for k, v in build_model("mlp-s", 5, (64,)).state_dict().items()})
    stacked = {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}
    return stacked, get_family("digits-subsets").train_tasks(200)


def write_zoo(url: str, n: int, per_commit: int, opts=None, seed: int = 0, base=None) -> list[float]:
    """Rows 0..n-1 in commits of ``per_commit``; returns ckpt/s of each commit as the zoo grows."""
    import torch

    from zoo import Checkpoint, Zoo

    stacked, tasks = base or _base()
    z = Zoo(url, storage_options=opts)
    g = torch.Generator().manual_seed(seed)
    rates = []
    for lo in range(0, n, per_commit):
        m = min(per_commit, n - lo)
        pick = torch.randint(len(tasks), (m,), generator=g)
        noise = {k: v[pick % len(v)] + 0.01 * torch.randn((m, *v.shape[1:]), generator=g) for k, v in stacked.items()}
        acc = torch.rand(m, generator=g)
        t0 = time.perf_counter()
        cks = [Checkpoint({k: v[i] for k, v in noise.items()}, "mlp-s", 5, (64,), dataset=tasks[int(pick[i])],
                          seed=lo + i, run_id=f"scale-{(lo + i) // 3}", step=100 * ((lo + i) % 3),
                          metrics={"test_acc": float(acc[i]), "train_acc": float(acc[i]) * 0.9 + 0.1},
                          tags=["population", f"group{(lo + i) % 100}"],
                          instructions=[f"Classify {tasks[int(pick[i])].split('=')[1]} digits, model {lo + i}"],
                          source="zoo_scale") for i in range(m)]
        z.add(cks)
        rates.append(m / (time.perf_counter() - t0))
    return rates


# --------------------------------------------------------------------------- one measurement per process


def peak_mb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss is inherited across exec from a big parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(op: str, url: str, opts: dict | None, extra: str) -> dict:
    """Run one operation in this (fresh) process: seconds and peak RSS after it."""
    import random

    t_import = time.perf_counter()
    from zoo import Zoo

    rss0 = peak_mb()
    t0 = time.perf_counter()
    out: dict = {}
    if op == "imports":
        pass
    elif op == "open":
        z = Zoo(url, mode="r", storage_options=opts)
        out["n"] = len(z)
    else:
        z = Zoo(url, mode="r", storage_options=opts)
        out["n"] = len(z)
        ids = None
        if op in ("load", "stack"):
            from zoo.index import Filters

            v = z._view()
            places = v.match(Filters())
            rng = random.Random(0)
            pick = sorted(rng.sample(range(len(places)), min(1000 if op == "stack" else 100, len(places))))
            ids = [z._records([places[i]])[0]["id"] for i in pick] if op == "load" else None
            if op == "stack":
                import numpy as np

                pos = np.array([places[i][1] for i in pick if places[i][0] == "index"], np.int64)
                ids = v._take(pos, ["id"])["id"].to_pylist() + [v.tail["id"][places[i][1]].as_py() for i in pick
                                                               if places[i][0] == "tail"]
        t0 = time.perf_counter()
        if op == "query":
            out["count"] = z.count(arch="mlp-s", metrics=[("test_acc", 0.9, None)])
            out["page"] = len(z.query(arch="mlp-s", metrics=[("test_acc", 0.9, None)], limit=100))
        elif op == "query_text":
            out["count"] = z.count(dataset="digits:classes=3*", tag="group7", instruction="model 1")
        elif op == "load":
            for i in ids:
                z.load(i)
            out["per_load_ms"] = (time.perf_counter() - t0) / len(ids) * 1e3
        elif op == "stack":
            st = z.stack(ids)
            out["rows"] = int(next(iter(st.values())).shape[0])
    out["seconds"] = time.perf_counter() - t0
    out["import_s"] = t0 - t_import
    out["rss_mb"] = peak_mb()
    out["rss_import_mb"] = rss0
    return out


def run_measure(op: str, url: str, opts=None, extra: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, __file__, "--measure", op, url, json.dumps(opts), extra], capture_output=True,
                       text=True, env=env, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"{op} on {url}: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_cli(args: list[str], env_extra: dict) -> dict:
    """A ``weightgen`` command in a fresh process: wall seconds and peak RSS (of that child)."""
    code = ("import sys, time, json; t=time.perf_counter(); from weightgen.cli import main; "
            "rc = main(sys.argv[1:]); sys.stdout.flush(); "
            "hwm = [int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM:')][0]; "
            "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, 'rss_mb': hwm / 1024}), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **env_extra})
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "{}"
    try:
        return json.loads(last)
    except json.JSONDecodeError:
        raise RuntimeError(f"{args}: {p.stderr[-2000:]}") from None


def reads(url: str, opts=None) -> dict:
    out = {op: run_measure(op, url, opts) for op in ("open", "query", "query_text", "load", "stack")}
    if opts is None:
        out["ls"] = run_cli(["zoo", "ls", "--zoo", url, "--arch", "mlp-s", "--metric", "test_acc>=0.9", "--limit", "100",
                             "--jsonl"], {})
    return out


# --------------------------------------------------------------------------- novelty


def train_small_generator(home: Path) -> tuple[str, str]:
    """A 1,000-model zoo and a tiny D2NWG trained on it; its stored zoo reference is removed so
    that ``sample`` reads the zoo for novelty (the path a zoo's size used to cost)."""
    from training.config import TrainConfig
    from training.train import train
    from zoo.population import PopulationConfig, build_population

    os.environ["WEIGHTGEN_HOME"] = str(home)
    zoo = str(home / "zoo")
    build_population(PopulationConfig(tasks=200, seeds=5, steps=60, checkpoint_fractions=(1.0,)), zoo, show_progress=False)
    train(TrainConfig(name="d2nwg-scale", generator="d2nwg-tiny", stages={"vae": 20, "diffusion": 20}, arch="mlp-s",
                      num_classes=5, input_shape=[64], dataset_prefix="digits:", min_test_acc=0.0, batch_size=16,
                      support_per_class=5, checkpoint_every=10**6, log_every=10**6, warmup_steps=2), show_progress=False)
    gen = home / "generators" / "d2nwg-scale"
    for f in gen.rglob("novelty_reference.safetensors"):
        f.unlink()
    return zoo, str(gen)


def sample_time(gen: str, zoo: str, home: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = run_cli(["sample", "--arch", "mlp-s", "--dataset", "digits:classes=4,2,8,1,0", "--generator", gen, "--n", "8",
                 "--out", str(out), "--json"], {"WEIGHTGEN_ZOO": zoo, "WEIGHTGEN_HOME": str(home)})
    man = json.loads((out / "manifest.json").read_text())
    return {**r, "novelty": man.get("novelty")}


# --------------------------------------------------------------------------- S3


def moto() -> tuple[object, str]:
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="zoo")
    return server, url


# --------------------------------------------------------------------------- report


def fmt_s(x: float) -> str:
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--small", type=int, default=100000, help="also written in commits of 10 (0: skip)")
    ap.add_argument("--s3", default="10000,100000")
    ap.add_argument("--quick", action="store_true", help="2k/10k, small 2k, S3 2k: a smoke run")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    ap.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.measure:
        op, url, opts, extra = a.measure
        print(json.dumps(measure(op, url, json.loads(opts), extra)))
        return
    if a.quick:
        a.sizes, a.small, a.s3 = "2000,10000", 2000, "2000"
    sizes = [int(s) for s in a.sizes.split(",") if s]
    s3_sizes = [int(s) for s in a.s3.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="wg-zoo-scale-", dir=os.environ.get("WG_SCALE_DIR")))
    load0 = os.getloadavg()[0]
    res: dict = {"local": {}, "s3": {}, "small": {}, "sample": {}}
    t_start = time.time()
    try:
        base = _base()
        home = tmp / "home"
        zoo1k, gen = train_small_generator(home)
        res["imports"] = run_measure("imports", zoo1k)
        res["local"][1000] = reads(zoo1k)
        res["sample"][1000] = sample_time(gen, zoo1k, home, tmp / "s1k")
        for n in sizes:
            url = str(tmp / f"zoo{n}")
            t0 = time.perf_counter()
            rates = write_zoo(url, n, max(100, n // 100), base=base)
            k = max(1, len(rates) // 10)
            res["local"][n] = {"write_s": time.perf_counter() - t0, "ingest_first": sum(rates[:k]) / k,
                               "ingest_last": sum(rates[-k:]) / k, **reads(url)}
            c = run_cli(["zoo", "compact", "--zoo", url], {})
            res["local"][n]["compact"] = c
            res["sample"][n] = sample_time(gen, url, home, tmp / f"s{n}")
            res["local"][n]["disk_gb"] = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file()) / 1e9
            shutil.rmtree(url)
            print(f"{n}: {json.dumps(res['local'][n])[:400]}", file=sys.stderr)
        if a.small:
            url = str(tmp / "zoo_small")
            t0 = time.perf_counter()
            rates = write_zoo(url, a.small, 10, base=base)
            k = max(1, len(rates) // 10)
            r = {"write_s": time.perf_counter() - t0, "ingest_first": sum(rates[:k]) / k, "ingest_last": sum(rates[-k:]) / k}
            r["before"] = reads(url)
            r["compact"] = run_cli(["zoo", "compact", "--zoo", url, "--no-novelty-index"], {})
            r["after"] = reads(url)
            res["small"][a.small] = r
            shutil.rmtree(url)
        if s3_sizes:
            server, endpoint = moto()
            opts = {**S3_OPTS, "endpoint_url": endpoint}
            try:
                for n in s3_sizes:
                    url = f"s3://zoo/z{n}"
                    t0 = time.perf_counter()
                    rates = write_zoo(url, n, max(100, n // 100), opts, base=base)
                    res["s3"][n] = {"write_s": time.perf_counter() - t0, "ingest_first": rates[0], "ingest_last": rates[-1],
                                    **reads(url, opts)}
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["load"] = (load0, os.getloadavg()[0])
    res["minutes"] = (time.time() - t_start) / 60
    (Path(tempfile.gettempdir()) / "zoo_scale_results.json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res, a)
    print(text)
    update_section(Path(a.results), SECTION, text)


def report(res: dict, a) -> str:
    return "```\n" + json.dumps(res, indent=1, default=str) + "\n```\n"


if __name__ == "__main__":
    main()
