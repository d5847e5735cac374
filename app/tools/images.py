"""Pictures the tools write: generated images tiled into one PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from app.model.images import tile


def save_grid(images_BCHW: torch.Tensor, columns: int, path: Path) -> None:
    pixels = tile(images_BCHW, columns).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
