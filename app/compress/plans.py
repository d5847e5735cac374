"""The plans of a checkpoint: the window plan and the sharing plan its attention passes take, found beside the
checkpoint, loaded, or calibrated on its weights. The service, the benchmarks and the command line get them
here; the passes take them as arguments and read no file.

Plans are calibrated for one checkpoint's weights and saved beside it (`python -m app.compress calibrate`,
or the service, which calibrates missing ones in the background and saves them: app/serve/startup.py).
Without a saved plan a variant that takes one refuses to load, naming that command; only a caller that asks
for it (`plans_for(..., calibrate_missing=True)`, `calibrated`) calibrates the missing ones, which takes a
while and is logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from app.compress.calibrate import calibrate, calibrate_plans, calibrate_sharing
from app.compress.registry import PlanKind, VariantSpec
from app.compress.sharing import SHARING_PLAN_FILE, SharingPlan, SharingSettings
from app.compress.windows import PLAN_FILE, WindowPlan, WindowSettings
from app.model.checksums import SUMS_FILE, write_sums
from app.model.config import VARConfig
from app.model.pipeline import VARPipeline
from app.model.progress import Progress

log = logging.getLogger(__name__)
CALIBRATE = "python -m app.compress calibrate"  # the command that saves the plans beside a checkpoint
FILES = {PlanKind.WINDOWS: PLAN_FILE, PlanKind.SHARING: SHARING_PLAN_FILE}  # their names in the folder


class PlanOrigin(StrEnum):
    """Where a plan came from (the service reports it per variant)."""

    FILE = "file"  # saved beside the checkpoint
    CALIBRATED = "calibrated at load"
    GIVEN = "given"  # by the caller: a plan file that replaces the checkpoint's, or a plan made in code


def _missing(needs: str, folder: Path | None, flags: str = "") -> str:
    where = f"beside the checkpoint {folder}" if folder is not None else "(no checkpoint folder)"
    command = f"{CALIBRATE} --model {folder if folder is not None else '<folder>'}{flags}"
    return f"{needs}: none {where}; calibrate one with `{command}`"


class MissingWindowPlan(ValueError):
    """No window plan is saved beside the checkpoint, and calibrating one now was not asked for."""

    def __init__(self, folder: Path | None):
        super().__init__(_missing("windowed attention needs a window plan", folder))


class MissingSharingPlan(ValueError):
    """No sharing plan is saved beside the checkpoint, and calibrating one now was not asked for."""

    def __init__(self, folder: Path | None):
        # --sharing-only: a window plan already beside the checkpoint stays as it is
        super().__init__(_missing("attention sharing across CFG needs a sharing plan", folder, " --sharing-only"))


class PlanNotGiven(ValueError):
    """A pass that takes a plan was given none (the caller skipped `plans_for`, or asked it for other variants)."""

    def __init__(self, kind: PlanKind, needed_by: str):
        super().__init__(
            f"{needed_by} takes a {kind} plan and none was given; `plans_for` (app/compress/plans.py) finds, "
            "loads or calibrates the plans of a checkpoint"
        )


@dataclass(frozen=True)
class Calibration:
    """Settings of the run that calibrates missing plans (both from one run: their batches must agree)."""

    windows: WindowSettings = field(default_factory=WindowSettings)
    sharing: SharingSettings = field(default_factory=SharingSettings)


@dataclass(frozen=True)
class Plans:
    """The plans variants take, each with where it came from; None where no variant needs it (not looked for).
    A plan given without its origin was given by the caller."""

    windows: WindowPlan | None = None
    sharing: SharingPlan | None = None
    windows_origin: PlanOrigin | None = None
    sharing_origin: PlanOrigin | None = None

    def __post_init__(self) -> None:
        for plan, origin in (("windows", "windows_origin"), ("sharing", "sharing_origin")):
            if getattr(self, plan) is None and getattr(self, origin) is not None:
                raise ValueError(f"{origin} {getattr(self, origin)} without a plan")
            if getattr(self, plan) is not None and getattr(self, origin) is None:
                object.__setattr__(self, origin, PlanOrigin.GIVEN)

    def kinds(self) -> frozenset[PlanKind]:
        """The plans held."""
        held = {PlanKind.WINDOWS: self.windows, PlanKind.SHARING: self.sharing}
        return frozenset(kind for kind, plan in held.items() if plan is not None)

    def window_plan(self, needed_by: str) -> WindowPlan:
        if self.windows is None:
            raise PlanNotGiven(PlanKind.WINDOWS, needed_by)
        return self.windows

    def sharing_plan(self, needed_by: str) -> SharingPlan:
        if self.sharing is None:
            raise PlanNotGiven(PlanKind.SHARING, needed_by)
        return self.sharing

    def require(self, kind: PlanKind, needed_by: str) -> WindowPlan | SharingPlan:
        """The plan of `kind`; PlanNotGiven naming it and `needed_by` when there is none."""
        return self.window_plan(needed_by) if kind is PlanKind.WINDOWS else self.sharing_plan(needed_by)

    def merged(self, other: Plans) -> Plans:
        """These plans, and `other`'s where these have none."""
        windows = self if self.windows is not None else other
        sharing = self if self.sharing is not None else other
        return Plans(windows.windows, sharing.sharing, windows.windows_origin, sharing.sharing_origin)


