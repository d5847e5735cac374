"""SHA256SUMS of a checkpoint folder, in `sha256sum -c` format: written by the tools that make a folder,
checked when a folder that has one is loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

SUMS_FILE = "SHA256SUMS"


def sha256(path: Path) -> str:
    with path.open("rb") as f:  # streamed: released weights are GBs
        return hashlib.file_digest(f, "sha256").hexdigest()


def sums_text(digests: dict[str, str]) -> str:
    """The SHA256SUMS lines of {file name: hex digest}, sorted by name."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))


def write_sums(folder: Path) -> None:
    """SHA256SUMS over every other file in the folder."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name != SUMS_FILE]
    (folder / SUMS_FILE).write_text(sums_text({p.name: sha256(p) for p in files}))


def sums_mismatches(folder: Path) -> list[str]:
    """Every file the folder's SHA256SUMS lists that is missing or whose content differs (none without one)."""
    sums = folder / SUMS_FILE
    if not sums.is_file():
        return []
    problems = []
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        path = folder / name.lstrip("*")
        if not path.is_file():
            problems.append(f"{name}: listed in {SUMS_FILE}, missing")
        elif sha256(path) != digest:
            problems.append(f"{name}: SHA-256 differs from {SUMS_FILE}")
    return problems
