"""Fused batched ridge solve (Gram + Cholesky + triangular solves) in Triton.

For every batch member ``b`` (one Triton program each):

* dual   (``primal=False``): ``A = Z Zᵀ + mu I`` (N×N), ``alpha = A⁻¹ Y``, ``W = Zᵀ alpha``
* primal (``primal=True``):  ``H = Zᵀ Z + mu I`` (d×d), ``W = H⁻¹ Zᵀ Y``

The Gram matrix is accumulated over chunks of the streamed dimension (``d`` for
dual, ``N`` for primal), factorised in registers by a right-looking Cholesky
loop, and both triangular solves run in the same program. The backward kernel
reuses the saved factor for its two triangular solves and fuses the remaining
GEMMs.

Seed: label-distillation §3 eq. 2–3 (LD-RR), krr-st-selfsup §3.2 eq. 4.
Equivalent PyTorch: ``ddfast.reference.ridge_solve``.

Supported inputs (see :func:`not_supported_reasons`):

* factor size ``n`` (``N`` dual, ``d`` primal): ``1 <= n <= MAX_FACTOR_DIM`` (64);
* number of targets ``C``: ``C <= MAX_TARGET_DIM`` (64);
* the streamed dimension (``d`` dual, ``N`` primal) is unbounded: it is
  processed in chunks and never held in registers as a whole;
* float32 or float64; CUDA tensors, or CPU tensors when the module was imported
  with ``TRITON_INTERPRET=1``.

Numerics: float32 products use ``tl.dot(..., input_precision="ieee")`` (no
TF32). float64 products use broadcast multiply + ``tl.sum`` with a small chunk,
because ``tl.dot`` on float64 is not available on every GPU code path.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = [
    "MAX_FACTOR_DIM",
    "MAX_TARGET_DIM",
    "TRITON_AVAILABLE",
    "TRITON_UNAVAILABLE_REASON",
    "not_supported_reasons",
    "ridge_solve_bwd",
    "ridge_solve_fwd",
]

#: Largest Cholesky factor (``N`` for dual, ``d`` for primal) held in registers.
MAX_FACTOR_DIM = 64
#: Largest number of right-hand sides / targets ``C``.
MAX_TARGET_DIM = 64

_SUPPORTED_DTYPES = (torch.float32, torch.float64)

from ._triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON, tl, triton, triton_op, wrap  # noqa: F401,E402


if TRITON_AVAILABLE:

    # ------------------------------------------------------------------ #
    # Small matrix products. USE_DOT selects tl.dot (float32, IEEE) or a  #
    # broadcast multiply-reduce (float64). All return acc + product.      #
    # ------------------------------------------------------------------ #

    @triton.jit
    def _mm(a, b, acc, USE_DOT: tl.constexpr):
        """acc + a @ b   (a: [M, K], b: [K, N])."""
        if USE_DOT:
            out = tl.dot(a, b, acc, input_precision="ieee")
        else:
            out = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        return out

    @triton.jit
    def _mm_tn(a, b, acc, USE_DOT: tl.constexpr):
        """acc + aᵀ @ b   (a: [K, M], b: [K, N])."""
        if USE_DOT:
            out = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            out = acc + tl.sum(a[:, :, None] * b[:, None, :], axis=0)
        return out

    @triton.jit
    def _mm_nt(a, b, acc, USE_DOT: tl.constexpr):
        """acc + a @ bᵀ   (a: [M, K], b: [N, K])."""
        if USE_DOT:
            out = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            out = acc + tl.sum(a[:, None, :] * b[None, :, :], axis=2)
        return out

    # ------------------------------------------------------------------ #
    # Register-resident Cholesky and triangular solves on a BLOCK x BLOCK #
    # tile. Rows/cols >= n are padding: identity in the factor, zero in   #
    # right-hand sides, and never touched by the loops.                   #
    # ------------------------------------------------------------------ #

    @triton.jit
    def _cholesky_fwd_sub(a, mu, x, n, BLOCK: tl.constexpr):
        """Factor a + mu I = L Lᵀ (lower) and overwrite x with L⁻¹ x.

        Returns (L, L⁻¹ x, info). ``info`` is the 1-based order of the first
        leading minor whose pivot is <= 0 or non-finite (0 on success); such a
        pivot is replaced by 1 so the loop keeps running without faults.
        """
        r = tl.arange(0, BLOCK)
        diag = r[:, None] == r[None, :]
        valid = (r[:, None] < n) & (r[None, :] < n)
        eye = diag.to(a.dtype)
        a = tl.where(valid, a + eye * mu, eye)
        fac = tl.zeros([BLOCK, BLOCK], a.dtype)
        info = tl.full([], 0, tl.int32)
        for k in range(0, n):
            col = tl.sum(tl.where(r[None, :] == k, a, 0.0), axis=1)
            piv = tl.sum(tl.where(r == k, col, 0.0), axis=0)
            ok = (piv > 0.0) & (piv < float("inf"))
            info = tl.where(ok | (info != 0), info, k + 1)
            s = tl.sqrt(tl.where(ok, piv, 1.0))
            below = tl.where(r > k, col / s, 0.0)
            fac = tl.where(r[None, :] == k, (below + tl.where(r == k, s, 0.0))[:, None], fac)
            a = a - below[:, None] * below[None, :]
            xk = tl.sum(tl.where(r[:, None] == k, x, 0.0), axis=0) / s
            x = tl.where(r[:, None] == k, xk[None, :], x - below[:, None] * xk[None, :])
        fac = tl.where(diag & (r[:, None] >= n), 1.0, fac)
        return fac, x, info

    @triton.jit
    def _fwd_sub(fac, x, n, BLOCK: tl.constexpr):
        """L⁻¹ x for lower-triangular L (column-oriented forward substitution)."""
        r = tl.arange(0, BLOCK)
        for k in range(0, n):
            col = tl.sum(tl.where(r[None, :] == k, fac, 0.0), axis=1)
            lkk = tl.sum(tl.where(r == k, col, 0.0), axis=0)
            below = tl.where(r > k, col, 0.0)
            xk = tl.sum(tl.where(r[:, None] == k, x, 0.0), axis=0) / lkk
            x = tl.where(r[:, None] == k, xk[None, :], x - below[:, None] * xk[None, :])
        return x

    @triton.jit
    def _bwd_sub(fac, x, n, BLOCK: tl.constexpr):
        """L⁻ᵀ x for lower-triangular L (back substitution with column k of L)."""
        r = tl.arange(0, BLOCK)
        for i in range(0, n):
            k = n - 1 - i
            col = tl.sum(tl.where(r[None, :] == k, fac, 0.0), axis=1)
            lkk = tl.sum(tl.where(r == k, col, 0.0), axis=0)
            # x_k = (x_k - sum_{j>k} L[j, k] x_j) / L[k, k]
            w = tl.where(r == k, 1.0, -tl.where(r > k, col, 0.0))
            xk = tl.sum(w[:, None] * x, axis=0) / lkk
            x = tl.where(r[:, None] == k, xk[None, :], x)
        return x

    # ------------------------------------------------------------------ #
    # Kernels: one program per batch member.                              #
    # ------------------------------------------------------------------ #

    @triton.jit
    def _ridge_solve_fwd_kernel(
        Z, Y, MU, W, L, AUX, INFO,
        N, D, C,
        s_zb, s_zn, s_zd,
        s_yb, s_yn, s_yc,
        s_mu,
        PRIMAL: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """dual: A = Z Zᵀ + mu I, alpha = A⁻¹ Y, W = Zᵀ alpha, aux = alpha.
        primal: H = Zᵀ Z + mu I, W = H⁻¹ Zᵀ Y, aux = W.
        Writes W [B,d,C], L [B,n,n] (zero upper triangle), aux [B,n,C], info [B].

        BLOCK_F: factor tile (>= n); BLOCK_S: chunk of the streamed dim;
        BLOCK_C: target tile (>= C). Outputs are contiguous.
        """
        pid = tl.program_id(0).to(tl.int64)
        dt = Z.dtype.element_ty
        offs_f = tl.arange(0, BLOCK_F)
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        z_ptr = Z + pid * s_zb
        y_ptr = Y + pid * s_yb
        mu = tl.load(MU + pid * s_mu)

        if PRIMAL:
            n = D
            mask_f = offs_f < D
            gram = tl.zeros([BLOCK_F, BLOCK_F], dt)
            rhs = tl.zeros([BLOCK_F, BLOCK_C], dt)
            for i0 in range(0, N, BLOCK_S):
                rows = i0 + offs_s
                mask_r = rows < N
                zb = tl.load(z_ptr + rows[:, None] * s_zn + offs_f[None, :] * s_zd,
                             mask=mask_r[:, None] & mask_f[None, :], other=0.0)
                yb = tl.load(y_ptr + rows[:, None] * s_yn + offs_c[None, :] * s_yc,
                             mask=mask_r[:, None] & mask_c[None, :], other=0.0)
                gram = _mm_tn(zb, zb, gram, USE_DOT)
                rhs = _mm_tn(zb, yb, rhs, USE_DOT)
        else:
            n = N
            mask_f = offs_f < N
            gram = tl.zeros([BLOCK_F, BLOCK_F], dt)
            for k0 in range(0, D, BLOCK_S):
                cols = k0 + offs_s
                zb = tl.load(z_ptr + offs_f[:, None] * s_zn + cols[None, :] * s_zd,
                             mask=mask_f[:, None] & (cols < D)[None, :], other=0.0)
                gram = _mm_nt(zb, zb, gram, USE_DOT)
            rhs = tl.load(y_ptr + offs_f[:, None] * s_yn + offs_c[None, :] * s_yc,
                          mask=mask_f[:, None] & mask_c[None, :], other=0.0)

        fac, sol, info = _cholesky_fwd_sub(gram, mu, rhs, n, BLOCK_F)
        sol = _bwd_sub(fac, sol, n, BLOCK_F)

        tl.store(INFO + pid, info)
        mask_fc = mask_f[:, None] & mask_c[None, :]
        l_off = pid * n * n + offs_f[:, None] * n + offs_f[None, :]
        fac = tl.where(offs_f[None, :] <= offs_f[:, None], fac, 0.0)
        tl.store(L + l_off, fac, mask=mask_f[:, None] & mask_f[None, :])
        a_off = pid * n * C + offs_f[:, None] * C + offs_c[None, :]
        tl.store(AUX + a_off, sol, mask=mask_fc)

        if PRIMAL:
            tl.store(W + a_off, sol, mask=mask_fc)
        else:
            for k0 in range(0, D, BLOCK_S):
                cols = k0 + offs_s
                mask_s = cols < D
                zb = tl.load(z_ptr + offs_f[:, None] * s_zn + cols[None, :] * s_zd,
                             mask=mask_f[:, None] & mask_s[None, :], other=0.0)
                wb = _mm_tn(zb, sol, tl.zeros([BLOCK_S, BLOCK_C], dt), USE_DOT)
                tl.store(W + pid * D * C + cols[:, None] * C + offs_c[None, :], wb,
                         mask=mask_s[:, None] & mask_c[None, :])

    @triton.jit
    def _ridge_solve_bwd_kernel(
        G, Z, Y, L, AUX, DZ, DY, DMU,
        N, D, C,
        s_gb, s_gd, s_gc,
        s_zb, s_zn, s_zd,
        s_yb, s_yn, s_yc,
        s_lb, s_lr, s_lc,
        s_ab, s_ar, s_ac,
        PRIMAL: tl.constexpr,
        NEED_DZ: tl.constexpr,
        NEED_DY: tl.constexpr,
        NEED_DMU: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Gradients of the ridge solve given G = dLoss/dW.

        dual:   Bm = A⁻¹ Z G; dY = Bm; dZ = alpha (G − Zᵀ Bm)ᵀ − Bm Wᵀ (W = Zᵀ alpha);
                dmu = −Σ Bm ∘ alpha.
        primal: V = H⁻¹ G; dY = Z V; dZ = (Y − Z W) Vᵀ − dY Wᵀ; dmu = −Σ V ∘ W.
        Outputs DZ [B,N,d], DY [B,N,C], DMU [B] are contiguous.
        """
        pid = tl.program_id(0).to(tl.int64)
        dt = Z.dtype.element_ty
        offs_f = tl.arange(0, BLOCK_F)
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        g_ptr = G + pid * s_gb
        z_ptr = Z + pid * s_zb
        y_ptr = Y + pid * s_yb

        if PRIMAL:
            n = D
        else:
            n = N
        mask_f = offs_f < n
        mask_fc = mask_f[:, None] & mask_c[None, :]
        lower = mask_f[:, None] & (offs_f[None, :] <= offs_f[:, None])
        fac = tl.load(L + pid * s_lb + offs_f[:, None] * s_lr + offs_f[None, :] * s_lc,
                      mask=lower, other=0.0)
        fac = tl.where((offs_f[:, None] == offs_f[None, :]) & (offs_f[:, None] >= n), 1.0, fac)
        aux = tl.load(AUX + pid * s_ab + offs_f[:, None] * s_ar + offs_c[None, :] * s_ac,
                      mask=mask_fc, other=0.0)

        if PRIMAL:
            w = aux
            g = tl.load(g_ptr + offs_f[:, None] * s_gd + offs_c[None, :] * s_gc,
                        mask=mask_fc, other=0.0)
            v = _bwd_sub(fac, _fwd_sub(fac, g, n, BLOCK_F), n, BLOCK_F)
            if NEED_DMU:
                tl.store(DMU + pid, -tl.sum(tl.sum(v * w, axis=1), axis=0))
            if NEED_DY or NEED_DZ:
                for i0 in range(0, N, BLOCK_S):
                    rows = i0 + offs_s
                    mask_r = rows < N
                    zb = tl.load(z_ptr + rows[:, None] * s_zn + offs_f[None, :] * s_zd,
                                 mask=mask_r[:, None] & mask_f[None, :], other=0.0)
                    dyb = _mm(zb, v, tl.zeros([BLOCK_S, BLOCK_C], dt), USE_DOT)
                    mask_rc = mask_r[:, None] & mask_c[None, :]
                    if NEED_DY:
                        tl.store(DY + pid * N * C + rows[:, None] * C + offs_c[None, :], dyb,
                                 mask=mask_rc)
                    if NEED_DZ:
                        yb = tl.load(y_ptr + rows[:, None] * s_yn + offs_c[None, :] * s_yc,
                                     mask=mask_rc, other=0.0)
                        resid = _mm(zb, -w, yb, USE_DOT)
                        dzb = _mm_nt(resid, v, tl.zeros([BLOCK_S, BLOCK_F], dt), USE_DOT)
                        dzb = _mm_nt(dyb, -w, dzb, USE_DOT)
                        tl.store(DZ + pid * N * D + rows[:, None] * D + offs_f[None, :], dzb,
                                 mask=mask_r[:, None] & mask_f[None, :])
        else:
            alpha = aux
            zg = tl.zeros([BLOCK_F, BLOCK_C], dt)
            for k0 in range(0, D, BLOCK_S):
                cols = k0 + offs_s
                mask_s = cols < D
                zb = tl.load(z_ptr + offs_f[:, None] * s_zn + cols[None, :] * s_zd,
                             mask=mask_f[:, None] & mask_s[None, :], other=0.0)
                gb = tl.load(g_ptr + cols[:, None] * s_gd + offs_c[None, :] * s_gc,
                             mask=mask_s[:, None] & mask_c[None, :], other=0.0)
                zg = _mm(zb, gb, zg, USE_DOT)
            bm = _bwd_sub(fac, _fwd_sub(fac, zg, n, BLOCK_F), n, BLOCK_F)
            if NEED_DY:
                tl.store(DY + pid * N * C + offs_f[:, None] * C + offs_c[None, :], bm,
                         mask=mask_fc)
            if NEED_DMU:
                tl.store(DMU + pid, -tl.sum(tl.sum(bm * alpha, axis=1), axis=0))
            if NEED_DZ:
                for k0 in range(0, D, BLOCK_S):
                    cols = k0 + offs_s
                    mask_s = cols < D
                    zb = tl.load(z_ptr + offs_f[:, None] * s_zn + cols[None, :] * s_zd,
                                 mask=mask_f[:, None] & mask_s[None, :], other=0.0)
                    gb = tl.load(g_ptr + cols[:, None] * s_gd + offs_c[None, :] * s_gc,
                                 mask=mask_s[:, None] & mask_c[None, :], other=0.0)
                    zero_sc = tl.zeros([BLOCK_S, BLOCK_C], dt)
                    ztb = _mm_tn(zb, bm, zero_sc, USE_DOT)
                    wb = _mm_tn(zb, alpha, zero_sc, USE_DOT)
                    dzb = _mm_nt(alpha, gb - ztb, tl.zeros([BLOCK_F, BLOCK_S], dt), USE_DOT)
                    dzb = _mm_nt(bm, -wb, dzb, USE_DOT)
                    tl.store(DZ + pid * N * D + offs_f[:, None] * D + cols[None, :], dzb,
                             mask=mask_f[:, None] & mask_s[None, :])


