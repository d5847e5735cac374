"""PNG plots of benchmark and evaluation records (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def bench_plot(records: list[dict[str, Any]], path: Path) -> None:
    """Speed-up over the reference per variant and batch size, and attention FLOPs as a share of its."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    batches = sorted({r["batch_size"] for r in records})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(batches)
    for i, bs in enumerate(batches):
        by = {r["variant"]: r for r in records if r["batch_size"] == bs}
        xs = [j + i * width for j in range(len(variants))]
        left.bar(
            xs, [by[v]["speedup_vs_baseline"] or 0 if v in by else 0 for v in variants], width, label=f"batch {bs}"
        )
        share = [100 * (by[v]["attention_share"] or 0) if v in by else 0 for v in variants]
        right.bar(xs, share, width, label=f"batch {bs}")
    for ax, title in ((left, "speed-up over the reference (x)"), (right, "attention FLOPs computed (% of reference)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], variants, rotation=30, ha="right")
        ax.set_title(title)
        ax.legend()
    left.axhline(1.0, color="grey", lw=0.8)
    preset = records[0]["preset"] if records else ""
    fig.suptitle(f"{preset} on {records[0]['device'] if records else ''}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality_speed_plot(records: list[dict[str, Any]], path: Path, speed: dict[str, float] | None = None) -> None:
    """FID and class accuracy against speed, one point per variant (main seed list), with the baseline's
    second seed list as the noise floor. Speed: `speed[variant]` (e.g. the benchmark's images per second)
    when given, else the evaluation's own images per second."""
    main = [r for r in records if r["seed_set"] == "main" and (speed is None or r["variant"] in speed)]
    for r in main:
        r["speed"] = speed[r["variant"]] if speed is not None else r["images_per_second"]
    floor = [r for r in records if r["seed_set"] == "noise-floor"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in main:
        for ax, key, scale in ((left, "fid", 1), (right, "class_accuracy", 100)):
            if r[key] is None:
                continue
            ax.scatter(r["speed"], scale * r[key])
            ax.annotate(r["variant"], (r["speed"], scale * r[key]), fontsize=8)
    for r in floor:
        left.axhline(r["fid"], color="grey", ls="--", lw=0.8, label="baseline, second seed list")
        if r["class_accuracy"] is not None:
            right.axhline(100 * r["class_accuracy"], color="grey", ls="--", lw=0.8, label="baseline, second seeds")
    left.set(xlabel="images per second", ylabel="FID (lower is better)", title="FID vs speed")
    right.set(xlabel="images per second", ylabel="class accuracy (%)", title="class accuracy vs speed")
    for ax in (left, right):
        if floor:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """`python -m app.bench.plots EVAL.json BENCH.json OUT.png [--batch-size 8]`: quality from the evaluation against
    the benchmark's images per second at one batch size."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m app.bench.plots", description=main.__doc__)
    ap.add_argument("evaluation", type=Path)
    ap.add_argument("bench", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args(argv)
    bench = json.loads(a.bench.read_text())
    speed = {r["variant"]: r["images_per_second"] for r in bench if r["batch_size"] == a.batch_size}
    quality_speed_plot(json.loads(a.evaluation.read_text()), a.out, speed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
