"""`python -m app.compress calibrate`: calibrated plans land beside the model and are what the passes load."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

import app.model.progress as progress_module
from app.compress import VARIANTS
from app.compress.__main__ import main
from app.compress.attention import PlannedAttention
from app.compress.plans import MissingSharingPlan, MissingWindowPlan, PlanOrigin, plans_for
from app.compress.sharing import SHARING_PLAN_FILE, SharingPlan
from app.compress.windows import PLAN_FILE, WindowPlan
from app.model.checkpoint import load_folder
from app.model.checksums import sha256, write_sums
from tests.conftest import DEMO, load_variant


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns(PLAN_FILE, SHARING_PLAN_FILE, "*.png", "*.md"))
    write_sums(folder)  # the copy's own checksums: without them loading refuses the files gone missing
    return folder


def test_calibrate_saves_both_plans_that_the_litevar_variant_loads(model_dir: Path, capsys) -> None:
    with pytest.raises(MissingWindowPlan, match=re.escape(f"`python -m app.compress calibrate --model {model_dir}`")):
        plans_for(load_folder(model_dir), model_dir, [VARIANTS["windows"]])  # no plan: refused, naming the command
    args = ["calibrate", "--model", str(model_dir), "--tau", "0.7", "--batches", "1", "--batch-size", "3"]
    assert main([*args, "--threshold", "0.1"]) == 0
    plan = WindowPlan.load(model_dir / PLAN_FILE)
    sharing = SharingPlan.load(model_dir / SHARING_PLAN_FILE)
    sums = (model_dir / "SHA256SUMS").read_text()
    for name in (PLAN_FILE, SHARING_PLAN_FILE):
        assert f"{sha256(model_dir / name)}  {name}" in sums
    assert plan.settings.tau == 0.7 and plan.settings.batch_size == 3
    assert sharing.settings.threshold == 0.1 and sharing.settings.batch_size == 3
    out = capsys.readouterr().out
    assert f"{100 * plan.kept_fraction():.1f}%" in out
    assert f"{int(sharing.shared.sum())} of 28 (layer, scale) pairs shared" in out
    found = plans_for(load_folder(model_dir), model_dir, [VARIANTS["litevar-float"]])
    assert (found.windows_origin, found.sharing_origin) == (PlanOrigin.FILE, PlanOrigin.FILE)
    pipe = load_variant("litevar-float", model_dir)
    kernels = [b.attn.kernel for b in pipe.var.block_list]
    assert all(isinstance(k, PlannedAttention) and set(k.routes) == {3, 4, 5, 6} for k in kernels)
    assert [k.share_scales for k in kernels] == [sharing.scales(layer) for layer in range(4)]


def test_calibrate_shows_a_progress_bar_and_logs_where_it_is(
    model_dir: Path, capsys, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.01)  # the log's 10 s, shortened
    caplog.set_level(logging.INFO, logger="app.compress.calibrate")
    task = f"calibrating the window and sharing plans of {model_dir}"
    assert main(["calibrate", "--model", str(model_dir), "--batches", "1", "--batch-size", "2"]) == 0
    scales = len(load_folder(model_dir).config.var.patch_nums)
    bar = capsys.readouterr().err
    assert "100%|" in bar and f"step {scales}/{scales}]" in bar
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == f"{task}: 1 batches of 2 images" and re.fullmatch(
        rf"{re.escape(task)}: done in \d+\.\d s", said[-1]
    )
    assert any(re.match(rf"{re.escape(task)}: step \d+/{scales}, \d+% done, \d+ s elapsed, ", line) for line in said)


@pytest.mark.parametrize(("threshold", "shared", "flops_kept"), [("0", 0, "100.0%"), ("inf", 28, "75.0%")])
def test_calibrating_the_sharing_plan_alone_keeps_the_window_plan(
    model_dir: Path, capsys, threshold: str, shared: int, flops_kept: str
) -> None:
    """The ends of the threshold: 0 shares nowhere, infinity everywhere (a quarter of the FLOPs saved)."""
    shutil.copyfile(DEMO / PLAN_FILE, model_dir / PLAN_FILE)
    write_sums(model_dir)
    with pytest.raises(MissingSharingPlan, match=re.escape(f"--model {model_dir} --sharing-only`")):
        plans_for(load_folder(model_dir), model_dir, [VARIANTS["cfg-share"]])
    args = ["calibrate", "--model", str(model_dir), "--sharing-only", "--batches", "1", "--batch-size", "3"]
    assert main([*args, "--threshold", threshold]) == 0
    assert sha256(model_dir / PLAN_FILE) == sha256(DEMO / PLAN_FILE)
    assert (
        f"{shared} of 28 (layer, scale) pairs shared, {flops_kept} of the attention FLOPs kept"
        in capsys.readouterr().out
    )
    pipe = load_variant("cfg-share", model_dir)  # loads: the checksums cover the new plan
    assert sum(len(b.attn.kernel.share_scales) for b in pipe.var.block_list) == shared
