"""Eager PyTorch reference for the ridge / kernel-ridge solve (the truth the kernels are tested against).

    W = Zᵀ (Z Zᵀ + μ I)⁻¹ Y = (ZᵀZ + μI)⁻¹ Zᵀ Y      ridge weights, dual / primal form  (label-distillation §3, eq. 2–3)
    P = Zq Zsᵀ (Zs Zsᵀ + μ I)⁻¹ Ys                   kernel-ridge prediction             (krr-st-selfsup §3.2, eq. 4)
    P = (K_qs + c) (K_ss + c + μ I)⁻¹ Y              the same from kernel matrices       (KIP, RFAD, analytic NTK/NNGP)

with the regulariser μ chosen by ``reg``:

    "absolute"    μ = λ                         (LD-RR)
    "trace_mean"  μ = λ · tr(K) / N             (KIP, FRePo, RFAD)
    "trace"       μ = λ · tr(K)                 (KRR-ST)

where K = Z Zᵀ (+ c) is the N×N Gram of the (optionally bias-augmented) features; tr(K) = ‖Z‖²_F + N·c.

Everything is computed in the solve dtype (Gram included) and cast to the output dtype at the end. Like the
kernels, the primal d×d system is solved when d < N and the dual N×N system otherwise; the factorization
follows the jitter policy of :mod:`ddfast.settings` (``torch.linalg.cholesky_ex``, jitter escalated only for
the failing batch members, a :class:`~ddfast.errors.NumericalWarning`, then
:class:`~ddfast.errors.NotPSDError`). Under ``torch.vmap`` and on the meta device the policy runs without
host synchronisation (every escalation step applied branch-free to the failing members, no warning); there
a member that never factors gives NaN instead of an error.
"""

from __future__ import annotations

import math
import warnings

import torch

from ddfast import settings
from ddfast.errors import NotPSDError, NumericalWarning

REGULARIZERS = ("absolute", "trace_mean", "trace")

__all__ = [
    "REGULARIZERS",
    "append_bias",
    "ridge_regularizer",
    "psd_safe_cholesky",
    "ridge_weights_ref",
    "krr_predict_ref",
    "ridge_from_gram_ref",
    "krr_predict_from_gram_ref",
]


def bias_value(bias) -> float:
    """The kernel constant c of ``bias``: False → 0, True → 1, a float → itself."""
    return float(bias) if not isinstance(bias, bool) else (1.0 if bias else 0.0)


def append_bias(Z: torch.Tensor, bias=True) -> torch.Tensor:
    """Append a constant column √c to the features: (..., N, d) → (..., N, d+1); adds c to every Gram entry."""
    c = bias_value(bias)
    col = Z.new_ones(Z.shape[:-1] + (1,)) if c == 1.0 else Z.new_full(Z.shape[:-1] + (1,), math.sqrt(c))
    return torch.cat([Z, col], dim=-1)


def _regularizer_from_trace(trace, lam, reg, n, batch, like):
    lam_t = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if reg == "absolute":
        mu = lam_t
    elif reg == "trace_mean":
        mu = lam_t * (trace / n)
    elif reg == "trace":
        mu = lam_t * trace
    else:
        raise ValueError(f"reg: expected one of {REGULARIZERS}, got {reg!r}")
    return mu.expand(batch) if mu.shape != batch else mu


def ridge_regularizer(
    Z: torch.Tensor, lam, reg: str = "absolute", detach_reg: bool = False, bias=False
) -> torch.Tensor:
    """μ of shape ``Z.shape[:-2]`` for features ``Z (..., N, d)``.

    ``lam`` is a float or a tensor broadcastable to the batch shape. With ``detach_reg`` the
    trace term carries no gradient (as KRR-ST does); λ itself always does. ``bias`` (True or a
    kernel constant c) gives μ of the augmented features [Z, √c] (tr grows by N·c) without forming them.
    """
    trace = None
    if reg != "absolute":
        Zr = Z.detach() if detach_reg else Z
        # Σz² (not ‖Z‖²_F through a norm: that one's second derivative is NaN at Z = 0)
        trace = Zr.pow(2).sum(dim=(-2, -1)) + Z.shape[-2] * bias_value(bias)
    return _regularizer_from_trace(trace, lam, reg, Z.shape[-2], Z.shape[:-2], Z)


