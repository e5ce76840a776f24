"""RESULTS.md is shared by every benchmark: each one rewrites only its own "## ..." section."""
from __future__ import annotations

import re
from pathlib import Path


def update_section(path: Path, title: str, text: str) -> None:
    """Replace (or append) the section that starts with ``title``; every other section is kept
    byte for byte. Written to a temporary file and renamed, so a crash never truncates it."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    new = pattern.sub(lambda _: text, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".md.partial")
    tmp.write_text(new)
    tmp.replace(path)
