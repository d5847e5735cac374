"""bf16_vqvae and the decoder forms it installs: images close to float32, bitwise batch invariance on the
CPU, float32 where bfloat16 is emulated, pre-packed convolutions that behave as the Conv2d they replace.

`VAR_CPU_ISA` forces the hardware table's answer (app/compress/hardware.py): `avx512_bf16` makes bfloat16
native on any CPU (emulated, slowly, where it is not), `avx2` makes it emulated."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from app.bench import decoder as bench
from app.compress.compiled import compiled_step
from app.compress.decoder import (
    BF16WeightConv2d,
    PrepackedConv2d,
    bf16_vqvae,
    is_prepacked,
    native_bf16_decoder,
    prepack_decoder,
    store_convs_in_bf16,
)
from app.model.memory import module_bytes
from app.model.pipeline import VARPipeline
from tests.compress.conftest import DECODED_LABELS as LABELS
from tests.compress.conftest import DECODED_SEEDS as SEEDS
from tests.conftest import DEMO

# bf16 against float32 on the demo model's generated images, pixels in [0, 1]: measured max 0.009, mean 0.0008
MAX_PIXEL_DIFF = 0.02
MEAN_PIXEL_DIFF = 0.002


def bf16_pipeline(demo: VARPipeline, monkeypatch: pytest.MonkeyPatch, isa: str) -> VARPipeline:
    monkeypatch.setenv("VAR_CPU_ISA", isa)
    return bf16_vqvae(copy.deepcopy(demo))


def conv_and_input(dtype: torch.dtype = torch.float32) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, 1, 1).to(dtype).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(1, 16, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return conv, x


# ---- PrepackedConv2d -------------------------------------------------------------------------------


@torch.inference_mode()
def test_prepacked_conv_equals_its_conv_bitwise_at_any_input_shape() -> None:
    conv, x = conv_and_input()
    packed = PrepackedConv2d(conv, x.shape)
    assert torch.equal(packed(x), conv(x))
    other = torch.randn(3, 16, 7, 9).contiguous(memory_format=torch.channels_last)  # packed for another shape
    assert torch.equal(packed(other), conv(other))


@torch.inference_mode()
def test_prepacked_conv_keeps_the_conv_state_dict_and_survives_copies() -> None:
    conv, x = conv_and_input()
    packed = PrepackedConv2d(conv, x.shape)
    sd, expected = packed.state_dict(), conv.state_dict()
    assert list(sd) == list(expected) and all(torch.equal(sd[k], expected[k]) for k in sd)
    assert module_bytes(packed) == module_bytes(conv)  # the packed weight is counted, and is the only copy
    assert torch.equal(copy.deepcopy(packed)(x), conv(x))
    other, _ = conv_and_input()
    nn.init.normal_(other.weight)
    packed.load_state_dict(other.state_dict())
    assert torch.equal(packed(x), other(x))
    with pytest.raises(RuntimeError, match="expected shape"):
        packed.load_state_dict({"weight": torch.zeros(24, 16, 1, 1), "bias": torch.zeros(24)})


# ---- bf16_vqvae ------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ["avx512_bf16", "avx2"])
def test_bf16_vqvae_stores_every_conv_weight_in_bf16_with_the_same_keys(
    demo: VARPipeline, monkeypatch: pytest.MonkeyPatch, isa: str
) -> None:
    """The quantizer's phi convolutions (a Conv2d subclass, on the sampling path) stay float32."""
    pipe = bf16_pipeline(demo, monkeypatch, isa)
    convs = [m for m in pipe.vqvae.modules() if type(m) in (BF16WeightConv2d, PrepackedConv2d)]
    assert len(convs) == sum(type(m) is nn.Conv2d for m in demo.vqvae.modules())  # the encoder's too
    assert all(m.weight.dtype == torch.bfloat16 for m in convs)
    sd, expected = pipe.vqvae.state_dict(), demo.vqvae.state_dict()
    assert list(sd) == list(expected)
    conv_weights = [k for k in sd if sd[k].dim() == 4 and not k.startswith("quantize.")]
    assert all(sd[k].dtype == torch.bfloat16 for k in conv_weights) and len(conv_weights) == len(convs)


