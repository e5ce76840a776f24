"""Limits of Serve's HTTP proxy itself, which reads every request before the app sees it.

Two things the proxy did without bound (measured with benchmarks/abuse.py):

* request heads: uvicorn's httptools protocol buffers a head of any size (one 100 MB header got a
  200 and grew the proxy from 172 MB to 1.4 GB). Past ``WEIGHTGEN_MAX_HEADER_BYTES`` (32 KiB,
  nginx's 4 x 8 KiB) the client gets 431 and the connection is closed.
* request bodies: Serve's proxy reads every body as fast as the client sends it and queues it
  until the ingress asks for it (``proxy_asgi_receive``), whatever the ingress will do with it, so
  six concurrent 64 MiB uploads grew it by 800 MB. Here a body over
  ``WEIGHTGEN_PROXY_MAX_BODY_BYTES`` (65 MiB: an upload at the app's 64 MiB limit, and its
  multipart framing) gets 413 before it is read, and the bodies in flight in one proxy share
  ``WEIGHTGEN_PROXY_BODY_BYTES`` (320 MiB: four such uploads and the ingress's 32 MiB of JSON);
  past it, 503 + Retry-After, before the body is read. A body with no Content-Length counts as it
  arrives. Raise both with the app's limits (``ServeArgs``).

Serve builds its proxy's uvicorn server itself; the only hook into it is
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, called in every proxy process before its server
starts. ``weightgen serve`` sets it; for ``serve run``/``serve deploy``, set it in the environment
of ``ray start`` (``ray_cluster.yaml`` does):

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy:setup
"""
from __future__ import annotations

import json
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = int(os.environ.get("WEIGHTGEN_MAX_HEADER_BYTES", 32 << 10))
MAX_BODY_BYTES = int(os.environ.get("WEIGHTGEN_PROXY_MAX_BODY_BYTES", 65 << 20))
BODY_BUDGET = int(os.environ.get("WEIGHTGEN_PROXY_BODY_BYTES", 320 << 20))
RETRY_AFTER_S = 5
LINGER_S = 5.0  # after a rejection, input is read and dropped this long, so the client can read it
REASONS = {413: b"Content Too Large", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


class Rejected(Exception):
    pass


class BoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a cap on request heads and on the body bytes in flight.

    Heads: one still incomplete after a read counts that read's bytes (a head that never ends is
    cut off after the cap plus one read); one that completes is measured from what was parsed. A
    read that finished one request and began the next is not counted. Bodies: the declared length
    is reserved from the process's budget when the head completes and returned when the response
    is complete (uvicorn discards body bytes that arrive after it) or the connection is lost."""

    max_head_bytes, max_body_bytes, body_budget = MAX_HEADER_BYTES, MAX_BODY_BYTES, BODY_BUDGET
    in_flight = 0  # body bytes reserved by all connections of this process (one event loop)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._in_head, self._head_bytes, self._completed = True, 0, False
        self._rejected: tuple[int, str] | None = None
        self._reserved, self._counting = 0, False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        parsed = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if parsed > self.max_head_bytes:
            self._reject(431, f"request line and headers over {self.max_head_bytes} bytes")
        declared = next((v for k, v in self.headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit():
            self._take(int(declared))
        else:
            self._counting = True  # chunked, or no body: counted as it arrives
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._counting and self.cycle is not None and not self.cycle.response_complete:
            self._take(len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._completed = True, True

    def on_response_complete(self) -> None:
        self._release()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._completed = False
        super().data_received(data)
        if self._in_head and not self._completed and not self._rejected and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._rejected = (431, f"request line and headers over {self.max_head_bytes} bytes")
                self._write_rejection()

    def send_400_response(self, msg: str) -> None:
        if self._rejected:  # a Rejected raised in a parser callback ends up here
            return self._write_rejection()
        super().send_400_response(msg)

    # ---------------------------------------------------------------- internals

    def _take(self, n: int) -> None:
        if self._reserved + n > self.max_body_bytes:
            self._reject(413, f"request body over {self.max_body_bytes} bytes")
        if BoundedProtocol.in_flight + n > self.body_budget:
            self._reject(503, "the server is receiving as many request bodies as it holds at once; retry")
        self._reserved += n
        BoundedProtocol.in_flight += n

    def _release(self) -> None:
        BoundedProtocol.in_flight -= self._reserved
        self._reserved, self._counting = 0, False

    def _reject(self, status: int, message: str):
        self._rejected = (status, message)
        raise Rejected  # httptools stops parsing; uvicorn answers with send_400_response, replaced above

    def _write_rejection(self) -> None:
        status, message = self._rejected
        body = json.dumps({"error": message}).encode()
        retry = b"retry-after: %d\r\n" % RETRY_AFTER_S if status == 503 else b""
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s"
                                 b"connection: close\r\n\r\n%s" % (status, REASONS[status], len(body), retry, body))
            # closing now would reset a client still sending its body before it reads the answer
            # (data_received drops what arrives meanwhile: nothing is buffered)
            self.flow.resume_reading()
            self.loop.call_later(LINGER_S, self.transport.close)
        self._release()


def setup() -> list:
    """The proxy callback: makes uvicorn's default ("auto") HTTP protocol the bounded one. No middlewares."""
    import uvicorn.config

    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:BoundedProtocol"
    return []
