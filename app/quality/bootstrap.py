"""Bootstrap intervals over the generated images: how much a figure moves when the same number of images is
drawn again (with replacement) from those generated.

The interval is the percentile interval of the resampled figures, moved by their bias (their mean less the
figure on all images). FID needs the move: a resample repeats some images and misses others, which adds
spread to its covariance and raises its FID by more than the interval is wide at a few thousand images in
128 dimensions, so the plain percentile interval would not even contain the figure. For a mean such as
class accuracy the bias is zero up to Monte-Carlo noise and the move is negligible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def resample_indices(n: int, resamples: int, seed: int = 0) -> torch.Tensor:
    """(resamples, n) indices into n items, drawn with replacement."""
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def bias_moved_interval(values: torch.Tensor, point: float, level: float = 0.95) -> tuple[float, float]:
    """The `level` percentile interval of the resampled `values`, less their bias (mean - `point`)."""
    values = values.double()
    bias = float(values.mean()) - point
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low - bias, high - bias


def bootstrap_interval(
    statistic: Callable[[torch.Tensor], float], indices: torch.Tensor, point: float, level: float = 0.95
) -> tuple[float, float]:
    """The interval of `statistic(rows)` over the resamples' index rows (resample_indices)."""
    values = torch.tensor([statistic(rows) for rows in indices], dtype=torch.float64)
    return bias_moved_interval(values, point, level)
