"""The ridge ops' per-call path: plans made once per argument signature (λ re-checked on every call), the
one-sum finiteness check, the forward without an autograd node when no derivative can be asked for, and
krr_predict's operator path on the cpu backend (``krr_predict_fwd`` / ``krr_predict_bwd`` through
KrrPredictDualFunction), with the same results, derivatives, checks and jitter policy as the fused path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.autograd import forward_ad

import ddfast.ops.ridge_solve as rs
from ddfast.errors import NotPSDError, NumericalWarning
from ddfast.ops import krr_predict, ridge_weights
from ddfast.reference.ridge_solve import krr_predict_ref, ridge_weights_ref

F64 = dict(atol=1e-10, rtol=1e-9)  # float64 solves of well-conditioned systems (λ ≥ 0.1): rounding only


def _counting(monkeypatch, name):
    calls = []
    fn = getattr(rs, name)

    def wrapped(*a, **k):
        calls.append(1)
        return fn(*a, **k)

    monkeypatch.setattr(rs, name, wrapped)
    return calls


def _inputs(N=6, d=9, M=12, C=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, d, generator=g, dtype=dtype), torch.randn(N, d, generator=g, dtype=dtype),
            torch.randn(N, C, generator=g, dtype=dtype))


def _fused_only(monkeypatch):
    """Route krr_predict past the operator path (the fused Functions)."""
    monkeypatch.setattr(rs, "_one_call", lambda *a: None)


def _grads(f, *xs, G=None):
    P = f(*xs)
    G = torch.randn_like(P) if G is None else G
    return P, G, torch.autograd.grad(P, [x for x in xs if x.requires_grad], G)


@pytest.mark.parametrize("detach_reg", [False, True])
@pytest.mark.parametrize("bias", [False, True, 0.25])
@pytest.mark.parametrize("reg", ["absolute", "trace_mean", "trace"])
def test_operator_path_matches_fused_and_reference(monkeypatch, bias, reg, detach_reg):
    """Values and first derivatives (Zq, Zs, Ys) of the operator path against the fused Functions and the
    float64 reference, both associations of the product (N = 4, d = 100, M = 8, C = 3: K_qs·α; the other:
    Zq·W), each within ONE_CALL_GRAD_MAX_FLOP_RATIO."""
    calls = []
    fn = rs._one_call
    monkeypatch.setattr(rs, "_one_call", lambda *a: calls.append(a[9]) or fn(*a))  # a[9]: forward_only
    lam = 0.3 if reg == "absolute" else 0.05
    for N, d, M, C in [(4, 100, 8, 3), (6, 9, 40, 2)]:
        Zq, Zs, Ys = (x.requires_grad_() for x in _inputs(N=N, d=d, M=M, C=C))
        kw = dict(reg=reg, bias=bias, detach_reg=detach_reg)
        P, G, got = _grads(lambda *a: krr_predict(*a, lam, **kw), Zq, Zs, Ys)
        assert calls[-1] is False, "a derivative can be asked for: the operators with their backward"
        assert "KrrPredictDual" in type(P.grad_fn).__name__
        _, _, want = _grads(lambda *a: krr_predict_ref(*a, lam, **kw), Zq, Zs, Ys, G=G)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **F64)
        torch.testing.assert_close(P.detach(), krr_predict_ref(Zq, Zs, Ys, lam, **kw).detach(), **F64)
        with torch.no_grad():
            P_fwd = krr_predict(Zq, Zs, Ys, lam, **kw)
        assert calls[-1] is True, "no derivative possible: the one-call forward alone"
        torch.testing.assert_close(P_fwd, P.detach(), **F64)
        n = len(calls)
        with monkeypatch.context() as m:
            _fused_only(m)
            _, _, fused = _grads(lambda *a: krr_predict(*a, lam, **kw), Zq, Zs, Ys, G=G)
        for g, w in zip(got, fused):
            torch.testing.assert_close(g, w, **F64)
        assert len(calls) == n


def test_operator_path_is_kept_for_few_targets_per_support_row(monkeypatch):
    """Many targets per support row (KRR-ST's target representations) take the fused Functions' backward,
    whose products with the queries scale with N instead of C (ONE_CALL_GRAD_MAX_FLOP_RATIO)."""
    ran = []
    fn = rs._one_call
    monkeypatch.setattr(rs, "_one_call", lambda *a: ran.append(a[9]) or fn(*a))
    Zq, Zs, Ys = _inputs(N=6, d=40, M=20, C=2)
    krr_predict(Zq, Zs.requires_grad_(), Ys, 0.3)
    assert ran == [False]
    Zq, Zs, Ys = _inputs(N=6, d=40, M=20, C=30)  # C·(M + 2N)/(N·M) = 8
    P = krr_predict(Zq, Zs.requires_grad_(), Ys, 0.3)
    assert ran == [False] and "KrrPredictDual" not in type(P.grad_fn).__name__
    with torch.no_grad():  # without a derivative the one-call forward still runs
        krr_predict(Zq, Zs, Ys, 0.3)
    assert ran == [False, True]


def test_operator_path_computes_only_the_gradients_asked_for():
    Zq, Zs, Ys = _inputs()
    for which in ("Zq", "Zs", "Ys"):
        args = {k: x.clone().requires_grad_(k == which) for k, x in dict(Zq=Zq, Zs=Zs, Ys=Ys).items()}
        P = krr_predict(args["Zq"], args["Zs"], args["Ys"], 0.3, reg="trace_mean")
        (g,) = torch.autograd.grad(P, args[which], torch.ones_like(P))
        ref = {k: x.detach().requires_grad_(k == which) for k, x in args.items()}
        R = krr_predict_ref(ref["Zq"], ref["Zs"], ref["Ys"], 0.3, reg="trace_mean")
        (w,) = torch.autograd.grad(R, ref[which], torch.ones_like(R))
        torch.testing.assert_close(g, w, **F64)
    # the operator itself: an output not asked for is undefined (None)
    P, L, alpha, status = torch.ops.ddfast.krr_predict_fwd(Zq, Zs, Ys, 0.3, 0, 0.0, False)
    out = torch.ops.ddfast.krr_predict_bwd(torch.randn_like(P), Zq, Zs, L, alpha, 0.0, 0.0, False, True, False)
    assert out[0] is None and out[2] is None and out[1].shape == Zs.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_operator_path_gradients_on_batches(batch, dtype):
    """Gradients through the operators on batched support sets up to ONE_CALL_GRAD_MAX_N (in-place factor)
    and one above it (the fused Functions), against the float64 reference; float32 within 2× the
    reference's own float32 error + 1e-5 (relative to the largest entry)."""
    g = torch.Generator().manual_seed(len(batch))
    limit = rs.ONE_CALL_GRAD_MAX_N["cpu"]
    for N, d, M in [(1, 3, 2), (7, 12, 9), (limit, limit + 4, 6), (limit + 1, limit + 8, 3)]:
        xs64 = [torch.randn(*batch, r, c, generator=g, dtype=torch.float64) for r, c in [(M, d), (N, d), (N, 2)]]
        kw = dict(reg="trace_mean", bias=0.5)
        want_P, G, want = _grads(lambda *a: krr_predict_ref(*a, 0.02, **kw), *(x.clone().requires_grad_() for x in xs64))
        got_P, _, got = _grads(lambda *a: krr_predict(*a, 0.02, **kw),
                               *(x.to(dtype).requires_grad_() for x in xs64), G=G.to(dtype))
        assert got_P.shape == want_P.shape and got_P.dtype == dtype
        if dtype == torch.float64:
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **F64)
            continue
        _, _, ref32 = _grads(lambda *a: krr_predict_ref(*a, 0.02, **kw),
                             *(x.float().requires_grad_() for x in xs64), G=G.float())
        for a, r, w in zip(got, ref32, want):
            scale = w.abs().max()
            err, ref_err = (a.double() - w).abs().max() / scale, (r.double() - w).abs().max() / scale
            assert err <= 2 * ref_err + 1e-5, (N, err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
@pytest.mark.parametrize("reg, bias", [("absolute", False), ("trace", True), ("trace_mean", 0.5)])
def test_forward_only_call_matches_reference(monkeypatch, dtype, batch, reg, bias):
    """The one-call forward (``torch.ops.ddfast.krr_predict_fwd``) on batched and unbatched support sets,
    both associations (M = 2: K_qs·α; M = 40: Zq·W), the in-place factor (N ≤ 128) and LAPACK's (N = 130), against the float64 reference; float32 within 2× the
    reference's own float32 error + 1e-5."""
    taken = []
    fn = rs._one_call
    monkeypatch.setattr(rs, "_one_call", lambda *a: taken.append(fn(*a)) or taken[-1])
    g = torch.Generator().manual_seed(len(batch) + 7 * len(reg))
    for N, d, M in [(1, 3, 2), (5, 8, 2), (16, 20, 40), (40, 45, 3), (130, 140, 5)]:  # N > 128: LAPACK factor
        Zq, Zs, Ys = (torch.randn(*batch, r, c, generator=g, dtype=torch.float64) for r, c in [(M, d), (N, d), (N, 3)])
        lam = 0.2 if reg == "absolute" else 0.02
        want = krr_predict_ref(Zq, Zs, Ys, lam, reg=reg, bias=bias)
        P = krr_predict(Zq.to(dtype), Zs.to(dtype), Ys.to(dtype), lam, reg=reg, bias=bias)
        assert taken and taken[-1] is not None and P.dtype == dtype and P.shape == want.shape
        if dtype == torch.float64:
            torch.testing.assert_close(P, want, **F64)
        else:
            ref32 = krr_predict_ref(Zq.float(), Zs.float(), Ys.float(), lam, reg=reg, bias=bias)
            err, ref_err = (P.double() - want).abs().max(), (ref32.double() - want).abs().max()
            assert err <= 2 * ref_err + 1e-5, (err, ref_err)


def test_forward_only_op_checks_its_arguments():
    op = torch.ops.ddfast.krr_predict_fwd.default
    Zq, Zs, Ys = _inputs(M=5, C=3)
    P, L, alpha, status = op(Zq, Zs, Ys, 0.3, 0, 0.0, False)
    assert int(status) == 0 and P.shape == (5, 3) and L.shape == (6, 6) and alpha.shape == (6, 3)
    torch.testing.assert_close(L, torch.linalg.cholesky(Zs @ Zs.T + 0.3 * torch.eye(6, dtype=Zs.dtype)), **F64)
    torch.testing.assert_close(alpha, torch.cholesky_solve(Ys, L), **F64)
    for args, match in [((Zq, Zs, Ys, -1.0, 0, 0.0, False), "lam"), ((Zq, Zs, Ys, 0.3, 3, 0.0, False), "reg"),
                        ((Zq, Zs, Ys, 0.3, 0, -1.0, False), "c"), ((Zq[:, :4], Zs, Ys, 0.3, 0, 0.0, False), "Zq"),
                        ((Zq, Zs, Ys[:4], 0.3, 0, 0.0, False), "Ys"), ((Zq, Zs, Ys.float(), 0.3, 0, 0.0, False), "Ys"),
                        ((Zq, Zs[None], Ys, 0.3, 0, 0.0, False), "Zq")]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    # a support set that does not factor: status 1, the output keeps its shape
    rows = (torch.randn(1, 9, dtype=torch.float32) * 100).repeat(6, 1)  # rank one, λ far below rounding
    P, _, _, status = op(Zq.float(), rows, Ys.float(), 1e-12, 0, 0.0, True)
    assert int(status) == 1 and P.shape == (5, 3)
    P, _, _, status = op(Zq * float("inf"), Zs, Ys, 0.3, 0, 0.0, True)
    assert int(status) == 2
    big = (torch.randn(1, 140, dtype=torch.float32) * 100).repeat(130, 1)  # N > 128 (LAPACK): also status 1
    P, L, _, status = op(torch.randn(4, 140), big, torch.randn(130, 2), 1e-12, 0, 0.0, False)
    assert int(status) == 1 and P.shape == (4, 2) and L.shape == (130, 130)
    # the backward's arguments
    bwd = torch.ops.ddfast.krr_predict_bwd.default
    P, L, alpha, _ = op(Zq, Zs, Ys, 0.3, 0, 0.0, False)
    G = torch.randn_like(P)
    for args, match in [((G[:4], Zq, Zs, L, alpha), "G"), ((G, Zq[:, :4], Zs, L, alpha), "Zq"),
                        ((G, Zq, Zs, L[:5, :5], alpha), "L"), ((G, Zq, Zs, L, alpha[:5]), "alpha"),
                        ((G, Zq, Zs, L.float(), alpha), "L"), ((G, Zq, Zs[:0], L, alpha), "Zs")]:
        with pytest.raises(RuntimeError, match=match):
            bwd(*args, 0.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="trace_coef"):
        bwd(G, Zq, Zs, L, alpha, 0.0, -1.0, True, True, True)
    with pytest.raises(RuntimeError, match="c:"):
        bwd(G, Zq, Zs, L, alpha, float("nan"), 0.0, True, True, True)


@pytest.mark.parametrize("N, d, M, C", [(4, 100, 8, 3), (12, 20, 8, 2)])  # the two associations: K_qs·α, Zq·W
def test_operator_path_higher_derivatives(monkeypatch, N, d, M, C):
    """gradcheck and gradgradcheck through KrrPredictDualFunction (a float λ; create_graph differentiates the
    reference formulation), and with a λ that requires grad (the fused Functions); torch.func transforms
    (the fused Functions) agree with the operator path's derivatives."""
    calls = []
    fn = rs._one_call
    monkeypatch.setattr(rs, "_one_call", lambda *a: calls.append(fn(*a) is not None) or fn(*a))
    Zq, Zs, Ys = (x.requires_grad_() for x in _inputs(N=N, d=d, M=M, C=C))

    def f(zq, zs, ys):
        return krr_predict(zq, zs, ys, 0.4, reg="trace_mean", bias=True)

    assert torch.autograd.gradcheck(f, (Zq, Zs, Ys))
    assert torch.autograd.gradgradcheck(f, (Zq, Zs, Ys))
    assert calls and all(calls), "the operator path ran"
    lam = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    n = len(calls)
    assert torch.autograd.gradcheck(lambda zs, lm: krr_predict(Zq, zs, Ys, lm, reg="trace_mean", bias=True), (Zs, lam))
    assert not any(calls[n:]), "a λ that requires grad takes the fused Functions"
    # torch.func (the fused Functions) against the operator path's backward
    z = Zs.detach()
    P = lambda zs: krr_predict(Zq.detach(), zs, Ys.detach(), 0.4, bias=True)  # noqa: E731
    jac = torch.stack([torch.autograd.grad(P(zr)[i, j], zr)[0] for zr in [z.clone().requires_grad_()]
                       for i in range(M) for j in range(C)]).reshape(M, C, N, d)
    torch.testing.assert_close(torch.func.jacrev(P)(z), jac, **F64)
    torch.testing.assert_close(torch.func.jacfwd(P)(z), jac, **F64)
    zb = torch.stack([z, 1.5 * z])
    torch.testing.assert_close(torch.func.vmap(P)(zb), torch.stack([P(z), P(1.5 * z)]), **F64)
    # forward mode (a dual level open: the fused Functions' jvp)
    t = torch.randn_like(z)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(P(forward_ad.make_dual(z, t))).tangent
    torch.testing.assert_close(tangent, (jac * t).sum((-2, -1)), **F64)


def test_operator_path_vector_targets_and_shared_support():
    Zq, Zs, Ys = _inputs(M=4, C=3)
    Zq3 = torch.stack([Zq, -Zq])  # (2, M, d) queries against one support set (N, d)
    torch.testing.assert_close(krr_predict(Zq3, Zs, Ys, 0.2), krr_predict(Zq3, Zs, Ys, 0.2, backend="cpu"), **F64)
    torch.testing.assert_close(krr_predict(Zq, Zs, Ys[:, 0], 0.2), krr_predict_ref(Zq, Zs, Ys[:, :1], 0.2)[:, 0], **F64)
    Zs.requires_grad_()
    P, G, (got,) = _grads(lambda zs: krr_predict(Zq3, zs, Ys, 0.2), Zs)
    _, _, (want,) = _grads(lambda zs: krr_predict_ref(Zq3.reshape(-1, Zq.shape[-1]), zs, Ys, 0.2), Zs, G=G.reshape(-1, 3))
    assert P.shape == (2, 4, 3)
    torch.testing.assert_close(got, want, **F64)


def test_operator_path_falls_back_to_the_jitter_policy():
    """Identical support rows with a tiny λ: the Gram does not factor in float32; the fused path's jitter
    policy takes over (warning), exactly as with backend="cpu"."""
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 16, generator=g) * 100
    Zs, Ys, Zq = row.repeat(6, 1), torch.randn(6, 2, generator=g), torch.randn(3, 16, generator=g)
    for grad in (False, True):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            P = krr_predict(Zq, Zs.clone().requires_grad_(grad), Ys, 1e-12)
        assert any(issubclass(x.category, NumericalWarning) for x in w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumericalWarning)
            torch.testing.assert_close(P.detach(), krr_predict(Zq, Zs, Ys, 1e-12, backend="cpu"))


