"""The one percentile definition (linear interpolation between the closest ranks), pinned on hand-checked
inputs, and the load report's milliseconds with "none" for no values."""

from __future__ import annotations

import random
import statistics

import pytest

from app.bench.load.report import percentile_ms
from app.bench.stats import median, percentile


def test_percentiles_interpolate_between_the_closest_ranks() -> None:
    four = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(four, 0) == 1.0 and percentile(four, 100) == 4.0
    assert percentile(four, 50) == 2.5  # nearest rank would say 2.0 (or 3.0): a latency some request had
    assert percentile(four, 25) == pytest.approx(1.75)  # position 0.75: three quarters from 1 to 2
    assert percentile([10.0, 20.0], 99) == pytest.approx(19.9)  # not the slowest, as nearest rank would have it
    assert percentile(range(1, 11), 90) == pytest.approx(9.1)  # position 8.1 of 0..9
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 0) == percentile([7.0], 99) == 7.0


def test_integer_percentiles_land_exactly_on_ranks() -> None:
    """(n - 1) q / 100 in floats can fall a hair below an integer and take the lower neighbour's share."""
    values = [float(i) for i in range(101)]
    assert all(percentile(values, q) == q for q in range(101))
    assert percentile([0.0, 1.0, 2.0, 3.0, 100.0], 75) == 3.0


def test_the_definition_is_numpys_default_and_its_median_is_the_median() -> None:
    rng = random.Random(0)
    for n in (2, 3, 10, 57, 200):
        values = [rng.expovariate(1.0) for _ in range(n)]
        inclusive = statistics.quantiles(values, n=100, method="inclusive")
        for q in (1, 5, 50, 95, 99):
            assert percentile(values, q) == pytest.approx(inclusive[q - 1], rel=1e-12)
        assert median(values) == pytest.approx(statistics.median(values), rel=1e-15)
        assert median(iter(values)) == median(values)  # any iterable, read once


def test_no_values_or_a_percentile_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], -1)


def test_the_load_report_gives_milliseconds_and_none_for_no_values() -> None:
    assert percentile_ms([], 99) is None
    assert percentile_ms([0.25], 99) == 250.0
    assert percentile_ms([0.001, 0.002, 0.003, 0.004], 50) == pytest.approx(2.5)
