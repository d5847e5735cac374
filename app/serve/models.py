"""Load a checkpoint folder once and build each configured variant from it, sharing what is unchanged.

Each variant gets its own copy of the transformer (passes rewrite it); the VQVAE is shared by every
variant whose passes left its modules, its tensors and the pipeline's decoder hook unchanged. Memory is
accounted per variant. Variants with windowed attention share one window plan, and variants sharing
attention across CFG one sharing plan: the checkpoint's, or one calibrated on the unmodified model
(`plans_for`, app/compress/plans.py). The service builds the variants one at a time as their plans are
there (app/serve/startup.py); `load_model` builds them all at once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from app.compress import apply_variant, variant_spec
from app.compress.plans import PlanOrigin, Plans, plans_for
from app.compress.registry import PlanKind, VariantSpec
from app.model.checkpoint import load_folder
from app.model.config import PipelineConfig
from app.model.memory import module_bytes
from app.model.pipeline import VARPipeline
from app.model.sampling import SamplingParams


@dataclass
class ServedVariant:
    name: str
    spec: VariantSpec
    pipeline: VARPipeline
    weight_bytes: int  # held for this variant alone
    shares_vqvae: bool
    window_plan: PlanOrigin | None  # where its window plan came from; None without windowed attention
    sharing_plan: PlanOrigin | None  # where its sharing plan came from; None without sharing across CFG


@dataclass
class ServedModel:
    folder: Path
    config: PipelineConfig
    device: torch.device
    # the checkpoint as loaded, while variants are being built: each from a copy of it, and calibration runs
    # on it; then released (`release_base`), so that its transformer does not stay in memory beside theirs
    base: VARPipeline | None = None
    variants: dict[str, ServedVariant] = field(default_factory=dict)  # those built so far
    shared_bytes: int = 0  # weights used by several variants

    def add(self, variant: ServedVariant) -> None:
        """A variant built from `base`; once one uses the base's VQVAE, its weights count as shared."""
        self.variants[variant.name] = variant
        if variant.shares_vqvae:
            self.shared_bytes = module_bytes(variant.pipeline.vqvae)

    def release_base(self) -> None:
        """No variant is built any more: drop the base pipeline (the VQVAE stays with the variants sharing it)."""
        self.base = None

    @property
    def defaults(self) -> SamplingParams:
        """What a request that names no sampling setting gets: the model's own settings."""
        return self.config.default_sampling

    @property
    def name(self) -> str:
        """What GET /models and var_model_info call the model: its folder's name (never the path, which says
        how the host is laid out), or the config's name for a folder without one (`/`)."""
        return self.folder.resolve().name or self.config.name

    @property
    def image_size(self) -> int:
        return self.config.vqvae.image_size

    def resident_bytes(self, name: str) -> int:
        """The weights variant `name` computes with: its own plus the shared VQVAE when it uses it."""
        v = self.variants[name]
        return v.weight_bytes + (self.shared_bytes if v.shares_vqvae else 0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_checkpoint(folder: Path, device: torch.device) -> ServedModel:
    """The checkpoint of `folder` on `device`, no variant built yet."""
    base = load_folder(folder).to(device)
    return ServedModel(folder, base.config, device, base)


def build_variant(model: ServedModel, name: str, plans: Plans, *, alone: bool = False) -> ServedVariant:
    """Variant `name` built from a copy of the model's base pipeline, with the VQVAE of the base when the
    variant leaves it unchanged; `alone` (the only variant served): from the base pipeline itself, which then
    is the variant (no copy, nothing to share; nothing may be built or calibrated from the base after it).
    `plans` must hold those it takes. The model is left as it is: `model.add` serves the result."""
    base = model.base
    assert base is not None, "variants are built before the base is released"
    if alone:
        pipe = apply_variant(name, base, plans=plans)
        return _served(name, pipe, plans, module_bytes(pipe.var, pipe.vqvae), False)
    pipe = apply_variant(name, copy.deepcopy(base), plans=plans)
    shares = vqvae_shareable(pipe, base)
    if shares:
        pipe.vqvae, pipe.decoder_fn = base.vqvae, base.decoder_fn  # the copy is dropped
    own = module_bytes(pipe.var) if shares else module_bytes(pipe.var, pipe.vqvae)
    return _served(name, pipe, plans, own, shares)


def load_model(
    folder: Path, variant_names: Sequence[str], device: torch.device, *, calibrate_missing_plans: bool = False
) -> ServedModel:
    """Every variant of `variant_names` from one load of `folder`, at once. Windowed variants need the
    folder's window plan, variants sharing attention across CFG its sharing plan; without one, loading refuses
    (MissingWindowPlan, MissingSharingPlan: each names the command that saves one) unless
    `calibrate_missing_plans`, which calibrates one plan for them all on the unmodified model."""
    model = load_checkpoint(folder, device)
    assert model.base is not None
    specs = [variant_spec(name) for name in variant_names]
    plans = plans_for(model.base, folder, specs, calibrate_missing=calibrate_missing_plans)
    for name in variant_names:
        model.add(build_variant(model, name, plans, alone=len(variant_names) == 1))
    model.release_base()
    return model


def _served(name: str, pipe: VARPipeline, plans: Plans, weight_bytes: int, shares: bool) -> ServedVariant:
    """The variant as served, with where each plan it takes came from."""
    spec = variant_spec(name)
    takes = spec.plans()
    windows = plans.windows_origin if PlanKind.WINDOWS in takes else None
    sharing = plans.sharing_origin if PlanKind.SHARING in takes else None
    return ServedVariant(name, spec, pipe, weight_bytes, shares, windows, sharing)


def vqvae_shareable(pipe: VARPipeline, base: VARPipeline) -> bool:
    """Whether the variant `pipe` may use the VQVAE of `base` (its unmodified source) instead of its own: its
    decoder hook is still its plain decoder module (a compiled one would be dropped by the swap) and its VQVAE
    can stand in for the base's."""
    return pipe.decoder_fn is pipe.vqvae.decoder and interchangeable(pipe.vqvae, base.vqvae)


def interchangeable(a: nn.Module, b: nn.Module) -> bool:
    """Whether one module can stand in for the other: same module types, bitwise-equal tensors of the same
    dtypes."""
    if [type(m) for m in a.modules()] != [type(m) for m in b.modules()]:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