@pytest.mark.parametrize("bad", ["Zq", "Zs", "Ys"])
def test_operator_path_names_a_non_finite_input(bad):
    Zq, Zs, Ys = _inputs(dtype=torch.float32)
    args = dict(Zq=Zq, Zs=Zs, Ys=Ys)
    args[bad] = args[bad].clone()
    args[bad][1, 1] = float("nan")
    with pytest.raises(ValueError, match=bad):
        krr_predict(args["Zq"], args["Zs"], args["Ys"], 0.5)
    if bad == "Zq":  # the output check is skipped on request (a NaN support set still fails the solve)
        out = krr_predict(args["Zq"], args["Zs"], args["Ys"], 0.5, check_finite=False)
        assert not torch.isfinite(out).all()


def test_plans_are_reused_and_lam_is_checked_every_call(monkeypatch):
    rs._PLANS.clear()
    calls = _counting(monkeypatch, "_validate")
    Zq, Zs, Ys = _inputs(N=40, d=30)
    for _ in range(3):
        krr_predict(Zq, Zs, Ys, 0.5)
        ridge_weights(Zs, Ys, 0.5, bias=True)
    assert len(calls) == 2, "one validation per argument signature"
    for lam in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lam"):
            krr_predict(Zq, Zs, Ys, lam)
        with pytest.raises(ValueError, match="lam"):
            ridge_weights(Zs, Ys, lam, bias=True)
    with pytest.raises(ValueError, match="lam"):
        ridge_weights(Zs, Ys, torch.tensor(-0.5, dtype=torch.float64), bias=True)
    with pytest.raises(TypeError, match="bias"):  # 1 == True, but only a bool is a ridge_weights bias
        ridge_weights(Zs, Ys, 0.5, bias=1)
    with pytest.raises(TypeError, match="Zs"):  # a new signature is validated again
        krr_predict(Zq, Zs.float(), Ys, 0.5)


