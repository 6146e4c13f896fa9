"""Differentiable Siamese Augmentation, DSA (Zhao & Bilen 2021; the DM / DC / MTT ``DiffAugment``).

One augmentation ω is a family drawn from ``families`` plus that family's parameters, drawn with
:func:`sample_dsa` and applied with :func:`apply_dsa` (differentiable in the images):

* ``color``: brightness +U(−½, ½), saturation ×U(0, 2), contrast ×U(½, 3/2);
* ``crop``: translation by up to 1/8 of the side (zero fill);
* ``cutout``: a zeroed half-side square;
* ``flip``: horizontal flip with probability ½;
* ``scale``: ×U(1/1.2, 1.2) per axis;  ``rotate``: U(−15°, 15°).

Siamese augmentation (soft-labels supplement eq. 5; DSA): ``A(·, ω)`` with **one** ω ~ Ω applied to the
real and the synthetic batch. :func:`siamese_dsa` samples ω once (``n = 1``: every image of both batches
shares it, as DSA's code does when it is given a seed) and applies those very parameters to each batch;
identical inputs give identical outputs, whatever the batch sizes. :func:`dsa_augment` draws the
parameters per image (DSA with no seed, MTT's ``DiffAugment``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddfast.augment.params import bernoulli, randint, uniform

__all__ = ["DSA_FAMILIES", "DSAParams", "sample_dsa", "apply_dsa", "dsa_augment", "siamese_dsa", "check_families"]

DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def check_families(families, name: str = "families") -> tuple[str, ...]:
    families = tuple(families)
    bad = [f for f in families if f not in DSA_FAMILIES]
    if not families or bad:
        raise ValueError(f"{name}: expected a non-empty subset of {DSA_FAMILIES}, got {families!r}")
    return families


@dataclass(frozen=True)
class DSAParams:
    """One DSA draw: the ``family`` and its parameters, each a CPU tensor of ``n`` values (n = 1: shared
    by every image of any batch it is applied to; else one per image of a batch of n)."""

    family: str
    values: dict
    size: tuple[int, int]  # (h, w) the parameters were drawn for (crop / cutout offsets depend on it)

    @property
    def n(self) -> int:
        return next(iter(self.values.values())).shape[0]


def sample_dsa(n: int, size: tuple[int, int], generator: torch.Generator,
               families: tuple[str, ...] = DSA_FAMILIES) -> DSAParams:
    """Draw one family and its parameters for ``n`` images of side ``size = (h, w)``."""
    families = check_families(families)
    h, w = int(size[0]), int(size[1])
    family = families[int(torch.randint(len(families), (1,), generator=generator))]
    if family == "color":
        values = {"brightness": uniform(n, 0.0, 1.0, generator) - 0.5,
                  "saturation": 2.0 * uniform(n, 0.0, 1.0, generator),
                  "contrast": uniform(n, 0.0, 1.0, generator) + 0.5}
    elif family == "crop":
        sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        values = {"ty": randint(-sy, sy + 1, n, generator), "tx": randint(-sx, sx + 1, n, generator)}
    elif family == "cutout":
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        values = {"oy": randint(0, h + (1 - ch % 2), n, generator) - ch // 2,
                  "ox": randint(0, w + (1 - cw % 2), n, generator) - cw // 2}
    elif family == "flip":
        values = {"flip": bernoulli(n, 0.5, generator)}
    elif family == "scale":
        values = {"sx": uniform(n, 1 / 1.2, 1.2, generator), "sy": uniform(n, 1 / 1.2, 1.2, generator)}
    else:  # rotate
        values = {"angle": uniform(n, -15.0, 15.0, generator) * math.pi / 180.0}
    return DSAParams(family, values, (h, w))


def _per_image(v: torch.Tensor, b: int, device) -> torch.Tensor:
    return (v.expand(b) if v.shape[0] == 1 else v).to(device)


def apply_dsa(x: torch.Tensor, params: DSAParams) -> torch.Tensor:
    """``A(x, ω)`` for the parameters ``params`` (drawn for n = 1 or n = x's batch size)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected float images [b, c, h, w], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    b, c, h, w = x.shape
    if params.n not in (1, b):
        raise ValueError(f"params: drawn for {params.n} images, x has {b} (expected 1 or {b})")
    if (h, w) != tuple(params.size):
        raise ValueError(f"params: drawn for images of side {tuple(params.size)}, x has ({h}, {w})")
    if b == 0:
        return x
    dev = x.device
    v = {k: _per_image(t, b, dev) for k, t in params.values.items()}
    family = params.family
    if family == "color":
        x = x + v["brightness"].view(b, 1, 1, 1).to(x)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * v["saturation"].view(b, 1, 1, 1).to(x) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * v["contrast"].view(b, 1, 1, 1).to(x) + mean
    if family == "crop":
        sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        xp = F.pad(x, (sx, sx, sy, sy))
        rows = (v["ty"][:, None] + sy + torch.arange(h, device=dev))[:, :, None]
        cols = (v["tx"][:, None] + sx + torch.arange(w, device=dev))[:, None, :]
        return xp.permute(0, 2, 3, 1)[torch.arange(b, device=dev)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()
    if family == "cutout":
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        oy, ox = v["oy"], v["ox"]
        r, q = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_r = (r[None] >= oy[:, None]) & (r[None] < oy[:, None] + ch)
        in_c = (q[None] >= ox[:, None]) & (q[None] < ox[:, None] + cw)
        keep = ~(in_r[:, :, None] & in_c[:, None, :])
        return x * keep[:, None].to(x)
    if family == "flip":
        return torch.where(v["flip"].view(b, 1, 1, 1), x.flip(3), x).contiguous()
    # the affine maps are built from the host parameters (no device-to-host copy), then moved
    host = {k: t.expand(b) if t.shape[0] == 1 else t for k, t in params.values.items()}
    theta = torch.zeros(b, 2, 3)
    if family == "scale":
        theta[:, 0, 0], theta[:, 1, 1] = host["sx"], host["sy"]
    elif family == "rotate":
        angle = host["angle"]
        theta[:, 0, 0], theta[:, 0, 1] = angle.cos(), -angle.sin()
        theta[:, 1, 0], theta[:, 1, 1] = angle.sin(), angle.cos()
    else:
        raise ValueError(f"params: unknown DSA family {family!r}; expected names from {DSA_FAMILIES}")
    grid = F.affine_grid(theta.to(device=dev, dtype=x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def dsa_augment(x: torch.Tensor, generator: torch.Generator, families: tuple[str, ...] = DSA_FAMILIES) -> torch.Tensor:
    """DSA with one family per batch and parameters drawn per image (DSA without a seed; MTT)."""
    return apply_dsa(x, sample_dsa(x.shape[0], tuple(x.shape[-2:]), generator, families))


def siamese_dsa(*batches: torch.Tensor, generator: torch.Generator,
                families: tuple[str, ...] = DSA_FAMILIES) -> tuple[torch.Tensor, ...]:
    """``A(x, ω)`` for every batch with one ω ~ Ω, sampled once and shared by all their images.

    Shape: batches ``[b_i, c, h, w]`` of one image size (any b_i) → the same shapes.
    """
    if not batches:
        raise ValueError("batches: expected at least one batch of images")
    params = sample_dsa(1, tuple(batches[0].shape[-2:]), generator, families)
    return tuple(apply_dsa(x, params) for x in batches)
