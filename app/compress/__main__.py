"""`python -m app.compress calibrate`: calibrate the window plan and the sharing plan, save them beside a checkpoint.

python -m app.compress calibrate --model model_store/demo [--tau 0.9 --drop-mass 0.1 --shape band] [--threshold 0.05]
python -m app.compress calibrate --model model_store/demo --sharing-only [--threshold 0.05]
python -m app.compress band-plan --preset d16 --keep 0.15 --out band15.safetensors   # synthetic, no weights
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from app.compress.attention_passes import attention_flops, cfg_attention_sharing
from app.compress.plans import Calibration, calibrated, save_plan
from app.compress.registry import PlanKind
from app.compress.sharing import SHARING_PLAN_FILE, SharingPlan, SharingSettings
from app.compress.windows import PLAN_FILE, WindowSettings, band_plan
from app.model.checkpoint import folder_config, load_folder
from app.model.config import PRESETS
from app.model.pipeline import VARPipeline
from app.model.progress import Progress, heartbeat

Settings = TypeVar("Settings", WindowSettings, SharingSettings)
log = logging.getLogger("app.compress.calibrate")


def _settings(settings_type: type[Settings], a: argparse.Namespace) -> Settings:
    """The settings the command line gives, their defaults for the rest."""
    fields = {f.name for f in dataclasses.fields(settings_type)}
    return settings_type(**{k: v for k, v in vars(a).items() if k in fields and v is not None})


def _report_sharing(plan: SharingPlan, pipe: VARPipeline, out: Path) -> None:
    """What the plan shares and the attention FLOPs it keeps (the pipeline is modified: it is not used after)."""
    dense = attention_flops(pipe, 1)
    kept = attention_flops(cfg_attention_sharing(pipe, plan=plan), 1) / dense
    shared = int(plan.shared.sum())
    print(
        f"{out}: {shared} of {plan.shared.numel()} (layer, scale) pairs shared, {100 * kept:.1f}% of the attention "
        f"FLOPs kept; settings {plan.settings}"
    )


@contextmanager
def progress_bar(progress: Progress) -> Iterator[None]:
    """A bar on stderr that follows `progress` in percent of the work (its steps differ in cost, so the bar's
    rate and time left are those of the work, not of the steps), with the log lines printed above it."""
    with tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]") as bar:

        def show(p: Progress) -> None:
            bar.n = round(100 * p.fraction, 1)
            bar.set_postfix_str(f"step {min(p.done + 1, p.steps)}/{p.steps}", refresh=True)

        progress.listeners.append(show)
        with logging_redirect_tqdm():
            yield


def calibrate_main(a: argparse.Namespace) -> int:
    """Both plans from one calibration run (the sharing plan alone with --sharing-only), saved beside the model;
    a progress bar while it runs, and its progress in the log every 10 s."""
    pipe = load_folder(a.model)
    kinds = {PlanKind.SHARING} if a.sharing_only else {PlanKind.WINDOWS, PlanKind.SHARING}
    calibration = Calibration(_settings(WindowSettings, a), _settings(SharingSettings, a))
    what = "sharing plan" if a.sharing_only else "window and sharing plans"
    progress = Progress(f"calibrating the {what} of {a.model}")
    log.info("%s: %d batches of %d images", progress.task, calibration.windows.batches, calibration.windows.batch_size)
    with progress_bar(progress), heartbeat(progress, log.info):
        plans = calibrated(pipe, kinds, calibration, progress)
    log.info("%s: done in %.1f s", progress.task, progress.elapsed_s)
    if plans.windows is not None:
        out = a.out or a.model / PLAN_FILE
        save_plan(plans.windows, out)
        kept = 100 * plans.windows.kept_fraction()
        print(f"{out}: {kept:.1f}% of (query, key) pairs kept; settings {plans.windows.settings}")
    sharing, sharing_out = plans.sharing_plan("calibrate"), a.sharing_out or a.model / SHARING_PLAN_FILE
    save_plan(sharing, sharing_out)
    _report_sharing(sharing, pipe, sharing_out)
    return 0


def add_band_plan_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("band-plan", help="write a synthetic band window plan keeping a stated share of the pairs")
    shape = b.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=list(PRESETS), default="d16", help="model shape (default d16)")
    shape.add_argument("--checkpoint", type=Path, help="the shape of a checkpoint folder (its config) instead")
    b.add_argument("--keep", type=float, required=True, help="share of the windowed scales' pairs kept, e.g. 0.15")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--dense-scales", type=int, default=WindowSettings.dense_scales, help="query scales left dense")


def band_plan_main(a: argparse.Namespace) -> int:
    """A band plan for a model's shape (no weights read), with the share of pairs it really keeps."""
    var = (folder_config(a.checkpoint) if a.checkpoint else PRESETS[a.preset]).var
    try:
        plan = band_plan(var.depth, var.num_heads, var.patch_nums, a.keep, WindowSettings(dense_scales=a.dense_scales))
    except ValueError as e:
        print(f"band-plan: {e}", file=sys.stderr)
        return 2
    plan.save(a.out)
    print(
        f"{a.out}: band plan keeping {100 * plan.kept_fraction(windowed_only=True):.2f}% of the windowed query "
        f"scales' (query, key) pairs (target {100 * a.keep:.2f}%), {100 * plan.kept_fraction():.2f}% of all pairs"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(prog="python -m app.compress", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="calibrate the window plan and the sharing plan of a checkpoint folder")
    c.add_argument("--model", type=Path, default=Path("model_store/demo"))
    c.add_argument("--out", type=Path, help=f"default: MODEL/{PLAN_FILE}")
    c.add_argument("--sharing-out", type=Path, help=f"default: MODEL/{SHARING_PLAN_FILE}")
    c.add_argument("--sharing-only", action="store_true", help="calibrate the sharing plan alone")
    fields = {f.name: f for f in dataclasses.fields(WindowSettings)}
    fields |= {f.name: f for f in dataclasses.fields(SharingSettings) if f.name not in fields}  # batches: once
    for f in fields.values():
        c.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), help=f"default {f.default}")
    add_band_plan_parser(sub)
    a = ap.parse_args(argv)
    if a.command == "band-plan":
        return band_plan_main(a)
    return calibrate_main(a)


if __name__ == "__main__":
    sys.exit(main())
