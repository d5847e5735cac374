"""The evaluation saved beside a checkpoint, `evaluation.json` in its folder, read back as plain figures.

The file is what `python -m app evaluate --json` writes: a list of records (docs/evaluation.md). Per record,
per feature space, the loader keeps class accuracy, FID and KID, and it keeps the run's date and each
record's number of images; the rest of the records is not read. A record is named by its variant, the
baseline's second seed list by `noise-floor`. A file that is not such a list raises ValueError naming the
file and what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

EVALUATION_FILE = "evaluation.json"
MAIN = "main"  # the seed set every variant generates
NOISE_FLOOR = "noise-floor"  # the baseline's second seed list: its seed set, and its record's name here
METRICS = ("class_accuracy", "fid", "kid")
JSON_TYPES = {int: "an integer", str: "a string", dict: "an object"}  # as the messages name them

# record name -> feature space -> metric -> value
Figures = dict[str, dict[str, dict[str, float]]]


@dataclass(frozen=True)
class SavedEvaluation:
    date: str  # when the run started: UTC, ISO-8601, as the records carry it
    images: dict[str, int]  # per record: how many images were judged
    figures: Figures


def load_evaluation(path: Path) -> SavedEvaluation:
    """The figures of the evaluation file at `path`. ValueError names the file and the problem; a file that
    cannot be read raises OSError as usual."""
    try:
        return parse_evaluation(json.loads(path.read_text()))
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ones
        raise ValueError(f"{path}: {e}") from e


def parse_evaluation(records: Any) -> SavedEvaluation:
    """The figures of a decoded evaluation file; ValueError says what is wrong."""
    if not isinstance(records, list) or not records:
        raise ValueError("expected a non-empty JSON list of evaluation records")
    images: dict[str, int] = {}
    figures: Figures = {}
    dates = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {i} is not a JSON object")
        name = _record_name(record, i)
        if name in figures:
            raise ValueError(f"two records for {name!r}")
        where = f"record {i} ({name})"
        images[name] = _field(record, "images", int, where)
        figures[name] = _spaces(record, where)
        dates.add(_date(record, where))
    # a yardstick is only one if it was measured with the same code and machine as what it measures
    if len(dates) > 1:
        raise ValueError(f"records from several runs (dates {sorted(dates)}); a file holds one evaluation")
    return SavedEvaluation(dates.pop(), images, figures)


def _record_name(record: dict[str, Any], i: int) -> str:
    seed_set = _field(record, "seed_set", str, f"record {i}")
    if seed_set == NOISE_FLOOR:
        return NOISE_FLOOR
    if seed_set != MAIN:
        raise ValueError(f"record {i}: seed_set {seed_set!r}, expected {MAIN!r} or {NOISE_FLOOR!r}")
    return _field(record, "variant", str, f"record {i}")


def _date(record: dict[str, Any], where: str) -> str:
    date = _field(record, "date", str, where)
    try:
        datetime.fromisoformat(date)
    except ValueError:
        raise ValueError(f"{where}: date {date!r} is not ISO-8601") from None
    return date


def _spaces(record: dict[str, Any], where: str) -> dict[str, dict[str, float]]:
    spaces = _field(record, "spaces", dict, where)
    if not spaces:
        raise ValueError(f"{where}: `spaces` holds no feature space")
    out = {}
    for space, metrics in spaces.items():
        if not isinstance(metrics, dict):
            raise ValueError(f"{where}: spaces.{space} is not a JSON object")
        out[space] = _metrics(metrics, f"{where}: spaces.{space}")
    return out


def _metrics(metrics: dict[str, Any], where: str) -> dict[str, float]:
    """Class accuracy, FID and KID; class accuracy is null in a feature space without classes (then left out)."""
    out = {}
    for metric in METRICS:
        if metric not in metrics:
            raise ValueError(f"{where}.{metric} is missing")
        value = metrics[metric]
        if metric == "class_accuracy" and value is None:  # a feature network without classes
            continue
        if not _is_number(value):
            raise ValueError(f"{where}.{metric} is {value!r}, expected a number")
        out[metric] = float(value)
    return out


def _field(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in record:
        raise ValueError(f"{where}: field {key!r} is missing")
    value = record[key]
    # bool is an int to Python, never an image count
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} is {value!r}, expected {JSON_TYPES[kind]}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
