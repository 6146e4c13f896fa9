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

import math
import numbers
import os
import warnings

import torch
from torch.autograd import forward_ad as _forward_ad

from ddfast import dispatch as _backends
from ddfast import settings
from ddfast.errors import NotPSDError, NumericalWarning
from ddfast.ops._autograd import FastFunction, compile_apply, select_backend
from ddfast.reference.ridge_solve import (
    REGULARIZERS,
    append_bias,
    bias_value,
    can_sync,
    krr_predict_from_gram_ref,
    krr_predict_ref,
    ridge_from_gram_ref,
    ridge_regularizer,
    ridge_weights_ref,
)

__all__ = ["ridge_weights", "krr_predict", "ridge_from_gram", "krr_predict_from_gram", "RidgeWeightsFunction",
           "KrrPredictFunction", "KrrPredictDualFunction"]

_FLOATS = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- backends


def _with_status(W, L, aux, info):
    """Kernel outputs plus a status (1: a factor failed, 2: non-finite W), for kernels that report none."""
    if bool(info.any()):
        return W, L, aux, info, 1
    return W, L, aux, info, 0 if bool(torch.isfinite(W).all()) else 2


def _compiled_fwd(Z, Y, mu, primal, compute_w=True):
    # The C++ operator reports its status (0-d int tensor) with the outputs: no extra reduction.
    W, L, aux, info, status = torch.ops.ddfast.ridge_solve_fwd(Z, Y, mu, primal, compute_w)
    if torch.compiler.is_compiling():  # no host sync while tracing: _factor checks the tensor on device
        return W, L, aux, info, status
    return W, L, aux, info, int(status)


def _triton():
    from ddfast.kernels import ridge_solve

    return ridge_solve


def _triton_bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu):
    grads = _triton().ridge_solve_bwd(G, Z, Y, L, aux, primal, need_dz, need_dy, need_dmu)
    return tuple(g if need else None for g, need in zip(grads, (need_dz, need_dy, need_dmu)))


def _torch_cholesky_solve(R, L):
    return torch.cholesky_solve(R.to(L.dtype), L)


def _factor_size(inputs):
    return inputs["d"] if inputs["primal"] else inputs["N"]


def _same_solve_dtype(inputs):
    if inputs["solve_dtype"] != inputs["dtype"]:
        return f"solve_dtype={inputs['solve_dtype']} differs from the input dtype {inputs['dtype']} (mixed precision is cpu only)"


def _triton_sizes(inputs):
    from ddfast.kernels.ridge_solve import MAX_FACTOR_DIM, MAX_TARGET_DIM

    n, C, what = _factor_size(inputs), inputs["C"], "d (primal" if inputs["primal"] else "N (dual"
    if n > MAX_FACTOR_DIM:
        return f"{what} factor size) = {n} > {MAX_FACTOR_DIM}"
    if C > MAX_TARGET_DIM:
        return f"C = {C} > {MAX_TARGET_DIM}"


#: The CUDA kernel runs one block per problem with the factor in shared memory: n ≤ this, and
#: cuda_shared_memory_bytes(n) within the device's opt-in maximum (232,448 B on H100/H200, 166,912 B on A100).
CUDA_MAX_FACTOR = 128


