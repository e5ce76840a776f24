"""Limits of Serve's HTTP proxy itself, which parses every request before the app sees it.

uvicorn's httptools protocol buffers a request head of any size: one request with a 100 MB header
got a 200 and grew the proxy from 172 MB to 1.4 GB (it stayed at 775 MB). Here the head (request
line and headers) is capped: past ``WEIGHTGEN_MAX_HEADER_BYTES`` (default 32 KiB, like nginx's
4 x 8 KiB) the client gets 431 and the connection is closed, so the proxy buffers at most the cap
plus one socket read (256 KiB).

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


class HeadTooLarge(Exception):
    pass


class HeadCappedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a cap on the bytes of a request head.

    Two checks: a head still incomplete after a read counts that read's bytes (a head that never
    ends is cut off after the cap plus one read); a head that completes is measured from what was
    parsed (request target and headers). A read that finished one request and began the next is
    not counted: the cap is never hit by bytes of an earlier request."""

    max_head_bytes = MAX_HEADER_BYTES

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._in_head, self._head_bytes, self._completed, self._too_large = True, 0, False, False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        parsed = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if parsed > self.max_head_bytes:
            self._too_large = True
            raise HeadTooLarge  # httptools stops; uvicorn answers with send_400_response, made a 431 below
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._completed = True, True

    def data_received(self, data: bytes) -> None:
        if self._too_large:
            return
        self._completed = False
        super().data_received(data)
        if self._in_head and not self._completed and not self._too_large and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._too_large = True
                self._reject_head()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            return self._reject_head()
        super().send_400_response(msg)

    def _reject_head(self) -> None:
        body = json.dumps({"error": f"request line and headers over {self.max_head_bytes} bytes"}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
        self.transport.close()


def setup() -> list:
    """The proxy callback: makes uvicorn's default ("auto") HTTP protocol the capped one. No middlewares."""
    import uvicorn.config

    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeadCappedProtocol"
    return []
