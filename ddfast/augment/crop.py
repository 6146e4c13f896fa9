"""Crop-and-flip augmentations: pad-and-crop with flips (CIFAR style) and RandomResizedCrop (ImageNet style).

Both draw their parameters per image through :mod:`ddfast.augment.params` and are vectorised over the
batch (an index gather for pad-and-crop, one ``affine_grid`` + ``grid_sample`` for the resized crop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddfast.augment.params import bernoulli, randint, uniform

__all__ = ["random_crop_flip", "random_resized_crop", "resized_crop_theta"]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool,
                     fill: torch.Tensor | None = None) -> torch.Tensor:
    """Random ``h×w`` crops of ``x`` padded by ``padding`` px (value ``fill`` per channel, default 0),
    and, if ``flip``, horizontal flips with probability ½ — independently per image, vectorised."""
    b, c, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)
        if fill is not None:
            border = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
            border = 1.0 - F.pad(border, (padding,) * 4)
            xp = xp + border * fill.to(x).view(1, c, 1, 1)
        oy = randint(0, 2 * padding + 1, b, generator).to(x.device)
        ox = randint(0, 2 * padding + 1, b, generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [b, h, 1]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [b, 1, w]
        x = xp.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = bernoulli(b, 0.5, generator).to(x.device).view(b, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x.contiguous()


def resized_crop_theta(n: int, scale: tuple[float, float], ratio: tuple[float, float],
                       generator: torch.Generator) -> torch.Tensor:
    """``[n, 3, 3]`` float64 maps (output → input, ``affine_grid`` convention) of random resized crops.

    A crop covers the fraction ``area ~ U(scale)`` of the image with aspect ratio (w / h) log-uniform in
    ``ratio``; its sides are clamped to the image and its centre is uniform among the positions that
    keep it inside. Draw order: area, log-ratio, x-centre, y-centre (n each).
    """
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    area = uniform(n, scale[0], scale[1], generator, torch.float64)
    ratio_ = uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, torch.float64).exp()
    w = (area * ratio_).sqrt().clamp(max=1.0)  # crop side fractions of the image
    h = (area / ratio_).sqrt().clamp(max=1.0)
    cx = (1.0 - w) * (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0)
    cy = (1.0 - h) * (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0)
    crop = eye.clone()
    crop[:, 0, 0], crop[:, 1, 1], crop[:, 0, 2], crop[:, 1, 2] = w, h, cx, cy
    return crop


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """RandomResizedCrop (+ horizontal flip with probability ½ when ``flip``), per image, bilinear.

    The torchvision transform's parameters (area fraction ``scale``, aspect ``ratio``) as one affine
    resampling of the whole batch; the crop is resized back to ``h×w``.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected float images [b, c, h, w], got {tuple(x.shape)} {x.dtype}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale: expected 0 < low <= high <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio: expected 0 < low <= high, got {ratio}")
    b = x.shape[0]
    m = resized_crop_theta(b, scale, ratio, generator)
    if flip:
        sign = torch.where(bernoulli(b, 0.5, generator, torch.float64), -1.0, 1.0).to(torch.float64)
        m = m.clone()
        m[:, :, 0] = m[:, :, 0] * sign[:, None]
    grid = F.affine_grid(m[:, :2].to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
