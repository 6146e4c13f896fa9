"""One benchmark harness for every op: providers × modes × the distillers' shapes, rows of data, tables.

    python -m ddfast.benchmarks --quick --out bench-out            # curated subset on this device
    python -m ddfast.benchmarks --ops ridge_solve relu_max_pool2d --providers reference cpu --device cpu
    python -m ddfast.benchmarks.report bench-out/results.csv -o docs/benchmarks-cpu.md

Providers (each a column of the table; a provider that cannot run a case leaves a row with the reason):

* ``reference`` – the eager PyTorch reference (``ddfast.reference``), the baseline of every speed-up;
* ``compiled``  – ``torch.compile`` of that same reference (the strongest eager peer); compilation is in
  the warm-up, and a case where compile fails records why;
* ``triton`` / ``cuda`` / ``cpu`` – the op with that backend forced (the Triton interpreter on CPU tensors
  is a correctness tool and is never timed);
* ``auto`` – the op as users call it (dispatch's choice).

Modes: ``fwd`` (no autograd graph), ``fwd+bwd`` (forward, then the gradients of every differentiable
input with a random grad_output), ``step`` (one distiller meta-step, end to end).

Timing: on CUDA, CUDA events around each call after warm-up calls, median of the repeats; on CPU,
``time.perf_counter`` medians. Memory: ``torch.cuda.max_memory_allocated`` above the allocation before
the call on CUDA; on CPU the peak of the CPU allocator during one call (``torch.profiler`` memory events,
as the per-op benchmarks have always measured it). Speed-ups are ratios to ``reference`` and
``compiled`` of the same op, case, dtype and mode, measured in the same run.

Shapes: the distillers' own (:func:`cases`): LD / LD-RR heads N = 10–100, few-shot B = 64 with N = 32–128,
KRR-ST m = 100 / 1000 / 5000 with d = 2048–8192, C = 512 and b = 256 / 1024, KRR users' widths d = 512–8192
with N = 10–500 and 256 queries, the label meta-gradient on LeNet / ConvNet, checkpoint inner products on
ConvNet at IPC 10 / 50 with t_m = 1 / 5 / 10, ReLU + max-pool on LeNet / ConvNet activations (NCHW and
NHWC, float32 and bfloat16), ghost products on a ConvNet's layers, and the LD, LD-RR, KRR-ST and EAD
meta-steps. ``--quick`` takes a curated subset; on a CPU device every list is the small CPU list.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

__all__ = ["PROVIDERS", "MODES", "OPS", "Case", "Unsupported", "cases", "make_fn", "measure", "run", "time_fn",
           "peak_memory", "environment", "add_speedups", "write_rows", "bench_device", "bench_params",
           "run_pytest_benchmark", "main"]



def _providers() -> tuple:
    """``reference`` and ``compiled`` (the baselines), every kernel backend the registered ops declare
    (:func:`ddfast.dispatch.backend_names`), and ``auto``."""
    from ddfast.dispatch import backend_names

    return ("reference", "compiled") + tuple(b for b in backend_names() if b != "reference") + ("auto",)


PROVIDERS = _providers()
MODES = ("fwd", "fwd+bwd", "step")
OPS = ("ridge_solve", "label_metagrad", "checkpoint_grad_inner", "relu_max_pool2d", "ghost_products", "e2e")
FIELDS = ("device", "device_name", "torch", "triton", "cuda", "commit", "timestamp", "op", "case", "shape",
          "dtype", "mode", "provider", "status", "median_ms", "min_ms", "reps", "tflops", "gbps", "peak_mib",
          "speedup_vs_reference", "speedup_vs_compiled", "note")


class Unsupported(Exception):
    """A provider that cannot run a case here (the message is the reason)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: ``build(provider, mode, device)`` returns a zero-argument callable."""

    op: str
    name: str
    shape: str
    dtype: torch.dtype
    modes: tuple
    build: Callable[[str, str, torch.device], Callable[[], object]]
    flops: Callable[[str], float] | None = None  # useful FLOPs per call (achieved TFLOP/s)
    nbytes: Callable[[str], float] | None = None  # bytes the op must move (achieved GB/s)
    quick: bool = False
    cpu: bool = False  # in the small CPU list
    gpu: bool = True  # in the GPU list
    providers: tuple = PROVIDERS
    repeats: int | None = None  # cap on timed calls (long cases)


# --------------------------------------------------------------------------- provider plumbing

_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _dtype_name(dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check_provider(provider: str, device: torch.device) -> None:
    if provider == "triton" and device.type == "cpu":
        raise Unsupported("Triton on CPU tensors runs the interpreter (a correctness tool): not timed")
    if provider == "cuda" and device.type != "cuda":
        raise Unsupported("the CUDA kernels take CUDA tensors")


def _forward(provider: str, ref_fn: Callable, op_fn: Callable) -> Callable:
    """The forward callable of ``provider``: the reference, ``torch.compile`` of it, or the op on a backend."""
    if provider == "reference":
        return ref_fn
    if provider == "compiled":
        torch._dynamo.reset()  # each case compiles afresh (the recompile limit would silently fall back)
        return torch.compile(ref_fn)
    return functools.partial(op_fn, backend=provider)


def _with_mode(forward: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor], mode: str, seed: int = 1):
    """``fwd``: the forward under no_grad. ``fwd+bwd``: forward and the input gradients for a fixed random
    grad_output (drawn on the first call, which the harness makes during warm-up)."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return forward()
        return fwd
    state = {}

    def fwd_bwd():
        out = forward()
        if "g" not in state:
            g = torch.Generator().manual_seed(seed)
            state["g"] = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device, out.dtype)
        return torch.autograd.grad(out, list(inputs), state["g"])
    return fwd_bwd