def cuda_shared_memory_bytes(n, itemsize):
    """Bytes of shared memory one block of the CUDA ridge kernels needs for a factor of order n
    (csrc/cuda/ridge_solve.h ``ridge_solve_smem_bytes``: n·(n|1) + 2·n·33 + 2·32·33 + 8 values; the
    right-hand sides go through in 32-column tiles, so it does not grow with C)."""
    tile = 32 + 1
    return (n * (n | 1) + 2 * n * tile + 2 * 32 * tile + 256 // 32) * itemsize


def _cuda_shared_memory(inputs):
    n = _factor_size(inputs)
    if n > CUDA_MAX_FACTOR:
        return f"factor size {n} > {CUDA_MAX_FACTOR} (one block per problem)"
    need = cuda_shared_memory_bytes(n, inputs["dtype"].itemsize)
    have = _backends.shared_memory_optin(inputs["device"])
    if need > have:
        return f"needs {need:,} B of shared memory per block (factor n={n}, {inputs['dtype']}) > the device's {have:,} B"


_COMPILED = dict(fwd=_compiled_fwd, bwd=lambda *a: torch.ops.ddfast.ridge_solve_bwd(*a))
RIDGE_SOLVE = _backends.register_op(
    "ridge_solve",
    [
        _backends.Impl("cuda", _backends.Kernels("cuda", **_COMPILED, cholesky_solve=_torch_cholesky_solve),
                       dtypes=_FLOATS, limits=(_same_solve_dtype, _cuda_shared_memory)),
        _backends.Impl("triton", _backends.Kernels(
            "triton", fwd=lambda Z, Y, mu, primal, compute_w=True: _with_status(
                *_triton().ridge_solve_fwd(Z, Y, mu, primal)),
            bwd=_triton_bwd, cholesky_solve=_torch_cholesky_solve),
            dtypes=_FLOATS, limits=(_same_solve_dtype, _triton_sizes)),
        _backends.Impl("cpu", _backends.Kernels(
            "cpu", **_COMPILED, cholesky_solve=lambda R, L: torch.ops.ddfast.cholesky_solve(R, L)), dtypes=_FLOATS),
    ],
    describe={
        "ridge_weights": lambda Z, Y, lam=None, *, bias=False, solve_dtype=None, **_: _describe(Z, Y, bias, solve_dtype),
        "krr_predict": lambda Zq, Zs, Ys, lam=None, *, bias=False, solve_dtype=None, out_dtype=None, **_: {
            **_describe(Zs, Ys, bias, solve_dtype), **_one_call_note(Zq, Zs, Ys, bias, solve_dtype, out_dtype)},
    },
)
_KERNELS = {name: impl.kernels for name, impl in RIDGE_SOLVE.impls.items() if impl.kernels is not None}


def _describe(Z, Y, bias, solve_dtype):
    """What the backends' limits read, for features Z (..., N, d) and targets Y (..., N, C)."""
    N, d = Z.shape[-2], Z.shape[-1] + int(bool(bias))
    return {"device": Z.device, "dtype": Z.dtype, "solve_dtype": solve_dtype or Z.dtype, "N": N, "d": d,
            "C": Y.shape[-1], "primal": d < N}


def _operator_path(N, M, C, primal, dtype, sd, od, device_type):
    """Whether krr_predict runs as the cpu kernel's operators (its cpu backend chosen, the product not through
    the reference): (the one-call forward: dual form, the solve in the features' dtype or float64, P in either;
    its closed-form backward too: N ≤ ``ONE_CALL_GRAD_MAX_N`` and few targets per support row,
    C·(M + 2N) ≤ ``ONE_CALL_GRAD_MAX_FLOP_RATIO``·N·M)."""
    forward = not primal and sd in (dtype, torch.float64) and od in (dtype, sd)
    backward = (forward and N <= ONE_CALL_GRAD_MAX_N.get(device_type, 0)
                and C * (M + 2 * N) <= ONE_CALL_GRAD_MAX_FLOP_RATIO * N * M)
    return forward, backward


def _one_call_note(Zq, Zs, Ys, bias, solve_dtype, out_dtype):
    """``explain``'s note on the operators ``krr_predict`` calls on the chosen cpu backend
    (:func:`_operator_path`)."""
    N, d = Zs.shape[-2], Zs.shape[-1] + int(bool(bias))
    M = Zq.shape[:-1].numel() if Zs.dim() == 2 and Zq.dim() > 2 else Zq.shape[-2]
    C = Ys.shape[-1] if Ys.dim() == Zs.dim() else 1
    forward, backward = _operator_path(N, M, C, d < N, Zs.dtype, solve_dtype or Zs.dtype, out_dtype or Zs.dtype,
                                       Zs.device.type)
    if not forward:
        return {}
    note = ("krr_predict runs the cpu kernel's one-call forward (torch.ops.ddfast.krr_predict_fwd) when no "
            "derivative can be asked for")
    if backward:
        return {"note": note + ", and with its closed-form backward (krr_predict_bwd) when one can (a float λ)"}
    return {"note": note + f"; derivatives go through the fused Functions (N = {N} > ONE_CALL_GRAD_MAX_N, or "
                           f"C·(M+2N)/(N·M) = {C * (M + 2 * N) / (N * M):.2f} > ONE_CALL_GRAD_MAX_FLOP_RATIO)"}


def _select(backend, Z, Y, primal, bias, solve_dtype, op):
    """Backend for features Z (..., N, d) and targets Y (..., N, C) (see ddfast.dispatch)."""
    return select_backend(RIDGE_SOLVE, backend, _describe(Z, Y, bias, solve_dtype))


# --------------------------------------------------------------------------- jitter policy


def _factor(kernels, Z, Y, mu, primal, compute_w=True):
    """Run the fused forward; re-factor only failing members with escalating jitter (see ddfast.settings)."""
    W, L, aux, info, status = kernels.fwd(Z, Y, mu, primal, compute_w)
    if torch.compiler.is_compiling():
        # Inside a compiled graph the status cannot steer Python: a failed factor (or a non-finite result)
        # stops the step with an error instead of the eager path's jitter retries (docs/ops/ridge_solve.md).
        torch._assert_async(torch.as_tensor(status == 0),
                            "ridge solve: the regularised Gram is not positive definite or the result is not "
                            "finite (compiled graphs skip the jitter retries; increase lam or run eagerly)")
        return W, L, aux
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
#
# Every Function here is new-style (``setup_context``) so torch.func transforms apply:
# * backward: the fused kernel's closed form when no graph is built; with ``create_graph=True`` (and under
#   torch.func, which always builds one) the same closed form written in torch ops around ``_CholSolve``,
#   whose own backward and jvp reuse the saved factor and are written with ``_CholSolve`` again, so
#   derivatives of every order are exact (gradgradcheck in tests/test_ridge_autograd.py);
# * jvp: the forward-mode derivative dα = A⁻¹(dY − dA·α) through ``_CholSolve`` (jacfwd, hessian);
# * vmap: the vmapped dimension is folded into the batch dimensions the kernels already take.


def _kernel_view(x, bias):
    """(..., n, k) → [B, n, k(+1)], with the constant column √c appended when ``bias`` (True: c = 1)."""
    if x.dim() != 3:
        x = x.unsqueeze(0) if x.dim() == 2 else x.reshape((-1,) + x.shape[-2:])
    return append_bias(x, bias) if bias else x


def _tangent_view(t, like, bias):
    """Tangent of ``_kernel_view(x, bias)``: the constant column has a zero tangent."""
    if t is None:
        return None
    t = _kernel_view(t, False)
    return torch.cat([t, t.new_zeros(t.shape[:-1] + (1,))], dim=-1) if bias else t


def _mm_thin(A, X):
    """A [.., m, k] @ X [.., k, c] for a thin X (c = targets), formed as (XᵀAᵀ)ᵀ: the layout MKL runs fast.

    Measured (one thread, float32): Zᵀα with Z 100×2048, C = 10 takes 0.96 ms as A@X, 0.18 ms as (XᵀAᵀ)ᵀ;
    K_qsᵀG with K_qs 256×100: 0.088 ms vs 0.043 ms.
    """
    return (X.mT @ A.mT).mT


class _ThinMatmul(FastFunction):
    """P = A @ X for a thin X (c = targets columns), every product in the fast orientation.

    Autograd's own backward of A @ X forms ∂X = AᵀG as a thin-output GEMM, the slow layout (one thread,
    float32: Zqᵀ·G with Zq 256×8192, C = 10 took 10× the time of (GᵀZq)ᵀ); here ∂X = (GᵀA)ᵀ, ∂A = GXᵀ.
    Written in torch ops and itself: derivatives of every order; vmap generated; jvp dA·X + A·dX.
    A and X share their batch dims (no broadcasting).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(A, X):
        return _mm_thin(A, X)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, G):
        A, X = ctx.saved_tensors
        dA = G @ X.mT if ctx.needs_input_grad[0] else None
        dX = _applyThinMatmul(A.mT, G) if ctx.needs_input_grad[1] else None
        return dA, dX

    @staticmethod
    def jvp(ctx, dA, dX):
        A, X = ctx.saved_tensors
        out = _applyThinMatmul(dA, X) if dA is not None else None
        if dX is not None:
            out = _applyThinMatmul(A, dX) if out is None else out + _applyThinMatmul(A, dX)
        return out


def _own(x, shape):
    """``x`` reshaped, as a tensor that is not a view (forward AD needs the output and its tangent alike)."""
    x = x.reshape(shape)
    return x.clone() if x._base is not None else x


def _fold_vmap(info, in_dims, *xs):
    """Each tensor with its vmapped dimension moved to the front; unbatched ones are expanded to it."""
    out = []
    for x, d in zip(xs, in_dims):
        if isinstance(x, torch.Tensor):
            x = x.movedim(d, 0) if d is not None else x.expand((info.batch_size,) + x.shape)
        out.append(x)
    return out


def _dA_times(Z, X, dZ, dmu, primal):
    """dA·X for A = ZZᵀ+μI (dual) or ZᵀZ+μI (primal) with tangents dZ, dμ (None: zero); None if both are."""
    out = None
    if dZ is not None:
        dZ = dZ.to(X.dtype)
        Zs = Z.to(X.dtype)
        out = dZ.mT @ (Zs @ X) + Zs.mT @ (dZ @ X) if primal else dZ @ (Zs.mT @ X) + Zs @ (dZ.mT @ X)
    if dmu is not None:
        term = dmu.to(X.dtype)[..., None, None] * X
        out = term if out is None else out + term
    return out


class _CholSolve(FastFunction):
    """X = A⁻¹R for A = ZZᵀ+μI (dual) or ZᵀZ+μI (primal), given A's saved lower Cholesky factor L.

    R [B, n, k] and μ [B] in the solve dtype (L's), Z [B, N, d] in the input dtype. Differentiable to
    any order in R, Z and μ: ∂R = A⁻¹Ḡ, Ā = −∂R·Xᵀ, ∂Z = (Ā+Āᵀ)Z (dual) or Z(Ā+Āᵀ) (primal), ∂μ = tr Ā;
    jvp dX = A⁻¹(dR − dA·X). The jitter a failing member needed is part of L: its derivatives are those
    of the jittered system.
    """

    @staticmethod
    def forward(R, Z, mu, L, primal, kernels):
        return kernels.cholesky_solve(R, L)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, Z, mu, L, primal, kernels = inputs
        ctx.save_for_backward(Z, mu, L, output)
        ctx.save_for_forward(Z, mu, L, output)
        ctx.primal, ctx.kernels = primal, kernels

    @staticmethod
    def backward(ctx, gX):
        Z, mu, L, X = ctx.saved_tensors
        need_r, need_z, need_mu = ctx.needs_input_grad[:3]
        gR = _applyCholSolve(gX.to(L.dtype), Z, mu, L, ctx.primal, ctx.kernels)
        dZ = dmu = None
        if need_z:
            S = gR @ X.mT
            S = S + S.mT
            Zs = Z.to(L.dtype)
            dZ = -(Zs @ S if ctx.primal else S @ Zs).to(Z.dtype)
        if need_mu:
            dmu = -(gR * X).sum(dim=(-2, -1))
        return (gR if need_r else None), dZ, dmu, None, None, None

    @staticmethod
    def jvp(ctx, dR, dZ, dmu, *_):
        Z, mu, L, X = ctx.saved_tensors
        r = dR
        dAX = _dA_times(Z, X, dZ, dmu, ctx.primal)
        if dAX is not None:
            r = -dAX if r is None else r - dAX
        if r is None:
            return torch.zeros_like(X)
        return _applyCholSolve(r.to(L.dtype), Z, mu, L, ctx.primal, ctx.kernels)

    @staticmethod
    def vmap(info, in_dims, R, Z, mu, L, primal, kernels):
        R, Z, mu, L = _fold_vmap(info, in_dims[:4], R, Z, mu, L)
        X = _applyCholSolve(R.flatten(0, 1), Z.flatten(0, 1), mu.flatten(0, 1), L.flatten(0, 1), primal, kernels)
        return X.unflatten(0, (info.batch_size, -1)), 0


def _ridge_weights_vjp(G, Zk, Yk, mu, L, primal, kernels, need_dz, need_dy, need_dmu):
    """The backward of W in differentiable torch ops (used when a graph of the backward is built)."""
    sd, io = L.dtype, Zk.dtype

    def solve(R):
        return _applyCholSolve(R.to(sd), Zk, mu, L, primal, kernels)

    dZ = dY = dmu = None
    if not primal:
        alpha, Bm = solve(Yk), solve(_mm_thin(Zk, G))  # α = A⁻¹Y, Bm = A⁻¹ZG
        a_io, b_io = alpha.to(io), Bm.to(io)
        if need_dy:
            dY = b_io
        if need_dmu:
            dmu = -(Bm * alpha).sum(dim=(-2, -1))
        if need_dz:
            S = b_io @ a_io.mT
            dZ = a_io @ G.mT - (S + S.mT) @ Zk
    else:
        W, V = solve(_mm_thin(Zk.mT, Yk)), solve(G)  # W = H⁻¹ZᵀY, V = H⁻¹G
        W_io, V_io = W.to(io), V.to(io)
        ZV = _mm_thin(Zk, V_io)
        if need_dy:
            dY = ZV
        if need_dmu:
            dmu = -(V * W).sum(dim=(-2, -1))
        if need_dz:
            dZ = (Yk - _mm_thin(Zk, W_io)) @ V_io.mT - ZV @ W_io.mT
    return dZ, dY, dmu


class RidgeWeightsFunction(FastFunction):
    """W = Zᵀ(ZZᵀ+μI)⁻¹Y (dual) or (ZᵀZ+μI)⁻¹ZᵀY (primal).

    Z (..., N, d), Y (..., N, C), μ (B,) with B the flattened batch; ``bias`` appends the ones column
    inside (no autograd node for it). Returns (W (..., d(+1), C), L, aux): the factor and α (dual) / W
    (primal) in the solve dtype, non-differentiable. Higher-order derivatives, jvp and vmap: see above.
    """

    @staticmethod
    def forward(Z, Y, mu, primal, bias, kernels):
        Zk, Yk = _kernel_view(Z, bias), _kernel_view(Y, False)
        W, L, aux = _factor(kernels, Zk, Yk, mu, primal)
        return _own(W, Z.shape[:-2] + W.shape[-2:]), L, aux

    @staticmethod
    def setup_context(ctx, inputs, output):
        Z, Y, mu, primal, bias, kernels = inputs
        _, L, aux = output
        ctx.mark_non_differentiable(L, aux)
        ctx.save_for_backward(Z, Y, mu, L, aux)
        ctx.save_for_forward(Z, Y, mu, L, aux)
        ctx.primal, ctx.bias, ctx.kernels = primal, bias, kernels

    @staticmethod
    def backward(ctx, G, _gL=None, _gaux=None):
        Z, Y, mu, L, aux = ctx.saved_tensors
        need_dz, need_dy, need_dmu = ctx.needs_input_grad[:3]
        Zk, Yk = _kernel_view(Z, ctx.bias), _kernel_view(Y, False)
        G = G.reshape(Zk.shape[:1] + G.shape[-2:])
        if torch.is_grad_enabled():  # create_graph=True or a torch.func transform: stay differentiable
            dZ, dY, dmu = _ridge_weights_vjp(G, Zk, Yk, mu, L, ctx.primal, ctx.kernels, need_dz, need_dy, need_dmu)
        else:
            dZ, dY, dmu = ctx.kernels.bwd(G, Zk, Yk, L, aux, ctx.primal, need_dz, need_dy, need_dmu)
        if dZ is not None:
            dZ = (dZ[..., :-1] if ctx.bias else dZ).reshape(Z.shape)
        if dY is not None:
            dY = dY.reshape(Y.shape)
        return (dZ if need_dz else None), (dY if need_dy else None), (dmu if need_dmu else None), None, None, None

    @staticmethod
    def jvp(ctx, dZ, dY, dmu, *_):
        Z, Y, mu, L, _aux = ctx.saved_tensors
        sd, io = L.dtype, Z.dtype
        Zk, Yk = _kernel_view(Z, ctx.bias), _kernel_view(Y, False)
        dZk, dYk = _tangent_view(dZ, Z, ctx.bias), _tangent_view(dY, Y, False)
        Zs = Zk.to(sd)

        def solve(R):
            return _applyCholSolve(R.to(sd), Zk, mu, L, ctx.primal, ctx.kernels)

        if not ctx.primal:
            alpha = solve(Yk)
            r = dYk.to(sd) if dYk is not None else torch.zeros_like(alpha)
            dAa = _dA_times(Zk, alpha, dZk, dmu, False)
            dW = Zs.mT @ solve(r if dAa is None else r - dAa)
            if dZk is not None:
                dW = dW + dZk.to(sd).mT @ alpha
        else:
            W = solve(Zs.mT @ Yk.to(sd))
            r = torch.zeros_like(W)
            if dZk is not None:
                dZs = dZk.to(sd)
                r = r + dZs.mT @ (Yk.to(sd) - Zs @ W) - Zs.mT @ (dZs @ W)
            if dYk is not None:
                r = r + Zs.mT @ dYk.to(sd)
            if dmu is not None:
                r = r - dmu.to(sd)[..., None, None] * W
            dW = solve(r)
        return dW.to(io).reshape(Z.shape[:-2] + dW.shape[-2:]), None, None

    @staticmethod
    def vmap(info, in_dims, Z, Y, mu, primal, bias, kernels):
        Z, Y, mu = _fold_vmap(info, in_dims[:3], Z, Y, mu)
        W, L, aux = _applyRidgeWeightsFunction(Z, Y, mu.flatten(0, 1), primal, bias, kernels)
        V = info.batch_size
        return (W, L.unflatten(0, (V, -1)), aux.unflatten(0, (V, -1))), (0, 0, 0)


def _query_gram(Zq, Zs, bias):
    """K_qs = Zq Zsᵀ (+ c) as [B, M, N], the kernel constant added to the product instead of a √c column
    appended to both feature matrices (a copy of the M×d queries saved; (Zs Zqᵀ)ᵀ measured 1.3× slower at
    N = 16, d = 8192, one thread)."""
    K_qs = _kernel_view(Zq, False) @ _kernel_view(Zs, False).mT
    return K_qs + bias_value(bias) if bias else K_qs


class KrrPredictFunction(FastFunction):
    """P = (Zq Zsᵀ) α, α = (ZsZsᵀ+μI)⁻¹Ys: the dual form with the query Gram K_qs formed explicitly.

    Used when K_qs is cheaper than going through W = Zsᵀα (many targets C, few queries M), or when the
    prediction is wanted in a wider ``out_dtype`` than the features (P = K_qs·α in that dtype).
    Backward (G = ∂/∂P): Bm = A⁻¹K_qsᵀG, dYs = Bm, dK_qs = Gαᵀ, dZq = dK_qs Zs,
    dZs = dK_qsᵀ Zq − (Bmαᵀ + αBmᵀ) Zs, dμ = −Σ Bm∘α. Returns (P, L, α, K_qs), the last three
    non-differentiable.
    """

    @staticmethod
    def forward(Zq, Zs, Ys, mu, bias, kernels, out_dtype):
        Zsk, Ysk = _kernel_view(Zs, bias), _kernel_view(Ys, False)
        _, L, alpha = _factor(kernels, Zsk, Ysk, mu, False, compute_w=False)
        K_qs = _query_gram(Zq, Zs, bias)
        P = _mm_thin(K_qs.to(out_dtype), alpha.to(out_dtype))
        return _own(P, Zq.shape[:-1] + P.shape[-1:]), L, alpha, K_qs

    @staticmethod
    def setup_context(ctx, inputs, output):
        Zq, Zs, Ys, mu, bias, kernels, out_dtype = inputs
        _, L, alpha, K_qs = output
        ctx.mark_non_differentiable(L, alpha, K_qs)
        ctx.save_for_backward(Zq, Zs, Ys, mu, L, alpha, K_qs)
        ctx.save_for_forward(Zq, Zs, Ys, mu, L, alpha, K_qs)
        ctx.bias, ctx.kernels, ctx.out_dtype = bias, kernels, out_dtype

    @staticmethod
    def backward(ctx, G, *_):
        Zq, Zs, Ys, mu, L, alpha, K_qs = ctx.saved_tensors
        need_dzq, need_dzs, need_dys, need_dmu = ctx.needs_input_grad[:4]
        # The kernel constant c only shifts K_qs and the Gram: the feature gradients are taken against the
        # features themselves (what the appended √c column's would be, less that column).
        Zq3, Zs3, Ysk = _kernel_view(Zq, False), _kernel_view(Zs, False), _kernel_view(Ys, False)
        sd, io = L.dtype, Zs.dtype
        G = G.reshape(Zq3.shape[:-1] + G.shape[-1:])
        if torch.is_grad_enabled():  # differentiable: recompute α and K_qs as functions of the inputs
            Zsk = _kernel_view(Zs, ctx.bias)

            def solve(R):
                return _applyCholSolve(R.to(sd), Zsk, mu, L, False, ctx.kernels)

            alpha, K_qs = solve(Ysk), _query_gram(Zq, Zs, ctx.bias)
        else:

            def solve(R):
                return ctx.kernels.cholesky_solve(R.to(sd), L)

        dZq = dZs = dYs = dmu = None
        a_io = alpha.to(io)
        if need_dzq or need_dzs:
            dK = (G.to(sd) @ alpha.mT).to(io)
            if need_dzq:
                dZq = dK @ Zs3
            if need_dzs:
                dZs = dK.mT @ Zq3
        if need_dzs or need_dys or need_dmu:
            Bm = solve(_mm_thin(K_qs.mT, G.to(io)))
            if need_dys:
                dYs = Bm.to(io).reshape(Ys.shape)
            if need_dmu:
                dmu = -(Bm * alpha).sum(dim=(-2, -1))
            if need_dzs:
                S = Bm.to(io) @ a_io.mT
                dZs = dZs - (S + S.mT) @ Zs3
        dZq = dZq.reshape(Zq.shape) if need_dzq else None
        dZs = dZs.reshape(Zs.shape) if need_dzs else None
        return dZq, dZs, dYs, (dmu if need_dmu else None), None, None, None

    @staticmethod
    def jvp(ctx, dZq, dZs, dYs, dmu, *_):
        Zq, Zs, Ys, mu, L, _alpha, _K = ctx.saved_tensors
        sd, od = L.dtype, ctx.out_dtype
        Zqk, Zsk, Ysk = _kernel_view(Zq, ctx.bias), _kernel_view(Zs, ctx.bias), _kernel_view(Ys, False)
        dZqk, dZsk, dYsk = (_tangent_view(dZq, Zq, ctx.bias), _tangent_view(dZs, Zs, ctx.bias),
                            _tangent_view(dYs, Ys, False))

        def solve(R):
            return _applyCholSolve(R.to(sd), Zsk, mu, L, False, ctx.kernels)

        alpha = solve(Ysk)
        r = dYsk.to(sd) if dYsk is not None else torch.zeros_like(alpha)
        dAa = _dA_times(Zsk, alpha, dZsk, dmu, False)
        dalpha = solve(r if dAa is None else r - dAa)
        dP = (Zqk @ Zsk.mT).to(od) @ dalpha.to(od)
        if dZqk is not None:
            dP = dP + (dZqk @ Zsk.mT).to(od) @ alpha.to(od)
        if dZsk is not None:
            dP = dP + (Zqk @ dZsk.mT).to(od) @ alpha.to(od)
        return dP.reshape(Zq.shape[:-1] + dP.shape[-1:]), None, None, None

    @staticmethod
    def vmap(info, in_dims, Zq, Zs, Ys, mu, bias, kernels, out_dtype):
        Zq, Zs, Ys, mu = _fold_vmap(info, in_dims[:4], Zq, Zs, Ys, mu)
        P, L, alpha, K = _applyKrrPredictFunction(Zq, Zs, Ys, mu.flatten(0, 1), bias, kernels, out_dtype)
        V = info.batch_size
        return (P, L.unflatten(0, (V, -1)), alpha.unflatten(0, (V, -1)), K.unflatten(0, (V, -1))), (0, 0, 0, 0)


class KrrPredictDualFunction(FastFunction):
    """P = (ZqZsᵀ + c)α, α = (ZsZsᵀ + c + μI)⁻¹Ys in two operator calls: ``torch.ops.ddfast.krr_predict_fwd``
    (Gram, regulariser, Cholesky, solves, product; the factor L and α kept) and ``krr_predict_bwd``, the
    closed form with one pass over the queries (KRR-ST §3.2 eq. 4)::

        H = GᵀZq,  β = (LLᵀ)⁻¹(HZsᵀ + c·1ᵀG)ᵀ,  ∂Ys = β,  ∂Zq = G(αᵀZs),
        ∂Zs = αH − (βαᵀ + αβᵀ)Zs + 2·(∂μ/∂tr K)·(−Σ β∘α)·Zs

    μ = λ (absolute), λ·tr(K)/N (trace_mean) or λ·tr(K) (trace) for a float λ (a λ that requires grad takes
    the fused Functions). Ys in the solve dtype (the features' or float64: K and the products with the
    features in theirs, the factor, α and P in Ys's). Dual form, eager mode without torch.func transforms or
    forward-mode levels (the caller checks). ``create_graph=True``: the backward differentiates the reference
    formulation instead (exact derivatives of every order). Outputs (P, L, α, status); status 1 (a factor
    failed) or 2 (non-finite P) sends the caller to the fused path (jitter policy, named errors).
    """

    @staticmethod
    def forward(Zq, Zs, Ys, lam, reg, c, via_weights, detach_reg):
        return torch.ops.ddfast.krr_predict_fwd.default(Zq, Zs, Ys, lam, _REG_CODE[reg], c, via_weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        Zq, Zs, Ys, lam, reg, c, _, detach_reg = inputs
        _, L, alpha, status = output
        ctx.mark_non_differentiable(L, alpha, status)
        ctx.save_for_backward(Zq, Zs, Ys, L, alpha)
        ctx.options = (lam, reg, c, detach_reg)

    @staticmethod
    def backward(ctx, G, *_):
        Zq, Zs, Ys, L, alpha = ctx.saved_tensors
        lam, reg, c, detach_reg = ctx.options
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: derivatives of the backward itself are wanted
            with torch.enable_grad():
                P = krr_predict_ref(Zq, Zs, Ys, lam, reg=reg, detach_reg=detach_reg, bias=c or False,
                                    solve_dtype=Ys.dtype, out_dtype=Ys.dtype)
                wrt = [x for x, n in zip((Zq, Zs, Ys), need) if n]
                got = iter(torch.autograd.grad(P, wrt, G, create_graph=True, allow_unused=True))
            return tuple(next(got) if n else None for n in need) + (None,) * 5
        trace_coef = 0.0 if reg == "absolute" or detach_reg else lam / Zs.shape[-2] if reg == "trace_mean" else lam
        return tuple(torch.ops.ddfast.krr_predict_bwd.default(G, Zq, Zs, L, alpha, c, trace_coef, *need)) + (None,) * 5


# --------------------------------------------------------------------------- validation


def _check_matrix(name, x, min_dims=2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if x.dim() < min_dims:
        raise ValueError(f"{name}: expected at least {min_dims} dims (..., rows, cols), got shape {tuple(x.shape)}")


def _check_dtype_arg(name, dt, first):
    if dt is not None and dt not in _FLOATS:
        raise TypeError(f"{name}: expected None, torch.float32 or torch.float64, got {dt}")
    if name == "solve_dtype" and dt is not None and torch.promote_types(dt, first.dtype) != dt:
        raise TypeError(f"solve_dtype: {dt} is narrower than the input dtype {first.dtype}")


_FLOAT_MAX = {t: torch.finfo(t).max for t in _FLOATS}


def _check_lam(lam, batch, first, sd):
    """λ: a finite positive float representable in the solve dtype, or a positive tensor broadcasting to batch."""
    if type(lam) is float and 0.0 < lam <= _FLOAT_MAX[sd]:  # the common case, checked on every call
        return
    if isinstance(lam, torch.Tensor):
        if lam.dtype not in _FLOATS:
            raise TypeError(f"lam: expected a float or a float32/float64 tensor, got dtype {lam.dtype}")
        if lam.device != first.device:
            raise ValueError(f"lam: expected device {first.device}, got {lam.device}")
        try:
            shape = torch.broadcast_shapes(lam.shape, batch)
        except RuntimeError:
            raise ValueError(f"lam: shape {tuple(lam.shape)} does not broadcast to the batch shape {tuple(batch)}") from None
        if shape != batch:
            raise ValueError(f"lam: shape {tuple(lam.shape)} would enlarge the batch shape {tuple(batch)}")
        if can_sync(lam) and not bool(((lam > 0) & (lam <= torch.finfo(sd).max)).all()):
            raise ValueError(f"lam: expected every entry > 0 and finite, got min {float(lam.min()):g}, max {float(lam.max()):g}")
    elif isinstance(lam, numbers.Real) and not isinstance(lam, bool):
        lam = float(lam)
        if not lam > 0 or lam == float("inf"):
            raise ValueError(f"lam: expected a finite positive float, got {lam}")
        if lam > torch.finfo(sd).max:
            raise ValueError(f"lam: {lam:g} overflows the solve dtype {sd} (max {torch.finfo(sd).max:g}); "
                             "pass solve_dtype=torch.float64 or a smaller lam")
    else:
        raise TypeError(f"lam: expected a positive float or a tensor, got {type(lam).__name__}")


def _check_bias(bias, allow_value):
    if isinstance(bias, bool):
        return
    if not allow_value:
        raise TypeError(f"bias: expected a bool (append a ones column), got {type(bias).__name__}; "
                        "a kernel constant c is a krr_predict / *_from_gram argument")
    if not isinstance(bias, numbers.Real) or not 0 <= float(bias) < float("inf"):
        raise ValueError(f"bias: expected a bool or a finite kernel constant c >= 0, got {bias!r}")


def _fold_scale(scale, lam, reg, bias):
    """K = s·ZqZsᵀ + c as the unscaled kernel: P is unchanged when K and μ both scale by s, so s folds into
    the kernel constant (c/s) and, for the absolute regulariser, into λ (λ/s); trace regularisers scale with
    K already. Returns (lam, bias)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) < float("inf"):
        raise ValueError(f"scale: expected a finite kernel scale s > 0 (K = s·ZqZsᵀ + c), got {scale!r}")
    s = float(scale)
    if s == 1.0:
        return lam, bias
    c = bias_value(bias)
    if reg == "absolute" and isinstance(lam, numbers.Real) and not isinstance(lam, bool) and 0 < lam < float("inf"):
        lam = float(lam) / s  # (a bad λ is left as given: its error names the value the caller passed)
    elif reg == "absolute" and isinstance(lam, torch.Tensor):
        lam = lam / s
    return lam, (c / s if c else False)


def _check_common(first, lam, reg, solve_dtype, out_dtype, check_finite, batch):
    if reg not in REGULARIZERS:
        raise ValueError(f"reg: expected one of {REGULARIZERS}, got {reg!r}")
    _check_dtype_arg("solve_dtype", solve_dtype, first)
    _check_dtype_arg("out_dtype", out_dtype, first)
    if check_finite is not None and not isinstance(check_finite, bool):
        raise TypeError(f"check_finite: expected None or a bool, got {type(check_finite).__name__}")
    _check_lam(lam, batch, first, solve_dtype or first.dtype)


def _validate(named, lam, reg, solve_dtype, out_dtype=None, check_finite=None, batch=None):
    """named: list of (name, tensor), same dtype / device / batch dims (or the given ``batch``)."""
    for name, x in named:
        _check_matrix(name, x)
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} like {first_name}, got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} like {first_name}, got {x.device}")
        if batch is None and x.shape[:-2] != first.shape[:-2]:
            raise ValueError(
                f"{name}: expected batch dims {tuple(first.shape[:-2])} like {first_name}, got {tuple(x.shape[:-2])}"
            )
    for name, x in named:
        if x.numel() == 0:
            raise ValueError(f"{name}: empty input, got shape {tuple(x.shape)}")
    _check_common(first, lam, reg, solve_dtype, out_dtype, check_finite, first.shape[:-2] if batch is None else batch)


