"""The official VAR code on our weights, for side-by-side benchmarks (`python -m app.bench --official-src`).

The official code is not part of this project: the user points at a local checkout of
FoundationVision/VAR. Both models get the very same tensors (the state-dict keys are identical).

Two contenders share one build of it: `official` as it runs by default (float32 on CPU), and `official-bf16`
under `torch.autocast(device, torch.bfloat16)`, the way its own demo runs on a GPU, measured only where
bfloat16 matmuls are native (the hardware table): elsewhere they are emulated, ~7x slower, and timing it
would only say so again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from app.bench.runner import Runner
from app.compress.hardware import bf16_native
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams


def _import_official_builder(src: Path) -> Callable[..., tuple[torch.nn.Module, torch.nn.Module]]:
    sys.path.insert(0, str(src))
    # find_spec refuses a module already stubbed in sys.modules (no __spec__): a second build in one process
    if "huggingface_hub" not in sys.modules and importlib.util.find_spec("huggingface_hub") is None:
        # only used there for a hub-download mixin class; generation does not touch it
        stub = types.ModuleType("huggingface_hub")
        stub.__dict__["PyTorchModelHubMixin"] = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    from models import build_vae_var

    return build_vae_var


def official_runners(src: Path, base: VARPipeline, params: SamplingParams) -> dict[str, Runner]:
    """The official contenders for this machine, by name: `official`, and `official-bf16` where bfloat16 is
    native on the pipeline's device; both run one build of the official models."""
    var = _official_var(src, base)
    runners = {"official": _runner(var, base.device, params, None)}
    if bf16_native(base.device):
        runners["official-bf16"] = _runner(var, base.device, params, torch.bfloat16)
    return runners


def official_runner(src: Path, base: VARPipeline, params: SamplingParams, dtype: torch.dtype | None = None) -> Runner:
    """The official code on `base`'s weights, under `dtype` autocast when given (float32 otherwise)."""
    return _runner(_official_var(src, base), base.device, params, dtype)


def _official_var(src: Path, base: VARPipeline) -> torch.nn.Module:
    build_vae_var = _import_official_builder(src)
    c = base.config
    with contextlib.redirect_stdout(sys.stderr):  # its constructors print
        vae, var = build_vae_var(
            device=base.device,
            patch_nums=c.var.patch_nums,
            V=c.vqvae.vocab_size,
            Cvae=c.vqvae.z_channels,
            ch=c.vqvae.ch,
            share_quant_resi=c.vqvae.share_quant_resi,
            num_classes=c.var.num_classes,
            depth=c.var.depth,
            shared_aln=c.var.shared_aln,
            attn_l2_norm=c.var.attn_l2_norm,
        )
    vae.load_state_dict(base.vqvae.state_dict(), strict=True)
    var.load_state_dict(base.var.state_dict(), strict=True)
    vae.eval()
    var.eval()
    return var


def _runner(var: torch.nn.Module, device: torch.device, params: SamplingParams, dtype: torch.dtype | None) -> Runner:
    def run(labels: list[int], seed: int) -> dict[str, float]:
        precision = torch.autocast(device.type, dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), precision:
            var.autoregressive_infer_cfg(  # type: ignore[operator]
                B=len(labels),
                label_B=torch.tensor(labels, device=device),
                g_seed=seed,
                cfg=params.cfg,
                top_k=params.top_k,
                top_p=params.top_p,
                more_smooth=params.more_smooth,
            )
        return {}

    return run
