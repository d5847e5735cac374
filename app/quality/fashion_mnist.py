"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, official train/test split).

Images are padded from 28x28 to 32x32 with the background value so the VQVAE downsamples evenly;
pixels map to [-1, 1] as the VQVAE expects.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SIZE = 32


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 32, 32) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int) -> Split:
        """The first n examples (the split's own order, which mixes the classes)."""
        return Split(self.images[:n], self.labels[:n])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic (0, 0, dtype 0x08, ndim), big-endian dims, uint8 data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder / stem}[.gz] not found: install Debian's package (apt-get install dataset-fashion-mnist)"
        " or pass the folder holding the IDX files"
    )


def to_model_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) float32 in [-1, 1], padded with black."""
    x = images_uint8.float().div(127.5).sub(1).unsqueeze(1)
    pad = (IMAGE_SIZE - x.shape[-1]) // 2
    return F.pad(x, (pad, pad, pad, pad), value=-1.0)


def load_split(split: str, folder: Path = DEFAULT_DIR) -> Split:
    """`train` (60,000 images) or `test` (10,000 images)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = torch.from_numpy(_read_idx(_find(folder, f"{prefix}-images-idx3-ubyte")).copy())
    labels = torch.from_numpy(_read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
    return Split(to_model_pixels(images), labels)
