"""Scattered rows of a segment's arrays, read as byte ranges.

Segments are stored uncompressed (one ``BytesCodec``), in chunks of ~4 MB of rows
(``store.CHUNK_BYTES``: big for the sequential reads that training does). Zarr reads whole chunks,
so one random row of a 1M-row zoo cost a 4 MB read per tensor: a stack of 1,000 random rows read
~4 GB and took 1.8-4.7 s, and a single ``load`` ~8 ms. A row of an uncompressed chunk is a known
byte range, so these reads fetch just the rows' bytes (concurrently; one ranged GET each on an
object store). Arrays with any other codec are read through Zarr as before.
"""
from __future__ import annotations

import asyncio
import sys

import numpy as np
from zarr.abc.store import RangeByteRequest
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync


def raw(arr) -> bool:
    """Whether ``arr`` stores rows as plain bytes this machine reads as they are: one ``BytesCodec``
    (little-endian, or 1-byte items), chunked along the first axis only."""
    codecs = getattr(arr.metadata, "codecs", ())
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec) or sys.byteorder != "little":
        return False
    if arr.dtype.itemsize > 1 and getattr(codecs[0].endian, "value", None) != "little":
        return False
    return tuple(arr.chunks[1:]) == tuple(arr.shape[1:])


def take_rows(arr, rows) -> np.ndarray:
    """``arr[rows]`` for a ``raw`` array, in the order of ``rows``, reading only runs of adjacent
    rows. A chunk that was never written (Zarr leaves out chunks of fill value) reads as fill."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= arr.shape[0]):
        raise IndexError(f"rows out of range for {arr.shape[0]} rows")
    shape = tuple(arr.shape[1:])
    row_bytes = int(np.prod(shape, dtype=np.int64)) * arr.dtype.itemsize
    per = arr.chunks[0]
    order = np.argsort(rows, kind="stable")
    s = rows[order]
    # runs: adjacent rows of one chunk, read with one request
    cut = np.flatnonzero((np.diff(s) != 1) | (s[1:] // per != s[:-1] // per)) + 1
    starts, ends = np.r_[0, cut], np.r_[cut, len(s)]
    store, base = arr.store_path.store, arr.store_path.path
    proto = default_buffer_prototype()
    zeros = (0,) * len(shape)

    def request(a: int, b: int):
        c, lo = divmod(int(s[a]), per)
        key = f"{base}/{arr.metadata.encode_chunk_key((c, *zeros))}"
        return store.get(key, proto, byte_range=RangeByteRequest(lo * row_bytes, (lo + b - a) * row_bytes))

    async def get_all():
        return await asyncio.gather(*(request(a, b) for a, b in zip(starts, ends)))

    out = np.empty((len(rows), *shape), arr.dtype)
    for a, b, buf in zip(starts, ends, sync(get_all()) if len(s) else []):
        if buf is None:
            out[order[a:b]] = arr.metadata.fill_value
        else:
            out[order[a:b]] = np.frombuffer(buf.to_bytes(), arr.dtype).reshape(b - a, *shape)
    return out
