"""LeNet (LeCun et al. 1998) as used by dataset distillation for MNIST-like data (label-distillation §4.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.ops.relu_max_pool2d import relu_max_pool2d


class LeNetFeatures(nn.Module):
    def __init__(self, in_channels: int, image_size: int):
        super().__init__()
        if image_size not in (28, 32):
            raise ValueError(f"image_size: LeNet takes 28×28 or 32×32 inputs, got {image_size} (resize with image_size=28)")
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2 if image_size == 28 else 0)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)

    def forward(self, x):
        # Under bf16 autocast the first convolution stays float32: with 1–3 input channels it is cheap, and
        # its bf16 weight-gradient kernel is slower than the float32 one (README, "End-to-end speed").
        with torch.autocast(x.device.type, enabled=False):
            x = relu_max_pool2d(self.conv1(x.to(self.conv1.weight.dtype)))  # = F.max_pool2d(F.relu(·), 2)
        x = relu_max_pool2d(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.relu(self.fc2(x))


class LeNet(nn.Module):
    """conv5(6)–pool–conv5(16)–pool–fc120–fc84 features, linear head to C classes."""

    feature_dim = 84

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = LeNetFeatures(in_channels, image_size)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
