"""SHA256SUMS of a checkpoint folder, in `sha256sum -c` format."""

from __future__ import annotations

import hashlib
from pathlib import Path

SUMS_FILE = "SHA256SUMS"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sums(folder: Path) -> None:
    """SHA256SUMS over every other file in the folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != SUMS_FILE)
    (folder / SUMS_FILE).write_text("".join(f"{sha256(p)}  {p.name}\n" for p in files))
