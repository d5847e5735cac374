"""The plans of a checkpoint (app/compress/plans.py): found beside it, calibrated only when asked for, checked
against the model's shape, looked for only when a variant takes them; and passes that read no file."""

from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors
import torch

import app.compress.plans as plans_module
from app.compress import VARIANTS, apply_variant
from app.compress.attention import PlannedAttention
from app.compress.attention_passes import cfg_attention_sharing, windowed_attention
from app.compress.calibrate import RecordingAttention
from app.compress.hardware import detected
from app.compress.plans import (
    Calibration,
    MissingSharingPlan,
    MissingWindowPlan,
    PlanOrigin,
    Plans,
    calibrated,
    plans_for,
    save_plan,
    save_plans,
)
from app.compress.registry import PlanKind
from app.compress.sharing import SHARING_PLAN_FILE, SharingPlan, SharingSettings
from app.compress.windows import PLAN_FILE, WindowPlan, WindowSettings, band_plan
from app.model.checkpoint import load_folder
from app.model.config import PRESETS
from app.model.pipeline import VARPipeline
from app.model.progress import Cancelled, Progress
from app.train.export import export_folder
from tests.spread_weights import small_pipeline

FEW = Calibration(WindowSettings(dense_scales=1, batches=1, batch_size=3), SharingSettings(batches=1, batch_size=3))
LITEVAR_FLOAT, WINDOWS, CFG_SHARE = VARIANTS["litevar-float"], VARIANTS["windows"], VARIANTS["cfg-share"]
UNPLANNED = [v for v in VARIANTS.values() if not v.plans()]  # baseline, w8a8, compiled...
LABELS, SEEDS = [1, 4], [7, 8]


@pytest.fixture(scope="module")
def small() -> VARPipeline:
    """Three layers, scales (1, 2, 4), weights spread so that attention is far from uniform."""
    return small_pipeline(depth=3, embed_dim=64, seed=5)


@pytest.fixture
def folder(tmp_path: Path, small: VARPipeline) -> Path:
    """`small` as a checkpoint folder, with no plan saved beside it."""
    out = tmp_path / "small"
    export_folder(small.config, small.var, small.vqvae, out)
    return out


def window_plan_of(pipe: VARPipeline, width: int = 1) -> WindowPlan:
    """Every windowed key block of the last scale kept at the same band width; scales after the first windowed."""
    cfg = pipe.config.var
    plan = WindowPlan.full(cfg.depth, cfg.num_heads, cfg.patch_nums, WindowSettings(dense_scales=1))
    plan.windows[:, 2, 1:] = width
    return plan


def sharing_plan_of(pipe: VARPipeline) -> SharingPlan:
    """Shares the last scale in every layer."""
    cfg = pipe.config.var
    distances = torch.ones(cfg.depth, len(cfg.patch_nums), dtype=torch.float64)
    distances[:, -1] = 0.0
    return SharingPlan(cfg.patch_nums, distances, SharingSettings(threshold=0.5))


