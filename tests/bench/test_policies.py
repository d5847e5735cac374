"""`python -m app.bench policies`: every policy measured under the same load, the table and the JSON."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from app.bench.policies import main, poisson
from app.bench.stats import percentile


def test_the_policies_run_side_by_side_on_the_same_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "policies.json"
    argv = ["--preset", "tiny", "--variants", "baseline,cfg-share", "--max-batch-size", "2", "--requests", "6"]
    argv += ["--capacity-requests", "4", "--levels", "0.5", "--json", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert [(r["policy"], r["level"]) for r in runs] == [
        ("whole", 0.0), ("scale", 0.0), ("scale+overlap", 0.0), ("whole", 0.5), ("scale", 0.5), ("scale+overlap", 0.5),
    ]  # fmt: skip
    assert record["capacity"] == runs[0]["images_per_s"] > 0
    for r in runs:
        assert r["requests"] == (4 if r["level"] == 0 else 6)
        assert 0 < r["p50_s"] <= r["p95_s"] <= r["p99_s"]
    table = capsys.readouterr().out
    assert "p99 vs whole" in table and table.count("scale+overlap") == 2


def test_the_reference_must_come_first() -> None:
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--policies", "scale,whole"])


def test_arrivals_and_percentiles() -> None:
    times = poisson(10.0, 2000, random.Random(0))
    assert times[0] == 0 and all(b > a for a, b in itertools.pairwise(times))
    assert 9.0 < len(times) / times[-1] < 11.0  # the rate asked for
    # the benchmark's percentiles are app.bench.stats's (tests/bench/test_stats.py pins the definition): the
    # p99 of two latencies is interpolated between them, no longer the slower one
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 99) == pytest.approx(1.99)