def _checking(check_finite):
    return settings.check_finite if check_finite is None else check_finite


def _check_finite_output(out, named, op, check_finite=None):
    """Never a silent NaN: a non-finite result names the non-finite input, or is a solve failure.

    Checking the (small) output costs one reduction and one host sync; NaN/Inf inputs always reach it.
    Skipped with ``check_finite=False``, under ``torch.vmap`` and on the meta device.
    """
    if not _checking(check_finite):
        return out
    if torch.compiler.is_compiling():  # no host sync in a compiled graph: an on-device check
        torch._assert_async(torch.isfinite(out).all(), f"{op}: non-finite result (NaN or Inf in "
                            f"{', '.join(n for n, _ in named)}, or a failed solve; increase lam)")
        return out
    if not can_sync(out, *(x for _, x in named)) or _all_finite(out):
        return out
    _raise_if_nonfinite(named)
    raise NotPSDError(f"{op}: the solve produced non-finite values from finite inputs; increase lam")


def _raise_if_nonfinite(named):
    for name, x in named:
        if isinstance(x, torch.Tensor) and can_sync(x) and not _all_finite(x):
            raise ValueError(f"{name}: contains NaN or Inf")


def _all_finite(t):
    """Whether every entry of ``t`` is finite, with one reduction and one host sync: a NaN or ±Inf entry
    makes the sum NaN or ±Inf, so a finite sum proves it; only a non-finite sum (a non-finite entry, or an
    overflow of finite ones) takes the exact check. One thread, float32: isfinite(t).all() took 41 µs on a
    256×10 output and 210 µs on 64×65×10; t.sum() 6 and 9 µs."""
    return math.isfinite(float(t.detach().sum())) or bool(torch.isfinite(t).all())


