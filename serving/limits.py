"""Bounds on what one request may cost, checked before the cost is paid.

* bodies: a size cap, and a minimum rate once a grace period has passed, so a client that trickles
  its body loses its own slot (408) instead of holding it for as long as it likes;
* JSON bodies in flight per ingress: a byte budget (503 + Retry-After when full), because parsing
  multiplies a body several times over in memory and blocks the event loop while it runs;
* work: classes, rows and rows x classes of the dataset a request brings, refused (413/422)
  before a replica starts on it: the cost of sampling grows with classes squared (attention over
  the class rows; measured with the quickstart diffusion generator, n = 32: 100 classes 3.8 s, 200 classes 10.9 s,
  and 3,000 classes kept a replica busy for minutes);
* what leaves: header values percent-encoded to printable ASCII, JSON without NaN/Infinity.

Plain functions of numbers and strings: the ingress and the generator replicas both use them.
"""

import asyncio
import math
import time
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

RETRY_AFTER_S = 5
# printable ASCII stays as it is (but "%", the escape); everything else is UTF-8, percent-encoded
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def error(status: int, message: Any, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": json_safe(message)}, status_code=status, headers=headers)


def busy(message: str) -> JSONResponse:
    return error(503, message, retry_after=RETRY_AFTER_S)


async def read_body(request: Request, limit: int, min_rate: float, grace_s: float) -> bytearray | JSONResponse:
    """The body, at most ``limit`` bytes, arriving at ``min_rate`` bytes/s on average once
    ``grace_s`` has passed (by time t it must have sent (t - grace_s) * min_rate bytes). A
    bytearray, not copied into bytes: an upload is held several times over already."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return error(413, f"request body over {limit} bytes")
    body, start = bytearray(), time.monotonic()
    chunks = request.stream().__aiter__()
    while True:
        wait = start + grace_s + len(body) / min_rate - time.monotonic()
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(chunks.__anext__(), wait)
        except StopAsyncIteration:
            return body
        except asyncio.TimeoutError:
            return error(408, f"request body arrived too slowly: {len(body)} bytes in {time.monotonic() - start:.1f} s "
                              f"(at least {min_rate:g} bytes/s after the first {grace_s:g} s)")
        except ClientDisconnect:
            return error(400, "client disconnected before sending the whole body")
        body += chunk
        if len(body) > limit:  # also caps chunked bodies that declare no length
            return error(413, f"request body over {limit} bytes")


class ByteBudget:
    """Bytes reserved by requests in flight on one event loop (no lock: one thread)."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.capacity:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


def check_work(rows: int, classes: int, max_rows: int, max_classes: int, max_rows_x_classes: int) -> tuple[int, str] | None:
    """(status, message) when a dataset of ``rows`` examples and ``classes`` classes asks for more
    work than the server allows; None when it is within bounds."""
    if classes > max_classes:
        return 422, f"{classes} classes; this server generates weights for at most {max_classes} (max_classes)"
    if rows > max_rows:
        return 413, f"{rows} examples; this server takes at most {max_rows} per request (max_rows)"
    if rows * classes > max_rows_x_classes:
        return 413, (f"{rows} examples x {classes} classes = {rows * classes}; this server takes at most "
                     f"{max_rows_x_classes} (max_rows_x_classes): send fewer examples")
    return None


def npz_rows(data: bytes) -> int:
    """Rows of ``x`` plus ``x_test`` in an .npz, from the arrays' headers (nothing inflated past
    them); 0 when they cannot be read (the full parse then says what is wrong)."""
    import io
    import zipfile

    import numpy as np

    rows = 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in ("x.npy", "x_test.npy"):
                if name in z.namelist():
                    with z.open(name) as f:
                        major, _ = np.lib.format.read_magic(f)
                        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                        shape = read(f)[0]
                        rows += int(shape[0]) if shape else 0
    except Exception:  # noqa: BLE001 - not a zip, not an .npy header: task_from_npz explains
        return 0
    return rows


def header_value(value: Any) -> str:
    """A header-safe value: printable ASCII kept, anything else (CR, LF, non-ASCII) percent-encoded
    as UTF-8, so ``urllib.parse.unquote`` gives the original back."""
    return quote(str(value), safe=_HEADER_SAFE)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and ±Infinity replaced by None (null): JSON has no literal for them, and one
    such value in a stored record must not turn a whole page into a 500."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
