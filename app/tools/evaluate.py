"""`python -m app evaluate`: image quality of each variant on the same (class, seed) list.

Defaults judge the embedded demo model with the demo classifier against the Fashion-MNIST test split; the
model folder, the reference images and the feature network are all arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from app.compress import VARIANTS, apply_variant
from app.model.checkpoint import load_folder
from app.quality.evaluation import NOISE_FLOOR_SEED_OFFSET, EvalRun, Judge, Prompts, evaluate_variant, greedy_agreement
from app.quality.fashion_mnist import DEFAULT_DIR
from app.tools.images import save_grid


def _grid(images: torch.Tensor, per_class: int, num_classes: int, columns: int = 10) -> torch.Tensor:
    """The first `columns` images of every class, one class per row."""
    keep = [c * per_class + i for c in range(num_classes) for i in range(min(columns, per_class))]
    return images[keep]


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    judge = Judge.open(a.features, a.reference, a.reference_split)
    base = load_folder(a.model)
    run = EvalRun(base.config.default_sampling.overridden(a.cfg, a.top_k, a.top_p), a.batch_size, a.label)
    C = base.num_classes
    prompts = Prompts.make(C, a.images_per_class, a.seed)
    greedy_prompts = Prompts.make(C, a.greedy_per_class, a.seed)
    apply_variant("baseline", base)
    records = []
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for name in a.variants:
        pipe = base if name == "baseline" else apply_variant(name, load_folder(a.model))
        record, images = evaluate_variant(name, pipe, prompts, run, judge, "main")
        record["greedy_agreement"] = [
            round(x, 4) for x in greedy_agreement(pipe, base, greedy_prompts, run.params.cfg, a.batch_size)
        ]
        save_grid(
            _grid(images, a.images_per_class, C), min(10, a.images_per_class), a.out_dir / f"{a.label}_{name}.png"
        )
        records.append(record)
        print_row(record)
    noise = Prompts.make(C, a.images_per_class, a.seed + NOISE_FLOOR_SEED_OFFSET)
    records.append(evaluate_variant("baseline", base, noise, run, judge, "noise-floor")[0])
    print_row(records[-1])
    return records


HEADER = (
    f"{'model':<10} {'variant':<14} {'seeds':<12} {'images':>6} {'class acc':>9} {'FID':>8} {'prec':>6} "
    f"{'recall':>6} {'img/s':>7}"
)


def print_row(r: dict[str, Any]) -> None:
    acc = "n/a" if r["class_accuracy"] is None else f"{100 * r['class_accuracy']:.2f}%"
    print(
        f"{r['model']:<10} {r['variant']:<14} {r['seed_set']:<12} {r['images']:>6} {acc:>9} {r['fid']:>8.3f} "
        f"{r['precision']:>6.3f} {r['recall']:>6.3f} {r['images_per_second']:>7.1f}"
        + (f"  greedy agreement per scale: {r['greedy_agreement']}" if "greedy_agreement" in r else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app evaluate", description=__doc__)
    ap.add_argument("--model", type=Path, default=Path("model_store/demo"), help="checkpoint folder")
    ap.add_argument("--label", default="", help="name of the model in the records (default: the folder name)")
    ap.add_argument(
        "--features",
        type=Path,
        default=Path("model_store/demo_classifier"),
        help="classifier folder (ours) or a torch.export .pt2 file mapping images in [-1, 1] to features",
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
    ap.add_argument("--greedy-per-class", type=int, default=10, help="images per class for token agreement")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--cfg", type=float, help="sampling overrides (default: the model's own settings)")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
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
    a.label = a.label or a.model.name
    print(HEADER)
    records = run(a)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(records, indent=2) + "\n")
    if a.plot:
        from app.bench.plots import quality_speed_plot

        quality_speed_plot(records, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
