"""Benchmark cases for the label meta-gradient, shared by ``bench/bench_label_metagrad.py``
(pytest-benchmark) and ``ddfast bench label-metagrad`` (a quick table).

Modes: ``metagrad`` (the op alone: L_out and ∂L_out/∂ỹ), ``ld_iteration`` (one whole second-order
LD meta-iteration: op + label Adam step + projection + model Adam step) and ``rr_iteration`` (one
LD-RR meta-iteration). Providers: ``reference`` (backpropagation through the inner step with
``create_graph=True``) and ``cpu`` (the fused first-order path with the C++ kernels).
"""

from __future__ import annotations

import dataclasses

import torch

from ddfast.benchmarks.ridge_solve import peak_memory_bytes
from ddfast.distill.ld import LDConfig, LabelDistiller
from ddfast.models import LeNet
from ddfast.ops.label_metagrad import label_metagrad

__all__ = ["MetagradCase", "CASES", "MODES", "make_fn", "peak_memory_bytes"]


@dataclasses.dataclass(frozen=True)
class MetagradCase:
    name: str
    N: int  # base batch
    M: int = 1024  # outer (real) batch
    C: int = 10
    image_size: int = 28


CASES = [MetagradCase("lenet28_N10_M1024", 10), MetagradCase("lenet28_N50_M1024", 50)]
MODES = ("metagrad", "ld_iteration", "rr_iteration")


def _data(case: MetagradCase, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = case.image_size
    xb = torch.randn(case.N, 1, s, s, generator=g)
    y = torch.softmax(torch.randn(case.N, case.C, generator=g), -1)
    xr = torch.randn(case.M, 1, s, s, generator=g)
    yr = torch.randint(0, case.C, (case.M,), generator=g)
    return xb, y, xr, yr


def make_fn(case: MetagradCase, provider: str, mode: str):
    """A zero-argument callable running one ``mode`` step of ``case`` on ``provider``."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    torch.manual_seed(0)
    xb, y, xr, yr = _data(case)
    if mode == "metagrad":
        model = LeNet(1, case.C, case.image_size)
        return lambda: label_metagrad(model, xb, y, xr, yr, inner_lr=0.01, backend=provider)
    variant = "second_order" if mode == "ld_iteration" else "rr"
    cfg = LDConfig(variant=variant, model="lenet", outer_batch=case.M, inner_batch=case.N, backend=provider,
                   stats_gap=10**9)
    ld = LabelDistiller(xb, (xr, yr), (xr[:8], yr[:8]), case.C, cfg)
    return lambda: ld.step(xr, yr)