def calibrations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calibration runs plans.py starts from now on, by the function it called."""
    runs: list[str] = []
    for name in ("calibrate", "calibrate_sharing", "calibrate_plans"):
        real = getattr(plans_module, name)

        def counted(*args: object, _real=real, _name=name, **kwargs: object) -> object:
            runs.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(plans_module, name, counted)
    return runs


# ---- finding and loading ------------------------------------------------------------------------------
def test_saved_plans_are_loaded_from_the_folder(folder: Path, small: VARPipeline) -> None:
    windows, sharing = window_plan_of(small), sharing_plan_of(small)
    save_plan(windows, folder / PLAN_FILE)
    save_plan(sharing, folder / SHARING_PLAN_FILE)
    found = plans_for(small, folder, [LITEVAR_FLOAT])
    assert (found.windows_origin, found.sharing_origin) == (PlanOrigin.FILE, PlanOrigin.FILE)
    assert found.windows is not None and torch.equal(found.windows.windows, windows.windows)
    assert found.sharing is not None and torch.equal(found.sharing.distances, sharing.distances)
    only_windows = plans_for(small, folder, [WINDOWS])  # what the variants take, and nothing else
    assert only_windows.windows is not None and only_windows.sharing is None
    assert only_windows.sharing_origin is None
    load_folder(folder)  # save_plan rewrote the checksums: they cover the plans


def test_a_missing_plan_is_refused_naming_the_command(folder: Path, small: VARPipeline) -> None:
    with pytest.raises(MissingWindowPlan, match=re.escape(f"`python -m app.compress calibrate --model {folder}`")):
        plans_for(small, folder, [WINDOWS])
    with pytest.raises(MissingWindowPlan, match=re.escape("(no checkpoint folder); calibrate one with `")):
        plans_for(small, None, [LITEVAR_FLOAT])
    save_plan(window_plan_of(small), folder / PLAN_FILE)
    with pytest.raises(MissingSharingPlan, match=re.escape(f"--model {folder} --sharing-only`")):
        plans_for(small, folder, [LITEVAR_FLOAT])


def test_missing_plans_are_calibrated_when_asked_for(
    folder: Path, small: VARPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = calibrations(monkeypatch)
    both = plans_for(small, folder, [LITEVAR_FLOAT], calibrate_missing=True, calibration=FEW)
    assert (both.windows_origin, both.sharing_origin) == (PlanOrigin.CALIBRATED, PlanOrigin.CALIBRATED)
    assert runs == ["calibrate_plans"]  # both from one run
    assert both.windows is not None and both.windows.settings == FEW.windows
    save_plan(window_plan_of(small), folder / PLAN_FILE)
    runs.clear()
    one = plans_for(small, folder, [LITEVAR_FLOAT], calibrate_missing=True, calibration=FEW)
    assert (one.windows_origin, one.sharing_origin) == (PlanOrigin.FILE, PlanOrigin.CALIBRATED)
    assert runs == ["calibrate_sharing"]  # the saved window plan is not calibrated again
    assert one.sharing is not None and both.sharing is not None
    assert torch.equal(one.sharing.distances, both.sharing.distances)  # the same settings, the same plan
    assert not (folder / SHARING_PLAN_FILE).exists()  # calibrated at load, never saved


@pytest.mark.parametrize("kinds", [{PlanKind.WINDOWS, PlanKind.SHARING}, {PlanKind.WINDOWS}, {PlanKind.SHARING}])
def test_a_calibration_run_reports_each_batch_and_scale_weighted_by_its_tokens(
    small: VARPipeline, kinds: set[PlanKind]
) -> None:
    two = Calibration(WindowSettings(dense_scales=1, batches=2, batch_size=2), SharingSettings(batches=2, batch_size=2))
    progress = Progress("calibrating")
    seen: list[tuple[int, float]] = []
    progress.listeners.append(lambda p: seen.append((p.done, p.fraction)))
    calibrated(small, kinds, two, progress)
    assert progress.weights == [1, 4, 16] * 2  # scales 1x1, 2x2, 4x4, per batch
    assert [done for done, _ in seen] == [0, 0, 1, 2, 3, 4, 5, 6]  # begun; each step begun (the done before); end
    assert [fraction for _, fraction in seen] == [sum(progress.weights[:done]) / 42 for done, _ in seen]
    assert progress.ended is not None


def test_a_cancelled_calibration_stops_at_its_next_step_and_leaves_the_model_as_it_was(small: VARPipeline) -> None:
    progress = Progress("calibrating")
    progress.listeners.append(lambda p: p.cancel() if p.done == 1 else None)
    with pytest.raises(Cancelled):
        calibrated(small, {PlanKind.WINDOWS}, FEW, progress)
    assert progress.done == 1
    assert not any(isinstance(blk.attn.kernel, RecordingAttention) for blk in small.var.block_list)


def test_only_calibrated_plans_are_saved_each_whole(folder: Path, small: VARPipeline) -> None:
    given = Plans(window_plan_of(small), sharing_plan_of(small), PlanOrigin.CALIBRATED, PlanOrigin.FILE)
    assert save_plans(given, folder) == [folder / PLAN_FILE]
    assert not (folder / SHARING_PLAN_FILE).exists()  # read from a file: it is there already
    assert torch.equal(WindowPlan.load(folder / PLAN_FILE).windows, window_plan_of(small).windows)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no partial file left


def test_a_plan_for_another_model_shape_is_refused(folder: Path, small: VARPipeline) -> None:
    d16 = PRESETS["d16"].var
    save_plan(band_plan(d16.depth, d16.num_heads, d16.patch_nums, 0.15), folder / PLAN_FILE)
    with pytest.raises(ValueError, match=r"window plan is for depth 16, 16 heads.* the model has depth 3"):
        plans_for(small, folder, [WINDOWS], calibrate_missing=True, calibration=FEW)  # refused, not replaced
    cfg = small.config.var
    wrong = SharingPlan((1, 2), torch.zeros(cfg.depth, 2, dtype=torch.float64), SharingSettings())
    save_plan(wrong, folder / SHARING_PLAN_FILE)
    with pytest.raises(ValueError, match=re.escape("patch_nums (1, 2) (the model: (1, 2, 4))")):
        plans_for(small, folder, [CFG_SHARE])
    with pytest.raises(ValueError, match="window plan is for depth 16"):
        windowed_attention(copy.deepcopy(small), plan=WindowPlan.load(folder / PLAN_FILE))  # the pass checks too


def test_a_window_plan_file_replaces_the_saved_one(folder: Path, tmp_path: Path, small: VARPipeline) -> None:
    save_plan(window_plan_of(small, width=1), folder / PLAN_FILE)
    given = tmp_path / "given.safetensors"
    window_plan_of(small, width=2).save(given)
    found = plans_for(small, folder, [WINDOWS], window_plan_file=given)
    assert found.windows_origin is PlanOrigin.GIVEN
    assert found.windows is not None and int(found.windows.windows[0, 2, 2, 0]) == 2
    unwindowed = plans_for(small, folder, [CFG_SHARE], calibrate_missing=True, calibration=FEW, window_plan_file=given)
    assert unwindowed.windows is None and unwindowed.sharing is not None  # no variant takes a window plan
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a window plan"):
        plans_for(small, folder, [WINDOWS], window_plan_file=tmp_path / "junk.safetensors")


def test_variants_that_take_no_plan_load_none(
    folder: Path, small: VARPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_plan(window_plan_of(small), folder / PLAN_FILE)
    save_plan(sharing_plan_of(small), folder / SHARING_PLAN_FILE)
    runs = calibrations(monkeypatch)

    def unread(*args: object) -> None:
        raise AssertionError("a plan file was read")

    monkeypatch.setattr(WindowPlan, "load", unread)
    monkeypatch.setattr(SharingPlan, "load", unread)
    assert UNPLANNED and "baseline" in {name for name, v in VARIANTS.items() if v in UNPLANNED}
    assert plans_for(small, folder, UNPLANNED, calibrate_missing=True) == Plans()
    assert plans_for(small, None, UNPLANNED, calibrate_missing=True) == Plans()
    assert runs == []


def test_plans_hold_an_origin_with_each_plan(small: VARPipeline) -> None:
    plan = window_plan_of(small)
    assert Plans(windows=plan).windows_origin is PlanOrigin.GIVEN and Plans(windows=plan).sharing_origin is None
    with pytest.raises(ValueError, match="sharing_origin file without a plan"):
        Plans(windows=plan, sharing_origin=PlanOrigin.FILE)
    merged = Plans(windows=plan).merged(Plans(sharing=sharing_plan_of(small), sharing_origin=PlanOrigin.FILE))
    assert (merged.windows, merged.windows_origin, merged.sharing_origin) == (plan, PlanOrigin.GIVEN, PlanOrigin.FILE)


# ---- passes read no file ------------------------------------------------------------------------------
def _data_file(path: str) -> bool:
    """Whether `path` is a file of data: not Python code (torch imports modules lazily, under compile say),
    nor a name the import system probes that is no file."""
    installed = (sys.prefix, sys.base_prefix, sys.exec_prefix)
    return os.path.isfile(path) and not (path.endswith((".py", ".pyc", ".so")) or path.startswith(installed))


@contextmanager
def no_file_opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fails every open of a data file from Python (an audit hook: open() in any form, os.open) and every
    safetensors read while active; yields the paths whose opening was attempted."""
    attempts: list[str] = []
    active = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active[0] and event == "open" and _data_file(str(args[0])):
            attempts.append(str(args[0]))
            raise AssertionError(f"opened {args[0]}")

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        attempts.append(str(path))
        raise AssertionError(f"safetensors read {path}")

    sys.addaudithook(hook)  # hooks cannot be removed: this one goes quiet when the block ends
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    try:
        yield attempts
    finally:
        active[0] = False


