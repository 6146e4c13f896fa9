"""The ridge ops' per-call path: plans made once per argument signature (λ re-checked on every call), the
one-sum finiteness check, the forward without an autograd node when no derivative can be asked for, and
krr_predict's lean torch-op path for small support sets (auto only), with the same results, derivatives,
checks and jitter policy as the fused path."""

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


def _inputs(N=6, d=9, M=5, C=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, d, generator=g, dtype=dtype), torch.randn(N, d, generator=g, dtype=dtype),
            torch.randn(N, C, generator=g, dtype=dtype))


@pytest.mark.parametrize("bias", [False, True, 0.25])
@pytest.mark.parametrize("reg", ["absolute", "trace_mean"])
def test_lean_path_matches_fused_and_reference(monkeypatch, bias, reg):
    calls = _counting(monkeypatch, "_lean_solve")
    forward = _counting(monkeypatch, "_forward_only")
    Zq, Zs, Ys = _inputs()
    lam = 0.3 if reg == "absolute" else 0.05
    P = krr_predict(Zq, Zs.requires_grad_(), Ys, lam, reg=reg, bias=bias)
    assert calls and not forward, "auto at N = 6 on CPU takes the lean path (torch ops when a derivative can be asked)"
    with torch.no_grad():
        P_fwd = krr_predict(Zq, Zs, Ys, lam, reg=reg, bias=bias)
    assert len(calls) == 1 and forward, "no derivative possible: the one-call forward"
    n, m = len(calls), len(forward)
    P_cpu = krr_predict(Zq, Zs, Ys, lam, reg=reg, bias=bias, backend="cpu")
    assert len(calls) == n and len(forward) == m, "a backend asked for by name never takes the lean path"
    torch.testing.assert_close(P.detach(), P_cpu.detach(), **F64)
    torch.testing.assert_close(P_fwd, P_cpu.detach(), **F64)
    torch.testing.assert_close(P_fwd, krr_predict_ref(Zq, Zs.detach(), Ys, lam, reg=reg, bias=bias), **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
@pytest.mark.parametrize("reg, bias", [("absolute", False), ("trace", True), ("trace_mean", 0.5)])
def test_forward_only_call_matches_reference(monkeypatch, dtype, batch, reg, bias):
    """The one-call forward (``torch.ops.ddfast.krr_predict_fwd``) on batched and unbatched support sets,
    both associations (M = 2: K_qs·α; M = 40: Zq·W), the in-place factor (N ≤ 128) and LAPACK's (N = 130), against the float64 reference; float32 within 2× the
    reference's own float32 error + 1e-5."""
    taken = []
    fn = rs._forward_only
    monkeypatch.setattr(rs, "_forward_only", lambda *a: taken.append(fn(*a)) or taken[-1])
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
    Zq, Zs, Ys = _inputs()
    P, status = op(Zq, Zs, Ys, 0.3, 0, 0.0, False)
    assert int(status) == 0 and P.shape == (5, 3)
    for args, match in [((Zq, Zs, Ys, -1.0, 0, 0.0, False), "lam"), ((Zq, Zs, Ys, 0.3, 3, 0.0, False), "reg"),
                        ((Zq, Zs, Ys, 0.3, 0, -1.0, False), "c"), ((Zq[:, :4], Zs, Ys, 0.3, 0, 0.0, False), "Zq"),
                        ((Zq, Zs, Ys[:4], 0.3, 0, 0.0, False), "Ys"), ((Zq, Zs, Ys.float(), 0.3, 0, 0.0, False), "Ys"),
                        ((Zq, Zs[None], Ys, 0.3, 0, 0.0, False), "Zq")]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
    # a support set that does not factor: status 1, the output keeps its shape
    rows = (torch.randn(1, 9, dtype=torch.float32) * 100).repeat(6, 1)  # rank one, λ far below rounding
    P, status = op(Zq.float(), rows, Ys.float(), 1e-12, 0, 0.0, True)
    assert int(status) == 1 and P.shape == (5, 3)
    P, status = op(Zq * float("inf"), Zs, Ys, 0.3, 0, 0.0, True)
    assert int(status) == 2
    big = (torch.randn(1, 140, dtype=torch.float32) * 100).repeat(130, 1)  # N > 128 (LAPACK): also status 1
    P, status = op(torch.randn(4, 140), big, torch.randn(130, 2), 1e-12, 0, 0.0, False)
    assert int(status) == 1 and P.shape == (4, 2)


@pytest.mark.parametrize("N, d", [(4, 7), (12, 20)])  # the two associations: K_qs·α (N=4: M·N·(d+C) fewer), Zq·W
def test_lean_path_derivatives(monkeypatch, N, d):
    calls = _counting(monkeypatch, "_lean_solve")
    Zq, Zs, Ys = _inputs(N=N, d=d, M=3, C=2)
    lam = torch.tensor(0.4, dtype=torch.float64)
    args = (Zq.requires_grad_(), Zs.requires_grad_(), Ys.requires_grad_(), lam.requires_grad_())

    def f(zq, zs, ys, lm):
        return krr_predict(zq, zs, ys, lm, reg="trace_mean", detach_reg=False, bias=True)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)
    assert calls
    # torch.func: jacrev / jacfwd agree with the fused backend's
    fused = lambda zs: krr_predict(Zq.detach(), zs, Ys.detach(), 0.4, bias=True, backend="cpu")  # noqa: E731
    lean = lambda zs: krr_predict(Zq.detach(), zs, Ys.detach(), 0.4, bias=True)  # noqa: E731
    z = Zs.detach()
    torch.testing.assert_close(torch.func.jacrev(lean)(z), torch.func.jacrev(fused)(z), **F64)
    torch.testing.assert_close(torch.func.jacfwd(lean)(z), torch.func.jacrev(fused)(z), **F64)
    # vmap over support sets: the fused path (no host sync under vmap), same values
    zb = torch.stack([z, 1.5 * z])
    torch.testing.assert_close(torch.func.vmap(lean)(zb), torch.stack([fused(z), fused(1.5 * z)]), **F64)


