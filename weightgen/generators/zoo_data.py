"""Training data for generators: zoo checkpoints aligned, standardized and tokenized, plus the
support data of the task each checkpoint was trained on (generators condition on support sets
drawn afresh every step, never on the zoo task's test split)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from weightgen.align import align
from weightgen.data import load_dataset
from weightgen.tokenize import Standardizer, TokenLayout


@dataclass
class ZooWeights:
    arch: str
    num_classes: int
    input_shape: tuple[int, ...]
    mode: str
    ids: list[str]
    datasets: list[str]  # per checkpoint
    tasks: list[str]  # distinct datasets
    task_index: torch.Tensor  # (N,) checkpoint -> task
    weights: dict[str, torch.Tensor]  # aligned, raw scale: name -> (N, ...)
    align_ref: dict[str, torch.Tensor]
    standardizer: Standardizer
    layout: TokenLayout
    tokens: torch.Tensor  # (N, T, C) standardized
    snapshot: str
    _task_data: list | None = None
    instructions: list[list[str]] | None = None  # per checkpoint, the phrasings stored in the zoo

    @classmethod
    def from_zoo(cls, zoo, arch: str, num_classes: int, input_shape, dataset_prefix: str = "", mode: str = "full",
                 min_test_acc: float = 0.0, exclude: tuple[str, ...] = (), tag: str | None = None,
                 max_checkpoints: int | None = None, token_dim: int | None = None) -> "ZooWeights":
        recs = [r for r in zoo.query(arch=arch, dataset=(dataset_prefix + "*") if dataset_prefix else None, tag=tag)
                if r["num_classes"] == num_classes and tuple(r["input_shape"]) == tuple(input_shape)
                and r["metrics"].get("test_acc", 1.0) >= min_test_acc and r["dataset"] not in set(exclude)]
        if not recs:
            raise ValueError(f"no {arch} checkpoints with {num_classes} classes and input {tuple(input_shape)} "
                             f"in zoo {zoo.url} (dataset prefix {dataset_prefix!r}); build some with `weightgen zoo build`")
        recs.sort(key=lambda r: r["id"])
        if max_checkpoints:
            recs = recs[:max_checkpoints]
        ids = [r["id"] for r in recs]
        layout = TokenLayout(arch, num_classes, input_shape, mode, token_dim)
        raw = {k: v.float() for k, v in zoo.stack(ids, layout.keys).items()}
        aligned, ref = align(raw, arch)
        std = Standardizer.fit(aligned)
        tokens = layout.tokenize(std.normalize(aligned))
        tasks = sorted({r["dataset"] for r in recs})
        t_index = torch.tensor([tasks.index(r["dataset"]) for r in recs])
        return cls(arch, num_classes, tuple(input_shape), mode, ids, [r["dataset"] for r in recs], tasks, t_index,
                   aligned, ref, std, layout, tokens, zoo.snapshot_id(),
                   instructions=[list(r.get("instructions") or []) for r in recs])

    def _pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's train split as one padded tensor (tasks, K, max per class, *input) + counts."""
        if self._task_data is None:
            per_task = []
            for name in self.tasks:
                t = load_dataset(name)
                per_task.append([t.x_train[t.y_train == c] for c in range(t.num_classes)])
            most = max(len(xc) for classes in per_task for xc in classes)
            pool = torch.zeros(len(self.tasks), self.num_classes, most, *self.input_shape)
            counts = torch.zeros(len(self.tasks), self.num_classes, dtype=torch.long)
            for ti, classes in enumerate(per_task):
                for c, xc in enumerate(classes):
                    pool[ti, c, :len(xc)] = xc
                    counts[ti, c] = len(xc)
            self._task_data = [pool, counts]
        return self._task_data[0], self._task_data[1]

    def texts(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
        """One instruction per row, drawn from the phrasings the zoo stores for that checkpoint (or,
        for zoos written before phrasings were stored, made from its digit-subset dataset name)."""
        from weightgen.instructions import digits_from_dataset, phrasings

        out = []
        for r in rows.tolist():
            options = self.instructions[r] if self.instructions else []
            if not options:
                digits = digits_from_dataset(self.datasets[r])
                options = phrasings(digits) if digits else []
            out.append(options[int(torch.randint(len(options), (1,), generator=generator))] if options else "")
        return out

    def _names(self, dataset: str) -> list[str]:
        from weightgen.instructions import digits_from_dataset

        return [str(c) for c in (digits_from_dataset(dataset) or range(self.num_classes))]

    def class_names(self, rows: torch.Tensor) -> list[list[str]]:
        """Per row, the name of each label's class (digit subsets: the digits), for class-name conditioning."""
        return [self._names(self.datasets[r]) for r in rows.tolist()]

    def task_class_names(self) -> list[list[str]]:
        """Per task (``self.tasks`` order), the name of each label's class."""
        return [self._names(t) for t in self.tasks]

    def task_inputs(self) -> list[torch.Tensor]:
        """Each zoo task's train-split inputs (N_t, *input_shape), in ``self.tasks`` order."""
        pool, counts = self._pool()
        return [torch.cat([pool[t, c, :counts[t, c]] for c in range(self.num_classes)]) for t in range(len(self.tasks))]

    def support(self, rows: torch.Tensor, per_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, K, M, *input_shape): a fresh support set (with replacement) from each checkpoint's
        task train split — one gather for the whole batch."""
        pool, counts = self._pool()
        t = self.task_index[rows]  # (B,)
        u = torch.rand(len(rows), self.num_classes, per_class, generator=generator)
        idx = (u * counts[t][..., None]).long()  # (B, K, M) indices below each class's count
        return pool[t[:, None, None], torch.arange(self.num_classes)[None, :, None], idx]

    def batch(self, batch_size: int, per_class: int, generator: torch.Generator | None = None,
              with_support: bool = True) -> dict:
        rows = torch.randint(len(self.ids), (batch_size,), generator=generator)
        out = {"tokens": self.tokens[rows], "rows": rows, "arch": self.arch}
        if with_support:
            out["support"] = self.support(rows, per_class, generator)
        out["texts"], out["names"] = self.texts(rows, generator), self.class_names(rows)
        return out

    def split(self, heldout_fraction: float, seed: int = 0) -> tuple["ZooWeights", "ZooWeights"]:
        """Split by *task* (never by checkpoint) so the held-out part tests generalization."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self.tasks), generator=g).tolist()
        n_out = max(1, int(round(len(self.tasks) * heldout_fraction)))
        out_tasks = set(perm[:n_out])
        mask = torch.tensor([int(t) in out_tasks for t in self.task_index])
        return self._subset(~mask), self._subset(mask)

    def _subset(self, mask: torch.Tensor) -> "ZooWeights":
        idx = mask.nonzero().flatten()
        sub = ZooWeights(self.arch, self.num_classes, self.input_shape, self.mode, [self.ids[i] for i in idx],
                         [self.datasets[i] for i in idx], self.tasks, self.task_index[idx],
                         {k: v[idx] for k, v in self.weights.items()}, self.align_ref, self.standardizer, self.layout,
                         self.tokens[idx], self.snapshot,
                         instructions=[self.instructions[i] for i in idx] if self.instructions else None)
        sub._task_data = self._task_data
        return sub


class ZooMixture:
    """Zoo weights of several architectures (same classes and input shape) trained as one
    generator: each step's batch comes from one architecture, drawn in proportion to its share of
    checkpoints. Offers what the training loop reads from a ``ZooWeights``; ``parts`` are those."""

    def __init__(self, parts: list[ZooWeights]):
        if len({(p.num_classes, tuple(p.input_shape)) for p in parts}) != 1:
            raise ValueError("a mixture's architectures must share the class count and input shape")
        self.parts = parts
        self.arch, self.num_classes, self.input_shape, self.mode = parts[0].arch, parts[0].num_classes, \
            parts[0].input_shape, parts[0].mode
        self.snapshot = parts[0].snapshot
        self.ids = [i for p in parts for i in p.ids]
        self.tasks = [t for p in parts for t in p.tasks]
        offsets = torch.tensor([0] + [len(p.tasks) for p in parts]).cumsum(0)
        self.task_index = torch.cat([p.task_index + offsets[i] for i, p in enumerate(parts)])

    def batch(self, batch_size: int, per_class: int, generator: torch.Generator | None = None,
              with_support: bool = True) -> dict:
        sizes = torch.tensor([float(len(p.ids)) for p in self.parts])
        part = self.parts[int(torch.multinomial(sizes, 1, generator=generator))]
        return part.batch(batch_size, per_class, generator, with_support)

    def split(self, heldout_fraction: float, seed: int = 0) -> tuple["ZooMixture", "ZooMixture"]:
        pairs = [p.split(heldout_fraction, seed) for p in self.parts]
        return ZooMixture([a for a, _ in pairs]), ZooMixture([b for _, b in pairs])

    def task_inputs(self) -> list[torch.Tensor]:
        return self.parts[0].task_inputs()
