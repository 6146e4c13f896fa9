"""ridge_weights / krr_predict: every backend against the eager reference, bad input, ill-conditioning."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch

import ddfast
from ddfast import settings
from ddfast.errors import BackendUnavailableError, NotPSDError, NumericalWarning
from ddfast.ops import krr_predict, ridge_weights
from ddfast.reference import krr_predict_ref, ridge_weights_ref

from conftest import backend_param
from contract import OpContract


@dataclasses.dataclass(frozen=True)
class Case:
    batch: tuple
    N: int
    d: int
    C: int
    M: int = 5
    reg: str = "absolute"
    lam: float = 0.5
    bias: bool = False
    detach_reg: bool = False
    lam_grad: bool = False
    noncontig: bool = False
    solve_dtype: torch.dtype | None = None

    @property
    def id(self):
        flags = [self.reg]
        flags += ["bias"] * self.bias + ["detach"] * self.detach_reg + ["lamgrad"] * self.lam_grad
        flags += ["noncontig"] * self.noncontig + (["f64solve"] if self.solve_dtype else [])
        b = "x".join(map(str, self.batch)) or "nobatch"
        return f"B{b}-N{self.N}-d{self.d}-C{self.C}-M{self.M}-" + "-".join(flags)


GRADCHECK_CASES = [
    Case((), 1, 3, 1),
    Case((2,), 4, 6, 2, M=3),  # dual, d > N
    Case((2,), 7, 3, 2, M=3, reg="trace_mean", lam_grad=True),  # primal, λ differentiable
    Case((1,), 5, 4, 3, M=2, reg="trace", bias=True),  # trace with bias: d+1 = N → dual
    Case((2, 1), 3, 5, 1, M=4, reg="trace", noncontig=True),  # (detach_reg is not a true derivative: parity only)
    Case((1,), 6, 2, 2, M=3, reg="trace_mean", bias=True, lam_grad=True),  # primal with bias
]

PARITY_CASES = [
    Case((1,), 1, 5, 3),  # N = 1
    Case((8,), 10, 32, 10, M=6),  # batch 8, N < d
    Case((1,), 50, 20, 1, M=7),  # N > d (primal), C = 1
    Case((8,), 32, 64, 10, M=16, bias=True),  # few-shot, bias
    Case((2, 3), 12, 9, 4, M=5, reg="trace_mean", noncontig=True),  # nested batch, non-contiguous, primal
    Case((1,), 10, 192, 10, M=64, bias=True),  # LD-RR
    Case((1,), 100, 192, 10, M=32, bias=True, reg="trace", detach_reg=True),
    Case((2,), 100, 64, 10, M=20, reg="trace_mean", lam_grad=True),  # primal, λ differentiable
    Case((1,), 64, 64, 64, M=8, lam=1e-3),  # square, small λ
    Case((1,), 200, 300, 400, M=64, reg="trace", lam=1e-4),  # dual, K_qs association (C large)
    Case((1,), 1000, 1100, 8, M=16, reg="trace", lam=1e-3),  # N = 1000 dual
    Case((1,), 1000, 64, 8, M=16),  # N = 1000 primal
    Case((2,), 40, 60, 5, M=8, solve_dtype=torch.float64),  # float64 factor for float32 inputs
]

# Triton kernels under the interpreter: only small factor sizes (in-kernel Cholesky, n ≤ 64).
TRITON_PARITY = {c for c in PARITY_CASES if (c.d + c.bias if c.N > c.d + c.bias else c.N) <= 64
                 and c.d <= 64 and c.C <= 16 and c.solve_dtype is None}


def _make(case: Case, dtype, with_query: bool):
    def mat(*shape):
        if case.noncontig:  # transposed storage: a non-contiguous view with the right shape
            return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype).mT
        return torch.randn(*shape, dtype=dtype)

    Z = mat(*case.batch, case.N, case.d).requires_grad_()
    Y = mat(*case.batch, case.N, case.C).requires_grad_()
    lam = case.lam
    if case.lam_grad:
        lam = torch.full(case.batch[-1:] if case.batch else (), case.lam, dtype=dtype).requires_grad_()
    inputs = {"Z": Z, "Y": Y, "lam": lam}
    if with_query:
        inputs["Zq"] = mat(*case.batch, case.M, case.d).requires_grad_()
    inputs["kwargs"] = dict(reg=case.reg, bias=case.bias, detach_reg=case.detach_reg, solve_dtype=case.solve_dtype)
    if case.solve_dtype is not None and dtype == torch.float64:
        inputs["kwargs"]["solve_dtype"] = torch.float64
    return inputs


class RidgeContract(OpContract):
    gradcheck_cases = GRADCHECK_CASES
    parity_cases = PARITY_CASES
    backends = [backend_param("reference"), backend_param("cpu"), backend_param("triton"), backend_param("cuda")]

    def parity_cases_for(self, backend):
        if backend == "triton":
            return TRITON_PARITY
        return self.parity_cases

    def gradcheck_fast_mode(self, backend):
        return backend == "triton"


class TestRidgeWeights(RidgeContract):
    def make_inputs(self, case, dtype):
        return _make(case, dtype, with_query=False)

    def reference(self, x):
        return ridge_weights_ref(x["Z"], x["Y"], x["lam"], **x["kwargs"])

    def kernel(self, x, backend):
        return ridge_weights(x["Z"], x["Y"], x["lam"], backend=backend, **x["kwargs"])


class TestKrrPredict(RidgeContract):
    def make_inputs(self, case, dtype):
        return _make(case, dtype, with_query=True)

    def reference(self, x):
        return krr_predict_ref(x["Zq"], x["Z"], x["Y"], x["lam"], **x["kwargs"])

    def kernel(self, x, backend):
        return krr_predict(x["Zq"], x["Z"], x["Y"], x["lam"], backend=backend, **x["kwargs"])


# ----------------------------------------------------------------------------- peers' formulations


def test_matches_ld_rr_inverse_formulation():
    """LD-RR writes W = Zᵀ (ZZᵀ + λI)⁻¹ Y with a ones column appended to the features."""
    Z, Y = torch.randn(50, 85, dtype=torch.float64), torch.softmax(torch.randn(50, 10, dtype=torch.float64), -1)
    Zb = torch.cat([Z, torch.ones(50, 1, dtype=torch.float64)], 1)
    peer = Zb.T @ torch.inverse(Zb @ Zb.T + 1.0 * torch.eye(50, dtype=torch.float64)) @ Y
    torch.testing.assert_close(ridge_weights(Z, Y, 1.0, bias=True), peer)


def test_matches_krr_st_trace_formulation():
    """KRR-ST: K_ts (K_ss + λ·tr(K_ss)·I)⁻¹ Y_s with the trace detached."""
    Zs = torch.randn(30, 40, dtype=torch.float64, requires_grad=True)
    Zt = torch.randn(20, 40, dtype=torch.float64)
    Ys = torch.randn(30, 16, dtype=torch.float64)
    K_ss = Zs @ Zs.T
    peer = (Zt @ Zs.T) @ torch.linalg.solve(K_ss + 1e-3 * torch.trace(K_ss).detach() * torch.eye(30, dtype=torch.float64), Ys)
    ours = krr_predict(Zt, Zs, Ys, 1e-3, reg="trace", detach_reg=True)
    torch.testing.assert_close(ours, peer)
    g_peer, = torch.autograd.grad(peer.square().sum(), Zs)
    g_ours, = torch.autograd.grad(ours.square().sum(), Zs)
    torch.testing.assert_close(g_ours, g_peer)


def test_detach_reg_changes_the_gradient():
    Z = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(6, 2, dtype=torch.float64)
    g1, = torch.autograd.grad(ridge_weights(Z, Y, 0.3, reg="trace").sum(), Z)
    g2, = torch.autograd.grad(ridge_weights(Z, Y, 0.3, reg="trace", detach_reg=True).sum(), Z)
    assert (g1 - g2).abs().max() > 1e-6


def test_primal_and_dual_agree():
    Z, Y = torch.randn(3, 40, 20, dtype=torch.float64), torch.randn(3, 40, 4, dtype=torch.float64)
    primal = ridge_weights(Z, Y, 0.2)  # d < N → primal path
    dual = Z.mT @ torch.linalg.solve(Z @ Z.mT + 0.2 * torch.eye(40, dtype=torch.float64), Y)  # the Woodbury form
    torch.testing.assert_close(primal, dual)
    torch.testing.assert_close(ridge_weights_ref(Z, Y, 0.2), dual)


def test_lam_per_batch_member():
    Z, Y = torch.randn(4, 5, 8, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64)
    lam = torch.tensor([0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    out = ridge_weights(Z, Y, lam)
    for b in range(4):
        torch.testing.assert_close(out[b], ridge_weights_ref(Z[b], Y[b], float(lam[b])))


# ----------------------------------------------------------------------------- ill-conditioning


@pytest.mark.parametrize("backend", [backend_param("cpu"), backend_param("triton")])
@pytest.mark.parametrize("kind", ["duplicate_rows", "rank_deficient"])
def test_ill_conditioned_is_finite_and_warns(backend, kind, device):
    torch.manual_seed(1)
    if kind == "duplicate_rows":
        Z = torch.randn(4, 12, 40) * 10
        Z[:, 6:] = Z[:, :6]
    else:
        Z = torch.randn(4, 12, 2) @ torch.randn(4, 2, 40) * 10
    Z[0] = torch.randn(12, 40)  # a healthy member in the same batch is not jittered
    Y = torch.randn(4, 12, 3)
    Z, Y = Z.to(device), Y.to(device)  # CUDA tensors for triton on a GPU machine (tests/conftest.py)
    Z.requires_grad_()
    with pytest.warns(NumericalWarning, match="jitter"):
        W = ridge_weights(Z, Y, 1e-8, backend=backend)
    assert torch.isfinite(W).all()
    g, = torch.autograd.grad(W.sum(), Z)
    assert torch.isfinite(g).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ridge_weights(Z[:1], Y[:1], 1e-8, backend=backend), W[:1], rtol=1e-4, atol=1e-5)


def test_not_psd_error_when_jitter_exhausted(monkeypatch):
    monkeypatch.setattr(settings, "max_jitter_tries", 0)
    Z = torch.randn(10, 30)
    Z[5:] = Z[:5]
    with pytest.raises(NotPSDError, match="batch member"):
        ridge_weights(Z * 100, torch.randn(10, 2), 1e-12, backend="cpu")


def test_reference_backend_never_returns_nan():
    Z = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="lam"):
        ridge_weights(Z, torch.randn(5, 2), 0.0, backend="reference")


# ----------------------------------------------------------------------------- bad input


GOOD_Z, GOOD_Y = torch.randn(4, 6, 5), torch.randn(4, 6, 3)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ridge_weights(GOOD_Z, torch.randn(4, 7, 3), 1.0), ValueError, r"Y: expected 6 rows"),
        (lambda: ridge_weights(GOOD_Z[0, 0], GOOD_Y, 1.0), ValueError, r"Z: expected at least 2 dims"),
        (lambda: ridge_weights(GOOD_Z.long(), GOOD_Y, 1.0), TypeError, r"Z: expected dtype float32 or float64"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y.double(), 1.0), TypeError, r"Y: expected dtype torch.float32"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y.to("meta"), 1.0), ValueError, r"Y: expected device cpu"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, 0.0), ValueError, r"lam: expected a finite positive"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, -1.0), ValueError, r"lam: expected a finite positive"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, r"lam: expected every entry > 0"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, torch.ones(3)), ValueError, r"lam: shape \(3,\) does not broadcast"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, "1"), TypeError, r"lam: expected a positive float"),
        (lambda: ridge_weights(GOOD_Z[:0], GOOD_Y[:0], 1.0), ValueError, r"Z: empty input"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y[:3], 1.0), ValueError, r"Y: expected batch dims \(4,\)"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, 1.0, reg="frobenius"), ValueError, r"reg: expected one of"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, 1.0, solve_dtype=torch.float16), TypeError, r"solve_dtype"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y, 1.0, backend="gpu"), ValueError, r"backend: expected one of"),
        (lambda: ridge_weights(GOOD_Z * float("nan"), GOOD_Y, 1.0), ValueError, r"Z: contains NaN or Inf"),
        (lambda: ridge_weights(GOOD_Z, GOOD_Y * float("inf"), 1.0), ValueError, r"Y: contains NaN or Inf"),
        (lambda: krr_predict(torch.randn(4, 2, 4), GOOD_Z, GOOD_Y, 1.0), ValueError, r"Zq: expected 5 features"),
        (lambda: krr_predict(torch.randn(4, 2, 5), GOOD_Z, GOOD_Y[:, :5], 1.0), ValueError, r"Ys: expected 6 rows"),
        (lambda: krr_predict(torch.randn(4, 2, 5).double(), GOOD_Z, GOOD_Y, 1.0), TypeError, r"Zs: expected dtype torch.float64"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_unavailable_backend_lists_reasons():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        ridge_weights(GOOD_Z, GOOD_Y, 1.0, backend="cuda")


# ----------------------------------------------------------------------------- dispatch / info


def test_auto_and_fused_pick_cpu_here(monkeypatch):
    from ddfast.ops.ridge_solve import _select

    monkeypatch.delenv("DDFAST_BACKEND", raising=False)
    assert _select("auto", GOOD_Z, GOOD_Y, False, False, torch.float32, "t") == "cpu"
    assert _select("fused", GOOD_Z, GOOD_Y, False, False, torch.float32, "t") == "cpu"
    monkeypatch.setenv("DDFAST_BACKEND", "reference")
    assert _select("auto", GOOD_Z, GOOD_Y, False, False, torch.float32, "t") == "reference"


def test_backends_report_and_info_cli():
    report = ddfast.backends()
    assert set(report) == {"cuda", "triton", "cpu", "reference"}
    assert report["reference"]["available"] and report["cpu"]["available"]
    for name, st in report.items():
        assert st["available"] or st["reason"], f"{name} unavailable without a reason"
    out = subprocess.run([sys.executable, "-m", "ddfast.info"], capture_output=True, text=True, check=True).stdout
    assert "cpu" in out and "reference" in out
