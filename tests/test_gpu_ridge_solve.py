"""The ridge / kernel-ridge solve on CUDA tensors: the distillers' shapes through ``auto`` and each compiled
backend, against the eager reference on the same device (skipped without CUDA; DDFAST_GPU_TESTS_ON_CPU=1
runs the ``auto`` cases on CPU tensors as a dry run)."""

from __future__ import annotations

import pytest
import torch

from ddfast.errors import BackendUnavailableError
from ddfast.ops import krr_predict, ridge_weights
from ddfast.reference import krr_predict_ref, ridge_weights_ref

from contract import assert_parity


def _inputs(device, *shape_sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_() for s in shape_sets]


def _run(fn, tensors, dtype):
    xs = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(out.device, dtype)
    return [out] + list(torch.autograd.grad(out, xs, g))


def _check(kernel, reference, tensors, names):
    got = _run(kernel, tensors, torch.float32)
    r64 = _run(reference, tensors, torch.float64)
    r32 = _run(reference, tensors, torch.float32)
    for what, a, b, c in zip(["output"] + [f"grad {n}" for n in names], got, r64, r32):
        assert a.device == b.device
        assert_parity(what, a, b, c)


def _backend_or_skip(backend, device):
    if backend != "auto" and device.type == "cpu":
        pytest.skip(f"dry run on CPU: the {backend} kernels need a GPU")
    return backend


# KRR-ST (krr-st §4.1): m synthetic rows, d features, C = d_y = 512 targets, b queries, λ·tr(K) detached.
# m = 93..128 at C = 512 is where the one-block CUDA solve runs out of shared memory: auto must not pick it.
@pytest.mark.parametrize("m", [93, 100, 128])
def test_krr_st_shapes_never_reach_a_kernel_that_cannot_launch(gpu_device, m):
    Zq, Zs, Ys = _inputs(gpu_device, (64, 256), (m, 256), (m, 512))
    kw = dict(reg="trace", detach_reg=True)
    _check(lambda q, s, y: krr_predict(q, s, y, 1e-3, backend="auto", **kw),
           lambda q, s, y: krr_predict_ref(q, s, y, 1e-3, **kw), [Zq, Zs, Ys], ["Zq", "Zs", "Ys"])


def test_krr_st_m1000_d2048(gpu_device):
    if gpu_device.type == "cpu":
        pytest.skip("dry run on CPU: the m=1000 case is GPU-sized")
    Zq, Zs, Ys = _inputs(gpu_device, (1024, 2048), (1000, 2048), (1000, 512))
    kw = dict(reg="trace", detach_reg=True)
    _check(lambda q, s, y: krr_predict(q, s, y, 1e-3, backend="auto", **kw),
           lambda q, s, y: krr_predict_ref(q, s, y, 1e-3, **kw), [Zq, Zs, Ys], ["Zq", "Zs", "Ys"])


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("B, N, d, C, bias", [(1, 10, 84, 10, True), (1, 100, 84, 10, True), (64, 32, 64, 10, False),
                                             (8, 17, 33, 5, True), (1, 1, 7, 3, False)])
def test_ridge_weights_heads(gpu_device, backend, B, N, d, C, bias):
    backend = _backend_or_skip(backend, gpu_device)
    Z, Y = _inputs(gpu_device, (B, N, d), (B, N, C))
    try:
        _check(lambda z, y: ridge_weights(z, y, 0.5, bias=bias, backend=backend),
               lambda z, y: ridge_weights_ref(z, y, 0.5, bias=bias), [Z, Y], ["Z", "Y"])
    except BackendUnavailableError as exc:  # a declared limit (e.g. Triton's in-kernel factor size): not a failure
        assert backend != "auto", exc
        pytest.skip(str(exc).splitlines()[0][:200])


@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("B, N, d, C, M", [(64, 32, 64, 10, 16), (64, 128, 512, 10, 64), (1, 500, 512, 10, 256),
                                          (1, 100, 2048, 10, 256)])
def test_krr_predict_fewshot_and_widths(gpu_device, backend, B, N, d, C, M):
    backend = _backend_or_skip(backend, gpu_device)
    if gpu_device.type == "cpu" and B * N * d > 64 * 32 * 64:
        pytest.skip("dry run on CPU: GPU-sized case")
    Zq, Zs, Ys = _inputs(gpu_device, (B, M, d), (B, N, d), (B, N, C))
    try:
        _check(lambda q, s, y: krr_predict(q, s, y, 1e-2, backend=backend),
               lambda q, s, y: krr_predict_ref(q, s, y, 1e-2), [Zq, Zs, Ys], ["Zq", "Zs", "Ys"])
    except BackendUnavailableError as exc:
        assert backend != "auto", exc
        pytest.skip(str(exc).splitlines()[0][:200])


def test_float64_gradcheck_on_device(gpu_device):
    Zq, Zs, Ys = _inputs(gpu_device, (3, 5), (4, 5), (4, 2))
    assert torch.autograd.gradcheck(lambda q, s, y: krr_predict(q, s, y, 0.3, backend="auto"), (Zq, Zs, Ys))


@pytest.mark.parametrize("via_weights", [False, True])
def test_krr_predict_operators_on_device(gpu_device, via_weights):
    """torch.ops.ddfast.krr_predict_fwd / krr_predict_bwd (the one-call forward and its closed-form backward)
    on the device's implementation (CUDA: ATen calls under a device guard) against the CPU kernels, and
    opcheck of their registration there."""
    import ddfast._C  # noqa: F401  (registers the operators)

    g = torch.Generator().manual_seed(3)
    Zq, Zs, Ys = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 9, 12), (3, 6, 12), (3, 6, 2)])
    dev = lambda *xs: tuple(x.to(gpu_device) for x in xs)  # noqa: E731
    args = (0.2, 1, 0.5, via_weights)
    want = torch.ops.ddfast.krr_predict_fwd(Zq, Zs, Ys, *args)
    got = torch.ops.ddfast.krr_predict_fwd(*dev(Zq, Zs, Ys), *args)
    assert got[0].device == gpu_device and int(got[3]) == int(want[3]) == 0
    for a, b in zip(got[:3], want[:3]):  # P, L, α
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-9)
    torch.library.opcheck(torch.ops.ddfast.krr_predict_fwd.default, (*dev(Zq, Zs, Ys), *args))
    G = torch.randn(3, 9, 2, generator=g, dtype=torch.float64)
    bwd_args = (0.5, 0.2 / 6, True, True, True)
    want = torch.ops.ddfast.krr_predict_bwd(G, Zq, Zs, want[1], want[2], *bwd_args)
    got_b = torch.ops.ddfast.krr_predict_bwd(*dev(G, Zq, Zs), got[1], got[2], *bwd_args)
    for a, b in zip(got_b, want):
        assert a.device == gpu_device
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-9)
    torch.library.opcheck(torch.ops.ddfast.krr_predict_bwd.default, (*dev(G, Zq, Zs), got[1], got[2], *bwd_args))
