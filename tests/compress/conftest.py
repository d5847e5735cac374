"""What several pass tests decode or quantize: the demo model, and the latents of a few of its images."""

from __future__ import annotations

import pytest
import torch

from app.model.checkpoint import load_folder
from app.model.pipeline import VARPipeline
from tests.conftest import DEMO

DECODED_LABELS, DECODED_SEEDS = [1, 4, 7], [10, 11, 12]  # the images whose latents `f_hat` holds


@pytest.fixture(scope="module")
def demo() -> VARPipeline:
    return load_folder(DEMO)


@pytest.fixture(scope="module")
def f_hat(demo: VARPipeline) -> torch.Tensor:
    return demo.generate(DECODED_LABELS, seeds=DECODED_SEEDS).f_hat
