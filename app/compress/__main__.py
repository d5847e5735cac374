"""`python -m app.compress`: calibrate a window plan beside a checkpoint; study per-layer int8 sensitivity.

python -m app.compress calibrate --model model_store/demo [--tau 0.9 --drop-mass 0.1 --shape band]
python -m app.compress sensitivity --model model_store/demo --images-per-class 100 --json runs/sens.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from app.checksums import SUMS_FILE, write_sums
from app.compress.calibrate import calibrate
from app.compress.windows import PLAN_FILE, WindowSettings
from app.model.checkpoint import load_folder


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


def sensitivity_main(a: argparse.Namespace) -> int:
    from app.compress.sensitivity import study

    records = study(a.model, a.images_per_class, a.greedy_per_class, a.batch_size)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(records, indent=2) + "\n")
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
    s = sub.add_parser("sensitivity", help="quality with one layer type at a time in int8")
    s.add_argument("--model", type=Path, default=Path("model_store/demo"))
    s.add_argument("--images-per-class", type=int, default=100)
    s.add_argument("--greedy-per-class", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=50)
    s.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    return calibrate_main(a) if a.command == "calibrate" else sensitivity_main(a)


if __name__ == "__main__":
    sys.exit(main())