def _mu(Z, lam, reg, detach_reg, bias, solve_dtype):
    if reg == "absolute" and not isinstance(lam, torch.Tensor):
        return torch.full((Z.shape[:-2].numel(),), float(lam), dtype=solve_dtype, device=Z.device)
    return ridge_regularizer(Z, lam, reg, detach_reg, bias).reshape(-1).to(solve_dtype)


def _vector_targets(Y, Z, name):
    """1-D targets: Y (..., N) beside Z (..., N, d) → (Y (..., N, 1), True)."""
    if isinstance(Y, torch.Tensor) and isinstance(Z, torch.Tensor) and Y.dim() >= 1 and Y.dim() == Z.dim() - 1 \
            and Z.dim() >= 2 and Y.shape[-1] == Z.shape[-2]:
        return Y.unsqueeze(-1), True
    return Y, False


# --------------------------------------------------------------------------- auto choice per shape class
#
# ``backend="auto"`` on CPU tensors takes the C++ kernel at every measured shape: the reference (LAPACK
# Cholesky + MKL GEMMs through autograd) was never faster beyond the noise. Measured fwd+bwd (gradient wrt
# the support features / Z and Y), one thread, process CPU time, medians of 9 with the providers interleaved,
# float32, C = 10 (tests never time anything). Time ratio reference / cpu (> 1: cpu faster):
#   krr_predict, B = 1, M = 256 queries:
#     N = 10:   0.93 (d=512)  0.97 (2048)  1.01 (8192)       N = 16: 1.05  0.99  0.94    (a tie: cpu kept)
#     N = 32:   1.12          1.26         1.28              N = 64: 1.30  1.57  2.06
#     N = 100:  1.41          1.90         2.10 (d=4096: 2.06)  N = 256: 2.4–2.8   N = 500: 2.5–4.3
#   ridge_weights, LD few-shot B = 64, N = 32–128, d = 64–640 (bias): 1.6–2.5;  B = 1, N = 10–500,
#   d = 192–2048: 1.6–3.3.
# Against the eager ``torch.linalg.solve`` formulation the fused path is 1.0–2.8× at N ≥ 32; below, the
# per-call cost decides: the validation and the dispatch choice are made once per argument signature
# (``_PLANS``), the finiteness check is one sum (``_all_finite``), and krr_predict in the dual form runs as
# two operator calls (:class:`KrrPredictDualFunction`, ``ONE_CALL_GRAD_MAX_N``).


