"""Safe, idempotent, crash-safe ingestion of checkpoint files into a zoo.

Every input is read and validated against its architecture before anything is written; valid
checkpoints are written in batches, each published by one atomic commit (see ``zoo.store``), so
``kill -9`` at any moment leaves only whole entries and re-running the same command finishes the
rest (already-stored content hashes to an existing id and is skipped). Small jobs run in-process;
``workers > 1`` (or a Ray cluster via ``RAY_ADDRESS``) fans the work out as Ray tasks, each
writing its own segments, so no two workers ever write the same key.

Inputs: checkpoint files, HF-style folders, directories (searched recursively) and ``.jsonl``
manifests whose lines are ``{"path": ..., "dataset"?, "seed"?, "metrics"?, "tags"?, ...}``.

One bad input never sinks the job: each item is checked in this order — its manifest fields,
the file's headers and config, the arch's tensor names/shapes/dtypes and the size the file
declares (``max_bytes``, see :func:`size_limit`), and only then its data (finite values) — and
every failure, expected or not, becomes a rejected row with a reason; the rest are ingested.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.checkpoints import CHECKPOINT_EXT, Rejected, is_hf_folder, open_checkpoint
from zoo.store import Checkpoint, Zoo
from zoo.validate import arch_spec, check_declared, check_metadata, validate_tensors

BATCH_BYTES = 256 << 20
BATCH_ROWS = 4096
_ITEM_FIELDS = ("dataset", "arch", "seed", "run_id", "step", "train_config", "metrics", "tags", "instructions")
SLACK_BYTES = 64 << 20


def size_limit(spec: dict, max_bytes: int | None = None) -> int:
    """What one file may make ingestion allocate: ``max_bytes``, else ``$WEIGHTGEN_MAX_CHECKPOINT_BYTES``,
    else 4x the arch's tensors + 64 MiB (a state dict saved with its Adam state is ~3x the weights)."""
    if max_bytes is None and os.environ.get("WEIGHTGEN_MAX_CHECKPOINT_BYTES"):
        max_bytes = int(os.environ["WEIGHTGEN_MAX_CHECKPOINT_BYTES"])
    return max_bytes if max_bytes is not None else 4 * sum(t.numel * t.dtype.itemsize for t in spec.values()) + SLACK_BYTES


@dataclass
class Item:
    """One thing to ingest, with any metadata a manifest line gave it."""

    path: str
    dataset: str | None = None
    arch: str | None = None
    seed: int | None = None
    run_id: str | None = None
    step: int | None = None
    train_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tags: list = field(default_factory=list)
    instructions: list = field(default_factory=list)
    reject: tuple | None = None  # (reason, detail) found while listing it (a bad manifest line)


@dataclass
class Summary:
    ingested: list = field(default_factory=list)
    duplicate: list = field(default_factory=list)
    rejected: list = field(default_factory=list)  # {"path", "reason", "detail"}

    def merge(self, other: "Summary") -> "Summary":
        self.ingested += other.ingested
        self.duplicate += other.duplicate
        self.rejected += other.rejected
        return self

    def as_dict(self) -> dict:
        return {"ingested": len(self.ingested), "duplicate": len(self.duplicate), "rejected": len(self.rejected),
                "rejected_by_reason": dict(Counter(r["reason"] for r in self.rejected)),
                "ids": self.ingested, "rejections": self.rejected}

    def text(self) -> str:
        d = self.as_dict()
        lines = [f"ingested {d['ingested']}, duplicate {d['duplicate']}, rejected {d['rejected']}"]
        for reason, n in sorted(d["rejected_by_reason"].items()):
            lines.append(f"  rejected ({reason}): {n}")
        for r in self.rejected[:20]:
            lines.append(f"  {r['path']}: {r['reason']}: {r['detail']}")
        if len(self.rejected) > 20:
            lines.append(f"  ... and {len(self.rejected) - 20} more (use --json for all)")
        return "\n".join(lines)


