"""Image tensors -> PNG / JPEG / WebP bytes, and the choice between a JSON and a raw-image answer."""

from __future__ import annotations

import io

import torch
from PIL import Image

from app.model.images import to_uint8_HWC

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JSON = "application/json"
_SAVE_OPTIONS: dict[str, dict[str, object]] = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}


def encode_images(images_BCHW: torch.Tensor, fmt: str) -> list[bytes]:
    out = []
    for pixels in to_uint8_HWC(images_BCHW).numpy():
        img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        buf = io.BytesIO()
        img.save(buf, format=fmt.upper(), **_SAVE_OPTIONS[fmt])
        out.append(buf.getvalue())
    return out


def negotiate(accept: str | None) -> str | None:
    """The image format the client prefers to JSON (png, jpeg, webp), or None for JSON.

    Highest quality value wins; on a tie, the earlier entry; `*/*`, `application/*` and a missing header
    mean JSON. Only an explicit image type asks for a raw image.
    """
    best: tuple[float, str | None] | None = None
    for entry in (accept or "").split(","):
        media, _, params = entry.strip().partition(";")
        media = media.strip().lower()
        if media in (JSON, "application/*", "*/*"):
            choice = None
        elif media in MEDIA_TYPES.values():
            choice = media.removeprefix("image/")
        else:
            continue
        q = _quality(params)
        if q > 0 and (best is None or q > best[0]):
            best = (q, choice)
    return best[1] if best else None


def _quality(params: str) -> float:
    for p in params.split(";"):
        key, _, value = p.strip().partition("=")
        if key.strip() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0