def test_plans_follow_ddfast_backend(monkeypatch):
    Zq, Zs, Ys = _inputs(N=40, d=30)
    krr_predict(Zq, Zs, Ys, 0.5)
    calls = _counting(monkeypatch, "krr_predict_ref")
    monkeypatch.setenv("DDFAST_BACKEND", "reference")
    krr_predict(Zq, Zs, Ys, 0.5)
    assert calls
    ops = _counting(monkeypatch, "_one_call")
    krr_predict(Zq, Zs, Ys, 0.5)
    assert not ops, "the reference backend never runs the cpu operators"
    monkeypatch.setenv("DDFAST_BACKEND", "cpu")
    n = len(calls)
    krr_predict(*_inputs(), 0.5)
    assert len(calls) == n and ops


def test_forward_without_autograd_node_matches():
    Zq, Zs, Ys = _inputs(N=40, d=30)
    Zs.requires_grad_()
    with torch.no_grad():
        P0, W0 = krr_predict(Zq, Zs, Ys, 0.5, bias=True), ridge_weights(Zs, Ys, 0.5, bias=True)
    assert P0.grad_fn is None and W0.grad_fn is None
    P1, W1 = krr_predict(Zq, Zs, Ys, 0.5, bias=True), ridge_weights(Zs, Ys, 0.5, bias=True)
    assert P1.grad_fn is not None and W1.grad_fn is not None
    torch.testing.assert_close(P0, P1.detach(), **F64)
    torch.testing.assert_close(W0, W1.detach(), **F64)
    # forward mode under no_grad still gets its tangent (a dual level is open: the Function runs)
    t = torch.randn_like(Zs)
    with torch.no_grad(), forward_ad.dual_level():
        W = ridge_weights(forward_ad.make_dual(Zs.detach(), t), Ys, 0.5)
        tangent = forward_ad.unpack_dual(W).tangent
    _, want = torch.func.jvp(lambda z: ridge_weights_ref(z, Ys, 0.5), (Zs.detach(),), (t,))
    torch.testing.assert_close(tangent, want, **F64)


