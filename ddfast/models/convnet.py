"""ConvNet-D*n*: the conv–norm–ReLU–avg-pool network of kernel-ridge distillation (krr-st-selfsup §4.1).

Each block is ``Conv3×3(pad 1) → norm → ReLU → AvgPool2×2``; the features are the flattened output of
the last block (``(image_size // 2**depth)² · widths[-1]``), the head is one ``nn.Linear``. The depth
follows the resolution (§4.1): 3 blocks for 32×32, 4 for 64×64; :func:`convnet_depth` also gives 2 for
images of 16 pixels or fewer. The paper widths are 128-256-512 (D3) and 64-128-256-512 (D4); CPU
presets pass narrower ``widths``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

NORMS = ("batch", "instance", "none")


def convnet_depth(image_size: int) -> int:
    """Blocks for a resolution: 2 (≤16 px), 3 (≤32 px, e.g. 28 and 32), 4 (≤64 px), 5 above."""
    if image_size <= 16:
        return 2
    if image_size <= 32:
        return 3
    return 4 if image_size <= 64 else 5


def paper_widths(depth: int) -> tuple[int, ...]:
    """Channel widths of the paper's ConvNet-D*depth* (128-256-512, 64-128-256-512, 32-…-512)."""
    return tuple(512 >> (depth - 1 - i) for i in range(depth))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)  # instance norm with affine parameters
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet with ``features`` (x → flat h) and a linear ``head``; see the module docstring.

    Args:
        in_channels, num_classes, image_size: input channels, head width and input resolution.
        widths: channels per block (its length is the depth). Default: the paper's widths for
            :func:`convnet_depth` of ``image_size``.
        norm: ``"batch"`` (paper), ``"instance"`` or ``"none"``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        widths: Sequence[int] | None = None,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        widths = tuple(widths) if widths is not None else paper_widths(convnet_depth(image_size))
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths: expected positive channel counts, got {widths}")
        side = image_size >> len(widths)
        if side < 1:
            raise ValueError(f"image_size: {image_size} px is too small for {len(widths)} pooling blocks")
        layers, cin = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), _norm(norm, w), nn.ReLU(), nn.AvgPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.widths = widths
        self.feature_dim = side * side * widths[-1]
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
