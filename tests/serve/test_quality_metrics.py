"""The checkpoint's offline evaluation on /metrics (app/serve/quality_metrics.py): `var_variant_quality` for the
served variants and the noise floor, `var_variant_quality_evaluation` with the date and images per variant;
nothing without the file; a malformed file logged and the service serving anyway."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.bench.prometheus_text import Samples, labels_of
from app.quality.saved import EVALUATION_FILE, NOISE_FLOOR, parse_evaluation
from app.serve.quality_metrics import QualityMetrics
from tests.quality.test_saved import DATE, evaluation_records, expected_figures
from tests.serve.conftest import serve_settings, serving
from tests.serve.test_metrics import scrape

SERVED = ["baseline", "bf16"]  # the evaluation also holds litevar and fastest, which are not served
QUALITY, EVALUATION = "var_variant_quality", "var_variant_quality_evaluation_info"


def checkpoint_with(demo_folder: Path, tmp_path: Path, content: Any | None) -> Path:
    """A copy of the demo-shaped checkpoint folder, with `content` as its evaluation file (None: no file)."""
    folder = tmp_path / "model"
    shutil.copytree(demo_folder, folder)
    if content is not None:
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / EVALUATION_FILE).write_text(text)
    return folder


def quality(samples: Samples) -> dict[tuple[str, str, str], float]:
    """The var_variant_quality samples by (variant, space, metric)."""
    out = {}
    for (name, labels), value in samples.items():
        if name == QUALITY:
            ls = dict(labels)
            out[ls["variant"], ls["space"], ls["metric"]] = value
    return out


def test_the_served_variants_and_the_noise_floor_are_exported(demo_folder: Path, tmp_path: Path) -> None:
    records = evaluation_records()
    folder = checkpoint_with(demo_folder, tmp_path, records)
    with serving(serve_settings(folder, variants=SERVED)) as client:
        samples = scrape(client)
    figures = expected_figures(records)
    expected = {
        (variant, space, metric): value
        for variant in [*SERVED, NOISE_FLOOR]
        for space, metrics in figures[variant].items()
        for metric, value in metrics.items()
    }
    assert quality(samples) == expected  # litevar and fastest were evaluated, not served: left out
    assert {metric for _, _, metric in expected} == {"class_accuracy", "fid", "kid"}
    assert quality(samples)["bf16", "mixer_classifier", "fid"] == 19.1
    assert labels_of(samples, EVALUATION) == {"date": DATE, "images_per_variant": "2000"}


def test_a_checkpoint_without_an_evaluation_exports_neither_metric(
    demo_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = checkpoint_with(demo_folder, tmp_path, None)
    with caplog.at_level(logging.WARNING), serving(serve_settings(folder, variants=SERVED)) as client:
        text = client.get("/metrics").text
    assert "var_model_info" in text  # the scrape is a real one
    assert "var_variant_quality" not in text
    assert not [r for r in caplog.records if r.name.startswith("app.serve.quality")]


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{not json", "Expecting property name"), ([{"variant": "baseline"}], "record 0: field 'seed_set' is missing")],
    ids=["not-json", "missing-field"],
)
def test_a_malformed_evaluation_is_logged_and_the_service_serves_anyway(
    demo_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, content: Any, problem: str
) -> None:
    folder = checkpoint_with(demo_folder, tmp_path, content)
    with caplog.at_level(logging.ERROR), serving(serve_settings(folder, variants=SERVED)) as client:
        assert client.post("/generate", json={"class_label": 1, "variant": "bf16"}).status_code == 200
        text = client.get("/metrics").text
    assert "var_variant_quality" not in text
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert str(folder / EVALUATION_FILE) in errors[0] and problem in errors[0]


def test_images_per_variant_names_each_record_when_their_counts_differ() -> None:
    """A file put together by hand may judge records on different numbers of images: the Info says which."""
    records = evaluation_records(("baseline", "litevar"))
    records[1]["images"] = 400
    registry = CollectorRegistry()
    QualityMetrics(registry).export(parse_evaluation(records), ["baseline", "litevar"])
    each = "baseline=2000,litevar=400,noise-floor=2000"
    assert registry.get_sample_value(EVALUATION, {"date": DATE, "images_per_variant": each}) == 1.0
