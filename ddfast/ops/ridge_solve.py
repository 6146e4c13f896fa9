"""Fused ridge / kernel-ridge solve: ``ridge_weights`` and ``krr_predict``.

    W = Zᵀ (Z Zᵀ + μI)⁻¹ Y = (ZᵀZ + μI)⁻¹ Zᵀ Y           label-distillation §3, eq. 2–3 (LD-RR)
    P = Zq Zsᵀ (Zs Zsᵀ + μI)⁻¹ Ys                        krr-st-selfsup §3.2, eq. 4 (KRR-ST, KIP, FRePo)

The forward forms the Gram by GEMM, factors it once (Cholesky) and saves the factor; the backward
reuses it (two triangular solves) and computes only the gradients autograd asks for. The dual
(Woodbury, N×N) form is used when N ≤ d, the primal (d×d) form when d < N: the same result.
Equivalent PyTorch: :func:`ddfast.reference.ridge_solve.ridge_weights_ref` / ``krr_predict_ref``.

Kernel contract shared by the backends (batch flattened to B, μ already regularised + jittered)::

    fwd(Z[B,N,d], Y[B,N,C], mu[B], primal) -> W[B,d,C], L[B,n,n], aux[B,n,C], info[B]
        dual:   A = ZZᵀ+μI, L = chol(A), aux = α = A⁻¹Y, W = Zᵀα
        primal: H = ZᵀZ+μI, L = chol(H), aux = W = H⁻¹ZᵀY
    bwd(G, Z, Y, L, aux, primal, need_dZ, need_dY, need_dmu) -> dZ, dY, dmu
        dual:   Bm = A⁻¹ZG, dY = Bm, dZ = α(G − ZᵀBm)ᵀ − BmWᵀ, dμ = −Σ Bm∘α
        primal: V = H⁻¹G, dY = ZV, dZ = (Y − ZW)Vᵀ − dY Wᵀ, dμ = −Σ V∘W
"""

from __future__ import annotations

import numbers
import os
import warnings

import torch

from ddfast import dispatch as _backends
from ddfast import settings
from ddfast.errors import NotPSDError, NumericalWarning
from ddfast.reference.ridge_solve import (
    REGULARIZERS,
    append_bias,
    krr_predict_ref,
    ridge_regularizer,
    ridge_weights_ref,
)

__all__ = ["ridge_weights", "krr_predict", "RidgeWeightsFunction", "KrrPredictFunction"]

_FLOATS = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- backends


def _with_status(W, L, aux, info):
    """Kernel outputs plus the status the C++ kernel reports itself (1: a factor failed, 2: non-finite W)."""
    if bool(info.any()):
        return W, L, aux, info, 1
    return W, L, aux, info, 0 if bool(torch.isfinite(W).all()) else 2


class _CpuKernels:
    name = "cpu"

    @staticmethod
    def not_supported_reasons(Z, Y, primal, solve_dtype):
        ext, why = _backends._load_extension()
        reasons = [why] if ext is None else []
        if Z.device.type != "cpu":
            reasons.append(f"inputs are on {Z.device}, the C++ CPU kernel takes CPU tensors")
        return reasons

    @staticmethod
    def fwd(Z, Y, mu, primal, compute_w=True):
        # The C++ kernel reports a status with the outputs: no extra reduction or sync.
        return _backends.extension().ridge_solve_fwd(Z, Y, mu, primal, compute_w)

    @staticmethod
    def bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu):
        return _backends.extension().ridge_solve_bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu)

    @staticmethod
    def cholesky_solve(R, L):
        return _backends.extension().cholesky_solve(R, L)


class _TritonKernels:
    name = "triton"

    @staticmethod
    def _module():
        from ddfast.kernels import ridge_solve as mod

        return mod

    @classmethod
    def not_supported_reasons(cls, Z, Y, primal, solve_dtype):
        ok, why = _backends._triton_status()
        if not ok:
            return [why]
        reasons = list(cls._module().not_supported_reasons(Z, Y, primal))
        if solve_dtype != Z.dtype:
            reasons.append(f"solve_dtype={solve_dtype} differs from the input dtype {Z.dtype} (mixed precision is cpu only)")
        return reasons

    @classmethod
    def fwd(cls, Z, Y, mu, primal, compute_w=True):
        return _with_status(*cls._module().ridge_solve_fwd(Z, Y, mu, primal))

    @classmethod
    def bwd(cls, G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu):
        return cls._module().ridge_solve_bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu)

    @staticmethod
    def cholesky_solve(R, L):
        return torch.cholesky_solve(R.to(L.dtype), L)


