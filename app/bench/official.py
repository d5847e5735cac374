"""The official VAR code on our weights, for side-by-side benchmarks (`python -m app.bench --official-src`).

The official code is not part of this project: the user points at a local checkout of
FoundationVision/VAR. Both models get the very same tensors (the state-dict keys are identical).

The contenders share one build of it: `official` as it runs by default (float32 on CPU); `official-bf16`
under `torch.autocast(device, torch.bfloat16)`, the way its own demo runs on a GPU, measured only where
bfloat16 matmuls are native (the hardware table): elsewhere they are emulated, ~7x slower, and timing it
would only say so again; and on CPU `official-int8`, a copy with torch's dynamic int8 linears (fbgemm), what
one `quantize_dynamic` call gives a CPU user for free.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

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
    """The official contenders for this machine, by name: `official`; `official-bf16` where bfloat16 is
    native on the pipeline's device; `official-int8` on CPU. All from one build of the official models."""
    var = _official_var(src, base)
    runners = {"official": _runner(var, base.device, params, None)}
    if bf16_native(base.device):
        runners["official-bf16"] = _runner(var, base.device, params, torch.bfloat16)
    if base.device.type == "cpu":
        runners["official-int8"] = _runner(dynamic_int8(var), base.device, params, None)
    return runners


def dynamic_int8(var: nn.Module) -> nn.Module:
    """A copy of the official transformer whose linears are torch's dynamic int8 ones (fbgemm, per-tensor
    activation scales). `mat_qkv` stays float32: the official attention reads its weight directly (`F.linear`
    with its separate q and v biases), which a quantized module has no tensor for."""
    names = {name for name, m in var.named_modules() if isinstance(m, nn.Linear) and not name.endswith("mat_qkv")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.ao\.quantization.*")
        return torch.ao.quantization.quantize_dynamic(var, names, dtype=torch.qint8)


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
