"""Issue 10 cost: wall time and peak RSS of ``weightgen sample --arch vit-s`` with a real-size ViT-S.

The backbone is the registry's vit-s (384 wide, 12 layers, 6 heads, patch 4 at 32x32; 21.4 M
parameters), randomly initialised: time and memory do not depend on the values. The data is a
synthetic archive in the exact ``cifar-10-batches-py`` format (PER_CLASS train images per class).
Each ``sample`` runs in a fresh process (as a user would), measured from outside: first with an
empty feature cache, then again (features read from the zoo).

    python benchmarks/vit_sample_cost.py [--per-class 20] [--support 16] [--serve ~/.weightgen]

``--serve HOME``: then a Ray Serve app with that backbone and HOME's mlp-s generators, its
processes' RSS after a whole-model vit-s request, a ``parts: task`` one and an mlp-s one.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages, not another install's

import numpy as np


def write_cifar(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    n = 10 * per_class // 5
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = rng.integers(0, 10, size=n).tolist()
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"labels": y, b"data": x}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)


def run_cli(args: list[str], env: dict) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB of the child, return code)."""
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "weightgen.cli", *args], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (peak RSS in KiB on Linux)
        wall = time.time() - t0
        rc = os.waitstatus_to_exitcode(status)
        if rc:
            err.seek(0)
            print(err.read().decode()[-2000:], file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, rc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--support", type=int, default=16)
    ap.add_argument("--serve", metavar="HOME", help="also measure a Serve app with this home's mlp-s generators")
    a = ap.parse_args()
    from weightgen.archs import build_model

    tmp = Path(tempfile.mkdtemp(prefix="vit_cost_"))
    build_model("vit-s", 10, (3, 32, 32)).save_pretrained(tmp / "vit-s")
    write_cifar(tmp / "data", a.per_class)
    env = {**os.environ, "WEIGHTGEN_HOME": str(tmp / "home"), "WEIGHTGEN_DATA": str(tmp / "data"),
           "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    zoo = ["--zoo", str(tmp / "zoo")]
    add = run_cli(["zoo", "add-backbone", str(tmp / "vit-s"), "--arch", "vit-s", *zoo], env)
    rows = {"add-backbone": add}
    for run in ("sample (features computed)", "sample (features cached)"):
        rows[run] = run_cli(["sample", "--arch", "vit-s", "--dataset", "cifar10", "--support-per-class",
                             str(a.support), "--torch-threads", "2", "--out", str(tmp / "d"), *zoo], env)
    m = json.loads((tmp / "d" / "manifest.json").read_text())
    out = {"rows_featurized": m["support_size"] + m["predicted_accuracy_n"], "backbone_params": m["backbone"]["num_params"],
           "runs": {k: {"wall_s": round(w, 1), "peak_rss_mib": round(r), "rc": rc} for k, (w, r, rc) in rows.items()}}
    if a.serve:
        out["serve"] = serve_memory(tmp, env, Path(a.serve).expanduser(), a.support)
    print(json.dumps(out, indent=1))


def serve_memory(tmp: Path, env: dict, mlp_home: Path, support: int) -> dict:
    """RSS of a Serve app holding the vit-s backbone and the mlp-s generators of ``mlp_home``
    (links to them), after a whole-model vit-s request, a ``parts: task`` one and an mlp-s one."""
    import httpx
    import ray
    from ray import serve

    from serving.app import build_app

    bench = runpy.run_path(str(ROOT / "benchmarks" / "serving.py"))
    (tmp / "home" / "generators").mkdir(parents=True, exist_ok=True)
    for g in (mlp_home / "generators").iterdir():
        (tmp / "home" / "generators" / g.name).symlink_to(g)
    os.environ.update({k: env[k] for k in ("WEIGHTGEN_HOME", "WEIGHTGEN_DATA")}, WEIGHTGEN_ZOO=str(tmp / "zoo"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sock = bench["reserve_port"]()
    port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"home": str(tmp / "home"), "torch_threads": 2}), name="weightgen", route_prefix="/")
    res = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            for name, req in (("vit-s whole model", {"arch": "vit-s", "dataset": "cifar10", "support_per_class": support}),
                              ("vit-s parts=task", {"arch": "vit-s", "dataset": "cifar10", "parts": "task",
                                                    "support_per_class": support}),
                              ("mlp-s", {"arch": "mlp-s", "dataset": "digits:classes=4,2,8,1,0"})):
                t0 = time.time()
                r = c.post("/v1/generate", json=req)
                rss = bench["serve_rss_mb"]()
                res[name] = {"status": r.status_code, "bytes": len(r.content), "wall_s": round(time.time() - t0, 1),
                             "serve_rss_mib": {k: round(v) for k, v in rss.items()}, "total_mib": round(sum(rss.values()))}
    finally:
        serve.shutdown()
        ray.shutdown()
    return res


if __name__ == "__main__":
    main()
