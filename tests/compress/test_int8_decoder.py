"""int8_vqvae: static int8 convolutions in the decoder where the hardware table says int8 is native, images
close to float32, bitwise batch invariance, and `bf16_vqvae`'s decoder unchanged elsewhere.

`VAR_CPU_ISA` forces the table's answer (app/compress/hardware.py): `avx512_bf16` converts on any CPU (oneDNN's
int8 kernel runs everywhere, slowly without VNNI), `avx512` and `avx2` do not. Decoding compiles the small
quantization kernels (seconds, once per process): the module is marked `compile`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from app.compress.compiled import compiled_step
from app.compress.decoder import bf16_vqvae
from app.compress.hardware import INT8_CONV, LEVELS
from app.compress.int8_decoder import (
    MIN_MACS,
    Int8Conv2d,
    Int8ResnetBlock,
    Int8Upsample2x,
    input_qparams,
    int8_targets,
    int8_vqvae,
)
from app.model.config import PRESETS
from app.model.pipeline import VARPipeline
from app.model.vqvae import VQVAE
from tests.compress.conftest import DECODED_LABELS as LABELS
from tests.compress.conftest import DECODED_SEEDS as SEEDS

pytestmark = pytest.mark.compile

# int8 against float32 on the demo model's generated images, pixels in [0, 1]: measured max 0.020, mean 0.0021
# (bf16_vqvae alone: 0.006, 0.0007)
MAX_PIXEL_DIFF = 0.04
MEAN_PIXEL_DIFF = 0.004


@pytest.fixture(scope="module")
def int8(demo: VARPipeline) -> VARPipeline:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAR_CPU_ISA", "avx512_bf16")
        return int8_vqvae(copy.deepcopy(demo), calibration_images=2, min_macs=0)  # the demo's convs are small


def test_every_residual_and_upsampling_conv_runs_on_onednns_int8_kernel(
    demo: VARPipeline, int8: VARPipeline, f_hat: torch.Tensor
) -> None:
    targets = int8_targets(demo.vqvae)
    convs = {n for n, m in int8.vqvae.decoder.named_modules() if isinstance(m, Int8Conv2d)}
    assert convs == {n.removeprefix("decoder.") for n in targets} and len(convs) > 10
    assert all(type(m) is not nn.Conv2d or "attn" in n for n, m in int8.vqvae.decoder.named_modules() if n)
    assert any(isinstance(m, Int8ResnetBlock) for m in int8.vqvae.decoder.modules())
    assert any(isinstance(m, Int8Upsample2x) for m in int8.vqvae.decoder.modules())
    with torch.inference_mode(), torch.profiler.profile() as prof:
        int8.decode(f_hat[:1])
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("onednn::qconv2d_pointwise", 0) == len(convs)  # one call per int8 convolution


def test_int8_decoder_images_are_close_to_float32(demo: VARPipeline, int8: VARPipeline, f_hat: torch.Tensor) -> None:
    with torch.inference_mode():
        ref, got = demo.decode(f_hat), int8.decode(f_hat)
    diff = (got - ref).abs()
    assert got.dtype == torch.float32
    assert 0 < diff.max().item() < MAX_PIXEL_DIFF
    assert diff.mean().item() < MEAN_PIXEL_DIFF


def test_int8_decoder_is_bitwise_batch_invariant_through_generate(int8: VARPipeline) -> None:
    batch = int8.generate(LABELS, seeds=SEEDS).images
    for i, (label, seed) in enumerate(zip(LABELS, SEEDS, strict=True)):
        alone = int8.generate([label], seeds=[seed]).images
        assert torch.equal(batch[i], alone[0]), f"image {i} depends on its batch"


def test_calibration_is_deterministic_and_copies_decode_the_same(
    demo: VARPipeline, int8: VARPipeline, f_hat: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", "avx512_bf16")
    again = int8_vqvae(copy.deepcopy(demo), calibration_images=2, min_macs=0)
    with torch.inference_mode():
        expected = int8.decode(f_hat)
        assert torch.equal(again.decode(f_hat), expected)
        assert torch.equal(copy.deepcopy(int8).decode(f_hat), expected)  # the packed weights are repacked


def test_state_dict_keeps_the_keys_and_adds_the_quantization_parameters(demo: VARPipeline, int8: VARPipeline) -> None:
    sd, expected = int8.vqvae.state_dict(), demo.vqvae.state_dict()
    convs = [n for n, m in int8.vqvae.named_modules() if isinstance(m, Int8Conv2d)]
    added = {f"{n}.{k}" for n in convs for k in ("weight_scale", "input_scale", "input_zero_point")}
    assert set(sd) == set(expected) | added
    assert all(sd[f"{n}.weight"].dtype == torch.int8 for n in convs)
    assert all(sd[f"{n}.weight"].shape == expected[f"{n}.weight"].shape for n in convs)


@pytest.mark.parametrize("isa", [level for level in LEVELS if not INT8_CONV[level]])
def test_without_native_int8_the_decoder_is_bf16_vqvaes(
    demo: VARPipeline, f_hat: torch.Tensor, monkeypatch: pytest.MonkeyPatch, isa: str
) -> None:
    monkeypatch.setenv("VAR_CPU_ISA", isa)
    pipe, reference = int8_vqvae(copy.deepcopy(demo), min_macs=0), bf16_vqvae(copy.deepcopy(demo))
    assert not any(isinstance(m, (Int8Conv2d, Int8ResnetBlock)) for m in pipe.vqvae.modules())
    assert pipe.decode_dtype == reference.decode_dtype
    with torch.inference_mode():
        assert torch.equal(pipe.decode(f_hat), reference.decode(f_hat))


def test_by_default_only_convolutions_large_enough_for_int8_to_pay_are_converted(
    demo: VARPipeline, f_hat: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All of d16's residual and upsampling convolutions, none of the demo model's (its decoder then is
    `bf16_vqvae`'s, bitwise)."""
    with torch.device("meta"):
        d16 = VQVAE(PRESETS["d16"].vqvae)
    assert int8_targets(d16, MIN_MACS) == int8_targets(d16) and len(int8_targets(d16)) == 40
    monkeypatch.setenv("VAR_CPU_ISA", "avx512_bf16")
    pipe, reference = int8_vqvae(copy.deepcopy(demo)), bf16_vqvae(copy.deepcopy(demo))
    assert not int8_targets(demo.vqvae, MIN_MACS) and not any(isinstance(m, Int8Conv2d) for m in pipe.vqvae.modules())
    with torch.inference_mode():
        assert torch.equal(pipe.decode(f_hat), reference.decode(f_hat))


def test_input_quantization_covers_the_range_and_keeps_zero_exact() -> None:
    for lo, hi in [(-0.28, 6.0), (0.5, 3.0), (-2.0, -1.0), (0.0, 0.0)]:
        scale, zero_point = input_qparams(lo, hi)
        assert 0 <= zero_point <= 255 and scale > 0
        assert (0 - zero_point) * scale <= min(lo, 0.0) + scale / 2  # the range's ends within half a step
        assert (255 - zero_point) * scale >= max(hi, 0.0) - scale / 2


def test_compiled_step_leaves_an_int8_decoder_eager(int8: VARPipeline) -> None:
    compiled = compiled_step(copy.deepcopy(int8))
    assert compiled.decoder_fn is compiled.vqvae.decoder
