from __future__ import annotations

from pathlib import Path

import pytest

from app.model.checkpoint import load_folder
from app.model.pipeline import VARPipeline

DATA = Path(__file__).parent / "data"
TINY = DATA / "var_official_tiny"
SHARED_ALN = DATA / "var_official_shared_aln"


@pytest.fixture(scope="session")
def tiny_pipeline() -> VARPipeline:
    """The official tiny fixture model (depth 2, separate AdaLN), loaded strictly."""
    return load_folder(TINY)