class _CudaKernels:
    name = "cuda"

    @staticmethod
    def not_supported_reasons(Z, Y, primal, solve_dtype):
        ext, why = _backends._load_extension()
        if ext is None:
            return [why]
        reasons = []
        if not getattr(ext, "with_cuda", False):
            reasons.append("ddfast._C was built without CUDA (DDFAST_CUDA=1)")
        if Z.device.type != "cuda":
            reasons.append("inputs are not CUDA tensors")
        if reasons:
            return reasons
        n = Z.shape[-1] if primal else Z.shape[-2]
        if n > ext.ridge_solve_cuda_max_n():
            reasons.append(f"factor size {n} > {ext.ridge_solve_cuda_max_n()} (one block per problem)")
        if solve_dtype != Z.dtype:
            reasons.append("solve_dtype differs from the input dtype (mixed precision is cpu only)")
        return reasons

    @staticmethod
    def fwd(Z, Y, mu, primal, compute_w=True):
        stream = torch.cuda.current_stream(Z.device).cuda_stream
        return _with_status(*_backends.extension().ridge_solve_fwd_cuda(Z, Y, mu, primal, stream))

    @staticmethod
    def bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu):
        stream = torch.cuda.current_stream(Z.device).cuda_stream
        return _backends.extension().ridge_solve_bwd_cuda(
            G.contiguous(), Z, Y, L, aux, primal, need_dz, need_dy, need_dmu, stream
        )

    @staticmethod
    def cholesky_solve(R, L):
        return torch.cholesky_solve(R.to(L.dtype), L)


_KERNELS = {"cpu": _CpuKernels, "triton": _TritonKernels, "cuda": _CudaKernels}


_SELECT_CACHE: dict = {}


def _select(backend, Z, Y, primal, bias, solve_dtype, op):
    """Backend for features Z (..., N, d) and targets Y (..., N, C); memoized on what the reasons depend on."""
    key = (backend, os.environ.get("DDFAST_BACKEND"), Z.device, Z.dtype, solve_dtype, primal, bias, Z.shape[-2:], Y.shape[-1])
    name = _SELECT_CACHE.get(key)
    if name is None:
        # The kernels' reasons look at [B, N, d(+1)] / [B, N, C] kernel inputs: pass shape-alike views.
        Zk = Z.new_empty(()).expand(1, Z.shape[-2], Z.shape[-1] + int(bias))
        Yk = Y.new_empty(()).expand(1, Y.shape[-2], Y.shape[-1])
        candidates = {n: (lambda k=k: k.not_supported_reasons(Zk, Yk, primal, solve_dtype)) for n, k in _KERNELS.items()}
        candidates["reference"] = lambda: []
        name = _backends.select(backend, candidates, op, on_gpu=Z.device.type == "cuda")
        if len(_SELECT_CACHE) > 4096:
            _SELECT_CACHE.clear()
        _SELECT_CACHE[key] = name
    return name


# --------------------------------------------------------------------------- jitter policy


def _factor(kernels, Z, Y, mu, primal, compute_w=True):
    """Run the fused forward; re-factor only failing members with escalating jitter (see ddfast.settings)."""
    W, L, aux, info, status = kernels.fwd(Z, Y, mu, primal, compute_w)
    if status == 0:
        return W, L, aux
    if status == 2:
        raise NotPSDError("ridge solve: non-finite result")
    bad = torch.nonzero(info).flatten()
    n = Z.shape[-1] if primal else Z.shape[-2]
    Zb, Yb, mub = Z[bad], Y[bad], mu[bad]
    scale = Zb.to(mu.dtype).pow(2).sum(dim=(-2, -1)) / n + mub
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    eps = settings.jitter_for(mu.dtype)
    for attempt in range(settings.max_jitter_tries):
        jitter = eps * (10.0**attempt) * scale
        Wb, Lb, auxb, infob, _ = kernels.fwd(Zb, Yb, mub + jitter, primal, compute_w)
        ok = infob == 0
        if bool(ok.any()):
            idx = bad[ok]
            if W.numel():
                W[idx] = Wb[ok]
            L[idx], aux[idx] = Lb[ok], auxb[ok]
            warnings.warn(
                f"ridge solve: {int(ok.sum())} batch member(s) needed diagonal jitter up to "
                f"{float(jitter[ok].max()):.3g} to factor (ddfast.settings jitter policy)",
                NumericalWarning,
                stacklevel=4,
            )
        bad, Zb, Yb, mub, scale = bad[~ok], Zb[~ok], Yb[~ok], mub[~ok], scale[~ok]
        if bad.numel() == 0:
            return W, L, aux
    raise NotPSDError(
        f"ridge solve: the regularised Gram of batch member(s) {bad.tolist()} is not positive definite even "
        f"with jitter {eps:g}·10^{settings.max_jitter_tries - 1}·mean(diag); increase lam or check the features"
    )