# Whether the kernels were built for the Triton CPU interpreter (TRITON_INTERPRET
# set when the ``triton.jit`` decorators ran, i.e. at import). Only then can
# they run on CPU tensors.
_INTERPRETED = TRITON_AVAILABLE and not isinstance(_ridge_solve_fwd_kernel, triton.runtime.JITFunction)


# ---------------------------------------------------------------------- #
# Launch helpers                                                         #
# ---------------------------------------------------------------------- #


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _prev_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x.bit_length() - 1)


def _launch_config(n: int, c: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warp count. Tiles are padded to >= 16 (tl.dot minimum)."""
    block_f = max(16, _next_pow2(n))
    block_c = max(16, _next_pow2(c))
    wide = max(block_f, block_c)
    use_dot = dtype == torch.float32
    if use_dot:
        block_s = 16 if block_f * wide >= 4096 else 32
    else:
        # broadcast products materialise block_f * block_s * wide elements
        block_s = min(16, max(1, _prev_pow2(4096 // (block_f * wide))))
    num_warps = 8 if block_f * wide >= 4096 else 4
    return dict(USE_DOT=use_dot, BLOCK_F=block_f, BLOCK_S=block_s, BLOCK_C=block_c,
                num_warps=num_warps)


def not_supported_reasons(Z, Y, primal: bool) -> List[str]:
    """Reasons this backend cannot run ``ridge_solve`` on these inputs ([] = supported)."""
    reasons: List[str] = []
    if not TRITON_AVAILABLE:
        reasons.append(TRITON_UNAVAILABLE_REASON)
    if not isinstance(Z, torch.Tensor) or not isinstance(Y, torch.Tensor):
        reasons.append("Z and Y must be torch tensors")
        return reasons
    if Z.dim() != 3 or Y.dim() != 3:
        reasons.append(f"expected Z [B,N,d] and Y [B,N,C], got {tuple(Z.shape)} and {tuple(Y.shape)}")
        return reasons
    if Z.shape[0] != Y.shape[0] or Z.shape[1] != Y.shape[1]:
        reasons.append(f"batch/row mismatch between Z {tuple(Z.shape)} and Y {tuple(Y.shape)}")
    if Z.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {Z.dtype} not supported (float32/float64 only)")
    if Y.dtype != Z.dtype:
        reasons.append(f"Y dtype {Y.dtype} differs from Z dtype {Z.dtype}")
    if Y.device != Z.device:
        reasons.append(f"Y on {Y.device} but Z on {Z.device}")
    dev = Z.device.type
    if dev == "cpu":
        if not _INTERPRETED:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before this module is imported")
    elif dev != "cuda":
        reasons.append(f"device type {dev!r} not supported")
    _, N, d = Z.shape
    C = Y.shape[2]
    n = d if primal else N
    name = "d (primal factor size)" if primal else "N (dual factor size)"
    if n < 1:
        reasons.append(f"{name} must be >= 1")
    if n > MAX_FACTOR_DIM:
        reasons.append(f"{name} = {n} > {MAX_FACTOR_DIM}")
    if C > MAX_TARGET_DIM:
        reasons.append(f"C = {C} > {MAX_TARGET_DIM}")
    return reasons


def _check(Z, Y, primal: bool) -> None:
    reasons = not_supported_reasons(Z, Y, primal)
    if reasons:
        raise ValueError("triton ridge_solve unsupported: " + "; ".join(reasons))


def _batch_vector(mu, B: int, like: torch.Tensor) -> torch.Tensor:
    mu = torch.as_tensor(mu, dtype=like.dtype, device=like.device).reshape(-1)
    if mu.numel() not in (1, B):
        raise ValueError(f"mu must have 1 or B={B} elements, got {mu.numel()}")
    return mu.expand(B)


@triton_op("triton_ridge_solve_fwd")
def ridge_solve_fwd(
    Z: torch.Tensor, Y: torch.Tensor, mu: torch.Tensor, primal: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched ridge solve, one Triton program per batch member.

    dual:   A = Z Zᵀ + mu I,  L = chol(A),  alpha = A⁻¹ Y,  W = Zᵀ alpha,  aux = alpha
    primal: H = Zᵀ Z + mu I,  L = chol(H),  W = H⁻¹ Zᵀ Y,   aux = W

    Args: Z [B,N,d], Y [B,N,C] (float32/float64, any strides), mu [B] (or 1 element).
    Returns: W [B,d,C], L [B,n,n] (lower factor, zero upper), aux [B,n,C],
    info [B] int32 (0 ok, k>0: leading minor k not positive definite; the other
    outputs of that member are then unspecified but finite-safe to read).

    Seed: label-distillation §3 eq. 2–3 (LD-RR), krr-st-selfsup §3.2 eq. 4.
    Equivalent PyTorch: ddfast.reference.ridge_solve
    """
    _check(Z, Y, primal)
    B, N, d = Z.shape
    C = Y.shape[2]
    n = d if primal else N
    mu = _batch_vector(mu, B, Z)
    opts = dict(dtype=Z.dtype, device=Z.device)
    W = torch.empty((B, d, C), **opts)
    L = torch.empty((B, n, n), **opts)
    aux = torch.empty((B, n, C), **opts)
    info = torch.empty((B,), dtype=torch.int32, device=Z.device)
    if B == 0:
        return W, L, aux, info
    wrap(_ridge_solve_fwd_kernel, Z)[(B,)](
        Z, Y, mu, W, L, aux, info,
        N, d, C,
        *Z.stride(), *Y.stride(), mu.stride(0),
        PRIMAL=bool(primal),
        **_launch_config(n, C, Z.dtype),
    )
    return W, L, aux, info


@triton_op("triton_ridge_solve_bwd")
def ridge_solve_bwd(
    G: torch.Tensor,
    Z: torch.Tensor,
    Y: torch.Tensor,
    L: torch.Tensor,
    aux: torch.Tensor,
    primal: bool,
    need_dZ: bool,
    need_dY: bool,
    need_dmu: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`ridge_solve_fwd` given G = dLoss/dW [B,d,C].

    dual:   Bm = A⁻¹ Z G;  dY = Bm;  dZ = alpha (G − Zᵀ Bm)ᵀ − Bm Wᵀ;  dmu = −Σ Bm ∘ alpha
    primal: V = H⁻¹ G;     dY = Z V; dZ = (Y − Z W) Vᵀ − dY Wᵀ;        dmu = −Σ V ∘ W

    L and aux are the forward outputs. Returns (dZ, dY, dmu); empty (0 elements) where not needed.

    Seed: label-distillation §3 eq. 2–3 (LD-RR), krr-st-selfsup §3.2 eq. 4.
    Equivalent PyTorch: ddfast.reference.ridge_solve
    """
    _check(Z, Y, primal)
    B, N, d = Z.shape
    C = Y.shape[2]
    n = d if primal else N
    if tuple(G.shape) != (B, d, C):
        raise ValueError(f"G must be {(B, d, C)}, got {tuple(G.shape)}")
    if tuple(L.shape) != (B, n, n) or tuple(aux.shape) != (B, n, C):
        raise ValueError(f"L/aux must be {(B, n, n)}/{(B, n, C)}, got {tuple(L.shape)}/{tuple(aux.shape)}")
    for name, t in (("G", G), ("L", L), ("aux", aux)):
        if t.dtype != Z.dtype or t.device != Z.device:
            raise ValueError(f"{name} must match Z in dtype and device")
    opts = dict(dtype=Z.dtype, device=Z.device)
    dZ = torch.empty((B, N, d) if need_dZ else (0,), **opts)
    dY = torch.empty((B, N, C) if need_dY else (0,), **opts)
    dmu = torch.empty((B,) if need_dmu else (0,), **opts)
    if B == 0 or not (need_dZ or need_dY or need_dmu):
        return dZ, dY, dmu
    dummy = torch.empty((1,), **opts)
    wrap(_ridge_solve_bwd_kernel, Z)[(B,)](
        G, Z, Y, L, aux,
        dZ if need_dZ else dummy,
        dY if need_dY else dummy,
        dmu if need_dmu else dummy,
        N, d, C,
        *G.stride(), *Z.stride(), *Y.stride(), *L.stride(), *aux.stride(),
        PRIMAL=bool(primal),
        NEED_DZ=bool(need_dZ),
        NEED_DY=bool(need_dY),
        NEED_DMU=bool(need_dmu),
        **_launch_config(n, C, Z.dtype),
    )
    return dZ, dY, dmu
