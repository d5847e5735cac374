"""Image tensors in [0, 1] -> 8-bit PIL images (the only place pixels are quantised)."""

from __future__ import annotations

import torch
from PIL import Image


def to_uint8_HWC(images_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8, rounded to nearest."""
    return images_BCHW.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(images_BCHW: torch.Tensor) -> list[Image.Image]:
    out = []
    for arr in to_uint8_HWC(images_BCHW).numpy():
        out.append(Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    return out


def grid(images_BCHW: torch.Tensor, columns: int) -> Image.Image:
    """Tile images row-major into one picture."""
    tiles = to_pil(images_BCHW)
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    out = Image.new(tiles[0].mode, (columns * w, rows * h))
    for i, tile in enumerate(tiles):
        out.paste(tile, ((i % columns) * w, (i // columns) * h))
    return out
