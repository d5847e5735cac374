from __future__ import annotations

from pathlib import Path

import pytest

from app.compress import apply_variant, variant_spec
from app.compress.plans import plans_for
from app.model.checkpoint import load_folder
from app.model.pipeline import VARPipeline

ROOT = Path(__file__).parents[1]  # the repository: tests pass paths anchored here, never relative to the cwd
DATA = ROOT / "tests" / "data"
DEMO = ROOT / "model_store" / "demo"
DEMO_CLASSIFIER = ROOT / "model_store" / "demo_classifier"
TINY = DATA / "var_official_tiny"
SHARED_ALN = DATA / "var_official_shared_aln"


@pytest.fixture(scope="session")
def tiny_pipeline() -> VARPipeline:
    """The official tiny fixture model (depth 2, separate AdaLN), loaded strictly."""
    return load_folder(TINY)


def load_variant(name: str, folder: Path = DEMO) -> VARPipeline:
    """The checkpoint in `folder` under variant `name`, with the plans saved beside it."""
    pipe = load_folder(folder)
    return apply_variant(name, pipe, plans=plans_for(pipe, folder, [variant_spec(name)]))