# --------------------------------------------------------------------------- autograd Functions


def _kernel_view(x, bias):
    """(..., n, k) → contiguous-batch [B, n, k(+1)], with the ones column appended when ``bias``."""
    if x.dim() != 3:
        x = x.unsqueeze(0) if x.dim() == 2 else x.reshape((-1,) + x.shape[-2:])
    return append_bias(x) if bias else x


class RidgeWeightsFunction(torch.autograd.Function):
    """W = Zᵀ(ZZᵀ+μI)⁻¹Y (dual) or (ZᵀZ+μI)⁻¹ZᵀY (primal).

    Z (..., N, d), Y (..., N, C), μ (B,) with B the flattened batch; ``bias`` appends the ones column
    inside (no autograd node for it). Returns W (..., d(+1), C).
    """

    @staticmethod
    def forward(ctx, Z, Y, mu, primal, bias, kernels):
        Zk, Yk = _kernel_view(Z, bias), _kernel_view(Y, False)
        W, L, aux = _factor(kernels, Zk, Yk, mu, primal)
        ctx.save_for_backward(Zk, Yk, L, aux)
        ctx.primal, ctx.bias, ctx.kernels = primal, bias, kernels
        ctx.shapes = (Z.shape, Y.shape)
        return W.view(Z.shape[:-2] + W.shape[-2:])

    @staticmethod
    def backward(ctx, G):
        Zk, Yk, L, aux = ctx.saved_tensors
        need_dz, need_dy, need_dmu = ctx.needs_input_grad[:3]
        G = G.reshape(Zk.shape[:1] + G.shape[-2:])
        dZ, dY, dmu = ctx.kernels.bwd(G, Zk, Yk, L, aux, ctx.primal, need_dz, need_dy, need_dmu)
        z_shape, y_shape = ctx.shapes
        if dZ is not None:
            dZ = (dZ[..., :-1] if ctx.bias else dZ).reshape(z_shape)
        if dY is not None:
            dY = dY.reshape(y_shape)
        return dZ, dY, dmu, None, None, None


class KrrPredictFunction(torch.autograd.Function):
    """P = (Zq Zsᵀ) α, α = (ZsZsᵀ+μI)⁻¹Ys: the dual form with the query Gram K_qs formed explicitly.

    Used when K_qs is cheaper than going through W = Zsᵀα (many targets C, few queries M).
    Backward (G = ∂/∂P): Bm = A⁻¹K_qsᵀG, dYs = Bm, dK_qs = Gαᵀ, dZq = dK_qs Zs,
    dZs = dK_qsᵀ Zq − (Bmαᵀ + αBmᵀ) Zs, dμ = −Σ Bm∘α.
    """

    @staticmethod
    def forward(ctx, Zq, Zs, Ys, mu, bias, kernels):
        Zqk, Zsk, Ysk = _kernel_view(Zq, bias), _kernel_view(Zs, bias), _kernel_view(Ys, False)
        _, L, alpha = _factor(kernels, Zsk, Ysk, mu, False, compute_w=False)
        K_qs = Zqk @ Zsk.mT
        ctx.save_for_backward(Zqk, Zsk, L, alpha, K_qs)
        ctx.kernels, ctx.bias, ctx.shapes = kernels, bias, (Zq.shape, Zs.shape, Ys.shape)
        P = K_qs @ alpha.to(Zs.dtype)
        return P.view(Zq.shape[:-1] + P.shape[-1:])

    @staticmethod
    def backward(ctx, G):
        Zq, Zs, L, alpha, K_qs = ctx.saved_tensors
        need_dzq, need_dzs, need_dys, need_dmu = ctx.needs_input_grad[:4]
        zq_shape, zs_shape, ys_shape = ctx.shapes
        G = G.reshape(Zq.shape[:-1] + G.shape[-1:])
        dZq = dZs = dYs = dmu = None
        alpha_io = alpha.to(Zs.dtype)
        if need_dzq or need_dzs:
            dK = G @ alpha_io.mT
            if need_dzq:
                dZq = dK @ Zs
            if need_dzs:
                dZs = dK.mT @ Zq
        if need_dzs or need_dys or need_dmu:
            Bm = ctx.kernels.cholesky_solve(K_qs.mT @ G, L)
            if need_dys:
                dYs = Bm.to(Zs.dtype).reshape(ys_shape)
            if need_dmu:
                dmu = -(Bm * alpha).sum(dim=(-2, -1))
            if need_dzs:
                S = Bm.to(Zs.dtype) @ alpha_io.mT
                dZs = dZs - (S + S.mT) @ Zs
        if ctx.bias:
            dZq = dZq[..., :-1] if dZq is not None else None
            dZs = dZs[..., :-1] if dZs is not None else None
        dZq = dZq.reshape(zq_shape) if dZq is not None else None
        dZs = dZs.reshape(zs_shape) if dZs is not None else None
        return dZq, dZs, dYs, dmu, None, None


