"""Write a trained pipeline as a checkpoint folder: config.json, var/vae .safetensors and SHA256SUMS."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from app.model.checksums import write_sums
from app.model.config import PipelineConfig


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def export_folder(config: PipelineConfig, var: nn.Module, vqvae: nn.Module, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    save_weights(var, out / "var.safetensors")
    save_weights(vqvae, out / "vae.safetensors")
    write_sums(out)
