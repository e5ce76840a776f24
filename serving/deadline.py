"""Stopping a request's sampling once its deadline has passed.

A sampling thread runs ``with deadline(t): ...``; every module of a served generator carries the
forward pre-hook ``stop_when_expired``, which raises ``RequestExpired`` in that thread once
``time.time() > t``. Sampling then stops within one module call, instead of computing for a client
that already got its 408 (two 3,000-class requests once kept every replica busy for 3 minutes).

Its own module: Serve pickles deployment classes by value, and a thread-local cannot be pickled.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

_REQUEST = threading.local()


class RequestExpired(Exception):
    """Raised inside sampling once the request's deadline has passed."""


def stop_when_expired(module, args) -> None:
    """Forward pre-hook: abandon the current thread's request once its deadline has passed."""
    t = getattr(_REQUEST, "deadline", None)
    if t is not None and time.time() > t:
        raise RequestExpired


@contextmanager
def deadline(t: float | None):
    """Sampling in this thread stops (``RequestExpired``) at wall-clock time ``t`` (None: never)."""
    _REQUEST.deadline = t
    try:
        yield
    finally:
        _REQUEST.deadline = None