# --------------------------------------------------------------------------- validation


def _check_matrix(name, x, min_dims=2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if x.dim() < min_dims:
        raise ValueError(f"{name}: expected at least {min_dims} dims (..., rows, cols), got shape {tuple(x.shape)}")


def _validate(named, lam, reg, solve_dtype):
    """named: list of (name, tensor). Checks dtype, dims, device, finiteness, λ, reg, solve_dtype."""
    for name, x in named:
        _check_matrix(name, x)
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} like {first_name}, got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} like {first_name}, got {x.device}")
        if x.shape[:-2] != first.shape[:-2]:
            raise ValueError(
                f"{name}: expected batch dims {tuple(first.shape[:-2])} like {first_name}, got {tuple(x.shape[:-2])}"
            )
    for name, x in named:
        if x.numel() == 0:
            raise ValueError(f"{name}: empty input, got shape {tuple(x.shape)}")
    if reg not in REGULARIZERS:
        raise ValueError(f"reg: expected one of {REGULARIZERS}, got {reg!r}")
    if solve_dtype is not None and solve_dtype not in _FLOATS:
        raise TypeError(f"solve_dtype: expected None, torch.float32 or torch.float64, got {solve_dtype}")
    if solve_dtype is not None and torch.promote_types(solve_dtype, first.dtype) != solve_dtype:
        raise TypeError(f"solve_dtype: {solve_dtype} is narrower than the input dtype {first.dtype}")
    batch = first.shape[:-2]
    if isinstance(lam, torch.Tensor):
        if lam.dtype not in _FLOATS:
            raise TypeError(f"lam: expected a float or a float32/float64 tensor, got dtype {lam.dtype}")
        if lam.device != first.device:
            raise ValueError(f"lam: expected device {first.device}, got {lam.device}")
        try:
            torch.broadcast_shapes(lam.shape, batch)
        except RuntimeError:
            raise ValueError(f"lam: shape {tuple(lam.shape)} does not broadcast to the batch shape {tuple(batch)}") from None
        if torch.broadcast_shapes(lam.shape, batch) != batch:
            raise ValueError(f"lam: shape {tuple(lam.shape)} would enlarge the batch shape {tuple(batch)}")
        if not bool((lam > 0).all()):
            raise ValueError("lam: expected every entry > 0")
    elif isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        if not lam > 0 or lam != lam or lam == float("inf"):
            raise ValueError(f"lam: expected a finite positive float, got {lam}")
    else:
        raise TypeError(f"lam: expected a positive float or a tensor, got {type(lam).__name__}")


def _check_finite_output(out, named, op):
    """Never a silent NaN: a non-finite result names the non-finite input, or is a solve failure.

    Checking the (small) output costs one reduction; NaN/Inf inputs always propagate to it.
    """
    if not settings.check_finite or bool(torch.isfinite(out).all()):
        return out
    _raise_if_nonfinite(named)
    raise NotPSDError(f"{op}: the solve produced non-finite values from finite inputs; increase lam")


def _raise_if_nonfinite(named):
    for name, x in named:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: contains NaN or Inf")


def _mu(Z, lam, reg, detach_reg, bias, solve_dtype):
    if reg == "absolute" and not isinstance(lam, torch.Tensor):
        return torch.full((Z.shape[:-2].numel(),), float(lam), dtype=solve_dtype, device=Z.device)
    return ridge_regularizer(Z, lam, reg, detach_reg, bias).reshape(-1).to(solve_dtype)


# --------------------------------------------------------------------------- public API