def test_bf16_decoder_images_are_close_to_float32(
    demo: VARPipeline, f_hat: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = bf16_pipeline(demo, monkeypatch, "avx512_bf16")
    assert pipe.vqvae.decoder.dtype == torch.bfloat16
    with torch.inference_mode():
        ref, got = demo.decode(f_hat), pipe.decode(f_hat)
    diff = (got - ref).abs()
    assert got.dtype == torch.float32
    assert 0 < diff.max().item() < MAX_PIXEL_DIFF  # not zero: the decoder did run in bfloat16
    assert diff.mean().item() < MEAN_PIXEL_DIFF


def test_bf16_decoder_is_bitwise_batch_invariant_through_generate(
    demo: VARPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = bf16_pipeline(demo, monkeypatch, "avx512_bf16")
    batch = pipe.generate(LABELS, seeds=SEEDS).images
    for i, (label, seed) in enumerate(zip(LABELS, SEEDS, strict=True)):
        alone = pipe.generate([label], seeds=[seed]).images
        assert torch.equal(batch[i], alone[0]), f"image {i} depends on its batch"


def test_installed_decoder_computes_what_the_plain_bf16_decoder_computes(
    demo: VARPipeline, f_hat: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packing the weights (where oneDNN has bfloat16) changes the speed, never the numbers."""
    pipe = bf16_pipeline(demo, monkeypatch, "avx512_bf16")
    plain = copy.deepcopy(demo)
    store_convs_in_bf16(plain.vqvae)
    native_bf16_decoder(plain.vqvae)
    plain.decode_dtype = torch.bfloat16
    with torch.inference_mode():
        assert torch.equal(pipe.decode(f_hat), plain.decode(f_hat))
    assert set(pipe.vqvae.state_dict()) == set(demo.vqvae.state_dict())


def test_bf16_vqvae_decodes_in_float32_where_bf16_is_emulated(
    demo: VARPipeline, f_hat: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On AVX2 the weights are stored in bfloat16 and the decoder computes in float32 from them upcast."""
    pipe = bf16_pipeline(demo, monkeypatch, "avx2")
    assert pipe.decode_dtype is None and pipe.vqvae.decoder.dtype == torch.float32
    assert not is_prepacked(pipe.vqvae.decoder)
    rounded = copy.deepcopy(demo)  # float32 convolutions from the same bfloat16-rounded weights
    for conv in rounded.vqvae.modules():
        if isinstance(conv, nn.Conv2d):
            conv.weight.data = conv.weight.data.to(torch.bfloat16).float()
    with torch.inference_mode():
        assert torch.equal(pipe.decode(f_hat), rounded.decode(f_hat))


def test_compiled_step_leaves_a_prepacked_decoder_eager(demo: VARPipeline) -> None:
    pipe = copy.deepcopy(demo)
    prepack_decoder(pipe.vqvae)  # packed in float32 here: the packing, not the dtype, is what matters
    compiled = compiled_step(pipe)
    assert compiled.decoder_fn is compiled.vqvae.decoder
    assert compiled.step_fn != compiled.var.step


# ---- python -m app.bench decoder --------------------------------------------------------------------


def test_bench_reports_each_form_against_float32(tmp_path: Path) -> None:
    out = tmp_path / "decoder.json"
    args = ["--checkpoint", str(DEMO), "--forms", "float32,bf16", "--batch-sizes", "1,2", "--runs", "1"]
    assert bench.main([*args, "--json", str(out)]) == 0
    timings = {(t["form"], t["batch_size"]): t for t in json.loads(out.read_text())["timings"]}
    assert set(timings) == {
        ("float32/per-image", 1),
        ("bf16/per-image", 1),
        *((f"{p}/{b}", 2) for p in ("float32", "bf16") for b in ("per-image", "batched")),
    }
    assert timings["float32/per-image", 2]["max_pixel_diff"] == 0
    assert 0 < timings["bf16/per-image", 2]["max_pixel_diff"] < MAX_PIXEL_DIFF
    assert timings["float32/per-image", 2]["batch_invariant"] is None  # per image by construction
    assert isinstance(timings["float32/batched", 2]["batch_invariant"], bool)
    assert all(t["seconds"] > 0 and len(t["seconds_all"]) == 1 for t in timings.values())


def test_bench_refuses_a_compiled_packed_form() -> None:
    with pytest.raises(ValueError, match="opaque"):
        bench.parse_forms("bf16-packed/compiled")