NO_PLANS = Plans()
DEFAULT_CALIBRATION = Calibration()


def plans_for(
    pipe: VARPipeline,
    folder: Path | None,
    variants: Iterable[VariantSpec],
    *,
    calibrate_missing: bool = False,
    calibration: Calibration = DEFAULT_CALIBRATION,
    window_plan_file: Path | None = None,
) -> Plans:
    """The plans `variants` take, and only those: saved in `folder` (the checkpoint's; None: none saved),
    each checked against the model's shape. A missing one raises MissingWindowPlan or MissingSharingPlan
    (naming the command that saves it) unless `calibrate_missing`, which calibrates it on `pipe` with
    `calibration` (both plans from one run when both are missing); `pipe` must then be unmodified, as
    calibration measures its dense attention. `window_plan_file` replaces any window plan (OSError or
    ValueError when it cannot be read or is for another model shape). Nothing is read or calibrated for
    variants that take no plan."""
    needed: frozenset[PlanKind] = frozenset().union(*(v.plans() for v in variants))
    plans = NO_PLANS
    if window_plan_file is not None and PlanKind.WINDOWS in needed:
        plans = Plans(windows=load_window_plan(window_plan_file, pipe.config.var))
    plans = plans.merged(saved_plans(folder, needed - plans.kinds(), pipe.config.var))
    missing = needed - plans.kinds()
    if not missing:
        return plans
    if not calibrate_missing:
        raise MissingWindowPlan(folder) if PlanKind.WINDOWS in missing else MissingSharingPlan(folder)
    names = " and ".join(f"{kind} plan" for kind in PlanKind if kind in missing)
    log.warning("no %s beside %s: calibrating at load (`%s` saves them)", names, folder, CALIBRATE)
    return plans.merged(calibrated(pipe, missing, calibration))


def saved_plans(folder: Path | None, kinds: Iterable[PlanKind], var: VARConfig) -> Plans:
    """The plans of `kinds` saved in `folder` (None: nowhere), checked against the model's shape `var`; None
    for those not saved. No other file is read."""
    paths = {kind: folder / FILES[kind] for kind in kinds} if folder is not None else {}
    found = {kind: path for kind, path in paths.items() if path.is_file()}
    windows = load_window_plan(found[PlanKind.WINDOWS], var) if PlanKind.WINDOWS in found else None
    sharing = load_sharing_plan(found[PlanKind.SHARING], var) if PlanKind.SHARING in found else None
    file = PlanOrigin.FILE
    return Plans(windows, sharing, file if windows is not None else None, file if sharing is not None else None)


def calibrated(
    pipe: VARPipeline, kinds: Iterable[PlanKind], calibration: Calibration, progress: Progress | None = None
) -> Plans:
    """Plans of `kinds` calibrated on the unmodified `pipe`; both from one run of the calibration batches when
    both are asked for, half the time of calibrating each alone. The run advances `progress` (calibrate.py)."""
    kinds = frozenset(kinds)
    origin = PlanOrigin.CALIBRATED
    if kinds == {PlanKind.WINDOWS, PlanKind.SHARING}:
        windows, sharing = calibrate_plans(pipe, calibration.windows, calibration.sharing, progress)
        return Plans(windows, sharing, origin, origin)
    if kinds == {PlanKind.WINDOWS}:
        return Plans(windows=calibrate(pipe, calibration.windows, progress), windows_origin=origin)
    if kinds == {PlanKind.SHARING}:
        return Plans(sharing=calibrate_sharing(pipe, calibration.sharing, progress), sharing_origin=origin)
    return NO_PLANS


def load_window_plan(path: Path, var: VARConfig) -> WindowPlan:
    """The window plan saved at `path`; ValueError when it is none or is for another model shape than `var`."""
    plan = WindowPlan.load(path)
    plan.check_fits(var.depth, var.num_heads, var.patch_nums)
    return plan


def load_sharing_plan(path: Path, var: VARConfig) -> SharingPlan:
    """The sharing plan saved at `path`; ValueError when it is for another model shape than `var`."""
    plan = SharingPlan.load(path)
    plan.check_fits(var.depth, var.patch_nums)
    return plan


def save_plan(plan: WindowPlan | SharingPlan, path: Path) -> None:
    """Write `plan` to `path`; a folder with checksums gets them rewritten, so that they cover the new plan.
    The file appears whole or not at all (written beside it, then renamed): a server starting meanwhile, or
    another replica saving the same plan, never reads half of one. OSError when the folder is not writable."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        plan.save(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    if (path.parent / SUMS_FILE).is_file():
        write_sums(path.parent)


def save_plans(plans: Plans, folder: Path) -> list[Path]:
    """Save beside the checkpoint in `folder` each plan of `plans` that was calibrated (not one read from a file
    or given), under its usual name, so that the next load finds it. Returns the paths written."""
    held = {
        PlanKind.WINDOWS: (plans.windows, plans.windows_origin),
        PlanKind.SHARING: (plans.sharing, plans.sharing_origin),
    }
    written = []
    for kind, (plan, origin) in held.items():
        if plan is not None and origin is PlanOrigin.CALIBRATED:
            save_plan(plan, folder / FILES[kind])
            written.append(folder / FILES[kind])
    return written
