"""AlexNet for 32×32 colour images as used by dataset distillation (label-distillation §4.1; 192-d features)."""

from __future__ import annotations

from torch import nn


class AlexNet(nn.Module):
    """conv5(64)–pool–LRN–conv5(64)–LRN–pool, fc384–fc192 features, linear head."""

    feature_dim = 192

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        if image_size != 32:
            raise ValueError(f"image_size: AlexNet takes 32×32 inputs, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1),
            nn.Conv2d(64, 64, 5, stride=1, padding=2),
            nn.ReLU(),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 384),
            nn.ReLU(),
            nn.Linear(384, 192),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
