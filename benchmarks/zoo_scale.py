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
SECTION = "## Zoo at scale (issue 16)"
SAVED = Path(tempfile.gettempdir()) / "zoo_scale_results.json"
SAVED_SMALL = Path(tempfile.gettempdir()) / "zoo_scale_small.json"  # --small-only, run beside the main run
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


def probe_ingest(url: str, n: int, opts=None, base=None, commits: int = 3) -> float:
    """ckpt/s of ``commits`` more commits of 1,000 new rows into a zoo of ``n`` rows (the same batch at every size)."""
    rates = write_zoo(url, 1000 * commits, 1000, opts, seed=n + 17, base=base, first_seed=10**9 + n)
    return sum(rates) / len(rates)


def write_zoo(url: str, n: int, per_commit: int, opts=None, seed: int = 0, base=None, first_seed: int = 0) -> list[float]:
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
                          seed=first_seed + lo + i, run_id=f"scale-{(lo + i) // 3}", step=100 * ((lo + i) % 3),
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
            from zoo.filters import Filters

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
        import gc

        # a gen-2 collection in a process that imported torch costs ~70 ms and lands on whichever
        # read allocates past the threshold (it made one zoo's stack look 3x slower): collect
        # first, as timeit does by disabling it
        gc.collect()
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


def run_measure(op: str, url: str, opts=None, extra: str = "", repeats: int = 2) -> dict:
    """The faster of ``repeats`` fresh processes (the cores are shared: one run can stall for seconds)."""
    runs = [_measure_once(op, url, opts, extra) for _ in range(repeats)]
    return min(runs, key=lambda r: r["seconds"])


def _measure_once(op: str, url: str, opts=None, extra: str = "") -> dict:
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


def sample_time(gen: str, zoo: str, home: Path, out: Path, repeats: int = 2) -> dict:
    return min((_sample_once(gen, zoo, home, out) for _ in range(repeats)), key=lambda r: r["seconds"])


