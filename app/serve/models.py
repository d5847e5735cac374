"""Load a checkpoint folder once and build every configured variant from it, sharing what is unchanged.

Each variant gets its own copy of the transformer (passes rewrite it); the VQVAE is shared by every
variant whose passes left its modules and tensors unchanged. Memory is accounted per variant.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.compress import VARIANTS, apply_variant
from app.model.checkpoint import load_folder
from app.model.config import PipelineConfig
from app.model.memory import module_bytes
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams


@dataclass
class ServedVariant:
    name: str
    pipeline: VARPipeline
    passes: list[dict[str, Any]]
    weight_bytes: int  # held for this variant alone
    shares_vqvae: bool


@dataclass
class ServedModel:
    folder: Path
    config: PipelineConfig
    device: torch.device
    variants: dict[str, ServedVariant] = field(default_factory=dict)
    shared_bytes: int = 0  # weights used by several variants

    @property
    def defaults(self) -> SamplingParams:
        """What a request that names no sampling setting gets: the model's own settings."""
        return self.config.default_sampling

    @property
    def image_size(self) -> int:
        return self.config.vqvae.image_size


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(folder: Path, variant_names: Sequence[str], device: torch.device) -> ServedModel:
    base = load_folder(folder).to(device)
    model = ServedModel(folder, base.config, device)
    if len(variant_names) == 1:  # nothing to share: transform the loaded pipeline itself
        name = variant_names[0]
        pipe = apply_variant(name, base)
        model.variants[name] = ServedVariant(
            name, pipe, describe_passes(name), module_bytes(pipe.var, pipe.vqvae), False
        )
        return model
    shared = False
    for name in variant_names:
        pipe = apply_variant(name, copy.deepcopy(base))
        shares = interchangeable(pipe.vqvae, base.vqvae)
        if shares:
            pipe.vqvae = base.vqvae  # the copy is dropped
            shared = True
        own = module_bytes(pipe.var) if shares else module_bytes(pipe.var, pipe.vqvae)
        model.variants[name] = ServedVariant(name, pipe, describe_passes(name), own, shares)
    model.shared_bytes = module_bytes(base.vqvae) if shared else 0
    return model


def describe_passes(variant: str) -> list[dict[str, Any]]:
    """Each pass's name, options (keyword arguments bound with functools.partial) and summary."""
    out = []
    for p in VARIANTS[variant]:
        fn, options = (p.func, dict(p.keywords)) if isinstance(p, functools.partial) else (p, {})
        doc = (fn.__doc__ or "").strip().splitlines()
        summary = doc[0] if doc else ""
        options = {k: v if isinstance(v, int | float | str | bool | None) else repr(v) for k, v in options.items()}
        out.append({"name": getattr(fn, "__name__", repr(fn)), "options": options, "summary": summary})
    return out


def interchangeable(a: nn.Module, b: nn.Module) -> bool:
    """Whether one module can stand in for the other: same module types, bitwise-equal tensors of the same
    dtypes, and no `forward` replaced on an instance (a compiled one, which sharing would drop)."""
    if [type(m) for m in a.modules()] != [type(m) for m in b.modules()]:
        return False
    if any("forward" in vars(m) for m in (*a.modules(), *b.modules())):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
