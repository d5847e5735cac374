"""An image depends only on its own request (seed, class, sampling parameters), not on its batch.

On CPU the guarantee is bitwise: tokens, latent and pixels of a row equal those of the request alone
(see app/model/row_stable.py for the kernels that needed care)."""

from __future__ import annotations

import torch

from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams

ROWS = [
    (207, 11, SamplingParams(cfg=1.5, top_k=900, top_p=0.96)),
    (980, 12, SamplingParams(cfg=4.0, top_k=50, top_p=0.0)),
    (1, 13, SamplingParams(cfg=0.0, top_k=0, top_p=0.9)),
    (207, 14, SamplingParams(cfg=2.5, top_k=1, top_p=0.5)),
    (500, 15, SamplingParams(cfg=1.0, top_k=4096, top_p=1.0)),
    (33, 16, SamplingParams(cfg=1.5, top_k=600, top_p=0.8, more_smooth=True)),
]


def test_each_image_equals_its_request_alone(tiny_pipeline: VARPipeline) -> None:
    labels, seeds, params = zip(*ROWS, strict=True)
    batch = tiny_pipeline.generate(labels, params, seeds=seeds)
    for i, (label, seed, p) in enumerate(ROWS):
        alone = tiny_pipeline.generate([label], p, seeds=[seed])
        for si, (t_batch, t_alone) in enumerate(zip(batch.tokens, alone.tokens, strict=True)):
            assert torch.equal(t_batch[i], t_alone[0]), f"row {i} differs from its request alone at scale {si}"
        assert torch.equal(batch.f_hat[i], alone.f_hat[0]), f"row {i}: latent differs"
        assert torch.equal(batch.images[i], alone.images[0]), f"row {i}: image differs"


def test_same_seed_same_image_different_seed_different_tokens(tiny_pipeline: VARPipeline) -> None:
    p = SamplingParams()
    a = tiny_pipeline.generate([207, 207], p, seeds=[5, 5])
    b = tiny_pipeline.generate([207, 207], p, seeds=[5, 6])
    assert torch.equal(a.tokens[-1][0], a.tokens[-1][1])
    assert torch.equal(a.tokens[-1][0], b.tokens[-1][0])
    assert not torch.equal(b.tokens[-1][0], b.tokens[-1][1])


def test_shared_generator_mode_depends_on_batch(tiny_pipeline: VARPipeline) -> None:
    """The official one-generator-per-batch mode: row 1 of a batch is not the same as that request alone."""
    p = SamplingParams()
    batch = tiny_pipeline.generate([207, 980], p, shared_seed=42)
    alone = tiny_pipeline.generate([980], p, shared_seed=42)
    assert batch.seeds is None
    assert not torch.equal(batch.tokens[-1][1], alone.tokens[-1][0])


def test_seeds_are_drawn_and_returned_when_omitted(tiny_pipeline: VARPipeline) -> None:
    gen = tiny_pipeline.generate([3, 4], SamplingParams())
    assert gen.seeds is not None and len(gen.seeds) == 2
    again = tiny_pipeline.generate([3, 4], SamplingParams(), seeds=gen.seeds)
    assert all(torch.equal(x, y) for x, y in zip(gen.tokens, again.tokens, strict=True))
