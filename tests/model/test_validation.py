"""Bad arguments get a ValueError naming the argument and the allowed range."""

from __future__ import annotations

import pytest

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams


@pytest.mark.parametrize(
    "labels, params, pattern",
    [
        ([1000], SamplingParams(), r"class label must be in \[0, 999\], got 1000"),
        ([-1], SamplingParams(), r"class label must be in \[0, 999\], got -1"),
        ([1], SamplingParams(top_k=-1), r"top_k must be in \[0, 4096\]"),
        ([1], SamplingParams(top_k=5000), r"top_k must be in \[0, 4096\]"),
        ([1], SamplingParams(top_p=1.5), r"top_p must be in \[0, 1\]"),
        ([1], SamplingParams(top_p=-0.1), r"top_p must be in \[0, 1\]"),
        ([1], SamplingParams(cfg=-0.5), r"cfg must be >= 0"),
        ([1], SamplingParams(cfg=float("nan")), r"cfg must be >= 0"),
        ([], SamplingParams(), r"batch size must be >= 1"),
    ],
)
def test_out_of_range_arguments_are_named(
    tiny_pipeline: VARPipeline, labels: list[int], params: SamplingParams, pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        tiny_pipeline.generate(labels, params, seeds=[0] * len(labels))


def test_seed_count_must_match_the_batch(tiny_pipeline: VARPipeline) -> None:
    with pytest.raises(ValueError, match=r"seeds must have one entry per label \(2\), got 1"):
        tiny_pipeline.generate([1, 2], SamplingParams(), seeds=[0])


def test_seeds_and_shared_seed_are_exclusive(tiny_pipeline: VARPipeline) -> None:
    with pytest.raises(ValueError, match="not both"):
        tiny_pipeline.generate([1], SamplingParams(), seeds=[0], shared_seed=0)
