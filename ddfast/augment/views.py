"""Batched, seeded two-view augmentations for self-supervised training, in plain torch ops.

Every sample of a batch draws its own parameters from an explicit ``torch.Generator``, so a view is
a deterministic function of ``(x, generator state)``. The geometric part of a view is one affine map
per sample (random resized crop, horizontal flip, rotation / translation / shear), composed into a
2×3 matrix θ and applied with one ``F.affine_grid`` + ``F.grid_sample``. Pixel operations act on the
un-normalised image ``x·std + mean`` in [0, 1]; the result is normalised again.

RGB default (the SimCLR / Barlow Twins recipe, Zbontar et al. 2021, minus blur and solarisation):
crop with area scale in (0.2, 1), flip, colour jitter (brightness / contrast / saturation 0.4, applied
with p = 0.8) and random greyscale (p = 0.2). Greyscale default (digits, MNIST): a gentler crop
(0.5, 1), no flip (it changes what a digit means), a small random affine (rotation ±15°,
translation ±10 %, shear ±10°) and no jitter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddfast.augment.crop import resized_crop_theta
from ddfast.augment.params import bernoulli, uniform, uniform_

__all__ = ["SSLAugment", "make_ssl_augment"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of the greyscale conversion


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return uniform(n, low, high, generator, torch.float64)


@dataclass(frozen=True)
class SSLAugment:
    """One random view per sample: ``augment(x, generator) -> x_aug`` (same shape, dtype and device).

    Args:
        channels: 1 (greyscale) or 3 (RGB).
        mean, std: per-channel normalisation of the inputs (length 1 or ``channels``).
        crop_scale: range of the crop's area as a fraction of the image; ``None`` for no crop.
        crop_ratio: range of the crop's aspect ratio (width / height, sampled log-uniformly).
        flip_p: probability of a horizontal flip.
        rotation: maximal rotation in degrees (uniform in ±rotation).
        translate: maximal translation as a fraction of the image side.
        shear: maximal horizontal shear angle in degrees.
        jitter_p: probability of colour jitter (RGB only).
        brightness, contrast, saturation: jitter strengths s; each factor is uniform in [1−s, 1+s].
        grayscale_p: probability of converting an RGB view to greyscale (kept as 3 channels).
    """

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] | None = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotation: float = 0.0
    translate: float = 0.0
    shear: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, self.channels):
                raise ValueError(f"{name}: expected 1 or {self.channels} values, got {len(v)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: expected positive values, got {self.std}")
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"crop_scale: expected 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio: expected 0 < low <= high, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {getattr(self, name)}")

    # ------------------------------------------------------------------ geometry

    def _theta(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """Per-sample 2×3 maps from output to input coordinates (``affine_grid`` convention), float64."""
        eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
        m = eye.clone()
        changed = False
        if self.crop_scale is not None and self.crop_scale != (1.0, 1.0):
            m = resized_crop_theta(n, self.crop_scale, self.crop_ratio, generator)
            changed = True
        if self.flip_p > 0:
            flip = bernoulli(n, self.flip_p, generator, torch.float64)
            sign = torch.where(flip, -1.0, 1.0).to(torch.float64)
            m = m.clone()
            m[:, :, 0] = m[:, :, 0] * sign[:, None]
            changed = True
        if self.rotation or self.translate or self.shear:
            a = torch.deg2rad(_uniform(n, -self.rotation, self.rotation, generator))
            s = torch.tan(torch.deg2rad(_uniform(n, -self.shear, self.shear, generator)))
            tx = _uniform(n, -2 * self.translate, 2 * self.translate, generator)  # [-1, 1] spans the image
            ty = _uniform(n, -2 * self.translate, 2 * self.translate, generator)
            aff = eye.clone()
            cos, sin = a.cos(), a.sin()
            # rotation · shear, then translation
            aff[:, 0, 0], aff[:, 0, 1] = cos, cos * s - sin
            aff[:, 1, 0], aff[:, 1, 1] = sin, sin * s + cos
            aff[:, 0, 2], aff[:, 1, 2] = tx, ty
            m = m @ aff
            changed = True
        return m[:, :2] if changed else None

    # ------------------------------------------------------------------ colour

    def _colour(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        apply = bernoulli(n, self.jitter_p, generator)
        b = uniform_(n, 1 - self.brightness, 1 + self.brightness, generator)
        c = uniform_(n, 1 - self.contrast, 1 + self.contrast, generator)
        s = uniform_(n, 1 - self.saturation, 1 + self.saturation, generator)
        one = torch.ones(n)
        b, c, s = (torch.where(apply, v, one).to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1) for v in (b, c, s))
        x = (x * b).clamp(0.0, 1.0)
        grey_mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = (c * x + (1 - c) * grey_mean).clamp(0.0, 1.0)
        grey = (x * luma).sum(1, keepdim=True)
        x = (s * x + (1 - s) * grey).clamp(0.0, 1.0)
        to_grey = bernoulli(n, self.grayscale_p, generator).to(x.device).view(n, 1, 1, 1)
        return torch.where(to_grey, (x * luma).sum(1, keepdim=True).expand_as(x), x)

    # ------------------------------------------------------------------ view

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels or not x.is_floating_point():
            raise ValueError(f"x: expected float images [n, {self.channels}, h, w], got {tuple(x.shape)} {x.dtype}")
        n = x.shape[0]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        pixels = x * std + mean
        theta = self._theta(n, generator)
        if theta is not None:
            grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
            pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.channels == 3 and (self.jitter_p > 0 or self.grayscale_p > 0):
            pixels = self._colour(pixels, generator)
        return (pixels - mean) / std


def make_ssl_augment(
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    crop_scale: tuple[float, float] | None = None,
    flip: bool | None = None,
    jitter: bool | None = None,
    affine: bool | None = None,
    rotation: float = 15.0,
    translate: float = 0.1,
    shear: float = 10.0,
) -> SSLAugment:
    """The default view augmentation for ``channels`` (see the module docstring).

    ``None`` picks the per-modality default: RGB gets crop (0.2, 1), flip, colour jitter and random
    greyscale; greyscale gets crop (0.5, 1) and the small affine (``rotation``°, ``translate``,
    ``shear``°) without flip or jitter.
    """
    rgb = channels == 3
    crop_scale = crop_scale if crop_scale is not None else ((0.2, 1.0) if rgb else (0.5, 1.0))
    flip = rgb if flip is None else flip
    jitter = rgb if jitter is None else jitter
    affine = (not rgb) if affine is None else affine
    if jitter and not rgb:
        raise ValueError("jitter: colour jitter needs 3 channels")
    return SSLAugment(
        channels=channels, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        crop_scale=tuple(crop_scale), flip_p=0.5 if flip else 0.0,
        rotation=rotation if affine else 0.0, translate=translate if affine else 0.0, shear=shear if affine else 0.0,
        jitter_p=0.8 if jitter else 0.0, grayscale_p=0.2 if jitter else 0.0,
    )
