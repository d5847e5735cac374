"""Memory numbers the pipeline and `app.model.memory` report: the KV cache's bytes, the peak above a start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.model.checkpoint import random_pipeline
from app.model.config import PipelineConfig, VARConfig, VQVAEConfig
from app.model.memory import peak_above_start
from app.model.pipeline import VARPipeline
from tests.conftest import ROOT

PATCH_NUMS = (1, 2, 3)


def tiny_pipeline() -> VARPipeline:
    var = VARConfig(
        depth=2, embed_dim=32, num_heads=2, num_classes=4, vocab_size=16, z_channels=4, patch_nums=PATCH_NUMS
    )
    vqvae = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, patch_nums=PATCH_NUMS)
    return random_pipeline(PipelineConfig("test", var, vqvae))


def test_generation_reports_the_bytes_of_its_kv_cache() -> None:
    pipe = tiny_pipeline()
    for batch in (1, 3):
        gen = pipe.generate([0] * batch, seeds=list(range(batch)))
        rows, head_dim, float32 = 2 * batch, 32 // 2, 4  # rows: conditional and guidance halves
        seq, prefix = 1 + 4 + 9, 1 + 4  # the last scale's keys are never cached, only assembled in the workspace
        per_layer = 2 * rows * 2 * prefix * head_dim * float32  # keys and values, 2 heads
        workspace = 2 * rows * 2 * seq * head_dim * float32  # one for all layers
        assert gen.kv_cache_bytes == 2 * per_layer + workspace, batch


PEAK_OF_64_MIB = """
import torch
from app.model.memory import peak_above_start
with peak_above_start("cpu") as reading:
    block = torch.ones(16 * 2**20)  # 64 MiB, touched, so resident
    del block
print(reading.bytes)
"""


def test_peak_above_start_sees_memory_touched_in_the_section() -> None:
    """In a process of its own: the resident set is process-wide, and in the test process other threads (servers,
    engines of earlier tests) free memory at any moment, which would hide the section's growth."""
    size = 64 * 2**20  # over glibc's largest mmap threshold (32 MiB): fresh pages, never a reused heap block
    out = subprocess.run([sys.executable, "-c", PEAK_OF_64_MIB], capture_output=True, text=True, check=True, cwd=ROOT)
    reading = out.stdout.strip()
    assert reading != "None", "Linux: VmHWM is resettable through /proc/self/clear_refs"
    assert int(reading) >= 0.9 * size


def test_peak_above_start_reports_nothing_for_a_section_that_raises() -> None:
    with pytest.raises(RuntimeError), peak_above_start("cpu") as reading:
        raise RuntimeError("batch failed")
    assert reading.bytes is None
