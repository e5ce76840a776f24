"""Class memory: examples of every class a generator was trained on, recalled by the class's name.

An instruction alone ("classify handwritten 2, 7 and 9") names classes but carries no examples of
them. A generator that reads text can only know what a "7" looks like from its training data, so
it keeps a few training examples of each class it saw (drawn from the zoo tasks' *train* splits,
never a test split) and recalls them by the request's class names: the recalled examples then
condition the sample, fit the declared closed-form head and score best-of-n, exactly as a user's
support set would. The prior alone, trained on 2 CPU cores, ignores its prefix (RESULTS.md, IGPG):
its instruction-only samples were at chance, so this is the part that makes them work, and the
manifest and harness say so (``support: class memory``) with the pure-generation number beside it.

Names are matched as written (the class names a request parses from its instruction, e.g. "7"),
not by embedding: the sentence embeddings of "the handwritten digit eight" and "... nine" are 0.93
cosine-similar under all-MiniLM-L6, and through the XBT projection a name's own match scored
0.53-0.64 while wrong ones reached 0.50, so no similarity threshold would both route every known
name right and refuse an unknown one. A name the memory lacks is an error naming the classes it has.
"""
from __future__ import annotations

import torch
from torch import nn


class UnknownClassError(ValueError):
    """A requested class is not one the generator was trained on (the message lists those it was)."""


class ClassMemory(nn.Module):
    """``per_class`` examples (buffer ``x``: (C, M, *input_shape)) of each class in ``names``."""

    def __init__(self, names: list[str], per_class: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.names = [str(n) for n in names]
        self.register_buffer("x", torch.zeros(len(self.names), per_class if self.names else 0, *input_shape))

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def collect(data, per_class: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
        """(names, (C, M, *input)) from the tasks of a ``ZooWeights`` (split): each class name's distinct
        train-split examples pooled over every task that has it, M drawn without replacement (with, if fewer)."""
        part = getattr(data, "parts", [data])[0]
        pool, counts = part._pool()
        names_per_task = part.task_class_names()
        by_name: dict[str, list[torch.Tensor]] = {}
        for t in sorted(set(part.task_index.tolist())):  # a split lists every task; only its own have rows
            for c, name in enumerate(names_per_task[t]):
                by_name.setdefault(name, []).append(pool[t, c, :counts[t, c]])
        g = torch.Generator().manual_seed(seed)
        names = sorted(by_name, key=lambda n: (len(n), n))
        out = []
        for n in names:
            xs = torch.unique(torch.cat(by_name[n]).flatten(1), dim=0).reshape(-1, *pool.shape[3:])
            pick = torch.randperm(len(xs), generator=g)[:per_class] if len(xs) >= per_class else \
                torch.randint(len(xs), (per_class,), generator=g)
            out.append(xs[pick])
        return names, torch.stack(out)

    def fill(self, x: torch.Tensor) -> None:
        self.x.copy_(x)

    def locate(self, names: list[str]) -> list[int]:
        """Memory row of each requested class name."""
        if not self.names:
            raise UnknownClassError("this generator keeps no class memory (trained before it had one)")
        missing = [n for n in names if str(n) not in self.names]
        if missing:
            raise UnknownClassError(f"class{'es' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                                    f"{'are' if len(missing) > 1 else 'is'} not among those this generator was "
                                    f"trained on ({', '.join(self.names)})")
        return [self.names.index(str(n)) for n in names]

    def recall(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (K*M, *input), y (K*M,)): the remembered examples of each requested class, labels in the
        order named."""
        x = self.x[self.locate(names)]  # (K, M, *input)
        y = torch.arange(len(names)).repeat_interleave(x.shape[1])
        return x.flatten(0, 1).clone(), y
