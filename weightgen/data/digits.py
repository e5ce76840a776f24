"""sklearn's ``load_digits`` (1,797 real 8x8 digits, shipped with scikit-learn) and its task family.

Convention: x = pixels / 16, flattened to 64 float32 features. One fixed stratified 70/30 split
of the 1,797 images is shared by every task derived from it, so a test image of one subset task
is never a train image of another, and held-out tasks stay honest.

The ``digits-subsets`` family is ordered class subsets (``digits:classes=3,1,4,0,9``). A fixed set
of class *sets* is held out: the zoo is built only from the others, and generators are evaluated
on held-out sets (unseen class sets) and on unseen orderings of training sets (unseen tuples).
"""
from __future__ import annotations

import gzip
import importlib.util
import itertools
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from weightgen.data import DatasetError, TaskData, parse_classes, parse_kv, register_dataset, select_classes, stratified_split

SPLIT_SEED = 0


def _digits_csv() -> Path:
    """The file ``sklearn.datasets.load_digits`` reads, found without importing scikit-learn
    (importing ``sklearn.datasets`` costs ~1.6-2.9 s, a third of a ``weightgen sample``; parsing the
    file takes 12 ms). Same values, checked in tests/test_data_loaders.py."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DatasetError("the digits dataset ships with scikit-learn, which is not installed (pip install scikit-learn)")
    return path


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(_digits_csv(), "rt") as f:
        a = np.loadtxt(f, delimiter=",")
    return (a[:, :-1] / 16.0).astype(np.float32), a[:, -1].astype(np.int64)


def _digits_full() -> TaskData:
    x, y = _digits_arrays()
    tr, te = stratified_split(y, 0.3, SPLIT_SEED)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return TaskData("digits", t(x[tr]), t(y[tr]), t(x[te]), t(y[te]), 10,
                    [str(i) for i in range(10)], "sklearn.datasets.load_digits")


@register_dataset("digits")
def load_digits_task(args: str) -> TaskData:
    name = "digits" + (f":{args}" if args else "")
    kw = parse_kv(args, {"classes"}, name)
    full = _digits_full()
    if "classes" in kw:
        return select_classes(full, parse_classes(kw["classes"], name), name)
    return full


def subset_name(classes) -> str:
    return "digits:classes=" + ",".join(str(int(c)) for c in classes)


@dataclass(frozen=True)
class SubsetFamily:
    """Ordered k-class subsets of a base dataset, with a fixed held-out share of class sets."""

    base: str = "digits"
    base_classes: int = 10
    k: int = 5
    n_heldout_sets: int = 20
    seed: int = 0

    def _sets(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        sets = list(itertools.combinations(range(self.base_classes), self.k))
        rng = np.random.default_rng(self.seed)
        held = set(rng.choice(len(sets), size=min(self.n_heldout_sets, len(sets) - 1), replace=False).tolist())
        return [s for i, s in enumerate(sets) if i not in held], [s for i, s in enumerate(sets) if i in held]

    @property
    def heldout_sets(self) -> list[tuple[int, ...]]:
        return self._sets()[1]

    @property
    def train_sets(self) -> list[tuple[int, ...]]:
        return self._sets()[0]

    def name(self, classes) -> str:
        return f"{self.base}:classes=" + ",".join(str(int(c)) for c in classes)

    def train_tasks(self, n: int, seed: int = 0) -> list[str]:
        """``n`` distinct ordered tasks whose class sets are not held out (cycling over sets)."""
        return [self.name(t) for t in self._tuples(self.train_sets, n, np.random.default_rng(seed), set())]

    def heldout_tasks(self, n: int, seed: int = 1, zoo_tasks=()) -> dict[str, list[str]]:
        """Held-out tasks in two kinds: ``set`` (class set never in the zoo) and ``tuple`` (a training
        class set in an order that ``zoo_tasks`` never used)."""
        rng = np.random.default_rng(seed)
        used = {tuple(parse_classes(t.split("classes=")[1], t)) for t in zoo_tasks}
        sets = [self.name(t) for t in self._tuples(self.heldout_sets, n, rng, set())]
        tuples = [self.name(t) for t in self._tuples(self.train_sets, n, rng, used)]
        return {"set": sets, "tuple": tuples}

    @staticmethod
    def _tuples(sets, n, rng, exclude) -> list[tuple[int, ...]]:
        out, seen = [], set(exclude)
        order = rng.permutation(len(sets))
        tries = 0
        while len(out) < n:
            s = sets[order[len(out) % len(order)] if tries < 10 * n else rng.integers(len(sets))]
            t = tuple(int(c) for c in rng.permutation(s))
            tries += 1
            if t in seen:
                if tries > 1000 * max(n, 1):
                    raise DatasetError(f"cannot draw {n} distinct tasks from {len(sets)} class sets")
                continue
            seen.add(t)
            out.append(t)
        return out


FAMILIES = {"digits-subsets": SubsetFamily()}


def get_family(name: str) -> SubsetFamily:
    if name not in FAMILIES:
        raise DatasetError(f"Unknown task family {name!r}. Available: {', '.join(FAMILIES)}")
    return FAMILIES[name]
