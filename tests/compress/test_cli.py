"""`python -m app.compress calibrate`: a calibrated plan lands beside the model and is what the windowed pass loads."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from app.compress import apply_variant
from app.compress.__main__ import main
from app.compress.attention import PlannedAttention
from app.compress.attention_passes import MissingWindowPlan
from app.compress.windows import PLAN_FILE, WindowPlan
from app.model.checkpoint import load_folder
from app.model.checksums import sha256, write_sums
from tests.conftest import DEMO


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns(PLAN_FILE, "*.png", "*.md"))
    write_sums(folder)  # the copy's own checksums: without them loading refuses the files gone missing
    return folder


def test_calibrate_saves_a_plan_that_the_windowed_variant_loads(model_dir: Path, capsys) -> None:
    with pytest.raises(MissingWindowPlan, match=re.escape(f"`python -m app.compress calibrate --model {model_dir}`")):
        apply_variant("windows", load_folder(model_dir))  # no plan: it refuses, naming the command below
    args = ["calibrate", "--model", str(model_dir), "--tau", "0.7", "--batches", "1", "--batch-size", "3"]
    assert main(args) == 0
    plan = WindowPlan.load(model_dir / PLAN_FILE)
    assert f"{sha256(model_dir / PLAN_FILE)}  {PLAN_FILE}" in (model_dir / "SHA256SUMS").read_text()
    assert plan.settings.tau == 0.7 and plan.settings.batch_size == 3
    assert f"{100 * plan.kept_fraction():.1f}%" in capsys.readouterr().out
    pipe = apply_variant("windows", load_folder(model_dir))
    kernels = [b.attn.kernel for b in pipe.var.block_list]
    assert all(isinstance(k, PlannedAttention) and set(k.routes) == {3, 4, 5, 6} for k in kernels)
