"""ResNet-18 and ResNet-10 for small images (label-distillation Tables 13–14; krr-st-selfsup §4.1).

The CIFAR-style stem (3×3 conv, no max-pool), four stages of BasicBlocks (two per stage for ResNet-18,
one for ResNet-10), global average pooling. ``width`` sets the first stage's channels (64 is the
standard network; the stages double it three times) and the feature width is 8·width.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetFeatures(nn.Module):
    """Stem, four stages of ``blocks_per_stage`` BasicBlocks (strides 1, 2, 2, 2), average pool."""

    def __init__(self, in_channels: int, width: int, blocks_per_stage: int = 2, stage_widths=None):
        super().__init__()
        stage_widths = tuple(stage_widths) if stage_widths is not None else (width, 2 * width, 4 * width, 8 * width)
        if len(stage_widths) != 4 or any(int(w) < 1 for w in stage_widths):
            raise ValueError(f"stage_widths: expected four positive channel counts, got {stage_widths!r}")
        self.out_dim = int(stage_widths[-1])
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate(stage_widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(blocks_per_stage - 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


class ResNet18Features(ResNetFeatures):
    def __init__(self, in_channels: int, width: int, stage_widths=None):
        super().__init__(in_channels, width, blocks_per_stage=2, stage_widths=stage_widths)


class ResNet18(nn.Module):
    """ResNet-18 (stages of ``width``·(1, 2, 4, 8) channels, 8·width features).

    ``features=64``: label-distillation's ResNet-18, whose ridge-regression layer sees 64 features
    (Table 14: "64 features + 1 for bias"): every stage keeps ``width`` = 64 channels.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 64,
                 features: int | None = None):
        super().__init__()
        stage_widths = None
        if features is not None:
            if int(features) < 1:
                raise ValueError(f"features: expected a positive feature width, got {features!r}")
            width = int(features)
            stage_widths = (width,) * 4
        self.features = ResNet18Features(in_channels, width, stage_widths)
        self.feature_dim = self.features.out_dim
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class ResNet10(nn.Module):
    """ResNet-18's layout with one BasicBlock per stage (the krr-st-selfsup architecture-transfer net)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 64):
        super().__init__()
        self.features = ResNetFeatures(in_channels, width, blocks_per_stage=1)
        self.feature_dim = 8 * width
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
