"""pytest-benchmark: torch.compile (Inductor, fullgraph=True) vs eager for steps built on the fused ops.

Cases (one group each; providers ``eager`` and ``compiled``):

* ``lenet_step``   — LeNet training step on [64, 1, 28, 28]: forward (two fused ReLU + 2×2 max-pools),
  cross-entropy, gradients (``torch.func.grad_and_value``), SGD update.
* ``ldrr_step``    — LD-RR label step: ``ridge_label_metagrad`` (N=100 base features, d=84, C=10, M=256).
* ``krr_outer``    — KRR-ST outer loss and its gradient w.r.t. the support features through ``krr_predict``
  (support 100×512, 256 queries), then a step on them.
* ``fewshot_head`` — a ridge head per task, 16 tasks × (25 support, 75 query) × d=64, loss, gradient, step.

    python -m pytest bench/bench_compile.py --benchmark-only --benchmark-group-by=group
    python bench/bench_compile.py            # a quick table: median eager / compiled time and the speed-up

The compiled function is built (and warmed up: compilation excluded) before timing. CPU numbers only
here; on a GPU set DDFAST_BENCH_DEVICE=cuda (the harness's variable) to time CUDA tensors.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from ddfast.models import LeNet
from ddfast.ops.label_metagrad import ridge_label_metagrad
from ddfast.ops.ridge_solve import krr_predict, ridge_weights

DEVICE = torch.device(os.environ.get("DDFAST_BENCH_DEVICE", "cpu"))


def _lenet():
    torch.manual_seed(0)
    model = LeNet(1, 10, 28).to(DEVICE).eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = torch.randn(64, 1, 28, 28, device=DEVICE), torch.randint(0, 10, (64,), device=DEVICE)

    def step(params, x, y):
        def loss_fn(p):
            return F.cross_entropy(functional_call(model, {**p, **buffers}, (x,)), y)

        grads, loss = grad_and_value(loss_fn)(params)
        return loss, {k: p - 0.01 * grads[k] for k, p in params.items()}

    return step, (params, x, y)


def _ldrr():
    g = torch.Generator().manual_seed(0)
    N, d, C, M = 100, 84, 10, 256
    zb, zr = torch.randn(N, d, generator=g), torch.randn(M, d, generator=g)
    y = torch.softmax(torch.randn(N, C, generator=g), -1)
    yr, w0 = torch.randint(0, C, (M,), generator=g), 0.01 * torch.randn(d + 1, C, generator=g)

    def step(zb, y, zr, yr, w0):
        loss, grad, _, w = ridge_label_metagrad(zb, y, zr, yr, w0, pseudo_lr=0.1, lam=1.0, check_finite=False)
        return loss, y - 0.5 * grad, w

    return step, tuple(t.to(DEVICE) for t in (zb, y, zr, yr, w0))


def _krr():
    g = torch.Generator().manual_seed(0)
    zs, ys = torch.randn(100, 512, generator=g), torch.randn(100, 10, generator=g)
    zq, yq = torch.randn(256, 512, generator=g), torch.randn(256, 10, generator=g)

    def step(zq, zs, ys, yq):
        grad, loss = grad_and_value(lambda s: F.mse_loss(krr_predict(zq, s, ys, 1e-2), yq))(zs)
        return loss, zs - 0.1 * grad

    return step, tuple(t.to(DEVICE) for t in (zq, zs, ys, yq))


def _fewshot():
    g = torch.Generator().manual_seed(0)
    T, S, Q, d, C = 16, 25, 75, 64, 5
    zs, ys = torch.randn(T, S, d, generator=g), torch.randint(0, C, (T, S), generator=g)
    zq, yq = torch.randn(T, Q, d, generator=g), torch.randint(0, C, (T, Q), generator=g)

    def loss_fn(zs, ys, zq, yq):
        W = ridge_weights(zs, F.one_hot(ys, C).to(zs.dtype), 1.0, bias=True)
        return F.cross_entropy((zq @ W[:, :-1] + W[:, -1:]).flatten(0, 1), yq.flatten())

    def step(zs, ys, zq, yq):
        grad, loss = grad_and_value(loss_fn)(zs, ys, zq, yq)
        return loss, zs - 0.1 * grad

    return step, tuple(t.to(DEVICE) for t in (zs, ys, zq, yq))


CASES = {"lenet_step": _lenet, "ldrr_step": _ldrr, "krr_outer": _krr, "fewshot_head": _fewshot}
_BUILT: dict = {}


def build(case: str, provider: str):
    """``(fn, args)`` for a case and provider; the compiled function is compiled and warmed up once."""
    key = (case, provider)
    if key not in _BUILT:
        step, args = CASES[case]()
        if provider == "compiled":  # every step is one graph: gradients by torch.func, no .backward()
            step = torch.compile(step, fullgraph=True)
            for _ in range(2):
                step(*args)
        _BUILT[key] = (step, args)
    return _BUILT[key]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", ["eager", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_compile(benchmark, case, provider):
    benchmark.group = f"compile:{case}"
    benchmark.extra_info.update(device=str(DEVICE), torch=torch.__version__, provider=provider)
    fn, args = build(case, provider)

    def run():
        out = fn(*args)
        _sync()
        return out

    benchmark(run)


def _median_ms(fn, args, reps=20):
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn(*args)
        _sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    print(f"device {DEVICE}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'case':14s} {'eager ms':>10s} {'compiled ms':>12s} {'speed-up':>9s}")
    for case in CASES:
        try:
            e = _median_ms(*build(case, "eager"))
            c = _median_ms(*build(case, "compiled"))
            print(f"{case:14s} {e:10.3f} {c:12.3f} {e / c:8.2f}x")
        except Exception as exc:  # report the case that does not compile and go on
            print(f"{case:14s} not compiled: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