def test_the_attention_passes_take_their_plans_and_read_no_file(
    folder: Path, small: VARPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_folder(folder)  # no plan beside it
    dense = copy.deepcopy(pipe)
    with pytest.raises(TypeError, match="plan"):
        windowed_attention(copy.deepcopy(pipe))  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="takes a sharing plan, or explicit scales or layers"):
        cfg_attention_sharing(copy.deepcopy(pipe))
    windows, sharing = window_plan_of(pipe), sharing_plan_of(pipe)
    with no_file_opened(monkeypatch) as attempts:
        pipe = cfg_attention_sharing(windowed_attention(pipe, plan=windows), plan=sharing)
    assert attempts == []
    kernels = [blk.attn.kernel for blk in pipe.var.block_list]
    assert all(isinstance(k, PlannedAttention) and set(k.routes) == {1, 2} for k in kernels)
    assert all(k.share_scales == {2} for k in kernels)
    planned, full = pipe.generate(LABELS, seeds=SEEDS), dense.generate(LABELS, seeds=SEEDS)
    assert not torch.equal(planned.tokens[-1], full.tokens[-1])  # the plans changed what the attention computes


def test_every_variant_applies_with_its_plans_given_reading_no_file(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_folder(folder)
    plans = Plans(windows=window_plan_of(pipe), sharing=sharing_plan_of(pipe))
    detected()  # the CPU's instruction sets come from /proc/cpuinfo once per process, not from a pass
    with no_file_opened(monkeypatch) as attempts:
        applied = {name: apply_variant(name, copy.deepcopy(pipe), plans=plans) for name in VARIANTS}
    assert attempts == []
    for name in ("litevar", "fastest-int8"):
        kernels = [blk.attn.kernel for blk in applied[name].var.block_list]
        assert all(isinstance(k, PlannedAttention) and k.routes and k.share_scales == {2} for k in kernels), name
