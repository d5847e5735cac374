"""Compiled code shipped as one file: torch's portable compile cache ("Mega-Cache",
`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`).

What it holds: every artefact that compiling wrote in this process (Inductor's generated and built kernels,
AOTAutograd's graphs, Dynamo's dynamic-shape decisions), as bytes. Loaded into another process before it
compiles, it fills the caches those compilers look in, so that they skip code generation and the C++ build;
Dynamo still traces each graph. At the d16 shape on 2 cores, `fastest`'s first calls at batch 1, 2 and 8 took
1149 s cold and 283 s with the file loaded (docs/benchmarks.md, "Compiled code that starts fast").

An entry serves only the same torch version, compile settings and CPU instruction set (they are in its key);
a file made elsewhere loads without error and its entries that do not apply are never looked up, so the
compilers then do their work as without it. Unlike `TORCHINDUCTOR_CACHE_DIR`, the file can be made once and
shipped: with the model, in an image, to every replica of a deployment.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def load_compiled(path: Path) -> bool:
    """Fill this process's compile caches from `path`; False when there is no such file. Call it before
    compiling: graphs compiled earlier do not look again."""
    if not path.is_file():
        return False
    torch.compiler.load_cache_artifacts(path.read_bytes())
    log.info("compile cache loaded from %s (%d bytes)", path, path.stat().st_size)
    return True


def save_compiled(path: Path) -> int:
    """Write every compile artefact of this process to `path` (a temporary name, then a rename, so a reader
    never sees half a file); returns the bytes written, 0 when nothing was compiled."""
    artefacts = torch.compiler.save_cache_artifacts()
    if artefacts is None or not artefacts[0]:
        return 0
    data = artefacts[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("compile cache saved to %s (%d bytes)", path, len(data))
    return len(data)
