"""The ridge reference is the truth: primal when d < N, the solve dtype asked for, the jitter policy, typed errors.

The bar is a float64 NumPy least-squares solve of the augmented system [Z; √μ·I] W = [Y; 0] (the most
stable formulation of ridge regression), on scaled and ill-conditioned inputs: the reference must meet it at
least as well as the fused path.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ddfast import settings
from ddfast.errors import NotPSDError, NumericalWarning
from ddfast.ops import krr_predict, ridge_weights
from ddfast.reference import krr_predict_ref, ridge_weights_ref


def numpy_truth(Z, Y, mu, bias=False):
    """W minimising ‖ZW − Y‖² + μ‖W‖² per batch member, float64 NumPy lstsq of the augmented system."""
    Z, Y = Z.detach().double().numpy(), Y.detach().double().numpy()
    if bias:
        Z = np.concatenate([Z, np.ones(Z.shape[:-1] + (1,))], -1)
    out = []
    for z, y, m in zip(Z.reshape((-1,) + Z.shape[-2:]), Y.reshape((-1,) + Y.shape[-2:]), np.broadcast_to(mu, Z.shape[:-2]).reshape(-1)):
        d = z.shape[1]
        A = np.concatenate([z, np.sqrt(m) * np.eye(d)], 0)
        b = np.concatenate([y, np.zeros((d, y.shape[1]))], 0)
        out.append(np.linalg.lstsq(A, b, rcond=None)[0])
    return torch.from_numpy(np.stack(out).reshape(Z.shape[:-2] + out[0].shape))


def system_condition(Z, mu, bias=False):
    """Largest 2-norm condition number over the batch of the smaller regularised system (ZᵀZ or ZZᵀ) + μI."""
    Z = Z.detach().double()
    if bias:
        Z = torch.cat([Z, torch.ones(Z.shape[:-1] + (1,), dtype=Z.dtype)], -1)
    G = Z.mT @ Z if Z.shape[-1] < Z.shape[-2] else Z @ Z.mT
    G = G + mu * torch.eye(G.shape[-1], dtype=G.dtype)
    return float(torch.linalg.cond(G).max())


def rel_err(W, truth):
    return ((W.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def test_primal_problem_scaled_float64():
    """d < N with huge features: the reference used to solve the N×N dual (relative error 1.9)."""
    torch.manual_seed(0)
    Z, Y = torch.randn(4, 6, 5).double() * 1e8, torch.randn(4, 6, 3).double()
    truth = numpy_truth(Z, Y, 1.0)
    assert rel_err(ridge_weights(Z, Y, 1.0, backend="reference"), truth) < 1e-6
    assert rel_err(ridge_weights_ref(Z, Y, 1.0), truth) < 1e-6
    assert rel_err(ridge_weights(Z, Y, 1.0, backend="cpu"), truth) < 1e-6


def test_primal_problem_scaled_float32():
    torch.manual_seed(0)
    Z, Y = torch.randn(4, 6, 5) * 1e3, torch.randn(4, 6, 3)
    truth = numpy_truth(Z, Y, 1.0)
    err_ref = rel_err(ridge_weights(Z, Y, 1.0, backend="reference"), truth)
    err_cpu = rel_err(ridge_weights(Z, Y, 1.0, backend="cpu"), truth)
    assert err_ref < 1e-2 and err_ref <= 2 * err_cpu + 1e-4, (err_ref, err_cpu)


def test_solve_dtype_is_honoured():
    """float32 inputs, float64 solve: the Gram and the factor are float64, far closer to the truth."""
    torch.manual_seed(1)
    Z, Y = torch.randn(2, 20, 12) * torch.logspace(0, -3, 12), torch.randn(2, 20, 3)  # cond(ZᵀZ) ~ 1e6
    truth = numpy_truth(Z, Y, 1e-6)
    e32 = rel_err(ridge_weights_ref(Z, Y, 1e-6), truth)
    e64 = rel_err(ridge_weights_ref(Z, Y, 1e-6, solve_dtype=torch.float64), truth)
    assert e64 < 1e-6 and e64 < e32 / 4, (e64, e32)  # e64 is float32 rounding of W
    out = ridge_weights_ref(Z, Y, 1e-6, solve_dtype=torch.float64, out_dtype=torch.float64)
    assert out.dtype == torch.float64 and rel_err(out, truth) < 1e-10


def test_reference_krr_predict_primal_and_dual_agree_with_numpy():
    torch.manual_seed(2)
    for N, d in ((30, 8), (8, 30)):
        Zs, Ys, Zq = torch.randn(N, d).double(), torch.randn(N, 2).double(), torch.randn(5, d).double()
        truth = Zq.double() @ numpy_truth(Zs, Ys, 0.3)
        assert rel_err(krr_predict_ref(Zq, Zs, Ys, 0.3), truth) < 1e-12


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 9), d=st.integers(1, 9), C=st.integers(1, 3), batch=st.integers(1, 2),
    log_scale=st.floats(-3, 8), log_lam=st.floats(-4, 2), log_cond=st.floats(0, 6), bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16),
)
def test_reference_meets_numpy_at_least_as_well_as_fused(N, d, C, batch, log_scale, log_lam, log_cond, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(batch, N, d, generator=g, dtype=torch.float64)
    Z = Z * torch.logspace(0, -log_cond, d, dtype=torch.float64) * 10.0**log_scale  # ill-conditioned columns
    Y = torch.randn(batch, N, C, generator=g, dtype=torch.float64)
    Z, Y, lam = Z.to(dtype), Y.to(dtype), 10.0**log_lam
    truth = numpy_truth(Z, Y, lam, bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        try:
            W_ref = ridge_weights(Z, Y, lam, bias=bias, backend="reference")
        except NotPSDError:
            W_ref = None
        try:
            W_cpu = ridge_weights(Z, Y, lam, bias=bias, backend="cpu")
        except NotPSDError:
            W_cpu = None
    if W_cpu is not None:  # where the fused path answers, the reference answers at least as well
        assert W_ref is not None
        e_ref, e_cpu = rel_err(W_ref, truth), rel_err(W_cpu, truth)
        # Within 2x of the kernel's error, up to rounding times the condition number of the regularised system:
        # the two round differently (the kernel is often closer on small problems, e.g. float32 1.9e-4 vs
        # 1.7e-5 at N = d = 6, scale 100, lam 1; float64 2.4e-11 vs 1.1e-11 at cond ~1e6).
        unit = 1e-6 if dtype == torch.float32 else 1e-15
        floor = 10 * unit + unit * system_condition(Z, lam, bias)
        assert e_ref <= 2 * e_cpu + floor, (e_ref, e_cpu)
    if W_ref is not None:
        assert torch.isfinite(W_ref).all()


# ----------------------------------------------------------------------------- jitter policy, typed errors


def test_reference_jitters_only_failing_members_and_warns():
    torch.manual_seed(1)
    Z = torch.randn(3, 12, 40) * 10
    Z[1:, 6:] = Z[1:, :6]  # members 1, 2 have duplicate rows: singular Gram at λ = 1e-8 in float32
    Y = torch.randn(3, 12, 3)
    with pytest.warns(NumericalWarning, match="2 batch member"):
        W = ridge_weights_ref(Z, Y, 1e-8)
    assert torch.isfinite(W).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ridge_weights_ref(Z[:1], Y[:1], 1e-8), W[:1])


def test_reference_raises_not_psd_error_after_the_policy(monkeypatch):
    monkeypatch.setattr(settings, "max_jitter_tries", 0)
    Z = torch.randn(10, 30)
    Z[5:] = Z[:5]
    with pytest.raises(NotPSDError, match=r"batch member\(s\) \[0\]"):
        ridge_weights_ref(Z * 100, torch.randn(10, 2), 1e-12)
    with pytest.raises(NotPSDError):
        ridge_weights(Z * 100, torch.randn(10, 2), 1e-12, backend="reference")


def test_reference_never_raises_raw_linalg_errors():
    """NaN features: a ValueError naming the input from the public op, never torch's _LinAlgError."""
    Z = torch.randn(6, 4)
    Z[2, 1] = float("nan")
    with pytest.raises(ValueError, match="Z: contains NaN"):
        ridge_weights(Z, torch.randn(6, 2), 0.5, backend="reference")
    with pytest.raises(ValueError, match="Zs: contains NaN"):
        krr_predict(torch.randn(2, 4), Z, torch.randn(6, 2), 0.5, backend="reference")


def test_meta_device_gives_shapes_without_host_syncs():
    Z, Y = torch.empty(3, 8, 5, device="meta"), torch.empty(3, 8, 2, device="meta")
    W = ridge_weights(Z, Y, torch.ones(3, device="meta"))
    assert W.device.type == "meta" and W.shape == (3, 5, 2)
    P = krr_predict(torch.empty(3, 4, 5, device="meta"), Z, Y, 0.1, bias=True)
    assert P.device.type == "meta" and P.shape == (3, 4, 2)


@pytest.mark.parametrize("reg", ["trace_mean", "trace"])
def test_trace_regularizer_second_derivatives_at_zero_features(reg):
    """μ's Hessian in the features is exact everywhere, including Z = 0 (all-zero support features): 2λ/N·I
    or 2λ·I, never NaN."""
    from ddfast.reference.ridge_solve import ridge_regularizer

    Z = torch.zeros(3, 4, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda z: ridge_regularizer(z, 0.5, reg).sum(), Z).reshape(12, 12)
    want = 2 * 0.5 / (3 if reg == "trace_mean" else 1) * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(H, want)
