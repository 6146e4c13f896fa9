"""VGG-11 with batch norm for small images (krr-st-selfsup §4.1, architecture transfer).

Eight ``Conv3×3(pad 1) → norm → ReLU`` layers with channels w, 2w, 4w, 4w, 8w, 8w, 8w, 8w (w = 64 is
the standard network) and a 2×2 max-pool after layers 1, 2, 4, 6 and 8 (its ReLU and the pool run as
one fused op, :class:`ddfast.ops.relu_max_pool2d.ReluMaxPool2d`). A pool is left out once the feature
map is down to 1×1, so 8×8, 16×16 and 28×28 inputs work as well as 32×32; the features are
the flattened last map (``8w · side²``; 8w for every input of 32 px or fewer).
"""

from __future__ import annotations

from torch import nn

from ddfast.ops.relu_max_pool2d import ReluMaxPool2d

VGG11_LAYOUT = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")  # channels in units of w; "M" = max-pool


class VGG11(nn.Module):
    """VGG-11 (BN) with ``features`` (x → flat h) and a linear ``head``; see the module docstring.

    Args:
        in_channels, num_classes, image_size: input channels, head width and input resolution.
        width: channels of the first layer (64 standard).
        norm: ``"batch"`` (default), ``"instance"`` or ``"none"``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: int = 64,
                 norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"norm: expected one of ('batch', 'instance', 'none'), got {norm!r}")
        if width < 1 or image_size < 1:
            raise ValueError(f"width, image_size: expected positive ints, got {width}, {image_size}")
        layers, cin, side = [], in_channels, image_size
        for item in VGG11_LAYOUT:
            if item == "M":
                if side >= 2:
                    # ReLU → MaxPool2d(2) fused (identical values and gradients); the Identity keeps the
                    # layer indices, hence the state_dict keys, of the unfused layout.
                    layers[-1:] = [ReluMaxPool2d(), nn.Identity()]  # layers[-1] is the block's nn.ReLU
                    side //= 2
                continue
            cout = item * width
            norm_layer = {"batch": nn.BatchNorm2d(cout), "instance": nn.GroupNorm(cout, cout),
                          "none": nn.Identity()}[norm]
            layers += [nn.Conv2d(cin, cout, 3, padding=1), norm_layer, nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.feature_dim = cin * side * side
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
