"""Image tensors in [0, 1] -> 8-bit pixels (the only place pixels are quantised), alone or tiled in a grid."""

from __future__ import annotations

import torch


def to_uint8_HWC(images_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) floats in [0, 1] -> (B, H, W, C) uint8 on the CPU, rounded to nearest."""
    return images_BCHW.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def nonfinite_images(images_BCHW: torch.Tensor) -> list[int]:
    """The indices of the images with a NaN or infinite pixel: quantising them would make up pixel values."""
    finite = torch.isfinite(images_BCHW.detach().flatten(1)).all(dim=1)
    return [i for i, ok in enumerate(finite.tolist()) if not ok]


def tile(images_BCHW: torch.Tensor, columns: int) -> torch.Tensor:
    """Images tiled row-major into one (rows * H, columns * W, C) uint8 picture; empty cells are black."""
    pixels = to_uint8_HWC(images_BCHW)
    B, H, W, C = pixels.shape
    rows = -(-B // columns)
    cells = torch.zeros(rows * columns, H, W, C, dtype=torch.uint8)
    cells[:B] = pixels
    return cells.view(rows, columns, H, W, C).permute(0, 2, 1, 3, 4).reshape(rows * H, columns * W, C)