def expand(paths: list[str]) -> list[Item]:
    """Files, HF folders, directories (recursive) and .jsonl manifests -> items, in a stable order.
    Never raises for one bad path: it becomes an item that is rejected with its reason."""
    items: list[Item] = []
    for raw in paths:
        p = Path(raw)
        try:
            if p.suffix == ".jsonl" and p.is_file():
                items += _read_manifest(p)
            elif p.is_dir() and not is_hf_folder(p):
                found = sorted(q for q in p.rglob("*") if (q.is_file() and q.suffix.lower() in CHECKPOINT_EXT
                                                           and not is_hf_folder(q.parent)) or is_hf_folder(q))
                items += [Item(str(q)) for q in found]
            else:
                items.append(Item(str(p)))  # missing paths are reported as rejections, not crashes
        except (OSError, UnicodeDecodeError, ValueError) as e:
            items.append(Item(str(p), reject=("unreadable", f"cannot list or read it ({e})")))
    return items


def _read_manifest(p: Path) -> list[Item]:
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(Item(where, reject=("bad_manifest", f"line is not JSON ({e})")))
            continue
        path = d.get("path") if isinstance(d, dict) else None
        if not isinstance(path, str) or not path:
            got = f"'path' {path!r}" if isinstance(d, dict) else type(d).__name__
            out.append(Item(where, reject=("bad_manifest", f"line must be a JSON object with a 'path' string, got {got}")))
            continue
        fields = {k: d[k] for k in _ITEM_FIELDS if k in d}
        bad = check_metadata(fields.get("arch"), dataset=fields.get("dataset") or "",
                             **{k: fields.get(k) for k in ("seed", "run_id", "step", "train_config", "metrics", "tags",
                                                           "instructions")})
        full = str(Path(path) if Path(path).is_absolute() else p.parent / path)
        if bad:
            out.append(Item(where, reject=(bad[0][0], f"{path}: " + "; ".join(d for _, d in bad))))
            continue
        out.append(Item(full, **{k: v for k, v in fields.items() if v is not None}))
    return out


def _resolve_shape(item: Item, arch, dataset, info: dict) -> tuple[str, int, tuple[int, ...]]:
    """(dataset name, num_classes, input_shape) from the item, the job's --dataset or the file's config."""
    from weightgen.data import dataset_shape

    ds = item.dataset or dataset or info.get("dataset")
    if ds:
        if not isinstance(ds, str):
            raise Rejected("bad_metadata", f"dataset must be a dataset name (a string), got {ds!r}"[:300], item.path)
        try:
            num_classes, input_shape = dataset_shape(ds)
        except Exception as e:  # noqa: BLE001 - any dataset error is this item's problem, not the job's
            raise Rejected("bad_dataset", str(e)[:300], item.path) from None
        return ds, num_classes, tuple(input_shape)
    if "num_classes" in info and "input_shape" in info:
        bad = check_metadata(arch, info["num_classes"], info["input_shape"])
        if bad:
            raise Rejected(bad[0][0], "config: " + "; ".join(d for _, d in bad), item.path)
        return "", info["num_classes"], tuple(info["input_shape"])
    raise Rejected("no_dataset", "dataset unknown: pass --dataset", item.path)


def prepare(item: Item, arch: str | None, dataset: str | None, tags: list[str], max_bytes: int | None = None) -> Checkpoint:
    """Read and validate one item; raises :class:`Rejected` with the reason. Metadata, then
    headers, then the declared size and shapes, then the data: nothing is read that will not fit."""
    from weightgen.archs import ARCHS

    if item.reject:
        raise Rejected(item.reject[0], item.reject[1], item.path)
    f = open_checkpoint(item.path)
    arch = item.arch or arch or f.info.get("arch")
    if not arch:
        raise Rejected("no_arch", "architecture unknown: pass --arch", item.path)
    if not isinstance(arch, str):
        raise Rejected("bad_metadata", f"arch must be an architecture name (a string), got {arch!r}"[:300], item.path)
    if arch not in ARCHS:
        raise Rejected("unknown_arch", f"{arch!r}; available: {', '.join(ARCHS.names())}", item.path)
    ds, num_classes, input_shape = _resolve_shape(item, arch, dataset, f.info)
    try:
        spec = arch_spec(arch, num_classes, input_shape)
    except ValueError as e:
        raise Rejected("bad_shape", str(e), item.path) from None
    limit = size_limit(spec, max_bytes)
    if f.alloc_bytes > limit:
        raise Rejected("too_large", f"declares {f.alloc_bytes} bytes of data, over the {limit}-byte limit for one "
                       f"{arch} checkpoint (--max-bytes or $WEIGHTGEN_MAX_CHECKPOINT_BYTES)", item.path)
    problems = check_declared(f.declared(), spec)
    if not problems:
        tensors = f.load()
        problems = validate_tensors(tensors, arch, num_classes, input_shape)
    if problems:
        raise Rejected(problems[0][0], "; ".join(d for _, d in problems), item.path)
    ck = Checkpoint(tensors, arch, num_classes, input_shape, dataset=ds, seed=item.seed, run_id=item.run_id,
                    step=item.step, train_config=item.train_config, metrics=item.metrics,
                    tags=sorted(set(tags) | set(item.tags)), instructions=item.instructions, source=item.path)
    bad = ck.problems(tensors=False)
    if bad:
        raise Rejected(bad[0][0], "; ".join(d for _, d in bad), item.path)
    return ck


