"""The second judge: an MLP-Mixer (Tolstikhin et al. 2021) over 4x4 patches of 32x32 grayscale images in [-1, 1].

It shares no layer type with the demo classifier beyond the final linear head: no stacked 3x3 convolutions, no
pooling pyramid, no batch norm. Patches are embedded linearly; blocks alternate an MLP across patches (each
channel sees the whole image at once) and an MLP across channels, with layer norm. A generator's flaw that one
network's features happen not to see has fewer reasons to hide from both.
"""

from __future__ import annotations

import torch
from torch import nn

from app.quality.feature_classifier import FeatureClassifier


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, dim) -> (B, tokens, dim)."""
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class MixerClassifier(FeatureClassifier):
    architecture = "mixer"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        feature_dim: int = 48,
        patch: int = 4,
        depth: int = 3,
        image_size: int = 32,
    ):
        super().__init__()
        self.in_channels, self.num_classes, self.feature_dim = in_channels, num_classes, feature_dim
        self.patch, self.depth, self.image_size = patch, depth, image_size
        tokens = (image_size // patch) ** 2
        # kernel = stride = patch: one linear map per non-overlapping patch, not a sliding convolution
        self.embed = nn.Conv2d(in_channels, feature_dim, patch, stride=patch)
        self.blocks = nn.Sequential(
            *[MixerBlock(tokens, feature_dim, feature_dim, 2 * feature_dim) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(feature_dim)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, feature_dim): the mean over patches of the last normalised tokens."""
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(tokens)).mean(dim=1)
