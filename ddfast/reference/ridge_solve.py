"""Eager PyTorch reference for the ridge / kernel-ridge solve (the truth the kernels are tested against).

    W = Zᵀ (Z Zᵀ + μ I)⁻¹ Y                    ridge weights, Woodbury form   (label-distillation §3, eq. 3)
    P = Zq Zsᵀ (Zs Zsᵀ + μ I)⁻¹ Ys             kernel-ridge prediction        (krr-st-selfsup §3.2, eq. 4)

with the regulariser μ chosen by ``reg``:

    "absolute"    μ = λ                         (LD-RR)
    "trace_mean"  μ = λ · tr(K) / N             (KIP, FRePo, RFAD)
    "trace"       μ = λ · tr(K)                 (KRR-ST)

where K = Z Zᵀ is the N×N Gram of the (optionally bias-augmented) features; tr(K) = ‖Z‖²_F.
"""

from __future__ import annotations

import torch

from ddfast.errors import NotPSDError

REGULARIZERS = ("absolute", "trace_mean", "trace")


def append_bias(Z: torch.Tensor) -> torch.Tensor:
    """Append a column of ones to the features: (..., N, d) → (..., N, d+1)."""
    return torch.cat([Z, Z.new_ones(Z.shape[:-1] + (1,))], dim=-1)


def ridge_regularizer(
    Z: torch.Tensor, lam, reg: str = "absolute", detach_reg: bool = False, bias: bool = False
) -> torch.Tensor:
    """μ of shape ``Z.shape[:-2]`` for features ``Z (..., N, d)``.

    ``lam`` is a float or a tensor broadcastable to the batch shape. With ``detach_reg`` the
    trace term carries no gradient (as KRR-ST does); λ itself always does. ``bias=True`` gives μ
    of the bias-augmented features [Z, 1] (tr grows by N) without forming them.
    """
    batch = Z.shape[:-2]
    lam_t = torch.as_tensor(lam, dtype=Z.dtype, device=Z.device)
    if reg == "absolute":
        mu = lam_t
    else:
        Zr = Z.detach() if detach_reg else Z
        trace = Zr.pow(2).sum(dim=(-2, -1))
        if bias:
            trace = trace + Z.shape[-2]
        if reg == "trace_mean":
            trace = trace / Z.shape[-2]
        elif reg != "trace":
            raise ValueError(f"reg: expected one of {REGULARIZERS}, got {reg!r}")
        mu = lam_t * trace
    return mu.expand(batch) if mu.shape != batch else mu


def _solve(A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    X = torch.linalg.solve(A, Y)
    if not bool(torch.isfinite(X).all()):
        raise NotPSDError("reference solve produced non-finite values: the regularised Gram is singular")
    return X


def ridge_weights_ref(Z, Y, lam, *, reg="absolute", detach_reg=False, bias=False, solve_dtype=None):
    """W = Zᵀ(ZZᵀ+μI)⁻¹Y by ``torch.linalg.solve`` + autograd.

    Shape: Z (..., N, d), Y (..., N, C) → W (..., d, C) (d+1 rows with ``bias``).
    ``solve_dtype``: dtype of the factorization; the Gram is formed in the input dtype.
    """
    if bias:
        Z = append_bias(Z)
    K = Z @ Z.mT
    mu = ridge_regularizer(Z, lam, reg, detach_reg)
    sd = solve_dtype or Z.dtype
    A = K.to(sd) + mu.to(sd)[..., None, None] * torch.eye(K.shape[-1], dtype=sd, device=K.device)
    alpha = _solve(A, Y.to(sd)).to(Z.dtype)
    return Z.mT @ alpha


def krr_predict_ref(Zq, Zs, Ys, lam, *, reg="absolute", detach_reg=False, bias=False, solve_dtype=None):
    """P = Zq Zsᵀ (Zs Zsᵀ+μI)⁻¹ Ys by ``torch.linalg.solve`` + autograd.

    Shape: Zq (..., M, d), Zs (..., N, d), Ys (..., N, C) → P (..., M, C).
    """
    if bias:
        Zq, Zs = append_bias(Zq), append_bias(Zs)
    K_ss = Zs @ Zs.mT
    K_qs = Zq @ Zs.mT
    mu = ridge_regularizer(Zs, lam, reg, detach_reg)
    sd = solve_dtype or Zs.dtype
    A = K_ss.to(sd) + mu.to(sd)[..., None, None] * torch.eye(K_ss.shape[-1], dtype=sd, device=K_ss.device)
    alpha = _solve(A, Ys.to(sd)).to(Zs.dtype)
    return K_qs @ alpha
