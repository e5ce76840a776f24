"""Queries on the index: ``Filters`` evaluated on a part's columns, cheapest first, and the
*filters file* beside each part that makes them cheap.

A part's Parquet file holds every event column, compressed, records included; reading the
filter columns of a 1M-row part from it took 60-300 ms a query (zstd and string decoding), and a
substring match over 1M instructions another ~60 ms. So each part also gets
``<part>.filters``: its filter columns as an uncompressed Arrow IPC file, strings of few values
dictionary-encoded, memory-mapped where the zoo is local (one GET on an object store). Readers
then pay for the rows they touch: code and metric filters run over whole columns of integers
and floats; list filters (tag, instruction) run only on the rows still matching. The file also
holds where each entry's tensors are (``LOCATE``): a stack of 1,000 random rows of a 1M zoo read
~480 Parquet row groups (0.5 s) just to find them. Parts written
before this file existed are read from Parquet, as before.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zoo import events as ev

CODED = ("arch", "dataset", "shape", "cid", "seg")  # few distinct values: dictionary-encoded in the filters file
LISTS = ("tags", "instructions")
LOCATE = ("id", "cid", "seg", "row")  # where an entry's tensors are: `load` and `stack` read these per row
COLUMNS = ("arch", "dataset", "shape", "num_classes") + LISTS + LOCATE  # and every metric (``ev.METRIC_PREFIX``)
SUFFIX = ".filters"  # one extension, so gc's part-name rule keeps it with its part


class Filters:
    """A query: every given field must match (see ``Zoo.query``)."""

    def __init__(self, arch=None, dataset=None, tag=None, metrics=(), instruction=None, num_classes=None,
                 input_shape=None, **equals):
        self.arch, self.dataset, self.tag, self.instruction = arch, dataset, tag, instruction
        self.metrics = list(metrics or [])
        self.num_classes = num_classes
        self.shape = None if input_shape is None else "x".join(str(int(s)) for s in input_shape)
        self.equals = equals  # other record fields: checked on the matching records themselves

    def columns(self) -> list[str]:
        cols = [c for c, v in (("arch", self.arch), ("dataset", self.dataset), ("tags", self.tag),
                               ("instructions", self.instruction), ("num_classes", self.num_classes),
                               ("shape", self.shape)) if v is not None]
        return cols + [ev.METRIC_PREFIX + m for m, _, _ in self.metrics]

    def key(self) -> tuple:
        return (self.arch, self.dataset, self.tag, self.instruction, tuple(tuple(m) for m in self.metrics),
                self.num_classes, self.shape)

    def mask(self, t: pa.Table, m: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``t`` matching (and set in ``m``): whole-column filters first, list filters
        (tag, instruction) only on the rows still in."""
        m = np.ones(t.num_rows, bool) if m is None else m.copy()
        if self.arch is not None:
            m &= _strings(t["arch"], lambda a: pc.equal(a, self.arch))
        if self.dataset is not None:
            d = self.dataset
            m &= _strings(t["dataset"], (lambda a: pc.starts_with(a, d[:-1])) if d.endswith("*") else (lambda a: pc.equal(a, d)))
        if self.shape is not None:
            m &= _strings(t["shape"], lambda a: pc.equal(a, self.shape))
        if self.num_classes is not None:
            m &= _np(t["num_classes"], -1) == int(self.num_classes)
        for name, lo, hi in self.metrics:
            col = ev.METRIC_PREFIX + name
            if col not in t.column_names:
                return np.zeros(t.num_rows, bool)
            v = _np(t[col], np.nan)  # NaN (stored before NaN was refused) matches no range
            ok = ~np.isnan(v)
            if lo is not None:
                ok &= v >= lo
            if hi is not None:
                ok &= v <= hi
            m &= ok
        for col, pred in (("tags", None if self.tag is None else (lambda a: pc.equal(a, self.tag))),
                          ("instructions", None if self.instruction is None else
                           (lambda a: pc.match_substring(a, self.instruction, ignore_case=True)))):
            if pred is None:
                continue
            rows = np.flatnonzero(m)
            if not len(rows):
                break
            sub = t[col] if len(rows) == t.num_rows else t[col].take(pa.array(rows))
            m[rows] = _lists(sub, pred)
        return m

    def keep(self, rec: dict) -> bool:
        return all(rec.get(k) == v for k, v in self.equals.items())


def _np(col, fill) -> np.ndarray:
    return col.fill_null(fill).to_numpy() if len(col) else np.zeros(0)


def _strings(col: pa.ChunkedArray, pred) -> np.ndarray:
    """``pred`` over a (possibly dictionary-encoded) string column, evaluated once per distinct value."""
    out = []
    for chunk in col.chunks:
        if pa.types.is_dictionary(chunk.type):
            hit = pred(chunk.dictionary).fill_null(False).to_numpy(zero_copy_only=False)
            codes = chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            out.append(np.where(codes >= 0, hit[np.maximum(codes, 0)] if len(hit) else False, False))
        else:
            out.append(pred(chunk).fill_null(False).to_numpy(zero_copy_only=False))
    return np.concatenate(out) if out else np.zeros(0, bool)


def _lists(col: pa.ChunkedArray, pred) -> np.ndarray:
    """Rows of a list<string> column where any element satisfies ``pred``."""
    out, base = np.zeros(len(col), bool), 0
    for chunk in col.chunks:
        flat = pc.list_flatten(chunk)
        if len(flat):
            parents = pc.list_parent_indices(chunk).to_numpy()
            hit = pred(flat).fill_null(False).to_numpy(zero_copy_only=False)
            out[base + parents[hit]] = True
        base += len(chunk)
    return out


def filter_table(t: pa.Table) -> pa.Table:
    """The filters file's table for a part's events ``t``: one chunk, coded strings encoded."""
    cols = {}
    for c in t.column_names:
        if c in COLUMNS or c.startswith(ev.METRIC_PREFIX):
            col = t[c]
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            col = col.combine_chunks()
            cols[c] = pc.dictionary_encode(col) if c in CODED else col
    return pa.table(cols)


def filters_bytes(t: pa.Table) -> bytes:
    sink, t = io.BytesIO(), filter_table(t)
    with pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    return sink.getvalue()


def open_filters(zoo, part_key: str) -> pa.Table | None:
    """A part's filters file, memory-mapped when local; None for parts written without one."""
    key = part_key.removesuffix(".parquet") + SUFFIX
    try:
        src = zoo._open_file(key)
        if isinstance(src, str):
            return pa.ipc.open_file(pa.memory_map(src)).read_all()
        with src:
            return pa.ipc.open_file(pa.BufferReader(src.read())).read_all()
    except (OSError, pa.ArrowInvalid):  # absent (an older part), or unreadable: Parquet has every column
        return None