#: krr_predict on the cpu backend (dual form, the solve in the features' dtype or float64, eager mode, a
#: float λ) runs as the operators
#: ``krr_predict_fwd`` / ``krr_predict_bwd`` (:class:`KrrPredictDualFunction`: one autograd node, the
#: backward's only pass over the queries is GᵀZq) instead of the fused Functions (two nodes, the ridge
#: kernels and Zq·W) up to this support size N; a call no derivative can be asked of takes the one-call
#: forward at every N. Measured on the two-core CPU box, one thread, float32, M = 256 queries, C = 10,
#: fwd+bwd (gradients of Zs and Ys), process CPU time, minimum of interleaved rounds:
#:   vs the eager torch.linalg.solve formulation (bench/krr_eager_small_n.py), d = 512 / 2048 / 8192:
#:     N = 10: 1.07 1.06 1.01   N = 16: 1.18 1.15 1.11   N = 24: 1.36 1.29 1.37   N = 32: 1.49 1.49 1.64
#:     N = 64: 1.86 2.04 2.10   N = 128: 1.95 2.15 2.42
#:   (the fused Functions before: N = 10: 0.72 0.85 0.93, N = 16: 0.84 0.85 0.91, N = 32: 1.02 1.21 1.44)
#:   fused Functions time / these operators, same run: N = 24, d = 512: 1.40; N = 64, d = 2048: 1.23;
#:   N = 128: 1.06 (d = 512), 1.01 (2048); N = 129 (the operators' LAPACK branch): 0.90; N = 256: 0.77 / 0.76;
#:   N = 500: 0.70 / 0.66 — above 128 the fused ridge kernels win.
ONE_CALL_GRAD_MAX_N = {"cpu": 128}

