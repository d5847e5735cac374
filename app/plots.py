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


def quality_speed_plot(records: list[dict[str, Any]], path: Path) -> None:
    """FID and class accuracy against images per second, one point per variant (main seed list), with the
    baseline's second seed list as the noise floor."""
    main = [r for r in records if r["seed_set"] == "main"]
    floor = [r for r in records if r["seed_set"] == "noise-floor"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in main:
        for ax, key, scale in ((left, "fid", 1), (right, "class_accuracy", 100)):
            if r[key] is None:
                continue
            ax.scatter(r["images_per_second"], scale * r[key])
            ax.annotate(r["variant"], (r["images_per_second"], scale * r[key]), fontsize=8)
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