def test_lean_path_vector_targets_and_shared_support():
    Zq, Zs, Ys = _inputs(M=4)
    Zq3 = torch.stack([Zq, -Zq])  # (2, M, d) queries against one support set (N, d)
    torch.testing.assert_close(krr_predict(Zq3, Zs, Ys, 0.2), krr_predict(Zq3, Zs, Ys, 0.2, backend="cpu"), **F64)
    torch.testing.assert_close(krr_predict(Zq, Zs, Ys[:, 0], 0.2), krr_predict_ref(Zq, Zs, Ys[:, :1], 0.2)[:, 0], **F64)


def test_lean_path_falls_back_to_the_jitter_policy():
    """Identical support rows with a tiny λ: the Gram does not factor in float32; the fused path's jitter
    policy takes over (warning), exactly as with backend="cpu"."""
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 16, generator=g) * 100
    Zs, Ys, Zq = row.repeat(6, 1), torch.randn(6, 2, generator=g), torch.randn(3, 16, generator=g)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        P = krr_predict(Zq, Zs, Ys, 1e-12)
    assert any(issubclass(x.category, NumericalWarning) for x in w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        torch.testing.assert_close(P, krr_predict(Zq, Zs, Ys, 1e-12, backend="cpu"))


@pytest.mark.parametrize("bad", ["Zq", "Zs", "Ys"])
def test_lean_path_names_a_non_finite_input(bad):
    Zq, Zs, Ys = _inputs(dtype=torch.float32)
    args = dict(Zq=Zq, Zs=Zs, Ys=Ys)
    args[bad] = args[bad].clone()
    args[bad][1, 2] = float("nan")
    with pytest.raises(ValueError, match=bad):
        krr_predict(args["Zq"], args["Zs"], args["Ys"], 0.5)
    if bad == "Zq":  # the output check is skipped on request (a NaN support set still fails the solve)
        out = krr_predict(args["Zq"], args["Zs"], args["Ys"], 0.5, check_finite=False)
        assert not torch.isfinite(out).all()


def test_plans_are_reused_and_lam_is_checked_every_call(monkeypatch):
    rs._PLANS.clear()
    calls = _counting(monkeypatch, "_validate")
    Zq, Zs, Ys = _inputs(N=40, d=30)  # N > LEAN_MAX_N: the fused path
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
    monkeypatch.setenv("DDFAST_BACKEND", "cpu")
    n = len(calls)
    lean = _counting(monkeypatch, "_lean_solve")
    krr_predict(*_inputs(), 0.5)  # small N, but a forced backend: no lean path
    assert len(calls) == n and not lean


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


def test_explain_names_the_lean_path(monkeypatch):
    from ddfast.ops import explain

    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    zq, zs, ys = torch.randn(8, 32), torch.randn(rs.LEAN_MAX_N["cpu"], 32), torch.randn(rs.LEAN_MAX_N["cpu"], 3)
    assert "lean path" in explain("krr_predict", zq, zs, ys, 1e-3)
    # a backend asked for by name, a larger support set or a wider solve dtype take the kernels: no note
    assert "lean path" not in explain("krr_predict", zq, zs, ys, 1e-3, backend="cpu")
    big = torch.randn(rs.LEAN_MAX_N["cpu"] + 1, 32)
    assert "lean path" not in explain("krr_predict", zq, big, torch.randn(big.shape[0], 3), 1e-3)
    assert "lean path" not in explain("krr_predict", zq, zs, ys, 1e-3, solve_dtype=torch.float64)
    # the one-call forward is named from N = 1 up (dual form, one dtype), not for primal problems
    assert "one-call forward" in explain("krr_predict", zq, big, torch.randn(big.shape[0], 3), 1e-3)
    assert "one-call forward" not in explain("krr_predict", zq, torch.randn(40, 32), torch.randn(40, 3), 1e-3)
    assert "one-call forward" not in explain("krr_predict", zq, zs, ys, 1e-3, solve_dtype=torch.float64)