# --------------------------------------------------------------------------- jitter policy


def _under_vmap(x) -> bool:
    """True when ``x`` is (or wraps) a vmap-batched tensor: no host syncs there."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(x):
        if f.is_batchedtensor(x):
            return True
        x = f.get_unwrapped(x)
    return False


def can_sync(*xs) -> bool:
    """Data-dependent Python checks are allowed: no input is vmap-batched or on the meta device."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(isinstance(x, torch.Tensor) and (x.is_meta or (wrapped(x) and _under_vmap(x))) for x in xs)


def psd_safe_cholesky(A: torch.Tensor, *, what: str = "ridge solve") -> torch.Tensor:
    """Lower Cholesky factor of the batch of SPD matrices ``A (..., n, n)`` under the jitter policy.

    Members that fail are re-factored with ``ε·10^k·mean(diag A)`` added to the diagonal, k = 0 …
    ``settings.max_jitter_tries``-1 (ε by dtype: ``settings.jitter_for``); a NumericalWarning says how much
    was needed, and :class:`NotPSDError` names the members that never factor. Differentiable (the gradient
    of a jittered member is the gradient of the jittered system).
    """
    L, info = torch.linalg.cholesky_ex(A)
    failed = info != 0
    sync = can_sync(A)
    if sync and not bool(failed.any()):
        return L
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = A.detach().diagonal(dim1=-2, dim2=-1).mean(-1)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    eps = settings.jitter_for(A.dtype)
    if not sync:
        for k in range(settings.max_jitter_tries):
            jitter = torch.where(failed, eps * 10.0**k * scale, torch.zeros_like(scale))
            Lk, infok = torch.linalg.cholesky_ex(A + jitter[..., None, None] * eye)
            L = torch.where(failed[..., None, None], Lk, L)
            failed = failed & (infok != 0)
        return L
    used = torch.zeros_like(scale)
    for k in range(settings.max_jitter_tries):
        jitter = torch.where(failed, eps * 10.0**k * scale, torch.zeros_like(scale))
        Lk, infok = torch.linalg.cholesky_ex(A + jitter[..., None, None] * eye)
        fixed = failed & (infok == 0)
        L = torch.where(fixed[..., None, None], Lk, L)
        used = torch.where(fixed, jitter, used)
        failed = failed & (infok != 0)
        if not bool(failed.any()):
            break
    if bool(failed.any()):
        members = torch.nonzero(failed.reshape(-1)).flatten().tolist()
        raise NotPSDError(
            f"{what}: the regularised Gram of batch member(s) {members} is not positive definite even with jitter "
            f"{eps:g}·10^{settings.max_jitter_tries - 1}·mean(diag); increase lam or check the inputs"
        )
    n_fixed = int((used > 0).sum())
    warnings.warn(
        f"{what}: {n_fixed} batch member(s) needed diagonal jitter up to {float(used.max()):.3g} to factor "
        "(ddfast.settings jitter policy)",
        NumericalWarning,
        stacklevel=4,
    )
    return L


def _add_diag(K, mu):
    return K + mu[..., None, None] * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)


# --------------------------------------------------------------------------- feature form


def ridge_weights_ref(Z, Y, lam, *, reg="absolute", detach_reg=False, bias=False, solve_dtype=None, out_dtype=None):
    """W = Zᵀ(ZZᵀ+μI)⁻¹Y (dual, N ≤ d) or (ZᵀZ+μI)⁻¹ZᵀY (primal, d < N), by Cholesky + autograd.

    Shape: Z (..., N, d), Y (..., N, C) → W (..., d, C) (d+1 rows with ``bias``).
    ``solve_dtype``: dtype of the Gram and the factorization (default Z's); ``out_dtype``: dtype of W (default Z's).
    """
    io = Z.dtype
    sd = solve_dtype or io
    if bias:
        Z = append_bias(Z, bias)
    Zs, Ys = Z.to(sd), Y.to(sd)
    mu = ridge_regularizer(Zs, lam, reg, detach_reg)
    N, d = Z.shape[-2], Z.shape[-1]
    if d < N:
        L = psd_safe_cholesky(_add_diag(Zs.mT @ Zs, mu))
        W = torch.cholesky_solve(Zs.mT @ Ys, L)
    else:
        L = psd_safe_cholesky(_add_diag(Zs @ Zs.mT, mu))
        W = Zs.mT @ torch.cholesky_solve(Ys, L)
    return W.to(out_dtype or io)


