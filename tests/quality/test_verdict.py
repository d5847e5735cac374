"""Verdicts per feature space against the baseline's seed-to-seed spread."""

from __future__ import annotations

from typing import Any

import pytest

from app.quality.verdict import add_verdicts, seed_spread


def space(accuracy: float | None, fid: float, kid: float) -> dict[str, Any]:
    return {"class_accuracy": accuracy, "fid": fid, "kid": kid, "precision": 0.8, "recall": 0.3}


def record(variant: str, seed_set: str, cnn: dict[str, Any], mixer: dict[str, Any]) -> dict[str, Any]:
    return {"variant": variant, "seed_set": seed_set, "spaces": {"cnn": cnn, "mixer": mixer}}


def records() -> list[dict[str, Any]]:
    """Baseline spreads: cnn accuracy 0.01, FID 0.4, KID 0.002; mixer accuracy 0.02, FID 1.0, KID 0.005."""
    return [
        record("baseline", "main", space(0.90, 17.0, 0.010), space(0.85, 80.0, 0.050)),
        record("free-here", "main", space(0.905, 17.2, 0.011), space(0.84, 97.5, 0.090)),  # worse in mixer only
        record("better", "main", space(0.95, 15.0, 0.005), space(0.90, 70.0, 0.030)),
        record("less-accurate", "main", space(0.88, 17.0, 0.010), space(0.85, 80.0, 0.050)),
        record("baseline", "noise-floor", space(0.91, 17.4, 0.012), space(0.83, 81.0, 0.055)),
    ]


def test_spread_is_the_distance_between_the_baselines_two_seed_lists() -> None:
    spread = seed_spread(space(0.90, 17.0, 0.010), space(0.91, 17.4, 0.012))
    assert spread == pytest.approx({"class_accuracy": 0.01, "fid": 0.4, "kid": 0.002})
    assert "class_accuracy" not in seed_spread(space(None, 1.0, 0.1), space(None, 2.0, 0.1))  # features only


def test_a_variant_free_in_one_space_and_worse_in_the_other_is_flagged_in_that_space() -> None:
    rs = records()
    assert add_verdicts(rs)
    free_here = rs[1]
    assert free_here["spaces"]["cnn"]["verdict"] == "ok"
    assert free_here["spaces"]["mixer"]["verdict"] == "worse"
    assert set(free_here["spaces"]["mixer"]["worse_in"]) == {"fid", "kid"}  # accuracy fell 0.01 < spread 0.02
    assert free_here["spaces"]["mixer"]["worse_in"]["fid"] == pytest.approx({"change": 17.5, "spread": 1.0})
    assert free_here["verdict"] == "worse"


def test_better_is_not_worse_and_lower_accuracy_beyond_the_spread_is() -> None:
    rs = records()
    add_verdicts(rs)
    by_variant = {r["variant"]: r for r in rs if r["seed_set"] == "main"}
    assert by_variant["baseline"]["verdict"] == "ok" and by_variant["better"]["verdict"] == "ok"
    less = by_variant["less-accurate"]
    assert less["spaces"]["cnn"]["worse_in"].keys() == {"class_accuracy"} and less["spaces"]["mixer"]["verdict"] == "ok"
    assert "verdict" not in rs[-1]  # the noise floor is the yardstick, not judged


def test_no_verdicts_without_the_baselines_two_runs() -> None:
    rs = [r for r in records() if r["variant"] != "baseline" or r["seed_set"] != "main"]
    assert not add_verdicts(rs)
    assert all("verdict" not in r for r in rs)
