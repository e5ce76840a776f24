"""Writing a user's output folder (``weightgen sample --out``, ``weightgen zoo export --out``).

Every file goes through a temp file in the same folder and ``os.replace``: a reader never sees a
half-written file, and an existing ``DIR/config.json`` that is a symlink is *replaced*, never
written through (writing through it overwrote the link's target, anywhere on disk). Files are
created with mode 0666 minus the umask, like any file the user writes (``model.safetensors``
came out 0600 beside 0644 configs). :func:`check_out_dir` runs before any work, so an unusable
``--out`` (an existing file, a read-only folder, ``/proc/x``) is an error up front, not a
traceback after sampling.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


class OutputError(ValueError):
    """An output folder or file that cannot be written; the message says which and why."""


def _probe(directory: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".weightgen-probe-", dir=directory)
    except OSError as e:
        raise OutputError(f"cannot write in {directory}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(name)


def check_out_dir(path: str | Path) -> Path:
    """Fail now if ``path`` cannot become (or is not) a writable folder; creates nothing."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory; name a new or existing folder")
    probe = out
    while not probe.exists():  # the nearest existing ancestor is where the folder would be made
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {out}: {probe} is not a directory")
    _probe(probe)
    return out


def make_out_dir(path: str | Path) -> Path:
    out = check_out_dir(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror or e}") from None
    return out


def write_file(path: str | Path, data: bytes) -> None:
    """``path`` <- ``data``, atomically, replacing (never following) whatever ``path`` is now."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