def krr_predict_ref(Zq, Zs, Ys, lam, *, reg="absolute", detach_reg=False, bias=False, scale=1.0, solve_dtype=None,
                    out_dtype=None):
    """P = Zq Zsᵀ (Zs Zsᵀ+μI)⁻¹ Ys (through the primal W = (ZsᵀZs+μI)⁻¹ZsᵀYs when d < N).

    Shape: Zq (..., M, d), Zs (..., N, d), Ys (..., N, C) → P (..., M, C). ``bias``: True or a kernel
    constant c (the features get a √c column, every kernel entry grows by c). ``scale`` s: K = s·ZqZsᵀ + c
    (the features are multiplied by √s; RFAD: s = 2, c = 0.01).
    """
    io = Zq.dtype
    sd = solve_dtype or io
    if scale != 1.0:
        Zq, Zs = Zq * math.sqrt(scale), Zs * math.sqrt(scale)
    if bias:
        Zq, Zs = append_bias(Zq, bias), append_bias(Zs, bias)
    N, d = Zs.shape[-2], Zs.shape[-1]
    Zqs, Zss = Zq.to(sd), Zs.to(sd)
    if d < N:
        W = ridge_weights_ref(Zss, Ys.to(sd), lam, reg=reg, detach_reg=detach_reg)
        P = Zqs @ W
    else:
        mu = ridge_regularizer(Zss, lam, reg, detach_reg)
        P = (Zqs @ Zss.mT) @ torch.cholesky_solve(Ys.to(sd), psd_safe_cholesky(_add_diag(Zss @ Zss.mT, mu)))
    return P.to(out_dtype or io)


# --------------------------------------------------------------------------- kernel (Gram) form


def ridge_from_gram_ref(K_ss, Y, lam, *, reg="absolute", detach_reg=False, bias=0.0, solve_dtype=None, out_dtype=None):
    """Dual coefficients α = (K_ss + c + μI)⁻¹ Y.

    Shape: K_ss (..., N, N) symmetric PSD, Y (..., N, C) → α (..., N, C). ``bias`` c is added to every
    kernel entry (RFAD: K = 2FFᵀ + 0.01 → ``bias=0.01``); μ from ``reg`` uses tr(K_ss + c).
    """
    io = K_ss.dtype
    sd = solve_dtype or io
    K = K_ss.to(sd)
    c = bias_value(bias)
    if c:
        K = K + c
    N = K.shape[-1]
    trace = None
    if reg != "absolute":
        trace = (K.detach() if detach_reg else K).diagonal(dim1=-2, dim2=-1).sum(-1)
    mu = _regularizer_from_trace(trace, lam, reg, N, K.shape[:-2], K)
    alpha = torch.cholesky_solve(Y.to(sd), psd_safe_cholesky(_add_diag(K, mu), what="ridge_from_gram"))
    return alpha.to(out_dtype or io)


def krr_predict_from_gram_ref(K_ss, K_qs, Y, lam, *, reg="absolute", detach_reg=False, bias=0.0, solve_dtype=None,
                              out_dtype=None):
    """P = (K_qs + c)(K_ss + c + μI)⁻¹ Y.

    Shape: K_ss (..., N, N), K_qs (..., M, N), Y (..., N, C) → P (..., M, C); batch dims broadcast (a shared
    support set K_ss (N, N) serves batched queries K_qs (B, M, N)).
    """
    io = K_qs.dtype
    sd = solve_dtype or io
    alpha = ridge_from_gram_ref(K_ss, Y, lam, reg=reg, detach_reg=detach_reg, bias=bias, solve_dtype=sd, out_dtype=sd)
    Kq = K_qs.to(sd)
    c = bias_value(bias)
    if c:
        Kq = Kq + c
    return (Kq @ alpha).to(out_dtype or io)