#: ... and while its backward's products with the features, H = GᵀZq (C·M·d) and the two C·N·d products,
#: cost at most this multiple of the fused backward's ∂K_qsᵀZq (N·M·d): C·(M + 2N) ≤ ratio·N·M, i.e. few
#: targets C per support row (classification heads; KRR-ST's C = 512 target dims at N = 100 is 9×). Fused
#: time / operators' time, fwd+bwd, d = 2048, M = 256 unless noted, by the ratio C·(M + 2N)/(N·M):
#: 0.94 (N = 16, C = 10, d = 512, M = 64): 1.86;  1.08 (N = C = 10): 1.08;  1.25 (N = C = 32): 1.15;
#: 1.50 (N = C = 64, d = 512): 1.17;  1.78 (N = C = 100): 0.91;  3.45 (N = 10, C = 32): 0.86;
#: 3.56 (N = 100, C = 200, d = 512): 0.83;  3.91 (N = 32, C = 100): 0.72;  9.12 (N = 100, C = 512): 0.45.
ONE_CALL_GRAD_MAX_FLOP_RATIO = 1.5


_REG_CODE = {"absolute": 0, "trace_mean": 1, "trace": 2}


def _one_call(Zq, Zs, Ys, lam, reg, detach_reg, bias, via_weights, check_finite, forward_only, sd, od):
    """P through the operators' one-call forward (and, when a derivative can be asked for,
    :class:`KrrPredictDualFunction`'s closed-form backward): the cpu backend, dual form, eager mode, the
    solve in the features' dtype or float64 (RFAD: float32 features, a float64 solve), P in ``od``. None
    when λ requires grad or is not one value, a member does not factor (the fused path then applies the
    jitter policy) or the checked result is not finite (the fused path names the input)."""
    if isinstance(lam, torch.Tensor):
        if lam.numel() != 1 or lam.requires_grad:
            return None
        lam = lam.item()
    Ys = Ys.to(sd)
    if forward_only:
        P, _, _, status = torch.ops.ddfast.krr_predict_fwd.default(Zq, Zs, Ys, float(lam), _REG_CODE[reg],
                                                                   bias_value(bias), via_weights)
    else:
        P, _, _, status = KrrPredictDualFunction.fast_apply(Zq, Zs, Ys, float(lam), reg, bias_value(bias), via_weights,
                                                            detach_reg)
    status = status.item()
    if status == 1 or (status == 2 and _checking(check_finite)):
        return None
    return P.to(od)


# --------------------------------------------------------------------------- per-call plans
#
# Everything a call decides from its arguments' shapes, dtypes, devices and options (validation, the
# backend, dual / primal, the association of krr_predict's product) is made once per argument signature
# and kept in ``_PLANS``: a repeated call (a training loop) only re-checks λ's value and runs. The key holds
# every argument that the validation reads except λ (checked on every call) and DDFAST_BACKEND; an
# unhashable argument, or tracing under torch.compile, takes the full path.

_PLANS: dict = {}
_PLAN_LIMIT = 1024


def _planned(make, key, *args):
    """``make(*args)`` (validates, raises on bad input), memoized on ``key`` (None: not memoized)."""
    if key is None:
        return make(*args)
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option: validated (and refused) by the full path
        return make(*args)
    if plan is None:
        plan = make(*args)
        if len(_PLANS) >= _PLAN_LIMIT:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _key(op, tensors, options):
    """The plan key: op, each tensor's (shape, dtype, device), the options (with their types: ``True`` and
    ``1`` validate differently) and DDFAST_BACKEND; None (no plan kept) when an argument is not a tensor
    and while torch.compile traces."""
    if torch.compiler.is_compiling():
        return None
    key = [op, os.environ.get("DDFAST_BACKEND")]
    for x in tensors:
        if not isinstance(x, torch.Tensor):
            return None
        key.append(x.shape)
        key.append(x.dtype)
        key.append(x.device)
    for o in options:
        key.append(type(o))
        key.append(o)
    return tuple(key)


def _plan_ridge_weights(Z, Y, lam, reg, bias, solve_dtype, out_dtype, check_finite, backend):
    _check_bias(bias, allow_value=False)
    _validate([("Z", Z), ("Y", Y)], lam, reg, solve_dtype, out_dtype, check_finite)
    if Y.shape[-2] != Z.shape[-2]:
        raise ValueError(f"Y: expected {Z.shape[-2]} rows like Z (..., N, d), got shape {tuple(Y.shape)}")
    sd = solve_dtype or Z.dtype
    N, d = Z.shape[-2], Z.shape[-1] + int(bias)
    primal = d < N
    name = _select(backend, Z, Y, primal, bias, sd, "ridge_weights")
    if (out_dtype or Z.dtype) != Z.dtype:  # a wider output: the reference computes everything in the solve dtype
        name = "reference"
    return name, primal, sd, Z.shape[:-2]


