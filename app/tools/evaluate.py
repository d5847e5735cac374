"""`python -m app evaluate`: image quality of each variant on the same (class, seed) list, in each feature space.

Defaults judge the embedded demo model in two independent feature spaces, the demo classifier's and the
mixer classifier's, against the Fashion-MNIST test split, and give each variant a verdict per space: worse
than the baseline by more than the baseline's seed-to-seed spread, or not. The model folder, the reference
images and the feature networks are all arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from app.compress import VARIANTS, apply_variant, variant_spec
from app.compress.plans import plans_for
from app.model.checkpoint import load_folder
from app.quality.evaluation import (
    NOISE_FLOOR_SEED_OFFSET,
    EvalRun,
    Prompts,
    Uncertainty,
    evaluate_variant,
    greedy_agreement,
    open_judges,
)
from app.quality.fashion_mnist import DEFAULT_DIR
from app.quality.verdict import JUDGED, add_verdicts
from app.tools.images import save_grid

# the two independent judges, relative to the working directory
FEATURES = (Path("model_store/demo_classifier"), Path("model_store/mixer_classifier"))


def _grid(images: torch.Tensor, per_class: int, num_classes: int, columns: int = 10) -> torch.Tensor:
    """The first `columns` images of every class, one class per row."""
    keep = [c * per_class + i for c in range(num_classes) for i in range(min(columns, per_class))]
    return images[keep]


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    judges = open_judges(a.features, a.reference, a.reference_split)
    uncertainty = Uncertainty(a.bootstrap, kid_subsets=a.kid_subsets, kid_subset_size=a.kid_subset_size)
    base = load_folder(a.model)
    plans = plans_for(base, a.model, [variant_spec(name) for name in a.variants])
    run = EvalRun(base.config.default_sampling.overridden(a.cfg, a.top_k, a.top_p), a.batch_size, a.label)
    C = base.num_classes
    prompts = Prompts.make(C, a.images_per_class, a.seed)
    greedy_prompts = Prompts.make(C, a.greedy_per_class, a.seed)
    apply_variant("baseline", base)
    records = []
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for name in a.variants:
        pipe = base if name == "baseline" else apply_variant(name, load_folder(a.model), plans=plans)
        record, images = evaluate_variant(name, pipe, prompts, run, judges, "main", uncertainty)
        if a.greedy_per_class:
            agreement = greedy_agreement(pipe, base, greedy_prompts, run.params.cfg, a.batch_size)
            record["greedy_agreement"] = [round(x, 4) for x in agreement]
        save_grid(
            _grid(images, a.images_per_class, C), min(10, a.images_per_class), a.out_dir / f"{a.label}_{name}.png"
        )
        records.append(record)
        print_row(record)
    noise = Prompts.make(C, a.images_per_class, a.seed + NOISE_FLOOR_SEED_OFFSET)
    records.append(evaluate_variant("baseline", base, noise, run, judges, "noise-floor", uncertainty)[0])
    print_row(records[-1])
    return records


HEADER = (
    f"{'model':<10} {'variant':<14} {'seeds':<12} {'images':>6} {'space':<18} {'class acc [95% CI]':<24} "
    f"{'FID [95% CI]':<26} {'KID ± se':<20} {'prec':>6} {'recall':>6} {'img/s':>7}"
)


def _accuracy(space: dict[str, Any]) -> str:
    if space["class_accuracy"] is None:
        return "n/a"
    ci = space.get("class_accuracy_ci")
    shown = f"{100 * space['class_accuracy']:.2f}%"
    return shown if ci is None else f"{shown} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def _fid(space: dict[str, Any]) -> str:
    ci = space.get("fid_ci")
    return f"{space['fid']:.3f}" if ci is None else f"{space['fid']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def print_row(r: dict[str, Any]) -> None:
    """One line per feature space; the record's columns on the first only."""
    lead = f"{r['model']:<10} {r['variant']:<14} {r['seed_set']:<12} {r['images']:>6}"
    for i, (name, s) in enumerate(r["spaces"].items()):
        kid = f"{s['kid']:.5f} ± {s['kid_se']:.5f}"
        line = (
            f"{lead if i == 0 else ' ' * len(lead)} {name:<18} {_accuracy(s):<24} {_fid(s):<26} {kid:<20} "
            f"{s['precision']:>6.3f} {s['recall']:>6.3f}"
        )
        if i == 0:
            line += f" {r['images_per_second']:>7.1f}"
            line += f"  greedy agreement per scale: {r['greedy_agreement']}" if "greedy_agreement" in r else ""
        print(line, flush=True)


