"""`python -m app.compress calibrate`: calibrate a window plan and save it beside a checkpoint.

python -m app.compress calibrate --model model_store/demo [--tau 0.9 --drop-mass 0.1 --shape band]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from app.compress.calibrate import calibrate
from app.compress.windows import PLAN_FILE, WindowSettings
from app.model.checkpoint import load_folder
from app.model.checksums import SUMS_FILE, write_sums


def calibrate_main(a: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(WindowSettings)}
    settings = WindowSettings(**{k: v for k, v in vars(a).items() if k in fields and v is not None})
    pipe = load_folder(a.model)
    plan = calibrate(pipe, settings)
    out = a.out or a.model / PLAN_FILE
    plan.save(out)
    if (out.parent / SUMS_FILE).is_file():  # the folder's checksums cover the new plan too
        write_sums(out.parent)
    print(f"{out}: {100 * plan.kept_fraction():.1f}% of (query, key) pairs kept; settings {settings}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(prog="python -m app.compress", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="calibrate the window plan of a checkpoint folder")
    c.add_argument("--model", type=Path, default=Path("model_store/demo"))
    c.add_argument("--out", type=Path, help=f"default: MODEL/{PLAN_FILE}")
    for f in dataclasses.fields(WindowSettings):
        c.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), help=f"default {f.default}")
    a = ap.parse_args(argv)
    return calibrate_main(a)


if __name__ == "__main__":
    sys.exit(main())