def _plan_krr_predict(Zq, Zs, Ys, lam, reg, bias, solve_dtype, out_dtype, check_finite, backend):
    _check_bias(bias, allow_value=True)
    shared = isinstance(Zs, torch.Tensor) and isinstance(Zq, torch.Tensor) and Zs.dim() == 2 and Zq.dim() > 2
    _validate([("Zq", Zq), ("Zs", Zs), ("Ys", Ys)], lam, reg, solve_dtype, out_dtype, check_finite,
              batch=torch.Size() if shared else None)
    if shared and Ys.dim() != 2:
        raise ValueError(f"Ys: expected (N, C) or (N,) like the shared support Zs {tuple(Zs.shape)}, got {tuple(Ys.shape)}")
    if Zq.shape[-1] != Zs.shape[-1]:
        raise ValueError(f"Zq: expected {Zs.shape[-1]} features like Zs (..., N, d), got shape {tuple(Zq.shape)}")
    if Ys.shape[-2] != Zs.shape[-2]:
        raise ValueError(f"Ys: expected {Zs.shape[-2]} rows like Zs (..., N, d), got shape {tuple(Ys.shape)}")
    sd = solve_dtype or Zs.dtype
    od = out_dtype or Zs.dtype
    M = Zq.shape[:-1].numel() if shared else Zq.shape[-2]
    N, d, C = Zs.shape[-2], Zs.shape[-1] + int(bool(bias)), Ys.shape[-1]
    primal = d < N
    name = _select(backend, Zs, Ys, primal, bool(bias), sd, "krr_predict")
    if name == "reference" or (od != Zs.dtype and primal):  # the primal W is in the input dtype: a wider
        route = "reference"                                  # output goes through the reference
    elif od == Zs.dtype and (primal or d * C * (N + M) <= M * N * (d + C)):
        route = "weights"  # P = Zq·W, W = Zsᵀα (or the primal W)
    else:
        route = "gram"  # P = K_qs·α
    # The cpu kernel's operators (_one_call), forward and with derivatives (_operator_path).
    on_cpu_kernel = name == "cpu" and route != "reference"
    forward, backward = _operator_path(N, M, C, primal, Zs.dtype, sd, od, Zs.device.type)
    one_call, one_call_grad = on_cpu_kernel and forward, on_cpu_kernel and backward
    return name, route, primal, shared, sd, od, (torch.Size() if shared else Zs.shape[:-2]), one_call, one_call_grad


def _no_derivative(*xs):
    """No derivative of this call can be asked for: grad mode off or no tensor argument requiring grad, no
    torch.func transform active and no forward-mode dual level open. The ops then run the Functions'
    forward directly (the same kernels and jitter policy, without the autograd node: 40–110 µs less per
    call at small N)."""
    if torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
        return False
    if not torch.is_grad_enabled():
        return True
    for x in xs:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            return False
    return True


# --------------------------------------------------------------------------- public API


def ridge_weights(Z, Y, lam, *, reg="absolute", detach_reg=False, bias=False, solve_dtype=None, out_dtype=None,
                  check_finite=None, backend="auto"):
    """Ridge-regression weights W = Zᵀ(ZZᵀ+μI)⁻¹Y = (ZᵀZ+μI)⁻¹ZᵀY (LD-RR §3 eq. 2–3).

    Args:
        Z: features (..., N, d), float32/float64.
        Y: targets (..., N, C) (or (..., N): one target, W is then (..., d)), same dtype, batch dims and device.
        lam: λ > 0, a float or a tensor broadcastable to the batch shape (differentiable).
        reg: "absolute" μ=λ (LD); "trace_mean" μ=λ·tr(K)/N (KIP/FRePo/RFAD); "trace" μ=λ·tr(K) (KRR-ST).
        detach_reg: no gradient through tr(K) (KRR-ST) when True.
        bias: append a ones column to Z (LD-RR, KRR-ST); W then has d+1 rows, the last is the bias.
        solve_dtype: dtype of the factorization (e.g. torch.float64 for float32 inputs).
        out_dtype: dtype of W (default Z's); a wider one is computed by the reference path in the solve dtype.
        check_finite: raise on NaN/Inf (ValueError naming the input, else NotPSDError) — one host sync on the
            output; ``False`` skips it in hot loops; None follows ``ddfast.settings.check_finite`` (default on).
        backend: "auto" | "fused" | "cpu" | "triton" | "cuda" | "reference".
    Shape: W (..., d, C) (d+1 with bias).
    Autograd: exact derivatives of every order (create_graph=True), torch.func grad / jacrev / jacfwd /
    jvp / hessian / vmap.
    Equivalent PyTorch: ``ddfast.reference.ridge_solve.ridge_weights_ref``.
    """
    Y, vector = _vector_targets(Y, Z, "Y")
    name, primal, sd, batch = _planned(
        _plan_ridge_weights, _key("ridge_weights", (Z, Y), (reg, bias, solve_dtype, out_dtype, check_finite, backend)),
        Z, Y, lam, reg, bias, solve_dtype, out_dtype, check_finite, backend)
    _check_lam(lam, batch, Z, sd)
    try:
        if name == "reference":
            W = ridge_weights_ref(Z, Y, lam, reg=reg, detach_reg=detach_reg, bias=bias, solve_dtype=solve_dtype,
                                  out_dtype=out_dtype)
        else:
            mu = _mu(Z, lam, reg, detach_reg, bias, sd)
            if not torch.compiler.is_compiling() and _no_derivative(Z, Y, lam):
                W = RidgeWeightsFunction.forward(Z, Y, mu, primal, bias, _KERNELS[name])[0]
            else:
                W = _applyRidgeWeightsFunction(Z, Y, mu, primal, bias, _KERNELS[name])[0]
    except NotPSDError:
        _raise_if_nonfinite([("Z", Z), ("Y", Y), ("lam", lam)])
        raise
    if name != "cpu":  # the C++ kernel checks its own output (no extra pass)
        W = _check_finite_output(W, [("Z", Z), ("Y", Y), ("lam", lam)], "ridge_weights", check_finite)
    return W.squeeze(-1) if vector else W


def krr_predict(Zq, Zs, Ys, lam, *, reg="absolute", detach_reg=False, bias=False, scale=1.0, solve_dtype=None,
                out_dtype=None, check_finite=None, backend="auto"):
    """Kernel-ridge prediction P = Zq Zsᵀ(ZsZsᵀ+μI)⁻¹Ys (KRR-ST §3.2 eq. 4; KIP; FRePo; RFAD).

    Args:
        Zq: query features (..., M, d); Zs: support features (..., N, d) or (N, d) shared by every query
            batch; Ys: support targets (..., N, C) or (..., N) (P is then (..., M)).
        bias: True appends a ones column (K + 1); a float c is a kernel constant, K = ZqZsᵀ + c.
        scale: kernel scale s, K = s·ZqZsᵀ + c (RFAD's K = 2FFᵀ + 0.01 is ``krr_predict(Fq, Fs, Y, lam,
            scale=2.0, bias=0.01)``). Folded into c and λ, at no cost: P is the same when K and μ scale together.
        out_dtype: dtype of P (default Zq's); e.g. torch.float64 with ``solve_dtype=torch.float64``.
        lam, reg, detach_reg, solve_dtype, check_finite, backend: as :func:`ridge_weights` (the regulariser
            is computed from the support Gram K = ZsZsᵀ (+ c)).
    Shape: P (..., M, C).
    The product is associated as Zq·W (W = Zsᵀα, or the primal W when d < N) or as K_qs·α, whichever
    takes fewer flops: M·N·(d+C) vs d·C·(N+M). On the cpu backend the dual form (the solve in the features'
    dtype or float64) runs as two operator calls (the one-call forward and, at N ≤ ``ONE_CALL_GRAD_MAX_N``, its closed-form backward:
    :class:`KrrPredictDualFunction`) with the same checks and jitter policy.
    Equivalent PyTorch: ``ddfast.reference.ridge_solve.krr_predict_ref``.
    """
    if not isinstance(scale, float) or scale != 1.0:
        _check_bias(bias, allow_value=True)
        lam, bias = _fold_scale(scale, lam, reg, bias)
    Ys, vector = _vector_targets(Ys, Zs, "Ys")
    name, route, primal, shared, sd, od, batch, one_call, one_call_grad = _planned(
        _plan_krr_predict, _key("krr_predict", (Zq, Zs, Ys), (reg, bias, solve_dtype, out_dtype, check_finite, backend)),
        Zq, Zs, Ys, lam, reg, bias, solve_dtype, out_dtype, check_finite, backend)
    _check_lam(lam, batch, Zs, sd)
    q_shape = Zq.shape
    if shared:  # one support set, many query batches: the queries become rows of one problem
        Zq = Zq.reshape(-1, Zq.shape[-1])
    if one_call and not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or Zs.is_meta
                         or _forward_ad._current_level >= 0):
        forward_only = _no_derivative(Zq, Zs, Ys, lam)
        P = (_one_call(Zq, Zs, Ys, lam, reg, detach_reg, bias, route == "weights", check_finite, forward_only, sd, od)
             if forward_only or one_call_grad else None)
        if P is not None:
            if shared:
                P = P.reshape(q_shape[:-1] + P.shape[-1:])
            return P.squeeze(-1) if vector else P
    try:
        if route == "reference":
            P = krr_predict_ref(Zq, Zs, Ys, lam, reg=reg, detach_reg=detach_reg, bias=bias, solve_dtype=solve_dtype,
                                out_dtype=out_dtype)
        else:
            mu = _mu(Zs, lam, reg, detach_reg, bias, sd)
            forward_only = not torch.compiler.is_compiling() and _no_derivative(Zq, Zs, Ys, lam)
            if route == "weights":
                if forward_only:
                    W, thin = RidgeWeightsFunction.forward(Zs, Ys, mu, primal, bias, _KERNELS[name])[0], _mm_thin
                else:
                    W, thin = _applyRidgeWeightsFunction(Zs, Ys, mu, primal, bias, _KERNELS[name])[0], _applyThinMatmul
                if bias:
                    c = bias_value(bias)
                    w_b = W[..., -1:, :] if c == 1.0 else W[..., -1:, :] * math.sqrt(c)
                    P = thin(Zq, W[..., :-1, :]) + w_b
                else:
                    P = thin(Zq, W)
            elif forward_only:
                P = KrrPredictFunction.forward(Zq, Zs, Ys, mu, bias, _KERNELS[name], od)[0]
            else:
                P = _applyKrrPredictFunction(Zq, Zs, Ys, mu, bias, _KERNELS[name], od)[0]
    except NotPSDError:
        _raise_if_nonfinite([("Zq", Zq), ("Zs", Zs), ("Ys", Ys), ("lam", lam)])
        raise
    P = _check_finite_output(P, [("Zq", Zq), ("Zs", Zs), ("Ys", Ys), ("lam", lam)], "krr_predict", check_finite)
    if shared:
        P = P.reshape(q_shape[:-1] + P.shape[-1:])
    return P.squeeze(-1) if vector else P


