"""Kernel-level entry points (KIP / RFAD / analytic NTK-NNGP users): ridge_from_gram, krr_predict_from_gram,
the kernel constant ``bias=c``, ``out_dtype``, a shared support set across batched queries, 1-D targets."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from ddfast.ops import krr_predict, krr_predict_from_gram, ridge_from_gram, ridge_weights
from ddfast.reference.ridge_solve import krr_predict_from_gram_ref

F64 = torch.float64


def eager_krr_gram(K_ss, K_qs, Y, lam, reg="absolute", c=0.0):
    """The formulation KIP / RFAD code writes: (K_qs + c)(K_ss + c + μI)⁻¹Y with torch.linalg.solve."""
    K = K_ss + c
    N = K.shape[-1]
    tr = K.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    mu = {"absolute": lam, "trace_mean": lam * tr / N, "trace": lam * tr}[reg]
    return (K_qs + c) @ torch.linalg.solve(K + mu * torch.eye(N, dtype=K.dtype), Y)


def kernels(B=(), N=6, M=4, p=9, dtype=F64):
    Fs, Fq = torch.randn(*B, N, p, dtype=dtype), torch.randn(*B, M, p, dtype=dtype)
    return Fs, Fq, Fs @ Fs.mT, Fq @ Fs.mT


@pytest.mark.parametrize("reg", ["absolute", "trace_mean", "trace"])
@pytest.mark.parametrize("c", [0.0, 0.01, 1.0])
def test_from_gram_matches_eager(reg, c):
    _, _, K_ss, K_qs = kernels((2,))
    Y = torch.randn(2, 6, 3, dtype=F64)
    expected = eager_krr_gram(K_ss, K_qs, Y, 0.1, reg, c)
    torch.testing.assert_close(krr_predict_from_gram(K_ss, K_qs, Y, 0.1, reg=reg, bias=c), expected)
    alpha = ridge_from_gram(K_ss, Y, 0.1, reg=reg, bias=c)
    torch.testing.assert_close((K_qs + c) @ alpha, expected)


def test_from_gram_gradcheck_and_double_backward():
    _, _, K_ss, K_qs = kernels((1,), N=4, M=2, p=6)
    Y = torch.randn(1, 4, 2, dtype=F64)
    lam = torch.tensor([0.3], dtype=F64)
    args = tuple(x.clone().requires_grad_() for x in (K_ss, K_qs, Y, lam))

    def f(K_ss, K_qs, Y, lam):
        K_ss = (K_ss + K_ss.mT) / 2  # gradcheck perturbs entries one at a time: keep the kernel symmetric
        return krr_predict_from_gram(K_ss, K_qs, Y, lam, reg="trace_mean", bias=0.01)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_feature_bias_constant_equals_gram_bias():
    """krr_predict(bias=c) is the kernel K = ZqZsᵀ + c, for c = 1 the ones column of bias=True."""
    Fs, Fq, K_ss, K_qs = kernels((2,))
    Y = torch.randn(2, 6, 3, dtype=F64)
    for backend in ("cpu", "reference"):
        for c in (0.01, 2.5):
            torch.testing.assert_close(krr_predict(Fq, Fs, Y, 1e-2, reg="trace", bias=c, backend=backend),
                                       eager_krr_gram(K_ss, K_qs, Y, 1e-2, "trace", c))
        torch.testing.assert_close(krr_predict(Fq, Fs, Y, 1e-2, bias=1.0, backend=backend),
                                   krr_predict(Fq, Fs, Y, 1e-2, bias=True, backend=backend))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("N", [40, 300])
def test_rfad_style_swap(backend, N):
    """RFAD: float32 random features F, K = 2FFᵀ + 0.01, a float64 solve with λ·tr(K)/N, float64 out.

    ddfast must match the eager formulation (Gram in float32, solve in float64) within the 2× rule against a
    float64 truth, forward and the gradient wrt the support features; both the feature and the kernel entry.
    """
    torch.manual_seed(3)
    p, M, C, lam = 64, 30, 10, 1e-6
    Fs64, Fq64 = torch.randn(N, p, dtype=F64) / p**0.5, torch.randn(M, p, dtype=F64) / p**0.5
    Y = torch.nn.functional.one_hot(torch.arange(N) % C, C).to(F64) - 0.1
    G = torch.randn(M, C, dtype=F64)

    def eager(Fs, Fq, Y):  # RFAD's own code path
        K_ss = (2 * Fs @ Fs.mT + 0.01).double()
        K_qs = (2 * Fq @ Fs.mT + 0.01).double()
        return eager_krr_gram(K_ss, K_qs, Y.double(), lam, "trace_mean")

    def ours_features(Fs, Fq, Y):
        r2 = 2**0.5
        return krr_predict(r2 * Fq, r2 * Fs, Y, lam, reg="trace_mean", bias=0.01, solve_dtype=F64,
                           out_dtype=F64, backend=backend)

    def ours_scaled(Fs, Fq, Y):  # the kernel scale folded into c (trace_mean: λ unchanged)
        return krr_predict(Fq, Fs, Y, lam, reg="trace_mean", scale=2.0, bias=0.01, solve_dtype=F64,
                           out_dtype=F64, backend=backend)

    def ours_gram(Fs, Fq, Y):
        return krr_predict_from_gram(2 * Fs @ Fs.mT, 2 * Fq @ Fs.mT, Y, lam, reg="trace_mean", bias=0.01,
                                     solve_dtype=F64, out_dtype=F64)

    def run(fn, dtype):
        Fs = Fs64.to(dtype).requires_grad_()
        P = fn(Fs, Fq64.to(dtype), Y.to(dtype))
        g, = torch.autograd.grad(P, Fs, G.to(P.dtype))
        return P, g

    truth_P, truth_g = run(eager, F64)
    eager_P, eager_g = run(eager, torch.float32)
    for fn in (ours_features, ours_scaled, ours_gram):
        P, g = run(fn, torch.float32)
        assert P.dtype == F64 and g.dtype == torch.float32
        for ours, ref32, truth in ((P, eager_P, truth_P), (g, eager_g, truth_g)):
            err, err_eager = (ours.double() - truth).abs().max(), (ref32.double() - truth).abs().max()
            assert err <= 2 * err_eager + 1e-6 * truth.abs().max(), (fn.__name__, float(err), float(err_eager))


def test_shared_support_broadcasts_over_query_batches():
    Fs, _, K_ss, _ = kernels(())
    Fq = torch.randn(3, 5, 9, dtype=F64)
    K_qs = Fq @ Fs.mT
    Y = torch.randn(6, 2, dtype=F64)
    loop = torch.stack([eager_krr_gram(K_ss, K_qs[i], Y, 0.2) for i in range(3)])
    torch.testing.assert_close(krr_predict_from_gram(K_ss, K_qs, Y, 0.2), loop)
    for backend in ("cpu", "reference"):
        torch.testing.assert_close(krr_predict(Fq, Fs, Y, 0.2, backend=backend), loop)


def test_one_dimensional_targets():
    Fs, Fq, K_ss, K_qs = kernels(())
    y = torch.randn(6, dtype=F64)
    P = krr_predict_from_gram(K_ss, K_qs, y, 0.2)
    assert P.shape == (4,)
    torch.testing.assert_close(P, eager_krr_gram(K_ss, K_qs, y[:, None], 0.2)[:, 0])
    assert ridge_from_gram(K_ss, y, 0.2).shape == (6,)
    for backend in ("cpu", "reference"):
        torch.testing.assert_close(krr_predict(Fq, Fs, y, 0.2, backend=backend), P)
        W = ridge_weights(Fs, y, 0.2, backend=backend)
        assert W.shape == (9,)
        torch.testing.assert_close(Fq @ W, P)


def test_out_dtype_keeps_float64():
    Fs, Fq, K_ss, K_qs = kernels((), dtype=torch.float32)
    Y = torch.randn(6, 2)
    P = krr_predict_from_gram(K_ss, K_qs, Y, 1e-3, solve_dtype=F64, out_dtype=F64)
    assert P.dtype == F64
    torch.testing.assert_close(P, eager_krr_gram(K_ss.double(), K_qs.double(), Y.double(), 1e-3))
    for backend in ("cpu", "reference"):
        P2 = krr_predict(Fq, Fs, Y, 1e-3, solve_dtype=F64, out_dtype=F64, backend=backend)
        assert P2.dtype == F64
        W = ridge_weights(Fs, Y, 1e-3, solve_dtype=F64, out_dtype=F64, backend=backend)
        assert W.dtype == F64
    assert krr_predict_from_gram(K_ss, K_qs, Y, 1e-3, solve_dtype=F64).dtype == torch.float32


def test_from_gram_under_vmap_and_grad():
    _, _, K_ss, K_qs = kernels((4,))
    Y = torch.randn(4, 6, 2, dtype=F64)
    out = vmap(lambda a, b, y: krr_predict_from_gram(a, b, y, 0.1, reg="trace"))(K_ss, K_qs, Y)
    torch.testing.assert_close(out, krr_predict_from_gram_ref(K_ss, K_qs, Y, 0.1, reg="trace"))
    g = grad(lambda y: krr_predict_from_gram(K_ss[0], K_qs[0], y, 0.1).square().sum())(Y[0])
    g_ref = grad(lambda y: eager_krr_gram(K_ss[0], K_qs[0], y, 0.1).square().sum())(Y[0])
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("reg", ["absolute", "trace_mean", "trace"])
@pytest.mark.parametrize("bias", [False, True, 0.01])
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_kernel_scale(reg, bias, backend):
    """scale=s is K = s·ZqZsᵀ + c: against the eager formulation of that kernel (values, gradients of every
    input including a λ that requires grad), in the dual and the primal form, with batched supports."""
    torch.manual_seed(5)
    c = {False: 0.0, True: 1.0}.get(bias, bias)
    for B, N, p in [((), 6, 9), ((2,), 5, 8), ((), 12, 4)]:  # the last: d < N, the primal form
        Fs, Fq = torch.randn(*B, N, p, dtype=F64), torch.randn(*B, 4, p, dtype=F64)
        Y = torch.randn(*B, N, 3, dtype=F64)
        lam = torch.tensor(0.2, dtype=F64)
        for s in (2.0, 0.37):
            args = [x.clone().requires_grad_() for x in (Fq, Fs, Y, lam)]
            P = krr_predict(*args[:3], args[3], reg=reg, bias=bias, scale=s, backend=backend)
            want_args = [x.clone().requires_grad_() for x in (Fq, Fs, Y, lam)]
            q, z, y, lm = want_args
            want = eager_krr_gram(s * z @ z.mT, s * q @ z.mT, y, lm, reg, c)
            torch.testing.assert_close(P, want)
            G = torch.randn_like(P)
            for got, w in zip(torch.autograd.grad(P, args, G), torch.autograd.grad(want, want_args, G)):
                torch.testing.assert_close(got, w)
            with torch.no_grad():  # the one-call forward, a float λ
                torch.testing.assert_close(krr_predict(Fq, Fs, Y, 0.2, reg=reg, bias=bias, scale=s, backend=backend),
                                           want.detach())


def test_kernel_scale_is_checked():
    Fs, Fq, _, _ = kernels()
    Y = torch.randn(6, 2, dtype=F64)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2", torch.tensor([2.0, 3.0])):
        with pytest.raises(ValueError, match="scale"):
            krr_predict(Fq, Fs, Y, 0.1, scale=bad)
    torch.testing.assert_close(krr_predict(Fq, Fs, Y, 0.1, scale=1), krr_predict(Fq, Fs, Y, 0.1))
    with pytest.raises(ValueError, match="bias"):  # the constant is checked before it is folded
        krr_predict(Fq, Fs, Y, 0.1, scale=2.0, bias=-1.0)