def _leaf(t: torch.Tensor, device, requires_grad=True, memory_format=torch.contiguous_format) -> torch.Tensor:
    return t.to(device).contiguous(memory_format=memory_format).requires_grad_(requires_grad)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- ridge / kernel-ridge solve


@dataclasses.dataclass(frozen=True)
class _Ridge:
    fn: str  # ridge_weights | krr_predict
    B: int
    N: int
    d: int
    C: int
    M: int = 0
    reg: str = "absolute"
    lam: float = 1e-3
    bias: bool = False
    detach_reg: bool = False

    def flops(self, mode: str) -> float:
        from ddfast.benchmarks.ridge_solve import RidgeCase

        return RidgeCase("", self.fn, self.B, self.N, self.d, self.C, self.M, self.reg, self.lam, self.bias,
                         self.detach_reg).flops("fwd+bwd" if mode == "fwd+bwd" else "fwd")

    def build(self, provider, mode, device):
        from ddfast.ops.ridge_solve import krr_predict, ridge_weights
        from ddfast.reference.ridge_solve import krr_predict_ref, ridge_weights_ref

        _check_provider(provider, device)
        g = _gen()
        lead = (self.B,) if self.B > 1 else ()
        Z = _leaf(torch.randn(*lead, self.N, self.d, generator=g), device)
        Y = _leaf(torch.randn(*lead, self.N, self.C, generator=g), device)
        kw = dict(reg=self.reg, detach_reg=self.detach_reg, bias=self.bias)
        if self.fn == "ridge_weights":
            inputs = (Z, Y)
            fwd = _forward(provider, lambda: ridge_weights_ref(Z, Y, self.lam, **kw),
                           lambda backend: ridge_weights(Z, Y, self.lam, backend=backend, **kw))
        else:
            Zq = _leaf(torch.randn(*lead, self.M, self.d, generator=g), device)
            inputs = (Zq, Z, Y)
            fwd = _forward(provider, lambda: krr_predict_ref(Zq, Z, Y, self.lam, **kw),
                           lambda backend: krr_predict(Zq, Z, Y, self.lam, backend=backend, **kw))
        return _with_mode(fwd, inputs, mode)


def _ridge_cases() -> list[Case]:
    out = []

    def add(name, r: _Ridge, quick=False, cpu=False, gpu=True, quick_cpu=None):
        shape = (f"B={r.B} " if r.B > 1 else "") + f"N={r.N} d={r.d} C={r.C}" + (f" M={r.M}" if r.M else "")
        shape += (" +bias" if r.bias else "") + (f" reg={r.reg}" if r.reg != "absolute" else "")
        out.append(Case("ridge_solve", f"{r.fn}:{name}", shape, torch.float32, ("fwd", "fwd+bwd"), r.build,
                        flops=r.flops, quick=quick, cpu=cpu, gpu=gpu))

    # LD / LD-RR heads: LeNet features (84) + bias, 10 classes (label-distillation §4.1).
    for n in (10, 50, 100):
        add(f"ld_rr_N{n}", _Ridge("ridge_weights", 1, n, 84, 10, lam=1.0, bias=True), quick=n in (10, 100),
            cpu=n in (10, 100))
    # Few-shot heads: 64 tasks, N = 32–128 support examples, 64 queries.
    for n in (32, 64, 128):
        add(f"fewshot_B64_N{n}", _Ridge("krr_predict", 64, n, 512, 10, M=64, bias=True), quick=n in (32, 128), gpu=True)
    add("fewshot_B64_N32_d64", _Ridge("krr_predict", 64, 32, 64, 10, M=16), cpu=True, gpu=False)
    # KRR-ST: m synthetic × d features, C = 512 targets, b real queries, λ·tr(K) detached (krr-st §4.1).
    for m, d, b in ((100, 2048, 256), (100, 8192, 256), (1000, 2048, 1024), (1000, 8192, 1024), (5000, 8192, 1024)):
        add(f"krr_st_m{m}_d{d}_b{b}", _Ridge("krr_predict", 1, m, d, 512, M=b, reg="trace", lam=1e-6, detach_reg=True),
            quick=(m, d) in ((100, 2048), (1000, 8192)), cpu=(m, d) == (100, 2048))
    # KRR users' feature widths: N = 10–500 support rows, 256 queries, 10 classes.
    for n in (10, 100, 500):
        for d in (512, 2048, 4096, 8192):
            add(f"krr_N{n}_d{d}", _Ridge("krr_predict", 1, n, d, 10, M=256), quick=(n, d) in ((100, 2048), (500, 8192)),
                cpu=(n, d) == (100, 512))
    return out


