"""The encoder's pixel conversion: numpy, single-threaded, and the same bytes as the model's own."""

from __future__ import annotations

import torch

from app.model.images import to_uint8_HWC
from app.serve.http.encoding import uint8_HWC


def test_numpy_conversion_rounds_exactly_as_the_model_does() -> None:
    images = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # some out of range
    edges = torch.tensor([0.5, 1.5, 127.5, 254.5, 254.49]) / 255  # halfway points round up
    images[0, 0, 0, : len(edges)] = edges
    assert torch.equal(torch.from_numpy(uint8_HWC(images)), to_uint8_HWC(images))
    assert uint8_HWC(images).shape == (3, 64, 48, 3)
