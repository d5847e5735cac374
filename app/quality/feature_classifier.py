"""What every classifier that judges images shares: a feature map, a head on it, and a config that rebuilds it."""

from __future__ import annotations

import inspect

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    """A classifier whose `features` are the space FID and precision/recall are measured in.

    Subclasses set `architecture`, build `dropout` and `head`, implement `features`, and keep each constructor
    argument as an attribute of the same name: `config()` reads them back, so the config rebuilds the module."""

    architecture: str
    dropout: nn.Module
    head: nn.Module

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def config(self) -> dict[str, int | str]:
        arguments = inspect.signature(type(self)).parameters
        return {"architecture": self.architecture, **{name: getattr(self, name) for name in arguments}}
