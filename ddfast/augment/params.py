"""The one place augmentations draw their random parameters from an explicit ``torch.Generator``.

Every augmentation in :mod:`ddfast.augment` samples its parameters here, on the CPU, *before* touching
pixels, so that a parameter set can be drawn once and applied to several batches (Siamese augmentation:
DSA's real and synthetic batches share one ω) and a view is a deterministic function of
``(x, generator state)``. ``n`` is the number of independent draws: the batch size for per-image
parameters, 1 for one draw shared by every image.
"""

from __future__ import annotations

import torch

__all__ = ["uniform", "randint", "bernoulli", "uniform_"]


def uniform(n: int, low: float, high: float, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``n`` draws of U(low, high) (``low + (high − low)·U(0, 1)``), CPU, ``dtype``."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=dtype)


def uniform_(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` float32 draws of U(low, high) by ``Tensor.uniform_`` (the stream torchvision-style jitter uses)."""
    return torch.empty(n).uniform_(low, high, generator=generator)


def randint(low: int, high: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` integers uniform in ``[low, high)``, int64, CPU."""
    return torch.randint(low, high, (n,), generator=generator)


def bernoulli(n: int, p: float, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """``n`` booleans, each True with probability ``p`` (``U(0, 1) < p``)."""
    return torch.rand(n, generator=generator, dtype=dtype) < p
