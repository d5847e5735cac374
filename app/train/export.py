"""Write a trained pipeline as a checkpoint folder: config.json, var/vae .safetensors and SHA256SUMS."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from app.model.config import PipelineConfig


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sums(folder: Path) -> None:
    """SHA256SUMS over every other file in the folder, in `sha256sum -c` format."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    (folder / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.name}\n" for p in files))


def export_folder(config: PipelineConfig, var: nn.Module, vqvae: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    save_weights(var, out / "var.safetensors")
    save_weights(vqvae, out / "vae.safetensors")
    write_sums(out)
