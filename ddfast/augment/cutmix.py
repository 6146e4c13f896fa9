"""CutMix of a batch with a shuffled copy of itself (Yun et al. 2019), labels left to a teacher."""

from __future__ import annotations

import math

import torch

from ddfast.augment.params import randint, uniform

__all__ = ["cutmix"]


def cutmix(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CutMix of a batch with a shuffled copy of itself: one box of area ``(1 − λ)·h·w``, λ ~ Beta(1, 1).

    The box centre is uniform and the box is clipped at the border (as in the reference CutMix). Labels are
    not mixed: under SL+KD the teacher labels the mixed images.
    """
    b, _, h, w = x.shape
    lam = float(uniform(1, 0.0, 1.0, generator))  # Beta(1, 1) = U(0, 1)
    perm = torch.randperm(b, generator=generator).to(x.device)
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy = int(randint(0, h, 1, generator))
    cx = int(randint(0, w, 1, generator))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return out