def iso_utc(moment: datetime) -> str:
    """A moment in UTC, ISO-8601 to the second: 2026-12-06T19:02:11Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def date_records(records: list[dict[str, Any]], started: datetime) -> None:
    """Every record carries the run's start: figures from different code or machines need their date."""
    for record in records:
        record["date"] = iso_utc(started)


METRIC_NAMES = {"class_accuracy": "accuracy", "fid": "FID", "kid": "KID"}


def _change(metric: str, change: float, spread: float) -> str:
    """A metric's change against the baseline and the baseline's spread, in the units the table prints."""
    if metric == "class_accuracy":
        return f"accuracy {100 * change:+.2f} pts (spread {100 * spread:.2f})"
    digits = 3 if metric == "fid" else 5
    return f"{METRIC_NAMES[metric]} {change:+.{digits}f} (spread {spread:.{digits}f})"


def verdict_text(space: dict[str, Any]) -> str:
    """`ok`, or `worse:` and each metric worse than the baseline with its change and the baseline's spread."""
    if space["verdict"] == "ok":
        return "ok"
    return "worse: " + ", ".join(_change(m, w["change"], w["spread"]) for m, w in space["worse_in"].items())


def print_verdicts(records: list[dict[str, Any]]) -> None:
    """The verdict table: a row per variant, a column per feature space."""
    main = [r for r in records if "verdict" in r]
    if not main:
        print("no verdicts: they need `baseline` among --variants (its seed-to-seed spread is the yardstick)")
        return
    spaces = list(main[0]["spaces"])
    judged = ", ".join(METRIC_NAMES[m] for m in JUDGED)
    print(f"\nverdict per feature space: worse than the baseline by more than its seed-to-seed spread ({judged})")
    print(f"{'variant':<14} " + " ".join(f"{name:<48}" for name in spaces))
    for r in main:
        print(f"{r['variant']:<14} " + " ".join(f"{verdict_text(r['spaces'][n]):<48}" for n in spaces))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app evaluate", description=__doc__)
    ap.add_argument("--model", type=Path, default=Path("model_store/demo"), help="checkpoint folder")
    ap.add_argument("--label", default="", help="name of the model in the records (default: the folder name)")
    ap.add_argument(
        "--features",
        default=",".join(str(f) for f in FEATURES),
        help="comma-separated feature networks, each a classifier folder (ours) or a torch.export .pt2 file "
        "mapping images in [-1, 1] to features; the first one's metrics are also the records' top-level fields",
    )
    ap.add_argument(
        "--reference",
        type=Path,
        default=DEFAULT_DIR,
        help="Fashion-MNIST IDX folder (test split) or a safetensors file with `images`",
    )
    ap.add_argument(
        "--reference-split",
        choices=["test", "train"],
        default="test",
        help="split of an IDX folder; choose sampling settings on train, report on test",
    )
    ap.add_argument("--variants", default="baseline", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--images-per-class", type=int, default=100)
    ap.add_argument("--greedy-per-class", type=int, default=10, help="images per class for token agreement (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--cfg", type=float, help="sampling overrides (default: the model's own settings)")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        help="resamples of the generated images for the 95%% intervals of class accuracy and FID (0: none)",
    )
    ap.add_argument("--kid-subsets", type=int, default=100, help="random subsets KID is averaged over (>= 2)")
    ap.add_argument("--kid-subset-size", type=int, default=1000, help="images per KID subset (at most all)")
    ap.add_argument("--json", type=Path, help="write the records here")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/eval"), help="sample grid PNG per variant")
    ap.add_argument("--plot", type=Path, help="PNG of FID and class accuracy against images per second")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)  # fmt: skip
    if a.threads:
        torch.set_num_threads(a.threads)
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if a.kid_subsets < 2:  # refused before minutes of generation, not after
        print("error: --kid-subsets must be at least 2 (KID's standard error)", file=sys.stderr)
        return 2
    a.label = a.label or a.model.name
    a.features = [Path(f.strip()) for f in a.features.split(",") if f.strip()]
    print(HEADER)
    started = datetime.now(UTC)
    records = run(a)
    add_verdicts(records)
    date_records(records, started)
    print_verdicts(records)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(records, indent=2) + "\n")
    if a.plot:
        from app.bench.plots import quality_speed_plot

        quality_speed_plot(records, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
