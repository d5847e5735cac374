"""Configurations produce exactly the official state-dict layouts and sizes."""

from __future__ import annotations

import pytest

from app.model.checkpoint import build_models
from app.model.config import PRESETS, VQVAEConfig
from app.model.vqvae import VQVAE


@pytest.mark.parametrize("name, params", [("d16", 310_283_520), ("d20", 600_917_136), ("d24", 1_033_399_360)])
def test_released_presets_have_the_official_parameter_counts(name: str, params: int) -> None:
    var, vqvae = build_models(PRESETS[name], "meta")
    assert sum(p.numel() for p in var.parameters()) == params
    assert len(var.state_dict()) == 12 + 13 * PRESETS[name].var.depth
    assert sum(p.numel() for p in vqvae.parameters()) == 108_948_355
    assert len(vqvae.state_dict()) == 324


def test_d36_uses_shared_adaln_and_the_512px_schedule() -> None:
    var, _ = build_models(PRESETS["d36"], "meta")
    keys = var.state_dict().keys()
    assert len(keys) == 14 + 12 * 36
    assert "shared_ada_lin.1.weight" in keys and "blocks.0.ada_gss" in keys and "blocks.0.ada_lin.1.weight" not in keys
    assert var.state_dict()["pos_1LC"].shape == (1, 2240, 2304)
    assert PRESETS["d36"].vqvae.image_size == 512


@pytest.mark.parametrize(
    "share, keys",
    [
        (0, [f"quantize.quant_resi.{k}.weight" for k in range(10)]),
        (1, ["quantize.quant_resi.qresi.weight"]),
        (4, [f"quantize.quant_resi.qresi_ls.{k}.weight" for k in range(4)]),
    ],
)
def test_phi_sharing_modes_use_the_official_key_names(share: int, keys: list[str]) -> None:
    sd = VQVAE(VQVAEConfig(ch=32, share_quant_resi=share)).state_dict()
    assert sorted(k for k in sd if k.startswith("quantize.quant_resi") and k.endswith("weight")) == sorted(keys)


def test_attn_l2_norm_off_has_no_scale_parameters() -> None:
    from dataclasses import replace

    cfg = replace(PRESETS["tiny"], var=replace(PRESETS["tiny"].var, attn_l2_norm=False))
    var, _ = build_models(cfg, "meta")
    assert not any("scale_mul_1H11" in k for k in var.state_dict())
    assert var.block_list[0].attn.scale == pytest.approx(0.25 / 8)
