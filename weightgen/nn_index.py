"""A nearest-neighbour index per zoo collection, so novelty never reads the whole zoo.

Stored in the zoo at ``nn/<collection>/<version>/``: each checkpoint aligned to one reference
(``weightgen.align``), standardized per tensor, flattened (D values) and projected on the top
``DIM`` principal directions of a sample; the ids; and the reference, statistics and basis that
map a new model into the same space. A request projects its sample, scans the (N, DIM) table in
chunks (N x 32 floats: 128 MB at a million rows, scanned without holding it), takes the
``CANDIDATES`` nearest and re-ranks them exactly in the full space from their own weights — the
only checkpoints it reads. The median nearest-neighbour distance of the zoo (the novelty ratio's
denominator) is measured on a sample when the index is built. Brute force over 32 dimensions is
~10 ms per 100k rows; an ANN library (faiss) would not earn its place at this size.

``update`` (run by ``weightgen zoo compact``) projects only entries the index lacks and drops
removed ones; the basis is refitted when the index is rebuilt from scratch (fewer than
``REFIT_BELOW`` rows indexed, or ``rebuild=True``). A new version is written whole and marked
complete last; readers take the newest complete one.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from weightgen.align import align
from weightgen.tokenize import Standardizer

DIM = 32
CANDIDATES = 32
SAMPLE = 2048  # rows that fit the reference, statistics and basis
CHUNK = 4096  # rows aligned and projected at a time
REFIT_BELOW = 256


def _flat(sd: dict[str, torch.Tensor], keys: list[str], std: Standardizer) -> torch.Tensor:
    z = std.normalize({k: sd[k].float() for k in keys})
    return torch.cat([z[k].flatten(1) for k in keys], 1)  # (B, D)


def _versions(zoo, cid: str) -> list[str]:
    return sorted((v for v in zoo._list(f"nn/{cid}") if v != "zarr.json"), reverse=True)


def open_index(zoo, cid: str) -> dict | None:
    """The newest complete index of collection ``cid``: attrs plus lazy array handles."""
    for v in _versions(zoo, cid):
        try:
            g = zoo.root[f"nn/{cid}/{v}"]
            attrs = g.attrs.asdict()
        except (KeyError, FileNotFoundError):
            continue
        if attrs.get("complete"):
            return {"version": v, "group": g, **attrs}
    return None


def _space(idx: dict) -> tuple[dict, Standardizer, torch.Tensor, torch.Tensor]:
    g = idx["group"]
    ref = {k: torch.from_numpy(g[f"ref.{k}"][...]) for k in idx["keys"]}
    std = Standardizer({k: tuple(v) for k, v in idx["std"].items()})
    return ref, std, torch.from_numpy(g["mean"][...]), torch.from_numpy(g["basis"][...])


def _project(zoo, ids: list[str], arch: str, keys: list[str], ref, std, mean, basis) -> np.ndarray:
    out = []
    for i in range(0, len(ids), CHUNK):
        sd, _ = align({k: v.float() for k, v in zoo.stack(ids[i:i + CHUNK], keys).items()}, arch, ref=ref)
        out.append(((_flat(sd, keys, std) - mean) @ basis).numpy())
    return np.concatenate(out) if out else np.zeros((0, basis.shape[1]), np.float32)


def update(zoo, cid: str, rebuild: bool = False) -> dict:
    """Bring the index of ``cid`` up to date with the zoo; returns {"rows", "added", "dropped", "refit"}."""
    from weightgen.archs import get_arch

    arch, k, shape = _parse_cid(cid)
    ids = sorted(zoo.ids(arch=arch, num_classes=k, input_shape=shape))
    old = None if rebuild else open_index(zoo, cid)
    if old is not None and old["rows"] < REFIT_BELOW and len(ids) > 2 * old["rows"]:
        old = None  # fitted on too few: fit again on what is there now
    if not ids:
        return {"rows": 0, "added": 0, "dropped": 0, "refit": False}
    keys = [t.name for t in get_arch(arch).tensors(k, shape) if t.dtype.is_floating_point]
    if old is None:
        sample = [ids[i] for i in np.random.default_rng(0).choice(len(ids), min(SAMPLE, len(ids)), replace=False)]
        sd, ref = align({n: v.float() for n, v in zoo.stack(sample, keys).items()}, arch)
        std = Standardizer.fit(sd)
        x = _flat(sd, keys, std)
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        basis = vh[:DIM].T.contiguous()  # (D, DIM)
        d = torch.cdist(x[:500], x[:500])
        d.fill_diagonal_(float("inf"))
        base = float(d.min(1).values.median()) if len(x) > 1 else 1.0
        kept_ids, kept = [], np.zeros((0, basis.shape[1]), np.float32)
    else:
        ref, std, mean, basis = _space(old)
        base = old["base"]
        old_ids = [bytes(r).hex() for r in old["group"]["ids"][...]]
        alive = np.isin(np.array(old_ids, object), np.array(ids, object))
        kept_ids = [i for i, a in zip(old_ids, alive) if a]
        kept = old["group"]["proj"][...][alive]
    have = set(kept_ids)
    new_ids = [i for i in ids if i not in have]
    proj = np.concatenate([kept, _project(zoo, new_ids, arch, keys, ref, std, mean, basis)]).astype(np.float32)
    all_ids = kept_ids + new_ids
    version = f"{time.time_ns():020d}"
    g = zoo.root.create_group(f"nn/{cid}/{version}", attributes={"complete": False})
    for name, arr in [("proj", proj), ("ids", np.frombuffer(bytes.fromhex("".join(all_ids)), np.uint8).reshape(-1, 32)),
                      ("mean", mean.numpy()), ("basis", basis.numpy())] + \
            [(f"ref.{n}", ref[n].float().numpy()) for n in keys]:
        a = g.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=(min(65536, max(1, arr.shape[0])),
                                                                         *arr.shape[1:]), compressors=None)
        a[...] = arr
    g.attrs.update({"complete": True, "arch": arch, "num_classes": k, "input_shape": list(shape), "keys": keys,
                    "std": {n: list(v) for n, v in std.stats.items()}, "base": base, "rows": len(all_ids),
                    "dim": int(basis.shape[1]), "built_at": time.time()})  # the commit: written last
    for v in _versions(zoo, cid)[2:]:  # keep the previous version for readers that opened it
        zoo._delete_prefix(f"nn/{cid}/{v}")
    return {"rows": len(all_ids), "added": len(new_ids), "dropped": (old["rows"] - len(kept_ids)) if old else 0,
            "refit": old is None}


def _parse_cid(cid: str) -> tuple[str, int, tuple[int, ...]]:
    arch, k, shape = cid.split("__")
    return arch, int(k.removeprefix("k")), tuple(int(s) for s in shape.split("x"))


def update_all(zoo) -> dict:
    """``update`` every collection whose architecture can be aligned and standardized."""
    out = {}
    for cid in sorted(c for c in zoo._list("collections") if c != "zarr.json"):
        try:
            out[cid] = update(zoo, cid)
        except Exception as e:  # noqa: BLE001 - one collection's index must not stop the others
            out[cid] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def nearest(zoo, cid: str, sd: dict[str, torch.Tensor], candidates: int = CANDIDATES) -> dict | None:
    """The visible zoo entry nearest to the one model ``sd`` (name -> (1, ...)), via the index:
    {"id", "distance", "base", "weights" (its aligned tensors, (1, ...)), "rows"}; None without an index."""
    idx = open_index(zoo, cid)
    if idx is None:
        return None
    arch, keys = idx["arch"], idx["keys"]
    ref, std, mean, basis = _space(idx)
    s_al, _ = align({k: sd[k].float() for k in keys}, arch, ref=ref)
    x = _flat(s_al, keys, std)  # (1, D)
    q = ((x - mean) @ basis).numpy()[0]
    proj, n = idx["group"]["proj"], idx["rows"]
    best_d, best_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
    for lo in range(0, n, 65536):
        block = proj[lo:lo + 65536]
        d = ((block - q) ** 2).sum(1)
        take = np.argpartition(d, min(candidates, len(d)) - 1)[:candidates]
        best_d, best_i = np.r_[best_d, d[take]], np.r_[best_i, take + lo]
    order = np.argsort(best_d)[:candidates * 2]
    cand_rows = np.sort(best_i[order])
    ids = [bytes(r).hex() for r in idx["group"]["ids"].get_orthogonal_selection((cand_rows,))]
    alive = zoo._retry(lambda: zoo._view().contains_many(ids))
    ids = [i for i, a in zip(ids, alive) if a]  # entries removed since the index was built drop out
    if not ids:
        return None
    z_al, _ = align({k: v.float() for k, v in zoo.stack(ids, keys).items()}, arch, ref=ref)
    dist = torch.cdist(x, _flat(z_al, keys, std))[0]  # exact, full space
    j = int(dist.argmin())
    return {"id": ids[j], "distance": float(dist[j]), "base": idx["base"], "rows": n,
            "weights": {k: v[j:j + 1] for k, v in z_al.items()}}


def recall(zoo, cid: str, queries: int = 200, seed: int = 0) -> dict:
    """Recall@1 of ``nearest`` against exact search on a sample: each sampled entry's nearest
    *other* entry, found exactly over the whole collection in the full aligned, standardized space,
    and through the index (projection candidates, exact re-rank). Reads the whole collection."""
    idx = open_index(zoo, cid)
    arch, keys, n = idx["arch"], idx["keys"], idx["rows"]
    ref, std, mean, basis = _space(idx)
    ids = [bytes(r).hex() for r in idx["group"]["ids"][...]]
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(n, min(queries, n), replace=False))
    xq = _flat(align({k: v.float() for k, v in zoo.stack([ids[i] for i in q], keys).items()}, arch, ref=ref)[0], keys, std)
    best = torch.full((len(q),), float("inf"))
    arg = torch.zeros(len(q), dtype=torch.long)
    for lo in range(0, n, CHUNK):  # exact, full space
        x = _flat(align({k: v.float() for k, v in zoo.stack(ids[lo:lo + CHUNK], keys).items()}, arch, ref=ref)[0], keys, std)
        d = torch.cdist(xq, x)
        own = torch.from_numpy(q)[:, None] == torch.arange(lo, lo + len(x))[None]
        d[own] = float("inf")
        m, j = d.min(1)
        better = m < best
        best[better], arg[better] = m[better], j[better] + lo
    proj = idx["group"]["proj"][...]
    hits = 0
    for t, i in enumerate(q):  # the index: projection candidates (itself left out), exact re-rank
        d = ((proj - proj[i]) ** 2).sum(1)
        d[i] = np.inf
        cand = np.argpartition(d, CANDIDATES)[:CANDIDATES]
        z_al, _ = align({k: v.float() for k, v in zoo.stack([ids[c] for c in cand], keys).items()}, arch, ref=ref)
        hits += int(cand[int(torch.cdist(xq[t:t + 1], _flat(z_al, keys, std))[0].argmin())] == int(arg[t]))
    return {"recall_at_1": hits / len(q), "queries": len(q), "rows": n, "dim": int(basis.shape[1]),
            "candidates": CANDIDATES}
