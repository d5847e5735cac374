"""Checkpoint loading: safetensors or `torch.load(weights_only=True)`, strict key and shape checks.

A checkpoint folder holds a VAR file and a VQVAE file, named either as released
(`var_d16.pth`, `vae_ch160v4096z32.pth`; the preset follows from the depth in the name) or
`var.{safetensors,pth}` + `vae.{safetensors,pth}` beside a `config.json` (ours, or the official
builder's keyword arguments as in the conformance fixtures). A folder with a `SHA256SUMS` file is checked
against it before anything is read.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from app.model.checksums import SUMS_FILE, sums_mismatches
from app.model.config import PipelineConfig, config_from_official, get_preset, with_imagenet_names
from app.model.pipeline import VARPipeline
from app.model.var import VAR, init_weights
from app.model.vqvae import VQVAE

# A training statistic the official VQVAE replaces by its own buffer when the number of scales differs.
_REPLACEABLE = {"quantize.ema_vocab_hit_SV"}


class CheckpointError(ValueError):
    """The file is not a loadable state dict (unreadable, unsafe to unpickle, or not tensors)."""


@dataclass
class CheckpointMismatch(CheckpointError):
    """The state dict's keys or shapes differ from what the configuration expects."""

    part: str
    preset: str
    missing: list[str]
    unexpected: list[str]
    misshapen: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, expected, found

    def __str__(self) -> str:
        lines = [f"{self.part} checkpoint does not match preset {self.preset!r}:"]
        lines += [f"  missing key: {k}" for k in self.missing]
        lines += [f"  unexpected key: {k}" for k in self.unexpected]
        lines += [f"  misshapen key: {k}: expected {tuple(e)}, found {tuple(f)}" for k, e, f in self.misshapen]
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} mapping from .safetensors or a torch.save file; never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        msg = str(e)
        detail = msg.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip()
        if "allowed global" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling, which is never done "
                f"(torch.load weights_only=True): {detail}"
            ) from e
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({detail})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    return _as_state_dict(obj, path)


def _torch_load(path: Path) -> object:
    try:  # memory-mapped: loading costs no copy, weights page in on first use
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: not a state dict (a {type(obj).__name__}, expected a mapping of tensors)")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(
            f"{path}: not a flat state dict; entries that are not tensors: {', '.join(bad[:10])}"
            + (" ..." if len(bad) > 10 else "")
        )
    return dict(obj)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, part: str, preset: str) -> None:
    """Raise CheckpointMismatch naming every missing, unexpected and misshapen key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshapen = [
        (k, tuple(expected[k].shape), tuple(sd[k].shape))
        for k in expected
        if k in sd and k not in _REPLACEABLE and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshapen:
        raise CheckpointMismatch(part, preset, missing, unexpected, misshapen)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], *, part: str, preset: str) -> nn.Module:
    check_state_dict(model, sd, part=part, preset=preset)
    own = model.state_dict()
    for k in _REPLACEABLE & sd.keys():
        if sd[k].shape != own[k].shape:
            sd[k] = torch.zeros(own[k].shape)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float()


def build_models(config: PipelineConfig, device: str | torch.device = "cpu") -> tuple[VAR, VQVAE]:
    with torch.device(device):
        return VAR(config.var), VQVAE(config.vqvae)


def load_pipeline(config: PipelineConfig, var_path: str | Path, vae_path: str | Path) -> VARPipeline:
    """Build the models without initialising them (meta device), then adopt the checkpoint tensors."""
    var, vqvae = build_models(config, "meta")
    _load_into(var, read_state_dict(var_path), part="VAR", preset=config.name)
    _load_into(vqvae, read_state_dict(vae_path), part="VQVAE", preset=config.name)
    return VARPipeline(config, var, vqvae)


def random_pipeline(config: PipelineConfig, seed: int = 0) -> VARPipeline:
    """Random weights (official VAR initialisation), for shape-only runs and benchmarks."""
    with torch.random.fork_rng():  # seeded, without disturbing the caller's global generator
        torch.manual_seed(seed)
        var, vqvae = build_models(config)
        init_weights(var)
    return VARPipeline(config, var, vqvae)


def _find(folder: Path, patterns: list[str]) -> Path:
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise CheckpointError(f"{folder}: no file matching {' or '.join(patterns)}")


def folder_config(folder: str | Path) -> PipelineConfig:
    """The configuration of a checkpoint folder: config.json (ours or official), else the released name.
    Released and official checkpoints are ImageNet models: with 1000 classes they get ImageNet's class names."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        raw = json.loads(cfg_file.read_text())
        if "var" in raw and "vqvae" in raw:
            return PipelineConfig.from_dict(raw)
        return with_imagenet_names(config_from_official(raw, name=folder.name))
    var_file = _find(folder, ["var_d*.pth", "var_d*.safetensors"])
    m = re.match(r"var_d(\d+)\.", var_file.name)
    assert m is not None
    return get_preset(f"d{m.group(1)}")


def load_folder(folder: str | Path) -> VARPipeline:
    folder = Path(folder)
    if problems := sums_mismatches(folder):
        raise CheckpointError(f"{folder} does not match its {SUMS_FILE}:\n  " + "\n  ".join(problems))
    config = folder_config(folder)
    var_path = _find(folder, ["var.safetensors", "var.pth", "var_d*.safetensors", "var_d*.pth"])
    vae_path = _find(folder, ["vae.safetensors", "vae.pth", "vae_*.safetensors", "vae_*.pth"])
    return load_pipeline(config, var_path, vae_path)


def open_pipeline(checkpoint: str | Path | None, preset: str | None, random_init: bool) -> VARPipeline:
    """A checkpoint folder, or a preset with random weights (`random_init`, for shape-only runs)."""
    if checkpoint is not None:
        if random_init:
            raise ValueError("give either a checkpoint folder or --random-init, not both")
        return load_folder(checkpoint)
    if preset is None or not random_init:
        raise ValueError("give a checkpoint folder, or a preset together with --random-init")
    return random_pipeline(get_preset(preset))
