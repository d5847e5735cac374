"""`python -m app weights d16`: download the released weights, verify them, lay out model_store/var_d16."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from app.tools.released import (
    DEFAULT_ENDPOINT,
    RELEASED,
    REPO_ID,
    Hub,
    ReleasedModel,
    RemoteFile,
    WeightsError,
    fetch_released,
)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def hub_from_args(a: argparse.Namespace) -> Hub:
    """HF_ENDPOINT and HF_HUB_CACHE as set now (huggingface_hub itself read them once, at its import)."""
    endpoint = a.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    cache = a.cache_dir or os.environ.get("HF_HUB_CACHE")
    return Hub(endpoint.rstrip("/"), a.repo, a.revision, Path(cache) if cache else None)


def main(argv: list[str] | None = None, models: Mapping[str, ReleasedModel] = RELEASED) -> int:
    ap = argparse.ArgumentParser(prog="python -m app weights", description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=list(models), help="the released model")
    ap.add_argument("--store", type=Path, default=Path("model_store"), help="where its folder goes")
    ap.add_argument("--repo", default=REPO_ID, help="the Hugging Face repository")
    ap.add_argument("--revision", default="main", help="branch, tag or commit of the repository")
    ap.add_argument("--endpoint", help=f"the hub (default: HF_ENDPOINT, else {DEFAULT_ENDPOINT})")
    ap.add_argument("--cache-dir", type=Path, help="huggingface_hub's cache (default: HF_HUB_CACHE, else its own)")
    a = ap.parse_args(argv)
    hub = hub_from_args(a)

    def announce(files: list[RemoteFile]) -> None:
        print(f"{hub.repo_id} at commit {files[0].commit} ({hub.endpoint}):", flush=True)
        for f in files:
            print(f"  {f.name}  {_size(f.size)}  sha256 {f.sha256}", flush=True)

    try:
        folder, laid_out = fetch_released(models[a.model], a.store, hub, announce)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    done = "verified and laid out" if laid_out else "already in place, verified:"
    print(f"{done} {folder} (its SHA256SUMS is checked at every load)")
    print(f"serve it: VAR_MODEL_DIR={folder} VAR_VARIANTS=baseline make serve")
    print(f"windowed variants (litevar, fastest) need a window plan: python -m app.compress calibrate --model {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