# --------------------------------------------------------------------------- kernel (Gram) entry points


def _validate_gram(named, lam, reg, bias, solve_dtype, out_dtype, check_finite):
    for name, x in named:
        _check_matrix(name, x)
        if x.numel() == 0:
            raise ValueError(f"{name}: empty input, got shape {tuple(x.shape)}")
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} like {first_name}, got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} like {first_name}, got {x.device}")
    K = first
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K_ss: expected a square kernel matrix (..., N, N), got shape {tuple(K.shape)}")
    try:
        batch = torch.broadcast_shapes(*(x.shape[:-2] for _, x in named))
    except RuntimeError:
        raise ValueError("K_ss, K_qs, Y: batch dims do not broadcast: "
                         + ", ".join(f"{n} {tuple(x.shape)}" for n, x in named)) from None
    if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not 0 <= float(bias) < float("inf"):
        raise ValueError(f"bias: expected a finite kernel constant c >= 0 (a float), got {bias!r}")
    _check_common(K, lam, reg, solve_dtype, out_dtype, check_finite, K.shape[:-2])
    return batch


def ridge_from_gram(K_ss, Y, lam, *, reg="absolute", detach_reg=False, bias=0.0, solve_dtype=None, out_dtype=None,
                    check_finite=None):
    """Dual ridge coefficients α = (K_ss + c + μI)⁻¹ Y from a kernel matrix (KIP, analytic NTK / NNGP).

    Args:
        K_ss: support kernel (..., N, N), symmetric positive semi-definite, float32/float64.
        Y: targets (..., N, C) or (..., N).
        lam, reg, detach_reg: the regulariser μ as :func:`ridge_weights`, with tr(K) = tr(K_ss + c).
        bias: kernel constant c added to every entry (RFAD: K = 2FFᵀ + 0.01 → ``bias=0.01``).
        solve_dtype / out_dtype: dtype of the factorization / of α (defaults: K_ss's).
        check_finite: as :func:`ridge_weights`.
    Shape: α (..., N, C) (or (..., N)). Predictions: ``(K_qs + c) @ α``, or :func:`krr_predict_from_gram`.
    Runs in torch ops (LAPACK / cuSOLVER Cholesky, jitter policy of ddfast.settings) on any device;
    differentiable to any order, torch.func-compatible.
    Equivalent PyTorch: ``ddfast.reference.ridge_solve.ridge_from_gram_ref``.
    """
    Y, vector = _vector_targets(Y, K_ss, "Y")
    _validate_gram([("K_ss", K_ss), ("Y", Y)], lam, reg, bias, solve_dtype, out_dtype, check_finite)
    if Y.shape[-2] != K_ss.shape[-1]:
        raise ValueError(f"Y: expected {K_ss.shape[-1]} rows like K_ss (..., N, N), got shape {tuple(Y.shape)}")
    named = [("K_ss", K_ss), ("Y", Y), ("lam", lam)]
    try:
        alpha = ridge_from_gram_ref(K_ss, Y, lam, reg=reg, detach_reg=detach_reg, bias=bias, solve_dtype=solve_dtype,
                                    out_dtype=out_dtype)
    except NotPSDError:
        _raise_if_nonfinite(named)
        raise
    alpha = _check_finite_output(alpha, named, "ridge_from_gram", check_finite)
    return alpha.squeeze(-1) if vector else alpha


def krr_predict_from_gram(K_ss, K_qs, Y, lam, *, reg="absolute", detach_reg=False, bias=0.0, solve_dtype=None,
                          out_dtype=None, check_finite=None):
    """Kernel-ridge prediction P = (K_qs + c)(K_ss + c + μI)⁻¹ Y from kernel matrices.

    Args:
        K_ss: support kernel (..., N, N); K_qs: query-support kernel (..., M, N); Y: targets (..., N, C) or
            (..., N). Batch dims broadcast: a shared support set K_ss (N, N), Y (N, C) serves batched queries
            K_qs (B, M, N).
        lam, reg, detach_reg, bias, solve_dtype, check_finite: as :func:`ridge_from_gram`.
        out_dtype: dtype of P (default K_qs's); ``torch.float64`` keeps a float64 solve in float64.
    Shape: P (..., M, C) (or (..., M)).
    Equivalent PyTorch: ``ddfast.reference.ridge_solve.krr_predict_from_gram_ref``.
    """
    Y, vector = _vector_targets(Y, K_ss, "Y")
    _validate_gram([("K_ss", K_ss), ("K_qs", K_qs), ("Y", Y)], lam, reg, bias, solve_dtype, out_dtype, check_finite)
    if K_qs.shape[-1] != K_ss.shape[-1]:
        raise ValueError(f"K_qs: expected {K_ss.shape[-1]} columns like K_ss (..., N, N), got shape {tuple(K_qs.shape)}")
    if Y.shape[-2] != K_ss.shape[-1]:
        raise ValueError(f"Y: expected {K_ss.shape[-1]} rows like K_ss (..., N, N), got shape {tuple(Y.shape)}")
    named = [("K_ss", K_ss), ("K_qs", K_qs), ("Y", Y), ("lam", lam)]
    try:
        P = krr_predict_from_gram_ref(K_ss, K_qs, Y, lam, reg=reg, detach_reg=detach_reg, bias=bias,
                                      solve_dtype=solve_dtype, out_dtype=out_dtype)
    except NotPSDError:
        _raise_if_nonfinite(named)
        raise
    P = _check_finite_output(P, named, "krr_predict_from_gram", check_finite)
    return P.squeeze(-1) if vector else P


_applyThinMatmul = compile_apply(_ThinMatmul, eager_under_transforms=True)
_applyCholSolve = compile_apply(_CholSolve, eager_under_transforms=True)
_applyRidgeWeightsFunction = compile_apply(RidgeWeightsFunction, eager_under_transforms=True)
_applyKrrPredictFunction = compile_apply(KrrPredictFunction, eager_under_transforms=True)
