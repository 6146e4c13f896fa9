"""Benchmark cases for the fused ReLU + 2×2 max-pool, shared by ``bench/bench_relu_max_pool2d.py``
(pytest-benchmark) and ``ddfast bench relu-max-pool2d`` (a quick table).

Cases: LeNet's two pools at batch 1024 (``[1024, 6, 28, 28]`` after conv1, ``[1024, 16, 10, 10]``
after conv2), float32 and bfloat16, NCHW and channels_last; and a whole LeNet forward + backward at
batch 1024. Modes: ``fwd`` (no autograd graph) and ``fwd+bwd`` (forward with a graph, then the input
gradient). Providers: ``reference`` (``F.max_pool2d(F.relu(x), 2)``; for the model,
``lenet_forward_ref``) and ``cpu`` (the fused C++ kernel).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ddfast.benchmarks.ridge_solve import peak_memory_bytes
from ddfast.models import LeNet
from ddfast.ops.relu_max_pool2d import relu_max_pool2d
from ddfast.reference.relu_max_pool2d import lenet_forward_ref, relu_max_pool2d_ref

__all__ = ["PoolCase", "CASES", "MODEL_CASES", "MODES", "PROVIDERS", "make_fn", "min_bytes", "peak_memory_bytes"]

MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("reference", "cpu")


@dataclasses.dataclass(frozen=True)
class PoolCase:
    name: str
    shape: tuple  # [N, C, H, W] of the pool's input; for a model case: [N, 1, 28, 28]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    model: bool = False


CASES = [
    PoolCase(f"{tag}_{dt}_{fmt}", shape, dtype, fmt == "cl")
    for tag, shape in (("pool1_1024x6x28x28", (1024, 6, 28, 28)), ("pool2_1024x16x10x10", (1024, 16, 10, 10)))
    for dt, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16))
    for fmt in ("nchw", "cl")
]
MODEL_CASES = [PoolCase("lenet28_N1024_f32", (1024, 1, 28, 28), model=True)]


def min_bytes(case: PoolCase, mode: str) -> int:
    """Bytes the fused op must move: fwd reads x, writes out and a uint8 code; bwd reads grad_out and
    the code and writes grad_in (a floor for the achieved-bandwidth figure)."""
    N, C, H, W = case.shape
    e = torch.finfo(case.dtype).bits // 8
    n_in, n_out = N * C * H * W, N * C * (H // 2) * (W // 2)
    fwd = n_in * e + n_out * (e + 1)
    return fwd + (n_out * (e + 1) + n_in * e if mode == "fwd+bwd" else 0)


def _model_fn(case: PoolCase, provider: str, mode: str):
    torch.manual_seed(0)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    net = LeNet(1, 10, case.shape[-1]).to(case.dtype, memory_format=fmt)
    model = (lambda t: lenet_forward_ref(net, t)) if provider == "reference" else net
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=g).to(case.dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (case.shape[0],), generator=g)
    params = list(net.parameters())
    if mode == "fwd":
        return torch.no_grad()(lambda: model(x))
    return lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params)


def make_fn(case: PoolCase, provider: str, mode: str):
    """A zero-argument callable running ``mode`` of ``case`` on ``provider``."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")
    if case.model:
        return _model_fn(case, provider, mode)
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = torch.randn(case.shape, generator=g).to(case.dtype).contiguous(memory_format=fmt)
    op = relu_max_pool2d_ref if provider == "reference" else lambda t: relu_max_pool2d(t, backend=provider)
    if mode == "fwd":
        return lambda: op(x)
    x.requires_grad_(True)
    N, C, H, W = case.shape
    grad_out = torch.randn(N, C, H // 2, W // 2, generator=g).to(case.dtype).contiguous(memory_format=fmt)
    return lambda: torch.autograd.grad(op(x), x, grad_out)