def _sample_once(gen: str, zoo: str, home: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = run_cli(["sample", "--arch", "mlp-s", "--dataset", "digits:classes=4,2,8,1,0", "--generator", gen, "--n", "8",
                 "--out", str(out), "--json"], {"WEIGHTGEN_ZOO": zoo, "WEIGHTGEN_HOME": str(home)})
    man = json.loads((out / "manifest.json").read_text())
    return {**r, "novelty": man.get("novelty")}


def warm(url: str) -> None:
    """One untimed stack and load before a zoo's reads: right after minutes of writes, the first
    reads of the data found it partly out of the page cache (stack 163 ms before compaction vs 86
    after in one run; 68 vs 64 ms with both warm), which is the machine's state, not the layout's."""
    for op in ("stack", "load"):
        _measure_once(op, url)


def small_phase(url: str, n: int, base) -> dict:
    """``n`` rows in commits of 10: reads before and after `zoo compact` (segments merged, index folded)."""
    t0 = time.perf_counter()
    rates = write_zoo(url, n, 10, base=base)
    k = max(1, len(rates) // 10)
    sm = {"write_s": time.perf_counter() - t0, "ingest_first": sum(rates[:k]) / k, "ingest_last": sum(rates[-k:]) / k}
    warm(url)
    sm["before"] = reads(url)
    sm["compact"] = run_cli(["zoo", "compact", "--zoo", url, "--no-novelty-index"], {})
    warm(url)
    sm["after"] = reads(url)
    shutil.rmtree(url)
    return sm


def _with_small(res: dict) -> dict:
    """The main run's results plus a --small-only run's, whichever finished last."""
    if SAVED_SMALL.is_file() and not res.get("small"):
        res["small"] = json.loads(SAVED_SMALL.read_text())["small"]
        res["skipped"] = [x for x in res.get("skipped", []) if not x.startswith("small")]
    return res


def recall_phase(tmp: Path) -> dict:
    """Recall@1 of the novelty index against exact search, on built populations (real training
    runs: synthetic rows are noise around 1,000 inits, where 'nearest' means little)."""
    from weightgen.nn_index import recall, update_all
    from zoo import Zoo
    from zoo.population import PopulationConfig, build_population

    out = {}
    for tasks, seeds in ((200, 5), (200, 17)):
        url = str(tmp / f"pop{tasks * seeds}")
        build_population(PopulationConfig(tasks=tasks, seeds=seeds, steps=100), url, show_progress=False)
        z = Zoo(url)
        update_all(z)
        t0 = time.perf_counter()
        r = recall(z, "mlp-s__k5__64", queries=200)
        out[r["rows"]] = {**r, "seconds": time.perf_counter() - t0}
        shutil.rmtree(url)
    return out


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
    ap.add_argument("--sizes", default="10000,100000,1000000", help="in this order (--small runs after its size)")
    ap.add_argument("--small", type=int, default=100000, help="also written in commits of 10 (0: skip)")
    ap.add_argument("--s3", default="10000,100000")
    ap.add_argument("--quick", action="store_true", help="2k/10k, small 2k, S3 2k: a smoke run")
    ap.add_argument("--budget-min", type=float, default=90, help="skip the phases not started by then")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    ap.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--recall-only", action="store_true",
                    help="add the novelty index's recall to the last run's results and rewrite the section")
    ap.add_argument("--s3-only", action="store_true", help="add the --s3 sizes to the last run's results")
    ap.add_argument("--small-only", action="store_true",
                    help="only the --small phase (commits of 10), saved apart: run it beside a --small 0 run")
    ap.add_argument("--compact-max", type=int, default=0,
                    help="sizes above this skip `zoo compact` (novelty index) and sample (0: none skip)")
    a = ap.parse_args(argv)
    if a.measure:
        op, url, opts, extra = a.measure
        print(json.dumps(measure(op, url, json.loads(opts), extra)))
        return
    if a.quick:
        a.sizes, a.small, a.s3 = "2000,3000", 2000, "2000"
    if a.s3_only:
        saved = SAVED
        res = json.loads(saved.read_text())
        server, endpoint = moto()
        opts = {**S3_OPTS, "endpoint_url": endpoint}
        base = _base()
        try:
            for n in [int(x) for x in a.s3.split(",") if x]:
                url = f"s3://zoo/z{n}"
                t0 = time.perf_counter()
                rates = write_zoo(url, n, max(100, n // 100), opts, base=base)
                res["s3"][str(n)] = {"write_s": time.perf_counter() - t0, "ingest_first": rates[0],
                                     "ingest_last": rates[-1], **reads(url, opts)}
                saved.write_text(json.dumps(res, indent=1, default=str))
        finally:
            server.stop()
        res["skipped"] = [x for x in res.get("skipped", []) if not x.startswith("S3")]
        saved.write_text(json.dumps(res, indent=1, default=str))
        text = report(_with_small(res), a)
        print(text)
        update_section(Path(a.results), SECTION, text)
        return
    if a.small_only:
        tmp = Path(tempfile.mkdtemp(prefix="wg-zoo-small-", dir=os.environ.get("WG_SCALE_DIR")))
        t_start, load0 = time.time(), os.getloadavg()[0]
        try:
            small = {a.small: small_phase(str(tmp / "zoo_small"), a.small, _base())}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        SAVED_SMALL.write_text(json.dumps({"small": small, "load": (load0, os.getloadavg()[0]),
                                           "minutes": (time.time() - t_start) / 60}, default=str))
        if SAVED.is_file():  # the main run finished first: the section gets these rows now
            res = _with_small(json.loads(SAVED.read_text()))
            text = report(res, a)
            print(text)
            update_section(Path(a.results), SECTION, text)
        return
    if a.recall_only:
        saved = SAVED
        res = json.loads(saved.read_text())
        tmp = Path(tempfile.mkdtemp(prefix="wg-zoo-recall-"))
        try:
            res["recall"] = recall_phase(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        saved.write_text(json.dumps(res, indent=1, default=str))
        text = report(_with_small(res), a)
        print(text)
        update_section(Path(a.results), SECTION, text)
        return
    sizes = [int(s) for s in a.sizes.split(",") if s]
    s3_sizes = [int(s) for s in a.s3.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="wg-zoo-scale-", dir=os.environ.get("WG_SCALE_DIR")))
    load0 = os.getloadavg()[0]
    res: dict = {"local": {}, "s3": {}, "small": {}, "sample": {}, "skipped": []}
    t_start = time.time()

    def over(what: str) -> bool:  # phases run in order of importance; later ones are skipped past the budget
        if (time.time() - t_start) / 60 > a.budget_min:
            res["skipped"].append(what)
            return True
        return False

    try:
        base = _base()
        home = tmp / "home"
        zoo1k, gen = train_small_generator(home)
        res["imports"] = run_measure("imports", zoo1k)
        res["local"][1000] = reads(zoo1k)
        res["sample"][1000] = sample_time(gen, zoo1k, home, tmp / "s1k")
        for n in sizes:
            if over(f"local {n:,}"):
                continue
            url = str(tmp / f"zoo{n}")
            t0 = time.perf_counter()
            rates = write_zoo(url, n, max(100, n // 100), base=base)
            k = max(1, len(rates) // 10)
            r = res["local"][n] = {"write_s": time.perf_counter() - t0, "ingest_first": sum(rates[:k]) / k,
                                   "ingest_last": sum(rates[-k:]) / k, **reads(url)}
            r["ingest_probe"] = probe_ingest(url, n, base=base)
            if a.compact_max and n > a.compact_max:
                res["skipped"].append(f"`zoo compact` (novelty index) and sample at {n:,}")
            else:
                r["compact"] = run_cli(["zoo", "compact", "--zoo", url], {})
                res["sample"][n] = sample_time(gen, url, home, tmp / f"s{n}")
            r["disk_gb"] = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file()) / 1e9
            shutil.rmtree(url)
            print(f"{n}: {json.dumps(r)[:300]}", file=sys.stderr)
            (Path(tempfile.gettempdir()) / "zoo_scale_partial.json").write_text(json.dumps(res, default=str))
            if a.small == n and not over(f"small commits {n:,}"):
                res["small"][n] = small_phase(str(tmp / "zoo_small"), n, base)
        if s3_sizes and not over("S3"):
            server, endpoint = moto()
            opts = {**S3_OPTS, "endpoint_url": endpoint}
            try:
                for n in s3_sizes:
                    if over(f"S3 {n:,}"):
                        continue
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
    SAVED.write_text(json.dumps(res, indent=1, default=str))
    res = _with_small(res)
    text = report(res, a)
    print(text)
    update_section(Path(a.results), SECTION, text)


def _ms(x) -> str:
    return "–" if x is None else f"{x * 1e3:,.0f} ms" if x < 10 else f"{x:,.1f} s"


def _row(name: str, cells: list, target: str = "", holds: str = "") -> str:
    return f"| {name} | " + " | ".join(cells) + f" | {target} | {holds} |"


def report(res: dict, a) -> str:
    local = {int(k): v for k, v in res["local"].items()}
    sizes = sorted(local)
    big = max(sizes)
    imp = res.get("imports", {})
    head = ["| measure | " + " | ".join(f"{n:,}" for n in sizes) + " | target | holds |",
            "|---|" + "---|" * len(sizes) + "---|---|"]

    def get(n, op, key="seconds"):
        return (local[n].get(op) or {}).get(key)

    def yes(ok):
        return "PASS" if ok else "**FAIL**"

    rows = [
        _row("open: `Zoo(url)` + `len()` (fresh process, after `import zoo`)", [_ms(get(n, "open")) for n in sizes],
             "≤ 1 s at 1M", yes(get(big, "open") <= 1.0)),
        _row("query `arch=mlp-s, test_acc>=0.9`: count + first 100 records", [_ms(get(n, "query")) for n in sizes],
             "≤ 100 ms at 1M", yes(get(big, "query") <= 0.1)),
        _row("query dataset prefix + tag + instruction text: count", [_ms(get(n, "query_text")) for n in sizes],
             "≤ 100 ms at 1M", yes(get(big, "query_text") <= 0.1)),
        _row("`weightgen zoo ls ... --limit 100 --jsonl` (whole command)", [_ms(get(n, "ls")) for n in sizes], "", ""),
        _row("peak RSS of `zoo ls` (MB)", [f"{get(n, 'ls', 'rss_mb'):,.0f}" for n in sizes], "", ""),
        _row("`load` one checkpoint (mean of 100 random)", [f"{get(n, 'load', 'per_load_ms'):.1f} ms" for n in sizes], "", ""),
        _row("`stack` 1,000 random checkpoints", [_ms(get(n, "stack")) for n in sizes], "", ""),
        _row("peak RSS of open / query / stack (MB)",
             [f"{get(n, 'open', 'rss_mb'):,.0f} / {get(n, 'query', 'rss_mb'):,.0f} / {get(n, 'stack', 'rss_mb'):,.0f}"
              for n in sizes], f"imports alone: {imp.get('rss_mb', 0):,.0f}", ""),
    ]
    smp = {int(k): v for k, v in res["sample"].items()}
    s0 = smp.get(1000, {})
    top = max(n for n in smp if n in local)  # the largest zoo sampled against (compaction may be skipped above it)
    at = "" if top == big else f" at {top:,} ({big:,} not measured)"
    rows.append(_row("`weightgen sample --n 8` with novelty against $WEIGHTGEN_ZOO",
                     [_ms(smp.get(n, {}).get("seconds")) for n in sizes],
                     f"within 1 s of 1k ({_ms(s0.get('seconds'))})",
                     yes(smp[top]["seconds"] <= s0.get("seconds", 0) + 1.0) + at))
    rows.append(_row("peak RSS of that `sample` (MB)",
                     [f"{smp[n]['rss_mb']:,.0f}" if n in smp else "–" for n in sizes],
                     "≤ 1 GB", yes(smp[top]["rss_mb"] <= 1024) + at))
    probe = {n: local[n]["ingest_probe"] for n in sizes if "ingest_probe" in local[n]}
    rows.append(_row("ingest: 3 more commits of 1,000 into the zoo (ckpt/s)",
                     [f"{probe[n]:,.0f}" if n in probe else "–" for n in sizes],
                     "at 1M within 20 % of 10k", yes(probe.get(big, 0) >= 0.8 * probe[min(probe)]) if probe else ""))
    rows.append(_row("while writing it: first / last 10 % of its 100 commits (ckpt/s)",
                     [f"{local[n]['ingest_first']:,.0f} / {local[n]['ingest_last']:,.0f}" if n in probe else "–"
                      for n in sizes], "", ""))
    rows.append(_row("write the zoo / `zoo compact` / size on disk",
                     [f"{local[n]['write_s']:,.0f} s / " + (f"{local[n]['compact']['seconds']:,.0f} s" if "compact" in local[n] else "–")
                      + f" / {local[n]['disk_gb']:.1f} GB"
                      if "write_s" in local[n] else "–" for n in sizes], "", ""))
    out = [SECTION, "", f"`python benchmarks/zoo_scale.py{' --quick' if a.quick else ''}` | {time.strftime('%Y-%m-%d')} | "
           f"{platform.machine()}, {os.cpu_count()} cores, shared (load average {res['load'][0]:.1f} at start, "
           f"{res['load'][1]:.1f} at end), {res['minutes']:.0f} min. Rows: 1,000 is a built population (the "
           "generator's training zoo); the others are synthetic `mlp-s` rows in 100 commits, written with `Zoo.add`.",
           "", *head, *rows, ""]
    for n, r in sorted((int(k), v) for k, v in (res.get("recall") or {}).items()):
        out.append(f"Novelty index recall@1 against exact search: {r['recall_at_1']:.3f} on {r['queries']} sampled "
                   f"entries of a built population of {n:,} checkpoints (leave-one-out; {r['dim']} dimensions, "
                   f"{r['candidates']} candidates re-ranked exactly; {r['seconds']:.0f} s to measure).")
    if res.get("recall"):
        out.append("")
    if res.get("skipped"):
        out += [f"Skipped (`--budget-min {a.budget_min:g}`, `--compact-max`): {', '.join(res['skipped'])}.", ""]
    for n, r in sorted(((int(k), v) for k, v in res["small"].items())):
        b, c = r["before"], r["after"]
        out += [f"{n:,} checkpoints written as {n // 10:,} commits of 10 (ingest {r['ingest_first']:,.0f} -> "
                f"{r['ingest_last']:,.0f} ckpt/s from the first to the last 10 %, {r['write_s']:,.0f} s in all); "
                f"`zoo compact` took {r['compact']['seconds']:,.1f} s:", "",
                "| read | before compaction | after | target | holds |", "|---|---|---|---|---|"]
        out[-2] = "| read | before compaction | after | 100 commits of the same size | target (before vs after) | holds |"
        out[-1] = "|---|---|---|---|---|---|"
        ref = local.get(n, {})
        for op, key, label in (("open", "seconds", "open"), ("query", "seconds", "query (count + 100 records)"),
                               ("query_text", "seconds", "text query"), ("load", "per_load_ms", "load (ms)"),
                               ("stack", "seconds", "stack 1,000")):
            x, y = b[op][key], c[op][key]
            fmt = (lambda v: f"{v:.1f}") if key == "per_load_ms" else _ms
            z = fmt(ref[op][key]) if op in ref else "–"
            out.append(f"| {label} | {fmt(x)} | {fmt(y)} | {z} | within 20 % | {yes(x <= 1.2 * y)} |")
        out.append("")
    if res["s3"]:
        s3 = {int(k): v for k, v in res["s3"].items()}
        out += ["On the S3-compatible test server (moto, in-process, loopback):", "",
                "| measure | " + " | ".join(f"{n:,}" for n in sorted(s3)) + " |", "|---|" + "---|" * len(s3)]
        for op, label in (("open", "open"), ("query", "query (count + 100 records)"), ("query_text", "text query"),
                          ("stack", "stack 1,000")):
            out.append(f"| {label} | " + " | ".join(_ms(s3[n][op]["seconds"]) for n in sorted(s3)) + " |")
        out.append("| load one (ms) | " + " | ".join(f"{s3[n]['load']['per_load_ms']:.0f}" for n in sorted(s3)) + " |")
        out.append("| ingest ckpt/s first / last commit | " + " | ".join(
            f"{s3[n]['ingest_first']:,.0f} / {s3[n]['ingest_last']:,.0f}" for n in sorted(s3)) + " |")
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
