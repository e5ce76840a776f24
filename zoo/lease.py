"""Writer leases: how ``gc`` tells a segment that a live writer is about to commit from garbage.

A writer creates ``collections/<cid>/leases/<seg>`` before its segment, renews it while it
writes (between arrays, every ``RENEW_S``), and deletes it after its commit. A lease is *dead*
when its writer provably is: on the same host and pid namespace, the pid no longer exists
(``kill -9`` is detected at once); anywhere, when it was not renewed for the lease TTL
(``$WEIGHTGEN_ZOO_LEASE_TTL_S``, default 3600 s: a writer on another machine cannot be asked).
"""
from __future__ import annotations

import os
import socket
import time

RENEW_S = 60.0


def ttl() -> float:
    return float(os.environ.get("WEIGHTGEN_ZOO_LEASE_TTL_S", 3600))


def _host() -> str:
    """This machine and pid namespace: pids are only comparable within one."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else open(path).read().strip())
        except OSError:
            parts.append("?")
    return "|".join(parts)


def new() -> dict:
    now = time.time()
    return {"host": _host(), "pid": os.getpid(), "started": now, "renewed": now}


def due(held: dict) -> bool:
    return time.time() - held["renewed"] >= min(RENEW_S, ttl() / 4)


def renew(held: dict) -> dict:
    held["renewed"] = time.time()
    return held


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def dead(attrs: dict, since: float, now: float | None = None, ttl_s: float | None = None) -> str | None:
    """Why this lease's writer is dead, or None while it may be alive. ``since``: when the segment
    was created, the age used for a lease whose document cannot be read."""
    now = time.time() if now is None else now
    ttl_s = ttl() if ttl_s is None else ttl_s
    renewed = attrs.get("renewed") if isinstance(attrs, dict) else None
    if not isinstance(renewed, (int, float)):
        return f"lease unreadable for {now - since:.0f} s (TTL {ttl_s:.0f} s)" if now - since > ttl_s else None
    if attrs.get("host") == _host() and isinstance(attrs.get("pid"), int) and _pid_gone(attrs["pid"]):
        return f"writer pid {attrs['pid']} on this host has exited"
    if now - renewed > ttl_s:
        return f"lease not renewed for {now - renewed:.0f} s (TTL {ttl_s:.0f} s)"
    return None
