"""The KV-cached next-scale loop equals the teacher-forced forward under the block-causal mask,
for configurations other than the shipped fixtures (depth, shared AdaLN, patch schedule, widths)."""

from __future__ import annotations

import pytest
import torch

from app.model.checkpoint import random_pipeline
from app.model.config import PipelineConfig, VARConfig, VQVAEConfig
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams
from tests.spread_weights import spread_weights


def _pipeline(shared_aln: bool, depth: int, patch_nums: tuple[int, ...], attn_l2_norm: bool = True) -> VARPipeline:
    cfg = PipelineConfig(
        "test",
        VARConfig(
            depth=depth,
            embed_dim=96,
            num_heads=3,
            num_classes=10,
            vocab_size=64,
            z_channels=8,
            shared_aln=shared_aln,
            patch_nums=patch_nums,
        ),
        VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=patch_nums),
    )
    pipe = random_pipeline(cfg, seed=3)
    return spread_weights(pipe, seed=4)


@pytest.mark.parametrize(
    "shared_aln, depth, patch_nums, attn_l2_norm",
    [(True, 3, (1, 2, 3, 4, 6), True), (False, 1, (1, 2, 4), True), (False, 4, (1, 3, 5, 8), False)],
)
def test_cached_guided_logits_equal_masked_forward(
    shared_aln: bool, depth: int, patch_nums: tuple[int, ...], attn_l2_norm: bool
) -> None:
    pipe = _pipeline(shared_aln, depth, patch_nums, attn_l2_norm)
    cfg, labels = 2.0, [3, 7]
    cached: dict[int, torch.Tensor] = {}
    gen = pipe.generate(
        labels,
        SamplingParams(cfg=cfg, top_k=1, top_p=0.0),
        seeds=[0, 1],
        on_guided_logits=lambda si, x: cached.__setitem__(si, x),
    )
    with torch.inference_mode():
        x_in = pipe.vqvae.quantize.idxBl_to_var_input(gen.tokens)
        cond = pipe.var(torch.tensor(labels), x_in)
        uncond = pipe.var(torch.full((2,), pipe.num_classes), x_in)
    assert len(cached) == len(patch_nums)
    for step in pipe.steps:
        t = cfg * step.si / (len(patch_nums) - 1)
        want = (1 + t) * cond[:, step.begin : step.end] - t * uncond[:, step.begin : step.end]
        torch.testing.assert_close(cached[step.si], want, atol=1e-4 * float(want.abs().max()), rtol=0)
        assert torch.equal(cached[step.si].argmax(-1), gen.tokens[step.si])


def test_cache_never_stores_the_last_scale() -> None:
    pipe = _pipeline(False, 2, (1, 2, 3, 4, 6))
    cache = pipe.var.new_cache(rows=4, device=torch.device("cpu"), dtype=torch.float32)
    prefix = 1 + 4 + 9 + 16
    assert all(layer.k.shape == (4, 3, prefix, 32) and layer.v.shape == (4, 3, prefix, 32) for layer in cache.layers)
