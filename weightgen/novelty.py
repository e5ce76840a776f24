"""Novelty: is a generated model a copy of a zoo checkpoint? (Zeng et al., arXiv 2506.07998)

Distances are taken after hidden-unit alignment to one reference (a permuted copy of a zoo
model is still a copy) and per-tensor standardization (so no layer dominates). The score is the
distance to the nearest zoo checkpoint divided by the zoo's own typical nearest-neighbour
distance: ~0 means a copy, >= 1 means as far from the zoo as zoo members are from each other.
The nearest checkpoint's accuracy on the requested task is reported too: distance alone is
ambiguous (shared/research/feasibility.md §3, pitfall 4).
"""
from __future__ import annotations

import json
import os
import time
import weakref
from pathlib import Path

import torch

from weightgen.align import align
from weightgen.evaluate import accuracy_many
from weightgen.tokenize import Standardizer

MAX_ZOO = 3000
MISS_TTL_S = 60.0  # how long "no comparable checkpoints in the zoo" is trusted


def flat(sd: dict[str, torch.Tensor], keys: list[str], std: Standardizer) -> torch.Tensor:
    z = std.normalize({k: sd[k] for k in keys})
    return torch.cat([z[k].flatten(1) for k in keys], 1)


def _zoo_reference(zoo_url: str, arch: str, k: int, shape: tuple, keys: tuple):
    """(ids, stacked tensors) of the zoo's checkpoints of this arch, class count and input shape."""
    from zoo import open_zoo

    z = open_zoo(zoo_url, mode="r")
    ids = sorted(z.ids(arch=arch, num_classes=k, input_shape=shape))[:MAX_ZOO]  # ids only: no record is read
    if not ids:
        return None
    return ids, z.stack(ids, list(keys))


def zoo_nn_distance(x: torch.Tensor, max_n: int = 500) -> float:
    """Median distance from a zoo member to its nearest other member."""
    x = x[:max_n]
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.median())


# generator -> {(zoo, snapshot, k, shape): prepared zoo}; dies with the generator (a server that
# evicts a generator frees its prepared zoo too)
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


REFERENCE_FILE = "novelty_reference.safetensors"


def save_reference(gen, zoo_url: str, arch: str, k: int, shape, out_dir) -> int:
    """Store the training zoo's checkpoints of (arch, k, shape), aligned to the generator's reference,
    beside the trained generator: novelty is measured against the zoo it was trained on, and reading
    ~9 MB once costs milliseconds where re-aligning the zoo cost ~0.35 s per process (and needed the zoo
    to be reachable). Aligned weights compute exactly what the originals do (alignment only permutes
    hidden units), so the nearest checkpoint's accuracy is measured on them. Returns the row count."""
    from safetensors.torch import save_file

    stats = gen.weight_stats(arch)
    keys = list(stats.stat_names)
    got = _zoo_reference(zoo_url, arch, k, tuple(shape), tuple(keys))
    if got is None:
        return 0
    ids, zoo_sd = got
    zoo_al, _ = align({n: zoo_sd[n].float() for n in keys}, arch, ref=stats.align_ref() or None)
    meta = {"ids": json.dumps(ids), "arch": arch, "num_classes": str(k), "input_shape": json.dumps(list(shape))}
    save_file({n: v.contiguous() for n, v in zoo_al.items()}, str(Path(out_dir) / REFERENCE_FILE), metadata=meta)
    return len(ids)


def _stored_reference(ref_dir, arch: str, k: int, shape) -> tuple[list[str], dict] | None:
    path = Path(ref_dir) / REFERENCE_FILE if ref_dir else None
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if (meta.get("arch"), meta.get("num_classes"), meta.get("input_shape")) != (arch, str(k), json.dumps(list(shape))):
            return None
        return json.loads(meta["ids"]), {n: f.get_tensor(n) for n in f.keys()}


