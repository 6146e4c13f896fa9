"""Eager PyTorch reference for the fused ReLU + 2×2 max-pool (the truth the kernels are tested against).

    out[n, c, i, j] = max_{(a, b) ∈ {0,1}²} relu(x[n, c, 2i + a, 2j + b])     i < ⌊H/2⌋, j < ⌊W/2⌋

Gradient (that of the composition): ∂out/∂x is 1 at the first window position in row-major scan
order (0,0), (0,1), (1,0), (1,1) holding the maximum when it is > 0, and 0 everywhere else (a window
whose maximum is 0, and the last row / column of an odd H / W). A NaN in a window makes the output
NaN and takes the gradient (the last NaN in scan order), as ``F.max_pool2d`` and ``F.relu`` do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lenet_forward_ref", "relu_max_pool2d_ref"]


def relu_max_pool2d_ref(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(F.relu(x), 2)`` for ``x`` of shape ``[N, C, H, W]`` (any float dtype and layout)."""
    return F.max_pool2d(F.relu(x), 2)


def lenet_forward_ref(model, x: torch.Tensor) -> torch.Tensor:
    """``ddfast.models.LeNet`` forward with the pools as ``F.max_pool2d(F.relu(·), 2)`` (the model's
    parameters, the composition in place of the fused op)."""
    f = model.features
    with torch.autocast(x.device.type, enabled=False):  # LeNet's first convolution stays float32 under autocast
        h = relu_max_pool2d_ref(f.conv1(x.to(f.conv1.weight.dtype)))
    h = relu_max_pool2d_ref(f.conv2(h))
    h = F.relu(f.fc2(F.relu(f.fc1(h.flatten(1)))))
    return model.head(h)