def ridge_weights(Z, Y, lam, *, reg="absolute", detach_reg=False, bias=False, solve_dtype=None, backend="auto"):
    """Ridge-regression weights W = Zᵀ(ZZᵀ+μI)⁻¹Y (Woodbury form; LD-RR §3 eq. 3).

    Args:
        Z: features (..., N, d), float32/float64.
        Y: targets (..., N, C), same dtype, batch dims and device.
        lam: λ > 0, a float or a tensor broadcastable to the batch shape (differentiable).
        reg: "absolute" μ=λ (LD); "trace_mean" μ=λ·tr(K)/N (KIP/FRePo/RFAD); "trace" μ=λ·tr(K) (KRR-ST).
        detach_reg: no gradient through tr(K) (KRR-ST) when True.
        bias: append a ones column to Z (LD-RR, KRR-ST); W then has d+1 rows, the last is the bias.
        solve_dtype: dtype of the factorization (e.g. torch.float64 for float32 inputs); Gram in input dtype.
        backend: "auto" | "fused" | "cpu" | "triton" | "cuda" | "reference".
    Shape: W (..., d, C) (d+1 with bias).
    Equivalent PyTorch: ``ddfast.reference.ridge_solve.ridge_weights_ref``.
    """
    _validate([("Z", Z), ("Y", Y)], lam, reg, solve_dtype)
    if Y.shape[-2] != Z.shape[-2]:
        raise ValueError(f"Y: expected {Z.shape[-2]} rows like Z (..., N, d), got shape {tuple(Y.shape)}")
    sd = solve_dtype or Z.dtype
    N, d = Z.shape[-2], Z.shape[-1] + int(bias)
    primal = d < N
    name = _select(backend, Z, Y, primal, bias, sd, "ridge_weights")
    named = [("Z", Z), ("Y", Y)]
    try:
        if name == "reference":
            W = ridge_weights_ref(Z, Y, lam, reg=reg, detach_reg=detach_reg, bias=bias, solve_dtype=solve_dtype)
        else:
            mu = _mu(Z, lam, reg, detach_reg, bias, sd)
            W = RidgeWeightsFunction.apply(Z, Y, mu, primal, bias, _KERNELS[name])
    except NotPSDError:
        _raise_if_nonfinite(named)
        raise
    return W if name == "cpu" else _check_finite_output(W, named, "ridge_weights")


def krr_predict(Zq, Zs, Ys, lam, *, reg="absolute", detach_reg=False, bias=False, solve_dtype=None, backend="auto"):
    """Kernel-ridge prediction P = Zq Zsᵀ(ZsZsᵀ+μI)⁻¹Ys (KRR-ST §3.2 eq. 4; KIP; FRePo).

    Args:
        Zq: query features (..., M, d); Zs: support features (..., N, d); Ys: support targets (..., N, C).
        lam, reg, detach_reg, bias, solve_dtype, backend: as :func:`ridge_weights` (the regulariser is
        computed from the support Gram K = ZsZsᵀ).
    Shape: P (..., M, C).
    The product is associated as Zq·W (W = Zsᵀα, or the primal W when d < N) or as K_qs·α, whichever
    takes fewer flops: M·N·(d+C) vs d·C·(N+M).
    Equivalent PyTorch: ``ddfast.reference.ridge_solve.krr_predict_ref``.
    """
    _validate([("Zq", Zq), ("Zs", Zs), ("Ys", Ys)], lam, reg, solve_dtype)
    if Zq.shape[-1] != Zs.shape[-1]:
        raise ValueError(f"Zq: expected {Zs.shape[-1]} features like Zs (..., N, d), got shape {tuple(Zq.shape)}")
    if Ys.shape[-2] != Zs.shape[-2]:
        raise ValueError(f"Ys: expected {Zs.shape[-2]} rows like Zs (..., N, d), got shape {tuple(Ys.shape)}")
    sd = solve_dtype or Zs.dtype
    M, N, d, C = Zq.shape[-2], Zs.shape[-2], Zs.shape[-1] + int(bias), Ys.shape[-1]
    primal = d < N
    name = _select(backend, Zs, Ys, primal, bias, sd, "krr_predict")
    named = [("Zq", Zq), ("Zs", Zs), ("Ys", Ys)]
    try:
        mu = None if name == "reference" else _mu(Zs, lam, reg, detach_reg, bias, sd)
        if name == "reference":
            P = krr_predict_ref(Zq, Zs, Ys, lam, reg=reg, detach_reg=detach_reg, bias=bias, solve_dtype=solve_dtype)
        elif primal or d * C * (N + M) <= M * N * (d + C):
            W = RidgeWeightsFunction.apply(Zs, Ys, mu, primal, bias, _KERNELS[name])
            P = Zq @ W[..., :-1, :] + W[..., -1:, :] if bias else Zq @ W
        else:
            P = KrrPredictFunction.apply(Zq, Zs, Ys, mu, bias, _KERNELS[name])
    except NotPSDError:
        _raise_if_nonfinite(named)
        raise
    return _check_finite_output(P, named, "krr_predict")
