"""Image tensors -> PNG / JPEG / WebP bytes, and the choice between a JSON and a raw-image answer."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JSON = "application/json"
ANY_IMAGE = "*"  # `Accept: image/*`: an image in the body's format
ANSWERS = (JSON, *MEDIA_TYPES.values())  # what POST /generate can answer with


class NotAcceptable(Exception):
    """The Accept header allows no answer this request can have (406)."""


_SAVE_OPTIONS: dict[str, dict[str, object]] = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}


def encode_images(images_BCHW: torch.Tensor, fmt: str) -> list[bytes]:
    """Runs in a thread of the event loop's pool, beside the engine's worker: the pixels are converted with
    numpy, never with torch, whose parallel ops would start a second team of OpenMP threads in this thread
    to fight the worker's for the cores (`uint8_HWC`)."""
    out = []
    for pixels in uint8_HWC(images_BCHW):
        img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        buf = io.BytesIO()
        img.save(buf, format=fmt.upper(), **_SAVE_OPTIONS[fmt])
        out.append(buf.getvalue())
    return out


def uint8_HWC(images_BCHW: torch.Tensor) -> np.ndarray:
    """`app.model.images.to_uint8_HWC` in numpy, single-threaded: the same float32 arithmetic, the same bytes."""
    scaled = images_BCHW.detach().cpu().float().numpy() * np.float32(255) + np.float32(0.5)
    return np.clip(scaled, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def negotiate(accept: str | None) -> str | None:
    """The image format the client prefers to JSON (png, jpeg, webp, or ANY_IMAGE for `image/*`), or None for
    JSON. NotAcceptable when the header allows none of them (`image/gif` alone, every type at `q=0`).

    Highest quality value wins; on a tie, the earlier entry; `*/*`, `application/*` and `application/json`
    mean JSON, and so does a missing or empty header. Only an image type asks for a raw image.
    """
    if accept is None or not accept.strip():
        return None
    best: tuple[float, str | None] | None = None
    for entry in accept.split(","):
        media, _, params = entry.strip().partition(";")
        media = media.strip().lower()
        if media in (JSON, "application/*", "*/*"):
            choice = None
        elif media in MEDIA_TYPES.values():
            choice = media.removeprefix("image/")
        elif media == "image/*":
            choice = ANY_IMAGE
        else:
            continue
        q = _quality(params)
        if q > 0 and (best is None or q > best[0]):
            best = (q, choice)
    if best is None:
        shown = accept if len(accept) <= 200 else accept[:200] + "..."
        raise NotAcceptable(
            f"no answer of POST /generate is acceptable to Accept: {shown}; it answers {', '.join(ANSWERS)}"
        )
    return best[1]


def _quality(params: str) -> float:
    """The entry's q, 1 when absent; an invalid one (not a number from 0 to 1) counts as 0, ruling it out."""
    for p in params.split(";"):
        key, _, value = p.strip().partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                return 0.0
            return q if 0 <= q <= 1 else 0.0
    return 1.0