def ingest_items(zoo: Zoo, items: list[Item], arch=None, dataset=None, tags=(), progress=None,
                 max_bytes: int | None = None) -> Summary:
    """In-process ingestion of ``items``; ``progress`` is called with the number of items done."""
    summary, batch, batch_bytes = Summary(), [], 0

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            res = zoo.add(batch, validate=False)  # validated in prepare()
            summary.ingested += res["ingested"]
            summary.duplicate += res["duplicate"]
        batch, batch_bytes = [], 0

    for item in items:
        try:
            ck = prepare(item, arch, dataset, list(tags), max_bytes)
        except Rejected as r:
            summary.rejected.append({"path": r.path or item.path, "reason": r.reason, "detail": r.detail})
        except Exception as e:  # noqa: BLE001 - an unforeseen failure is still this item's, not the job's
            summary.rejected.append({"path": item.path, "reason": "error", "detail": f"{type(e).__name__}: {e}"[:300]})
        else:
            batch.append(ck)
            batch_bytes += sum(t.numel() * t.element_size() for t in ck.tensors.values())
            if len(batch) >= BATCH_ROWS or batch_bytes >= BATCH_BYTES:
                flush()
        if progress:
            progress(1)
    flush()
    return summary


def ingest(paths: list[str], zoo_url: str, arch: str | None = None, dataset: str | None = None, tags=(),
           workers: int = 1, show_progress: bool = True, storage_options: dict | None = None,
           max_bytes: int | None = None) -> Summary:
    """Ingest files into the zoo at ``zoo_url``: in-process, or as a Ray batch job when
    ``workers > 1`` or ``RAY_ADDRESS`` names a cluster. ``max_bytes``: see :func:`size_limit`."""
    from tqdm import tqdm

    items = expand(paths)
    bar = tqdm(total=len(items), desc="ingest", unit="ckpt", disable=not show_progress)
    try:
        if workers > 1 or os.environ.get("RAY_ADDRESS"):
            return _ingest_ray(items, zoo_url, arch, dataset, tags, max(workers, 1), bar, storage_options, max_bytes)
        zoo = Zoo(zoo_url, storage_options=storage_options)
        return ingest_items(zoo, items, arch, dataset, tags, progress=bar.update, max_bytes=max_bytes)
    finally:
        bar.close()


def _ingest_chunk(items, zoo_url, arch, dataset, tags, storage_options, max_bytes=None) -> dict:
    zoo = Zoo(zoo_url, storage_options=storage_options)
    return asdict(ingest_items(zoo, [Item(**i) for i in items], arch, dataset, tags, max_bytes=max_bytes))


def _ingest_ray(items, zoo_url, arch, dataset, tags, workers, bar, storage_options, max_bytes=None) -> Summary:
    import ray

    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
        started_here = True
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_ingest_chunk)
        if "://" not in zoo_url:
            zoo_url = str(Path(zoo_url).resolve())  # workers may run in another cwd
        items = [Item(**{**asdict(i), "path": os.path.abspath(i.path)}) for i in items]  # so may the items' paths
        n_chunks = min(len(items), 4 * workers) or 1
        chunks = [items[i::n_chunks] for i in range(n_chunks)]
        pending = {task.remote([asdict(i) for i in c], zoo_url, arch, dataset, list(tags), storage_options, max_bytes): c
                   for c in chunks if c}
        summary = Summary()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                chunk = pending.pop(ref)
                try:
                    summary.merge(Summary(**ray.get(ref)))
                except Exception as e:  # noqa: BLE001 - a worker that died (after retries): its items, not the job
                    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    summary.rejected += [{"path": i.path, "reason": "worker_failed",
                                          "detail": f"{why}; run again to finish (committed entries are kept)"}
                                         for i in chunk]
                bar.update(len(chunk))
        return summary
    finally:
        if started_here:
            ray.shutdown()
