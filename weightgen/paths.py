"""Where weightgen keeps its state: ``$WEIGHTGEN_HOME`` (default ``~/.weightgen``)."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("WEIGHTGEN_HOME", "~/.weightgen")).expanduser()


def default_zoo() -> str:
    """The default zoo URL: a local directory under the home, or ``$WEIGHTGEN_ZOO`` (any URL)."""
    return os.environ.get("WEIGHTGEN_ZOO") or str(home() / "zoo")


def generators_dir() -> Path:
    return home() / "generators"
