"""The checkpoint's offline evaluation on /metrics: `var_variant_quality` and `var_variant_quality_evaluation`.

When the checkpoint folder holds `evaluation.json` (`python -m app evaluate --json`, app/quality/saved.py), its
class accuracy, FID and KID per feature space are exported for the variants the service is configured to serve
and for `noise-floor`, the baseline on a second seed list: how far the figures move from sampling alone, the
yardstick a difference between variants must exceed. They are figures of the offline run, not measured on the
requests served; the Info metric says when that run was and how many images each record judged.

A folder without the file exports neither metric and logs nothing: released weights come without one.
A malformed file (not JSON, wrong shape, missing fields) or one that cannot be read is logged as an error
naming the file and the problem, nothing is exported, and the service starts anyway. The figures describe
the model, they take no part in serving it: stopping the service for a statistics file would turn a bad
edit of a JSON file into an outage, while missing gauges show on the dashboard and the log says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Info

from app.quality.saved import EVALUATION_FILE, NOISE_FLOOR, SavedEvaluation, load_evaluation

log = logging.getLogger(__name__)


class QualityMetrics:
    """The two metrics, registered on the service's registry (ServeMetrics.registry)."""

    def __init__(self, registry: CollectorRegistry):
        self.quality = Gauge(
            "var_variant_quality",
            "offline evaluation of the checkpoint (evaluation.json), not measured live: class accuracy (0 to 1), "
            "FID and KID per variant and feature space; variant noise-floor is the baseline on a second seed list",
            ["variant", "space", "metric"],
            registry=registry,
        )
        self.evaluation = Info(
            "var_variant_quality_evaluation",
            "the offline evaluation behind var_variant_quality: its date (UTC) and images per variant",
            registry=registry,
        )

    def export(self, evaluation: SavedEvaluation, variants: Sequence[str]) -> None:
        """The figures of the configured `variants` and of the noise floor; the other records are left out, so
        that the label values stay the served variants' (and a dashboard compares what is served)."""
        names = [name for name in evaluation.figures if name in variants or name == NOISE_FLOOR]
        for name in names:
            for space, metrics in evaluation.figures[name].items():
                for metric, value in metrics.items():
                    self.quality.labels(name, space, metric).set(value)
        self.evaluation.info({"date": evaluation.date, "images_per_variant": _images(evaluation, names)})


def _images(evaluation: SavedEvaluation, names: Sequence[str]) -> str:
    """One number when every exported record judged as many images (as `python -m app evaluate` writes them),
    else `variant=images` pairs."""
    counts = {name: evaluation.images[name] for name in names}
    if len(set(counts.values())) == 1:
        return str(next(iter(counts.values())))
    return ",".join(f"{name}={n}" for name, n in counts.items())


def export_quality(folder: Path, variants: Sequence[str], registry: CollectorRegistry) -> QualityMetrics | None:
    """The metrics of `folder`'s evaluation file on `registry`, for `variants` and the noise floor; None, and
    nothing registered, without a file or with one that cannot be read (logged: see the module's docstring)."""
    path = folder / EVALUATION_FILE
    if not path.is_file():
        return None
    try:
        evaluation = load_evaluation(path)
    except (OSError, ValueError) as e:
        log.error("offline quality not exported: %s", e)  # either names the file
        return None
    metrics = QualityMetrics(registry)
    metrics.export(evaluation, variants)
    return metrics
