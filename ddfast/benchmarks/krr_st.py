"""Benchmark cases for one KRR-ST meta-step, shared by ``bench/bench_krr_st.py`` (pytest-benchmark)
and ``ddfast bench krr-st`` (a table with the time split).

A meta-step (krr-st-selfsup Algorithm 1 lines 7–10) is: ConvNet features of X_s (with graph) and of the
real batch (without), the kernel-ridge prediction and MSE of eq. 4, and the gradient to (X_s, Y_s).
Parts: ``solve`` (eq. 4 from fixed features: K_ss, K_ts, the solve, and its backward to the features
and Y_s), ``features`` (the ConvNet passes alone: forward of both sets, backward of X_s), ``step``
(everything). Providers: ``reference`` — the method's own code path, ``torch.linalg.solve`` on
K_ss + λI in float32 with autograd through it — and ``cpu`` (ddfast's fused ``krr_predict``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ddfast.benchmarks.ridge_solve import peak_memory_bytes
from ddfast.distill.krr_st import outer_loss
from ddfast.models import ConvNet
from ddfast.ops.ridge_solve import krr_predict

__all__ = ["KRRSTCase", "CASES", "PARTS", "make_fn", "peak_memory_bytes"]


@dataclasses.dataclass(frozen=True)
class KRRSTCase:
    name: str
    m: int  # synthetic images
    b: int = 256  # real batch
    d_y: int = 512  # target representation width (ResNet-18)
    channels: int = 3
    image_size: int = 32
    widths: tuple[int, ...] = (128, 256, 512)  # ConvNet-D3 of the paper


CASES = [KRRSTCase("convnet3_m100_b256", 100), KRRSTCase("convnet3_m1000_b256", 1000)]
PARTS = ("solve", "features", "step")


def _data(case: KRRSTCase, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = case.image_size
    xs = torch.randn(case.m, case.channels, s, s, generator=g).requires_grad_(True)
    ys = torch.randn(case.m, case.d_y, generator=g).requires_grad_(True)
    xr = torch.randn(case.b, case.channels, s, s, generator=g)
    yr = torch.randn(case.b, case.d_y, generator=g)
    return xs, ys, xr, yr


def make_fn(case: KRRSTCase, provider: str, part: str):
    """A zero-argument callable running ``part`` of one meta-step of ``case`` on ``provider``."""
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    torch.manual_seed(0)
    xs, ys, xr, yr = _data(case)
    model = ConvNet(case.channels, case.d_y, case.image_size, widths=case.widths).eval()
    if part == "step":
        def step():
            loss = outer_loss(model.features, xs, ys, xr, yr, lam=1e-6, backend=provider)
            return torch.autograd.grad(loss, [xs, ys])
        return step
    with torch.no_grad():
        zs0, zr = model.features(xs), model.features(xr)
    if part == "solve":
        zs = zs0.clone().requires_grad_(True)

        def solve():
            pred = krr_predict(zr, zs, ys, 1e-6, reg="trace", detach_reg=True, bias=True, backend=provider)
            return torch.autograd.grad(F.mse_loss(pred, yr), [zs, ys])
        return solve
    gz = torch.randn_like(zs0)

    def features():
        z = model.features(xs)
        with torch.no_grad():
            model.features(xr)
        return torch.autograd.grad(z, [xs], gz)
    return features
