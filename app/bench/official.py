"""The official VAR code on our weights, for side-by-side benchmarks (`python -m app.bench --official-src`).

The official code is not part of this project: the user points at a local checkout of
FoundationVision/VAR. Both models get the very same tensors (the state-dict keys are identical).
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
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams


def _import_official_builder(src: Path) -> Callable[..., tuple[torch.nn.Module, torch.nn.Module]]:
    sys.path.insert(0, str(src))
    if importlib.util.find_spec("huggingface_hub") is None:
        # only used there for a hub-download mixin class; generation does not touch it
        stub = types.ModuleType("huggingface_hub")
        stub.__dict__["PyTorchModelHubMixin"] = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    from models import build_vae_var

    return build_vae_var


def official_runner(src: Path, base: VARPipeline, params: SamplingParams) -> Runner:
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

    def run(labels: list[int], seed: int) -> dict[str, float]:
        with torch.inference_mode():
            var.autoregressive_infer_cfg(  # type: ignore[operator]
                B=len(labels),
                label_B=torch.tensor(labels, device=base.device),
                g_seed=seed,
                cfg=params.cfg,
                top_k=params.top_k,
                top_p=params.top_p,
                more_smooth=params.more_smooth,
            )
        return {}

    return run
