"""`app.bench.official` drives a checkout of the official code through its public builder. The official code is
not in this project, so a stand-in package with the official builder's signature plays it here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from app.bench.official import dynamic_int8, official_runner, official_runners
from app.model.checkpoint import load_folder
from app.model.sampling import SamplingParams
from tests.conftest import TINY

STAND_IN = """
import torch
from app.model.checkpoint import build_models
from app.model.config import config_from_official
from app.model.pipeline import VARPipeline

CALLS = []
BUILDS = []

def build_vae_var(device, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, ch=160, share_quant_resi=4,
                  num_classes=1000, depth=16, shared_aln=False, attn_l2_norm=True, flash_if_available=True,
                  fused_if_available=True, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1):
    kw = dict(V=V, Cvae=Cvae, ch=ch, share_quant_resi=share_quant_resi, patch_nums=list(patch_nums),
              num_classes=num_classes, depth=depth, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm)
    cfg = config_from_official({"build_vae_var_kwargs": kw})
    BUILDS.append(cfg)
    var, vae = build_models(cfg)
    pipe = VARPipeline(cfg, var, vae)

    def autoregressive_infer_cfg(B, label_B, g_seed, cfg, top_k, top_p, more_smooth):
        images = pipe.generate(label_B, pipe_params(cfg, top_k, top_p, more_smooth), shared_seed=g_seed).images
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        CALLS.append((B, label_B.tolist(), g_seed, images, autocast))
        return images

    var.autoregressive_infer_cfg = autoregressive_infer_cfg
    return vae, var

def pipe_params(cfg, top_k, top_p, more_smooth):
    from app.model.sampling import SamplingParams
    return SamplingParams(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
"""


def test_official_runner_builds_from_the_config_and_runs_on_our_weights(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(STAND_IN)
    base = load_folder(TINY)
    try:
        run = official_runner(tmp_path, base, SamplingParams(cfg=1.5, top_k=900, top_p=0.96))
        assert run([207, 980], 42) == {}
        calls = sys.modules["models"].CALLS
    finally:
        sys.modules.pop("models", None)
        sys.path.remove(str(tmp_path))
    assert [c[:3] for c in calls] == [(2, [207, 980], 42)]
    # the stand-in was built with random weights: equal images prove the runner loaded ours into it
    ours = base.generate([207, 980], SamplingParams(cfg=1.5, top_k=900, top_p=0.96), shared_seed=42)
    assert torch.equal(calls[0][3], ours.images)


def test_official_bf16_runs_under_bfloat16_autocast_where_native(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contenders run one build of the official models; `official-bf16` under CPU bfloat16 autocast, and
    only where bfloat16 matmuls are native (forced here both ways)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(STAND_IN)
    base = load_folder(TINY)
    params = SamplingParams(cfg=1.5, top_k=900, top_p=0.96)
    try:
        monkeypatch.setenv("VAR_CPU_ISA", "avx512_bf16")
        runners = official_runners(tmp_path, base, params)
        assert list(runners) == ["official", "official-bf16", "official-int8"]
        for runner in runners.values():
            runner([207], 42)
        monkeypatch.setenv("VAR_CPU_ISA", "avx2")
        assert list(official_runners(tmp_path, base, params)) == ["official", "official-int8"]
        stand_in = sys.modules["models"]
    finally:
        sys.modules.pop("models", None)
        while str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
    assert len(stand_in.BUILDS) == 2  # one per call of official_runners, shared by its contenders
    assert [c[4] for c in stand_in.CALLS] == [None, torch.bfloat16, None]
    assert not torch.is_autocast_enabled("cpu")  # left as it was


def test_official_int8_is_a_copy_with_dynamic_int8_linears_but_the_qkv_projection() -> None:
    """The official attention reads `mat_qkv.weight` itself: that layer must stay a float Linear."""
    nn = torch.nn
    block = nn.ModuleDict({"attn": nn.ModuleDict({"mat_qkv": nn.Linear(8, 24), "proj": nn.Linear(8, 8)})})
    var = nn.ModuleDict({"blocks": nn.ModuleList([block]), "head": nn.Linear(8, 16)})
    quantized = dynamic_int8(var)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert type(quantized.get_submodule("blocks.0.attn.mat_qkv")) is nn.Linear
    assert type(quantized.get_submodule("blocks.0.attn.proj")) is dynamic
    assert type(quantized.get_submodule("head")) is dynamic
    assert all(type(m) is nn.Linear for m in (var.get_submodule("head"), var.get_submodule("blocks.0.attn.proj")))
