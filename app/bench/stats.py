"""The one percentile definition of every benchmark: linear interpolation between the closest ranks.

For n sorted values v[0] <= ... <= v[n-1], the q-th percentile sits at position p = (n - 1) q / 100 and is
v[j] + (v[j+1] - v[j]) (p - j) with j = floor(p): Hyndman and Fan's type 7, numpy.percentile's and pandas'
default, and `statistics.quantiles(method="inclusive")`. Why this one and not nearest rank:
- its 50th percentile is the median (the mean of the two middle values for even n), so the medians that
  most benchmarks print and the p50/p95/p99 of the load and policy benchmarks are one statistic;
- anyone recomputing a figure from raw samples with numpy gets the same number;
- it moves continuously with each sample, so a ratio of two p99s over a few hundred requests (the policies
  benchmark's "p99 vs whole") does not jump by a whole gap between neighbours when one request moves.
The price: with fewer than 100 values a p99 lies between the two slowest requests rather than being a
latency some request had; with so few, no definition estimates a p99 well, so the reports say n.
"""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of `values`, interpolated as the module says. ValueError when
    `values` is empty: a percentile of nothing is no number (callers that report "none" check first)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    # divmod keeps the position exact for integer q: (n - 1) q / 100 in float could land a hair below j
    j, rest = divmod((len(ordered) - 1) * q, 100)
    j = int(j)
    if rest == 0:
        return float(ordered[j])
    return ordered[j] + (ordered[j + 1] - ordered[j]) * rest / 100


def median(values: Iterable[float]) -> float:
    """The 50th percentile: the middle value, or the mean of the two middle ones (as `statistics.median`)."""
    return percentile(values, 50)