def _prepared_zoo(gen, info: dict, arch: str, k: int, shape, ref_dir=None) -> dict | None:
    """The zoo side of novelty, done once per generator: aligned, standardized, flattened, and
    its typical nearest-neighbour distance (alignment of ~1,000 models is the expensive part).
    Read from the reference stored beside the generator when it covers (arch, k, shape), else from
    the zoo."""
    # $WEIGHTGEN_ZOO wins over the path recorded at training time: on a cluster the generator was
    # trained elsewhere and the zoo is read by URL (ray_cluster.yaml)
    key = (_zoo_url(info), info.get("zoo_snapshot") or "", arch, k, tuple(shape))
    per_gen = _PREPARED.setdefault(gen, {})
    hit = per_gen.get(key)
    if hit is not None and (hit["zx"] is not None or time.monotonic() - hit["at"] < MISS_TTL_S):
        return hit if hit["zx"] is not None else None
    stats = gen.weight_stats(arch)
    keys = list(stats.stat_names)
    ref = {n: v for n, v in stats.align_ref().items()}
    stored = _stored_reference(ref_dir, arch, k, shape)
    if stored is not None:
        ids, zoo_al = stored
    elif key[0] and (indexed := _indexed_zoo(key[0], arch, k, shape)) is not None:
        per_gen[key] = indexed  # the zoo's novelty index: a request reads it and ~32 candidates, not the zoo
        return indexed
    else:
        got = _zoo_reference(key[0], arch, k, tuple(shape), tuple(keys)) if key[0] else None
        if got is None:  # remembered briefly: checkpoints with k classes may be added to the zoo later
            per_gen[key] = {"zx": None, "at": time.monotonic()}
            return None
        ids, zoo_sd = got
        zoo_al, _ = align({n: zoo_sd[n].float() for n in keys}, arch, ref=ref or None)
    std = stats.standardizer()
    zx = flat(zoo_al, keys, std)
    per_gen[key] = {"ids": ids, "zoo_sd": zoo_al, "zx": zx, "zx_sq": zx.pow(2).sum(1), "base": zoo_nn_distance(zx),
                    "keys": keys, "ref": ref, "std": std}
    return per_gen[key]


def _indexed_zoo(zoo_url: str, arch: str, k: int, shape) -> dict | None:
    from weightgen.nn_index import open_index
    from zoo import open_zoo
    from zoo.records import collection_id

    z = open_zoo(zoo_url, mode="r")
    cid = collection_id(arch, k, shape)
    return {"index": z, "cid": cid, "zx": "index", "at": time.monotonic()} if open_index(z, cid) else None


def _novelty_from_index(z: dict, arch: str, k: int, shape, sd: dict, task) -> dict:
    from weightgen.nn_index import nearest

    try:
        nn = nearest(z["index"], z["cid"], {n: v[:1] for n, v in sd.items()})
    except Exception as e:  # a zoo that moved or is unreachable must not fail the sample
        return {"error": f"zoo novelty index unavailable: {e}"}
    if nn is None:
        return {"error": f"no {arch} checkpoints with {k} classes in the zoo's novelty index"}
    out = {"distance_to_nearest": nn["distance"], "zoo_nn_distance": nn["base"],
           "ratio": nn["distance"] / max(nn["base"], 1e-12), "nearest_zoo_id": nn["id"],
           "basis": f"zoo novelty index ({nn['rows']} checkpoints; `weightgen zoo compact` updates it)"}
    if task is not None and len(task.y_test):
        out["nearest_zoo_accuracy"] = float(accuracy_many(arch, k, shape, nn["weights"], task.x_test, task.y_test).mean())
    return out


def _zoo_url(info: dict) -> str | None:
    return os.environ.get("WEIGHTGEN_ZOO") or info.get("zoo")


def novelty_vs_zoo(gen, info: dict, arch: str, k: int, shape, sd: dict[str, torch.Tensor], task,
                   ref_dir=None) -> dict | None:
    """Novelty of stacked samples ``sd`` (n=1 usually) against the generator's zoo (its stored
    reference in ``ref_dir``, the trained generator's directory, where there is one)."""
    if not _zoo_url(info) and ref_dir is None:
        return None
    try:
        z = _prepared_zoo(gen, info, arch, k, shape, ref_dir)
    except Exception as e:  # a zoo that moved or is unreachable must not fail the sample
        return {"error": f"zoo unavailable for novelty: {e}"}
    if z is None:
        return {"error": f"no {arch} checkpoints with {k} classes in the zoo to compare with"}
    if "index" in z:
        return _novelty_from_index(z, arch, k, shape, sd, task)
    s_al, _ = align({n: sd[n].float() for n in z["keys"]}, arch, ref=z["ref"] or None)
    sx = flat(s_al, z["keys"], z["std"])
    # |s - z|^2 = |s|^2 + |z|^2 - 2 s.z with the zoo's norms computed once: 4x faster than cdist here
    d = (sx.pow(2).sum(1, keepdim=True) + z["zx_sq"] - 2 * sx @ z["zx"].T).clamp_min(0).sqrt()  # (n, Z)
    dmin, idx = d.min(1)
    out = {"distance_to_nearest": float(dmin.mean()), "zoo_nn_distance": z["base"],
           "ratio": float(dmin.mean()) / max(z["base"], 1e-12), "nearest_zoo_id": z["ids"][int(idx[0])]}
    if task is not None and len(task.y_test):
        near = {n: z["zoo_sd"][n][idx] for n in z["keys"]}
        out["nearest_zoo_accuracy"] = float(accuracy_many(arch, k, shape, near, task.x_test, task.y_test).mean())
    return out
