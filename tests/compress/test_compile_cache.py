"""The compile cache file: what one process compiled, saved, and loaded by a fresh process (an empty Inductor
cache directory) turns its compilation into cache hits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.compress.compile_cache import load_compiled

COMPILE_AND_COUNT = """
import sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from app.compress.compile_cache import load_compiled, save_compiled

mode, path = sys.argv[1], Path(sys.argv[2])
if mode == "load":
    assert load_compiled(path)
f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 3 + x.sin())
f(torch.randn(8, 16))
if mode == "save":
    print("bytes", save_compiled(path))
print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
"""


def compile_in_fresh_process(mode: str, path: Path, cache_dir: Path) -> str:
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", COMPILE_AND_COUNT, mode, str(path)], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.compile
def test_a_fresh_process_that_loads_the_file_hits_the_cache_where_it_would_compile(tmp_path: Path) -> None:
    file = tmp_path / "compiled.bin"
    first = compile_in_fresh_process("save", file, tmp_path / "inductor-a")
    assert "hits 0 misses 1" in first and file.stat().st_size > 0
    assert "hits 0 misses 1" in compile_in_fresh_process("none", file, tmp_path / "inductor-b")  # the control
    assert "hits 1 misses 0" in compile_in_fresh_process("load", file, tmp_path / "inductor-c")


def test_no_file_is_no_load(tmp_path: Path) -> None:
    assert load_compiled(tmp_path / "absent.bin") is False
