"""A small multi-layer perceptron (for flat or tiny inputs, and tests)."""

from __future__ import annotations

from torch import nn


class MLP(nn.Module):
    """flatten – [Linear – ReLU] × len(hidden) features, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, hidden=(128, 64)):
        super().__init__()
        layers, width = [nn.Flatten()], in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