def test_all_finite_one_sum():
    big = torch.full((4,), 3e38, dtype=torch.float32)  # the sum overflows: the exact check decides
    assert not math.isfinite(float(big.sum())) and rs._all_finite(big)
    for v in (float("inf"), float("-inf"), float("nan")):
        x = torch.ones(5, 3)
        x[2, 1] = v
        assert not rs._all_finite(x)
    assert rs._all_finite(torch.randn(7, 2)) and rs._all_finite(torch.empty(0))
    with pytest.raises(NotPSDError):  # finite inputs, non-finite result: a solve failure, not an input error
        rs._check_finite_output(torch.tensor([1.0, float("inf")]), [("Z", torch.ones(2))], "op", True)


def test_explain_names_the_operator_path(monkeypatch):
    from ddfast.ops import explain

    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    limit = rs.ONE_CALL_GRAD_MAX_N["cpu"]
    zq, zs, ys = torch.randn(8, 256), torch.randn(16, 256), torch.randn(16, 3)
    note = explain("krr_predict", zq, zs, ys, 1e-3)
    assert "one-call forward" in note and "closed-form backward" in note
    big = torch.randn(limit + 1, 256)
    note = explain("krr_predict", zq, big, torch.randn(limit + 1, 3), 1e-3)
    assert "one-call forward" in note and "fused Functions" in note and "closed-form backward" not in note
    # a float64 solve of float32 features runs the operators too; primal problems and an output wider than
    # the solve take the kernels' Functions: no note
    assert "closed-form backward" in explain("krr_predict", zq, zs, ys, 1e-3, solve_dtype=torch.float64)
    assert "one-call forward" not in explain("krr_predict", zq[:, :32], torch.randn(40, 32), torch.randn(40, 3), 1e-3)
    assert "one-call forward" not in explain("krr_predict", zq, zs, ys, 1e-3, out_dtype=torch.float64)


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [12, 100])
def test_operator_path_float64_solve_of_float32_features(monkeypatch, N, out_dtype):
    """RFAD's precision split through the operators: float32 features (Gram and products in float32), the
    factor and α in float64, P in ``out_dtype``. Values and gradients of every input against a float64
    truth, within 2× the error of the eager formulation written that way (float32 Gram, float64 solve) +
    1e-6 of the largest entry."""
    ran = []
    fn = rs._one_call

    def one_call(*a):
        P = fn(*a)
        ran.append(P is not None)
        return P

    monkeypatch.setattr(rs, "_one_call", one_call)
    g = torch.Generator().manual_seed(N)
    p, M, C, lam = 256, 30, 10, 1e-6
    xs = [torch.randn(N, p, generator=g, dtype=torch.float64) / p**0.5,
          torch.randn(M, p, generator=g, dtype=torch.float64) / p**0.5,
          torch.nn.functional.one_hot(torch.arange(N) % C, C).double() - 0.1]
    G = torch.randn(M, C, generator=g, dtype=torch.float64)

    def eager(Fs, Fq, Y):
        K = (2 * Fs @ Fs.mT + 0.01).double()
        mu = lam * K.diagonal().sum() / N
        return ((2 * Fq @ Fs.mT + 0.01).double() @ torch.linalg.solve(K + mu * torch.eye(N, dtype=K.dtype),
                                                                       Y.double())).to(out_dtype)

    def ours(Fs, Fq, Y):
        return krr_predict(Fq, Fs, Y, lam, reg="trace_mean", scale=2.0, bias=0.01, solve_dtype=torch.float64,
                           out_dtype=out_dtype)

    def run(f, dtype):
        args = [x.to(dtype).requires_grad_() for x in xs]
        P = f(*args)
        return (P,) + torch.autograd.grad(P, args, G.to(P.dtype))

    truth, ref32 = run(eager, torch.float64), run(eager, torch.float32)
    got = run(ours, torch.float32)
    assert ran and all(ran), "the operators ran (one-call forward and closed-form backward)"
    assert got[0].dtype == out_dtype and all(x.dtype == torch.float32 for x in got[1:])
    for a, r, t in zip(got, ref32, truth):
        err, err_eager = (a.double() - t).abs().max(), (r.double() - t).abs().max()
        assert err <= 2 * err_eager + 1e-6 * t.abs().max(), (float(err), float(err_eager))
    with torch.no_grad():  # the forward alone
        P = ours(*(x.float() for x in xs))
    torch.testing.assert_close(P, got[0].detach())


