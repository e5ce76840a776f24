"""Safe, idempotent, crash-safe ingestion of checkpoint files into a zoo.

Every input is read and validated against its architecture before anything is written; valid
checkpoints are written in batches, each published by one atomic commit (see ``zoo.store``), so
``kill -9`` at any moment leaves only whole entries and re-running the same command finishes the
rest (already-stored content hashes to an existing id and is skipped). Small jobs run in-process;
``workers > 1`` (or a Ray cluster via ``RAY_ADDRESS``) fans the work out as Ray tasks, each
writing its own segments, so no two workers ever write the same key.

Inputs: checkpoint files, HF-style folders, directories (searched recursively) and ``.jsonl``
manifests whose lines are ``{"path": ..., "dataset"?, "seed"?, "metrics"?, "tags"?, ...}``.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.checkpoints import CHECKPOINT_EXT, Rejected, is_hf_folder, read_checkpoint
from zoo.store import Checkpoint, Zoo, validate_tensors

BATCH_BYTES = 256 << 20
BATCH_ROWS = 4096
_ITEM_FIELDS = ("dataset", "arch", "seed", "run_id", "step", "train_config", "metrics", "tags", "instructions")


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
    """Files, HF folders, directories (recursive) and .jsonl manifests -> items, in a stable order."""
    items: list[Item] = []
    for raw in paths:
        p = Path(raw)
        if p.suffix == ".jsonl" and p.is_file():
            items += _read_manifest(p)
        elif p.is_dir() and not is_hf_folder(p):
            found = sorted(q for q in p.rglob("*") if (q.is_file() and q.suffix.lower() in CHECKPOINT_EXT
                                                       and not is_hf_folder(q.parent)) or is_hf_folder(q))
            items += [Item(str(q)) for q in found]
        else:
            items.append(Item(str(p)))  # missing paths are reported as rejections, not crashes
    return items


def _read_manifest(p: Path) -> list[Item]:
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            path = d.pop("path")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            out.append(Item(f"{p}:{n}", dataset="\0bad-manifest-line"))
            continue
        full = Path(path) if Path(path).is_absolute() else p.parent / path
        out.append(Item(str(full), **{k: d[k] for k in _ITEM_FIELDS if k in d}))
    return out


def prepare(item: Item, arch: str | None, dataset: str | None, tags: list[str]) -> Checkpoint:
    """Read and validate one item; raises :class:`Rejected` with the reason."""
    from weightgen.archs import ARCHS
    from weightgen.data import dataset_shape

    if item.dataset == "\0bad-manifest-line":
        raise Rejected("bad_manifest", "manifest line is not a JSON object with a 'path'", item.path)
    tensors, info = read_checkpoint(item.path)
    arch = item.arch or arch or info.get("arch")
    if not arch:
        raise Rejected("no_arch", "architecture unknown: pass --arch", item.path)
    if arch not in ARCHS:
        raise Rejected("unknown_arch", f"{arch!r}; available: {', '.join(ARCHS.names())}", item.path)
    ds = item.dataset or dataset or info.get("dataset")
    if ds:
        try:
            num_classes, input_shape = dataset_shape(ds)
        except Exception as e:  # any dataset error is this item's problem, not the job's
            raise Rejected("bad_dataset", str(e), item.path) from None
    elif "num_classes" in info and "input_shape" in info:
        num_classes, input_shape, ds = info["num_classes"], tuple(info["input_shape"]), ""
    else:
        raise Rejected("no_dataset", "dataset unknown: pass --dataset", item.path)
    problems = validate_tensors(tensors, arch, num_classes, input_shape)
    if problems:
        reason = problems[0][0]
        raise Rejected(reason, "; ".join(d for _, d in problems), item.path)
    return Checkpoint(tensors, arch, num_classes, input_shape, dataset=ds, seed=item.seed, run_id=item.run_id,
                      step=item.step, train_config=item.train_config, metrics=item.metrics,
                      tags=sorted(set(tags) | set(item.tags)), instructions=item.instructions, source=item.path)


def ingest_items(zoo: Zoo, items: list[Item], arch=None, dataset=None, tags=(), progress=None) -> Summary:
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
            ck = prepare(item, arch, dataset, list(tags))
        except Rejected as r:
            summary.rejected.append({"path": r.path or item.path, "reason": r.reason, "detail": r.detail})
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
           workers: int = 1, show_progress: bool = True, storage_options: dict | None = None) -> Summary:
    """Ingest files into the zoo at ``zoo_url``: in-process, or as a Ray batch job when
    ``workers > 1`` or ``RAY_ADDRESS`` names a cluster."""
    from tqdm import tqdm

    items = expand(paths)
    bar = tqdm(total=len(items), desc="ingest", unit="ckpt", disable=not show_progress)
    try:
        if workers > 1 or os.environ.get("RAY_ADDRESS"):
            return _ingest_ray(items, zoo_url, arch, dataset, tags, max(workers, 1), bar, storage_options)
        zoo = Zoo(zoo_url, storage_options=storage_options)
        return ingest_items(zoo, items, arch, dataset, tags, progress=bar.update)
    finally:
        bar.close()


def _ingest_chunk(items, zoo_url, arch, dataset, tags, storage_options) -> dict:
    zoo = Zoo(zoo_url, storage_options=storage_options)
    return asdict(ingest_items(zoo, [Item(**i) for i in items], arch, dataset, tags))


def _ingest_ray(items, zoo_url, arch, dataset, tags, workers, bar, storage_options) -> Summary:
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
        n_chunks = min(len(items), 4 * workers) or 1
        chunks = [items[i::n_chunks] for i in range(n_chunks)]
        pending = {task.remote([asdict(i) for i in c], zoo_url, arch, dataset, list(tags), storage_options): len(c)
                   for c in chunks if c}
        summary = Summary()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                summary.merge(Summary(**ray.get(ref)))
                bar.update(pending.pop(ref))
        return summary
    finally:
        if started_here:
            ray.shutdown()