# --------------------------------------------------------------------------- label meta-gradient


@dataclasses.dataclass(frozen=True)
class _Metagrad:
    model: str  # lenet | convnet
    N: int
    M: int
    C: int = 10

    def build(self, provider, mode, device):
        from ddfast.models import ConvNet, LeNet
        from ddfast.ops.label_metagrad import label_metagrad

        _check_provider(provider, device)
        torch.manual_seed(0)
        if self.model == "lenet":
            net, shape = LeNet(1, self.C, 28), (1, 28, 28)
        else:
            net, shape = ConvNet(3, self.C, 32, widths=(128, 128, 128), norm="instance"), (3, 32, 32)
        net = net.to(device)
        g = _gen()
        xb = torch.randn(self.N, *shape, generator=g).to(device)
        y = torch.softmax(torch.randn(self.N, self.C, generator=g), -1).to(device)
        xr = torch.randn(self.M, *shape, generator=g).to(device)
        yr = torch.randint(0, self.C, (self.M,), generator=g).to(device)
        return _forward(provider, lambda: label_metagrad(net, xb, y, xr, yr, inner_lr=0.01, backend="reference"),
                        lambda backend: label_metagrad(net, xb, y, xr, yr, inner_lr=0.01, backend=backend))


def _metagrad_cases() -> list[Case]:
    out = []
    for model, n, m, quick, cpu in (("lenet", 10, 1024, True, False), ("lenet", 50, 1024, False, False),
                                    ("lenet", 100, 1024, True, False), ("convnet", 10, 256, False, False),
                                    ("convnet", 100, 256, True, False)):
        mg = _Metagrad(model, n, m)
        out.append(Case("label_metagrad", f"{model}_N{n}_M{m}", f"{model} N={n} M={m} C=10", torch.float32,
                        ("fwd+bwd",), mg.build, quick=quick, cpu=cpu))
    mg = _Metagrad("lenet", 10, 256)
    out.append(Case("label_metagrad", "lenet_N10_M256", "lenet N=10 M=256 C=10", torch.float32, ("fwd+bwd",), mg.build,
                    quick=True, cpu=True, gpu=False))
    return out


# --------------------------------------------------------------------------- checkpoint inner products


@dataclasses.dataclass(frozen=True)
class _CGI:
    ipc: int
    t_m: int
    n_real: int = 256
    image_size: int = 28
    widths: tuple = (32, 32, 32)
    classes: int = 10

    def build(self, provider, mode, device):
        from ddfast.models.convnet import ConvNet
        from ddfast.ops.checkpoint_grad_inner import checkpoint_grad_inner, effect_alignment_loss

        _check_provider(provider, device)
        g = _gen()
        torch.manual_seed(0)
        model = ConvNet(1, self.classes, self.image_size, widths=self.widths, norm="instance").to(device)
        ckpts = [{k: (v + 0.01 * torch.randn(v.shape, generator=g).to(device) if v.is_floating_point() else v)
                  for k, v in model.state_dict().items()} for _ in range(self.t_m)]
        shape = (1, self.image_size, self.image_size)
        n_syn = self.ipc * self.classes

        def batch(n):
            return (torch.randn(n, *shape, generator=g).to(device),
                    torch.randint(0, self.classes, (n,), generator=g).to(device))

        probe, real = batch(self.n_real), batch(self.n_real)
        images = _leaf(torch.randn(n_syn, *shape, generator=g), device)
        labels = _leaf(torch.randn(n_syn, self.classes, generator=g), device)
        if provider == "compiled":  # measured: compile traced > 5 min on CPU before refusing (label_metagrad alike)
            raise Unsupported("torch.compile of the reference is not run: it differentiates twice (create_graph), "
                              "which aot_autograd refuses (\"does not currently support double backward\")")
        backend = "reference" if provider == "reference" else provider

        def step():
            r, s = checkpoint_grad_inner(model, ckpts, probe, real, images, labels, backend=backend)
            return torch.autograd.grad(effect_alignment_loss(r, s, 1.0), (images, labels))
        return step