def test_operator_path_random_configurations():
    """Random configurations against the float64 reference, values and the gradients of whichever inputs
    require grad: batch shapes (), (1,), (3,), (2, 2); a support set shared by batched queries; 1-D targets;
    the support set as its own queries; non-contiguous features; three regularisers, the kernel constant
    and scale, a detached regulariser."""
    import random

    rng = random.Random(0)
    ran = []
    for _ in range(60):
        B = rng.choice([(), (1,), (3,), (2, 2)])
        N = rng.randint(1, 12)
        d, M, C = rng.randint(N, N + 20), rng.randint(1, 30), rng.randint(1, 3)
        shared, vector, self_queries = rng.random() < 0.2 and B != (), rng.random() < 0.15, rng.random() < 0.15
        kw = dict(reg=rng.choice(["absolute", "trace_mean", "trace"]), bias=rng.choice([False, True, 0.3]),
                  detach_reg=rng.random() < 0.3, scale=rng.choice([1.0, 2.5]))
        lam = rng.choice([0.1, 1.0])
        Zs = torch.randn(*(() if shared else B), N, d, dtype=torch.float64)
        if rng.random() < 0.3:
            Zs = Zs.mT.contiguous().mT
        Zq = Zs if self_queries and not shared else torch.randn(*B, M, d, dtype=torch.float64)
        Ys = torch.randn(*(() if shared else B), N, *(() if vector else (C,)), dtype=torch.float64)
        need = [rng.random() < 0.6 for _ in range(3)]
        need[1] = need[1] or not any(need)
        ours = [x.clone().requires_grad_(n) for x, n in zip((Zq, Zs, Ys), need)]
        ref = [x.clone().requires_grad_(n) for x, n in zip((Zq, Zs, Ys), need)]
        if Zq is Zs:  # the support set is its own query set: one tensor in both places
            ours[0], ref[0] = ours[1], ref[1]
        P = krr_predict(*ours, lam, **kw)
        ran.append("KrrPredictDual" in type(P.grad_fn).__name__)
        q = ref[0].reshape(-1, d) if shared else ref[0]
        R = krr_predict_ref(q, ref[1], ref[2].unsqueeze(-1) if vector else ref[2], lam, **kw)
        R = R.reshape(P.shape)
        torch.testing.assert_close(P, R, **F64)
        G = torch.randn_like(P)
        wrt = lambda xs: list(dict.fromkeys(x for x in xs if x.requires_grad))  # noqa: E731
        for g, w in zip(torch.autograd.grad(P, wrt(ours), G), torch.autograd.grad(R, wrt(ref), G)):
            torch.testing.assert_close(g, w, atol=1e-8, rtol=1e-7)
    assert sum(ran) > 30, "most configurations take the operator path"