def _cgi_cases() -> list[Case]:
    out = []
    for ipc in (10, 50):
        for t in (1, 5, 10):
            c = _CGI(ipc, t)
            out.append(Case("checkpoint_grad_inner", f"convnet28_ipc{ipc}_t{t}",
                            f"ConvNet 32-32-32 1×28×28 |S|={10 * ipc} |P|=|D|=256 t_m={t}", torch.float32, ("fwd+bwd",),
                            c.build, quick=(ipc, t) in ((10, 5), (50, 10)), repeats=10))
    c = _CGI(1, 2, n_real=64, widths=(16, 16))
    out.append(Case("checkpoint_grad_inner", "convnet28_ipc1_t2_small", "ConvNet 16-16 1×28×28 |S|=10 |P|=|D|=64 t_m=2",
                    torch.float32, ("fwd+bwd",), c.build, quick=True, cpu=True, gpu=False))
    return out


# --------------------------------------------------------------------------- ReLU + 2×2 max-pool


@dataclasses.dataclass(frozen=True)
class _Pool:
    shape: tuple
    dtype: torch.dtype
    channels_last: bool

    def nbytes(self, mode: str) -> float:
        N, C, H, W = self.shape
        e = torch.finfo(self.dtype).bits // 8
        n_in, n_out = N * C * H * W, N * C * (H // 2) * (W // 2)
        fwd = n_in * e + n_out * (e + 1)  # read x, write out and a one-byte window code
        return fwd + (n_out * (e + 1) + n_in * e if mode == "fwd+bwd" else 0)

    def build(self, provider, mode, device):
        from ddfast.ops.relu_max_pool2d import relu_max_pool2d
        from ddfast.reference.relu_max_pool2d import relu_max_pool2d_ref

        _check_provider(provider, device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = _leaf(torch.randn(self.shape, generator=_gen()).to(self.dtype), device, mode == "fwd+bwd", fmt)
        fwd = _forward(provider, lambda: relu_max_pool2d_ref(x), lambda backend: relu_max_pool2d(x, backend=backend))
        return _with_mode(fwd, (x,), mode)


def _pool_cases() -> list[Case]:
    out = []
    shapes = (("lenet_pool1", (1024, 6, 28, 28)), ("lenet_pool2", (1024, 16, 10, 10)),
              ("convnet_pool1", (256, 128, 32, 32)), ("convnet_pool2", (256, 128, 16, 16)))
    quick = {("lenet_pool1", "fp32", False), ("convnet_pool1", "fp32", True), ("convnet_pool1", "bf16", False)}
    for tag, shape in shapes:
        for dt in ("fp32", "bf16"):
            for cl in (False, True):
                p = _Pool(shape, _DTYPES[dt], cl)
                fmt = "nhwc" if cl else "nchw"
                out.append(Case("relu_max_pool2d", f"{tag}_{fmt}", "×".join(map(str, shape)) + f" {fmt.upper()}",
                                _DTYPES[dt], ("fwd", "fwd+bwd"), p.build, nbytes=p.nbytes, quick=(tag, dt, cl) in quick))
    for tag, shape in (("lenet_pool1_small", (64, 6, 28, 28)), ("lenet_pool2_small", (64, 16, 10, 10))):
        for dt, cl in (("fp32", False), ("fp32", True), ("bf16", False)):
            p = _Pool(shape, _DTYPES[dt], cl)
            fmt = "nhwc" if cl else "nchw"
            out.append(Case("relu_max_pool2d", f"{tag}_{fmt}", "×".join(map(str, shape)) + f" {fmt.upper()}",
                            _DTYPES[dt], ("fwd", "fwd+bwd"), p.build, nbytes=p.nbytes,
                            quick=(tag, dt, cl) == ("lenet_pool1_small", "fp32", False), cpu=True, gpu=False))
    return out


# --------------------------------------------------------------------------- ghost products


@dataclasses.dataclass(frozen=True)
class _Ghost:
    N: int
    P: int
    K: int
    O: int

    def flops(self, mode: str) -> float:
        from ddfast.benchmarks.ghost_products import layer_flops
        from ddfast.ops.ghost_products import ghost_is_cheaper

        return layer_flops(self.P, self.K, self.O, self.N, "norms", ghost_is_cheaper(self.P, self.O, self.K))

    def build(self, provider, mode, device):
        from ddfast.ops.ghost_products import ghost_norms
        from ddfast.reference.ghost_products import ghost_norms_ref

        _check_provider(provider, device)
        g = _gen()
        A = _leaf(torch.randn(self.N, self.P, self.K, generator=g), device, mode == "fwd+bwd")
        G = _leaf(torch.randn(self.N, self.P, self.O, generator=g), device, mode == "fwd+bwd")
        fwd = _forward(provider, lambda: ghost_norms_ref(A, G), lambda backend: ghost_norms(A, G, backend=backend))
        return _with_mode(fwd, (A, G), mode)


def _ghost_cases() -> list[Case]:
    out = []
    # Rows of a ConvNet 16-32-64 on 28×28 at N = 256 (P positions, K = c_in·k², O = c_out), and its head.
    for name, (n, p, k, o), quick, cpu in (("conv1", (256, 784, 10, 16), False, False),
                                           ("conv2", (256, 196, 145, 32), True, False),
                                           ("conv3", (256, 49, 289, 64), True, True),
                                           ("head", (256, 1, 577, 10), False, True)):
        gh = _Ghost(n, p, k, o)
        out.append(Case("ghost_products", f"ghost_norms:{name}", f"N={n} P={p} K={k} O={o}", torch.float32,
                        ("fwd", "fwd+bwd"), gh.build, flops=gh.flops, quick=quick, cpu=cpu))
    return out


# --------------------------------------------------------------------------- end-to-end meta-steps


def _e2e_build(workload: str, dtype: torch.dtype, small: bool):
    """Providers map to the modes of :mod:`ddfast.benchmarks.e2e`: reference → reference-fp32, auto →
    fused-fp32 / fused-bf16 (by dtype), compiled → fused-bf16-compile. Data: random tensors of the real
    shapes, on the benchmark device."""
    def build(provider, mode, device):
        from ddfast.benchmarks import e2e

        if provider == "reference" and dtype != torch.float32:
            raise Unsupported("the reference meta-step is float32 (the baseline of every mode)")
        if provider == "compiled" and dtype != torch.bfloat16:
            raise Unsupported("compiled meta-steps are timed in bf16 (fused-bf16-compile)")
        if provider not in ("reference", "auto", "compiled"):
            raise Unsupported("meta-steps run as users run them: reference, auto or compiled")
        e2e_mode = {"reference": "reference-fp32", "auto": "fused-fp32" if dtype == torch.float32 else "fused-bf16",
                    "compiled": "fused-bf16-compile"}[provider]
        if not e2e.supported(workload, e2e_mode):
            raise Unsupported(f"{workload} has no {e2e_mode} mode (it differentiates the network twice)")
        if provider == "compiled":
            torch._dynamo.reset()
        return e2e.make_step(workload, e2e_mode, device=device, data="random", small=small).fn
    return build


def _e2e_cases() -> list[Case]:
    from ddfast.benchmarks.e2e import WORKLOADS

    out = []
    for w in WORKLOADS:
        for dt in ("fp32", "bf16"):
            out.append(Case("e2e", w, _E2E_SHAPES.get(w, w), _DTYPES[dt], ("step",), _e2e_build(w, _DTYPES[dt], False),
                            quick=w in ("ld-rr", "krr-st-m1000-b1024") or (w in ("ld-second-order", "ead-tm5") and dt == "fp32"),
                            providers=("reference", "compiled", "auto"), repeats=10))
    out.append(Case("e2e", "ld-rr-small", "LD-RR LeNet 1×28×28 N=20 N_i=10 N_o=128", torch.float32, ("step",),
                    _e2e_build("ld-rr", torch.float32, True), quick=True, cpu=True, gpu=False, providers=("reference", "compiled", "auto")))
    return out


_E2E_SHAPES = {
    "ld-rr": "LD-RR LeNet 1×28×28 N=100 N_i=50 N_o=1024",
    "ld-second-order": "LD LeNet 1×28×28 N=100 N_i=50 N_o=1024",
    "krr-st-m100-b256": "KRR-ST ConvNet-D3 3×32×32 m=100 b=256 d_y=512",
    "krr-st-m1000-b1024": "KRR-ST ConvNet-D3 3×32×32 m=1000 b=1024 d_y=512",
    "ead-tm5": "EAD ConvNet 32-32-32 1×28×28 IPC 10 |P|=|D|=256 t_m=5",
}

_CASE_BUILDERS = {"ridge_solve": _ridge_cases, "label_metagrad": _metagrad_cases, "checkpoint_grad_inner": _cgi_cases,
                  "relu_max_pool2d": _pool_cases, "ghost_products": _ghost_cases, "e2e": _e2e_cases}


def cases(op: str, device: str = "cuda", quick: bool = False) -> list[Case]:
    """The cases of ``op`` for a device type ("cuda": the distillers' shapes; "cpu": the small CPU list),
    the curated subset when ``quick``. The ``bench/bench_<op>.py`` files parametrize over these."""
    if op not in _CASE_BUILDERS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    on_gpu = device != "cpu"
    return [c for c in _CASE_BUILDERS[op]() if (c.gpu if on_gpu else c.cpu) and (c.quick or not quick)]


def make_fn(case: Case, provider: str, mode: str, device) -> Callable[[], object]:
    """The zero-argument callable of ``case`` / ``provider`` / ``mode`` on ``device`` (raises
    :class:`Unsupported` with the reason when the provider cannot run it here)."""
    device = torch.device(device)
    if provider not in case.providers:
        raise Unsupported(f"{provider} is not a provider of {case.op}")
    return case.build(provider, mode, device)


def warmup_calls(case: Case, provider: str) -> int:
    if case.op == "e2e":
        return 3 if provider == "compiled" else 2
    return 3 if provider == "compiled" else 2


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device, repeats: int = 20, warmup: int = 2, budget_s: float = 2.0):
    """(median ms, min ms, timed calls): ``warmup`` untimed calls, then up to ``repeats`` timed ones
    (fewer when they would exceed ``budget_s``; at least 3). CUDA events on a GPU, perf_counter on CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    t_start = time.perf_counter()
    for i in range(max(repeats, 1)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - t_start > budget_s:
            break
    return statistics.median(times), min(times), len(times)


def peak_memory(fn: Callable[[], object], device) -> float:
    """Peak MiB allocated during one call above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from ddfast.benchmarks.ridge_solve import peak_memory_bytes

    return peak_memory_bytes(fn) / 2**20


def _git_commit() -> str:
    if os.environ.get("DDFAST_COMMIT"):
        return os.environ["DDFAST_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """Device, versions and commit for every row."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return dict(device=device.type, device_name=name, torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda or "none", commit=_git_commit(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def _first_line(exc: BaseException, limit: int = 200) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:limit] if msg else ''}"


def measure(case: Case, provider: str, mode: str, device, repeats: int, memory: bool = True,
            budget_s: float = 2.0) -> dict:
    """One row: time, throughput and peak memory of ``case`` on ``provider`` in ``mode`` (or why not)."""
    from ddfast.errors import BackendUnavailableError

    device = torch.device(device)
    row = dict(op=case.op, case=case.name, shape=case.shape, dtype=_dtype_name(case.dtype), mode=mode, provider=provider)
    try:
        fn = make_fn(case, provider, mode, device)
        fn()  # first call: compile / kernel build / allocator; an unsupported input raises here
    except Unsupported as exc:
        return {**row, "status": "skipped", "note": str(exc)}
    except BackendUnavailableError as exc:
        return {**row, "status": "skipped", "note": " ".join(str(exc).split())[:300]}
    except Exception as exc:  # compile failures and kernel errors are results too
        status = "skipped" if provider == "compiled" else "error"
        prefix = "torch.compile failed: " if provider == "compiled" else ""
        return {**row, "status": status, "note": prefix + _first_line(exc)}
    try:
        reps = min(repeats, case.repeats) if case.repeats else repeats
        med, mn, n = time_fn(fn, device, reps, warmup=warmup_calls(case, provider) - 1, budget_s=budget_s)
        peak = peak_memory(fn, device) if memory else float("nan")
    except Exception as exc:
        return {**row, "status": "error", "note": _first_line(exc)}
    flops = case.flops(mode) if case.flops else None
    nbytes = case.nbytes(mode) if case.nbytes else None
    return {**row, "status": "ok", "median_ms": med, "min_ms": mn, "reps": n,
            "tflops": flops / (med * 1e-3) / 1e12 if flops else None,
            "gbps": nbytes / (med * 1e-3) / 1e9 if nbytes else None, "peak_mib": peak, "note": ""}


def add_speedups(rows: list[dict]) -> list[dict]:
    """Fill ``speedup_vs_reference`` / ``speedup_vs_compiled`` from rows of the same op, case, mode and
    dtype (an e2e bf16 row is compared with the float32 reference: the baseline step)."""
    def key(r, dtype=None):
        return (r["op"], r["case"], r["mode"], dtype or r["dtype"])

    ok = {(key(r), r["provider"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        r.setdefault("speedup_vs_reference", None)
        r.setdefault("speedup_vs_compiled", None)
        if r.get("status") != "ok":
            continue
        for prov, field in (("reference", "speedup_vs_reference"), ("compiled", "speedup_vs_compiled")):
            base = ok.get((key(r), prov)) or (ok.get((key(r, "fp32"), prov)) if r["op"] == "e2e" else None)
            if base is not None and r["median_ms"]:
                r[field] = float(base["median_ms"]) / float(r["median_ms"])
    return rows


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_rows(rows: list[dict], out_dir: str, stem: str = "results") -> tuple[str, str]:
    """``<out_dir>/<stem>.csv`` and ``.json`` (every row, skipped ones with their reason)."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path = os.path.join(out_dir, f"{stem}.csv"), os.path.join(out_dir, f"{stem}.json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in FIELDS})
    with open(json_path, "w") as f:
        json.dump([{k: r.get(k) for k in FIELDS} for r in rows], f, indent=1, default=str)
    return csv_path, json_path


def run(ops: Sequence[str] = OPS, providers: Sequence[str] = PROVIDERS, device=None, quick: bool = False,
        repeats: int | None = None, memory: bool = True, out_dir: str | None = None, time_budget_s: float | None = None,
        budget_per_cell_s: float | None = None, progress=print) -> list[dict]:
    """Every case × mode × provider of ``ops``; rows (with speed-ups) written to ``out_dir`` as they come.

    Kernel providers run first and ``compiled`` last, so a run cut short by ``time_budget_s`` keeps the
    kernels' numbers; cells not started within the budget are rows with status ``skipped``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    repeats = repeats or (50 if on_gpu else 5)
    budget_per_cell_s = budget_per_cell_s or (1.0 if on_gpu else 2.0)
    env = environment(device)
    cells = []
    for op in ops:
        for case in cases(op, device.type, quick):
            for mode in case.modes:
                for p in providers:
                    if p in case.providers:
                        cells.append((case, mode, p))
    # Stable sort: compiled cells last, and among them the ops whose reference differentiates twice
    # (compile refuses double backward, after tracing for a while) at the very end.
    late = ("e2e", "label_metagrad", "checkpoint_grad_inner")
    cells.sort(key=lambda c: (c[2] == "compiled", c[2] == "compiled" and c[0].op in late))
    rows: list[dict] = []
    compile_failed: dict[str, str] = {}  # op -> why torch.compile failed on its first case
    t0 = time.perf_counter()
    for case, mode, provider in cells:
        base = dict(op=case.op, case=case.name, shape=case.shape, dtype=_dtype_name(case.dtype), mode=mode,
                    provider=provider)
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            row = {**base, "status": "skipped", "note": f"time budget of {time_budget_s:.0f} s spent"}
        elif provider == "compiled" and case.op in compile_failed:
            row = {**base, "status": "skipped", "note": compile_failed[case.op]}
        else:
            row = measure(case, provider, mode, device, repeats, memory, budget_per_cell_s)
            if provider == "compiled" and "double backward" in row.get("note", ""):
                compile_failed[case.op] = f"{row['note']} (first seen on {case.name}; not retried)"
            if on_gpu:
                torch.cuda.empty_cache()
        rows.append({**env, **row})
        if progress:
            if row["status"] == "ok":
                progress(f"{case.op:22s} {case.name:28s} {row['dtype']:5s} {mode:8s} {provider:10s} "
                         f"{row['median_ms']:10.3f} ms  {row['peak_mib']:9.1f} MiB")
            else:
                progress(f"{case.op:22s} {case.name:28s} {row['dtype']:5s} {mode:8s} {provider:10s} "
                         f"{row['status']}: {row['note'][:120]}")
        if out_dir:
            write_rows(add_speedups([dict(r) for r in rows]), out_dir)
    add_speedups(rows)
    if out_dir:
        write_rows(rows, out_dir)
    return rows


# --------------------------------------------------------------------------- pytest-benchmark (bench/)


def bench_device() -> torch.device:
    """``DDFAST_BENCH_DEVICE`` (cpu / cuda), else CUDA when visible."""
    name = os.environ.get("DDFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_params(op: str, providers: Sequence[str] | None = None):
    """pytest params ``(case, provider, mode)`` of ``op`` on :func:`bench_device` for ``bench/bench_<op>.py``.

    ``DDFAST_BENCH_QUICK=1`` takes the curated subset; ``DDFAST_BENCH_PROVIDERS=a,b`` limits the providers.
    """
    import pytest

    env = os.environ.get("DDFAST_BENCH_PROVIDERS")
    providers = list(providers or (env.split(",") if env else PROVIDERS))
    quick = os.environ.get("DDFAST_BENCH_QUICK", "") == "1"
    return [pytest.param(c, p, m, id=f"{c.name}-{_dtype_name(c.dtype)}-{m}-{p}")
            for c in cases(op, bench_device().type, quick) for m in c.modes for p in providers if p in c.providers]


def run_pytest_benchmark(benchmark, case: Case, provider: str, mode: str) -> None:
    """Time one harness cell with pytest-benchmark (skipping with the reason when the provider cannot run
    it); ``extra_info`` carries device, versions, commit, peak MiB and the achieved TFLOP/s or GB/s."""
    import pytest

    from ddfast.errors import BackendUnavailableError

    device = bench_device()
    try:
        fn = make_fn(case, provider, mode, device)
        for _ in range(warmup_calls(case, provider)):
            fn()
    except (Unsupported, BackendUnavailableError) as exc:
        pytest.skip(" ".join(str(exc).split())[:300])
    except Exception as exc:
        if provider == "compiled":
            pytest.skip("torch.compile failed: " + _first_line(exc))
        raise
    call = fn
    if device.type == "cuda":
        def call():
            fn()
            torch.cuda.synchronize(device)
    benchmark.group = f"{case.op} {case.name} {_dtype_name(case.dtype)} {mode}"
    benchmark.extra_info.update(environment(device))
    benchmark.extra_info.update(shape=case.shape, dtype=_dtype_name(case.dtype), mode=mode, provider=provider,
                                peak_mib=peak_memory(fn, device))
    if case.repeats:
        benchmark.pedantic(call, rounds=case.repeats, iterations=1)
    else:
        benchmark(call)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else 0.0
    if median > 0 and case.flops:
        benchmark.extra_info["tflops"] = case.flops(mode) / median / 1e12
    if median > 0 and case.nbytes:
        benchmark.extra_info["gbps"] = case.nbytes(mode) / median / 1e9


def _split(values):
    out = []
    for v in values or []:
        out += [x for x in v.split(",") if x]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ddfast.benchmarks`` (and ``ddfast bench``): run the harness, write CSV / JSON / markdown."""
    parser = argparse.ArgumentParser(prog="python -m ddfast.benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help=f"ops to run (comma or space separated; default: all of {', '.join(OPS)})")
    parser.add_argument("--providers", nargs="+", default=None, metavar="P",
                        help=f"providers (default: all of {', '.join(PROVIDERS)})")
    parser.add_argument("--quick", action="store_true", help="the curated subset of the shapes")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when visible)")
    parser.add_argument("--out", default="bench-results", help="directory for results.csv / .json / .md")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default: 50 GPU, 5 CPU)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; cells not started by then are recorded as skipped")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    ops = _split(args.ops) or list(OPS)
    providers = _split(args.providers) or list(PROVIDERS)
    for o in ops:
        if o not in OPS:
            parser.error(f"--ops: unknown op {o!r} (expected one of {', '.join(OPS)})")
    for p in providers:
        if p not in PROVIDERS:
            parser.error(f"--providers: unknown provider {p!r} (expected one of {', '.join(PROVIDERS)})")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.list:
        for op in ops:
            for c in cases(op, device.type, args.quick):
                print(f"{op:22s} {c.name:28s} {_dtype_name(c.dtype):5s} {'/'.join(c.modes):12s} {c.shape}")
        return 0
    if device.type == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    rows = run(ops, providers, device, args.quick, args.repeats, not args.no_memory, args.out, args.time_budget,
               progress=lambda s: print(s, flush=True))
    from ddfast.benchmarks.report import load_rows, markdown

    md_path = os.path.join(args.out, "results.md")
    with open(md_path, "w") as f:  # from the CSV as written: the table `report` regenerates from it, digit for digit
        f.write(markdown(load_rows(os.path.join(args.out, "results.csv"))))
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_err = sum(r["status"] == "error" for r in rows)
    print(f"{n_ok} cells timed, {n_err} errors, {len(rows) - n_ok - n_err} skipped; "
          f"{os.path.join(args.out, 'results.csv')}, results.json, results.md", flush=True)
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
