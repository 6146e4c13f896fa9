"""Ghost products of per-example layer gradients in Triton.

A ``[N, P, K]`` layer inputs, G ``[N, P, O]`` output gradients, W_n = Σ_p G[n,p] A[n,p]ᵀ ``[O, K]``:

* ``_ghost_bilinear_fwd_kernel`` — out[n] = Σ_p G[n,p]ᵀ V A[n,p]. A program owns ``BLOCK_N`` examples
  × ``BLOCK_P`` positions as one block of rows (``BLOCK_N·BLOCK_P`` rows: many examples of a
  ``nn.Linear`` with P = 1, or many positions of one example of a convolution); for each K tile it
  accumulates ``T = G_rows V`` over O tiles with ``tl.dot`` and reduces ``T ⊙ A_rows`` into the
  examples' sums before the next tile: no N·P·K intermediate.
* ``_ghost_norms_fwd_kernel`` — out[n] = ‖W_n‖². ``GHOST``: the Gram tiles (I, J ≥ I) of A_nA_nᵀ and
  G_nG_nᵀ accumulated over K / O tiles, their product reduced at once (off-diagonal tiles twice);
  otherwise W_n in ``[BLOCK_O, BLOCK_K]`` tiles accumulated over P and squared in registers.
* ``_ghost_inner_fwd_kernel`` — out[n, m] = Σ_{p,q} (G1_n G2_mᵀ)_{pq} (A1_n A2_mᵀ)_{pq}: a program owns
  a ``[BLOCK_N1, BLOCK_N2]`` tile of the output, forms the two cross-Gram tiles of its row blocks with
  ``tl.dot`` and reduces their product over the position axes.
* ``_ghost_materialize_kernel`` — W_n tiles for the materialized inner product, written for a bounded
  block of examples at a time and multiplied by ``torch.mm``.

Seed: ghost clipping (Goodfellow 2015; Li et al. 2022; opacus).
Equivalent PyTorch: ``ddfast.reference.ghost_products`` (``ghost_bilinear_ref``, ``ghost_norms_ref``,
``ghost_inner_ref``).

Supported inputs (:func:`not_supported_reasons`): float32 or float64, any strides and sizes; CUDA
tensors, or CPU tensors when the module was imported with ``TRITON_INTERPRET=1``.
Numerics: float32 products use ``tl.dot(..., input_precision="ieee")`` (no TF32); float64 products a
broadcast multiply + ``tl.sum`` (``tl.dot`` on float64 is not available on every GPU code path).
"""

from __future__ import annotations

from typing import List

import torch

__all__ = [
    "TRITON_AVAILABLE",
    "TRITON_UNAVAILABLE_REASON",
    "ghost_bilinear_fwd",
    "ghost_inner_fwd",
    "ghost_norms_fwd",
    "not_supported_reasons",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
#: Elements of W per block in the materialized inner product.
MATERIALIZE_BLOCK_ELEMS = 1 << 22

from ._triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON, tl, triton, triton_op, wrap  # noqa: F401,E402


if TRITON_AVAILABLE:

    @triton.jit
    def _rows3(ptr, n, p, c, s_n, s_p, s_c, mask_n, mask_p, mask_c):
        """Load the [len(n), len(p), len(c)] block ptr[n, p, c] (zeros outside the masks)."""
        offs = n[:, None, None] * s_n + p[None, :, None] * s_p + c[None, None, :] * s_c
        mask = mask_n[:, None, None] & mask_p[None, :, None] & mask_c[None, None, :]
        return tl.load(ptr + offs, mask=mask, other=0.0)

    @triton.jit
    def _ghost_bilinear_fwd_kernel(
        A, G, V, OUT,
        N, P, K, O,
        s_an, s_ap, s_ak,
        s_gn, s_gp, s_go,
        s_vo, s_vk,
        USE_DOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        """OUT[n] = Σ_p G[n,p]ᵀ V A[n,p]  ([N], contiguous)."""
        pid = tl.program_id(0).to(tl.int64)
        dt = A.dtype.element_ty
        R: tl.constexpr = BLOCK_N * BLOCK_P
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < N
        acc = tl.zeros([BLOCK_N], dt)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask_p = p < P
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                mask_k = k < K
                t = tl.zeros([R, BLOCK_K], dt)
                for o0 in range(0, O, BLOCK_O):
                    o = o0 + tl.arange(0, BLOCK_O)
                    mask_o = o < O
                    g = tl.reshape(_rows3(G, n, p, o, s_gn, s_gp, s_go, mask_n, mask_p, mask_o), [R, BLOCK_O])
                    v = tl.load(V + o[:, None] * s_vo + k[None, :] * s_vk,
                                mask=mask_o[:, None] & mask_k[None, :], other=0.0)
                    if USE_DOT:
                        t = tl.dot(g, v, t, input_precision="ieee")
                    else:
                        t += tl.sum(g[:, :, None] * v[None, :, :], axis=1)
                a = _rows3(A, n, p, k, s_an, s_ap, s_ak, mask_n, mask_p, mask_k)
                acc += tl.sum(tl.sum(tl.reshape(t, [BLOCK_N, BLOCK_P, BLOCK_K]) * a, axis=2), axis=1)
        tl.store(OUT + n, acc, mask=mask_n)

    @triton.jit
    def _gram3(X, n, i, j, s_n, s_p, s_c, C, mask_n, mask_i, mask_j,
               USE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """[BLOCK_N, BLOCK_P, BLOCK_P] block of X_n X_nᵀ (rows i against rows j) over C columns."""
        dt = X.dtype.element_ty
        acc = tl.zeros([BLOCK_N, BLOCK_P, BLOCK_P], dt)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask_c = c < C
            xi = _rows3(X, n, i, c, s_n, s_p, s_c, mask_n, mask_i, mask_c)
            xj = _rows3(X, n, j, c, s_n, s_p, s_c, mask_n, mask_j, mask_c)
            if USE_DOT:  # BLOCK_N == 1
                d = tl.dot(tl.reshape(xi, [BLOCK_P, BLOCK_C]), tl.trans(tl.reshape(xj, [BLOCK_P, BLOCK_C])),
                           input_precision="ieee")
                acc += tl.reshape(d, [BLOCK_N, BLOCK_P, BLOCK_P])
            else:
                acc += tl.sum(xi[:, :, None, :] * xj[:, None, :, :], axis=3)
        return acc

    @triton.jit
    def _ghost_norms_fwd_kernel(
        A, G, OUT,
        N, P, K, O,
        s_an, s_ap, s_ak,
        s_gn, s_gp, s_go,
        GHOST: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        """OUT[n] = ‖Σ_p G[n,p] A[n,p]ᵀ‖²  ([N], contiguous). Materialized: BLOCK_N == 1."""
        pid = tl.program_id(0).to(tl.int64)
        dt = A.dtype.element_ty
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = n < N
        acc = tl.zeros([BLOCK_N], dt)
        if GHOST:
            for i0 in range(0, P, BLOCK_P):
                i = i0 + tl.arange(0, BLOCK_P)
                mask_i = i < P
                for j0 in range(i0, P, BLOCK_P):
                    j = j0 + tl.arange(0, BLOCK_P)
                    mask_j = j < P
                    ga = _gram3(A, n, i, j, s_an, s_ap, s_ak, K, mask_n, mask_i, mask_j,
                                USE_DOT, BLOCK_N, BLOCK_P, BLOCK_K)
                    gg = _gram3(G, n, i, j, s_gn, s_gp, s_go, O, mask_n, mask_i, mask_j,
                                USE_DOT, BLOCK_N, BLOCK_P, BLOCK_O)
                    w = tl.where(j0 == i0, 1.0, 2.0)  # off-diagonal tiles stand for their mirror too
                    acc += w * tl.sum(tl.sum(ga * gg, axis=2), axis=1)
        else:
            for o0 in range(0, O, BLOCK_O):
                o = o0 + tl.arange(0, BLOCK_O)
                mask_o = o < O
                for k0 in range(0, K, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    mask_k = k < K
                    w = tl.zeros([BLOCK_O, BLOCK_K], dt)
                    for p0 in range(0, P, BLOCK_P):
                        p = p0 + tl.arange(0, BLOCK_P)
                        mask_p = p < P
                        g = tl.reshape(_rows3(G, n, p, o, s_gn, s_gp, s_go, mask_n, mask_p, mask_o),
                                       [BLOCK_P, BLOCK_O])
                        a = tl.reshape(_rows3(A, n, p, k, s_an, s_ap, s_ak, mask_n, mask_p, mask_k),
                                       [BLOCK_P, BLOCK_K])
                        if USE_DOT:
                            w = tl.dot(tl.trans(g), a, w, input_precision="ieee")
                        else:
                            w += tl.sum(g[:, :, None] * a[:, None, :], axis=0)
                    acc += tl.sum(tl.sum(w * w, axis=1), axis=0)
        tl.store(OUT + n, acc, mask=mask_n)

    @triton.jit
    def _cross_gram(X1, X2, n1, p1, n2, p2, s1n, s1p, s1c, s2n, s2p, s2c, C,
                    mask_n1, mask_p1, mask_n2, mask_p2,
                    USE_DOT: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, BLOCK_C: tl.constexpr):
        """[R1, R2] block of X1_rows X2_rowsᵀ over C columns (rows = examples × positions)."""
        dt = X1.dtype.element_ty
        acc = tl.zeros([R1, R2], dt)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask_c = c < C
            x1 = tl.reshape(_rows3(X1, n1, p1, c, s1n, s1p, s1c, mask_n1, mask_p1, mask_c), [R1, BLOCK_C])
            x2 = tl.reshape(_rows3(X2, n2, p2, c, s2n, s2p, s2c, mask_n2, mask_p2, mask_c), [R2, BLOCK_C])
            if USE_DOT:
                acc = tl.dot(x1, tl.trans(x2), acc, input_precision="ieee")
            else:
                acc += tl.sum(x1[:, None, :] * x2[None, :, :], axis=2)
        return acc

    @triton.jit
    def _ghost_inner_fwd_kernel(
        A1, G1, A2, G2, OUT,
        N1, P1, N2, P2, K, O,
        s_a1n, s_a1p, s_a1k,
        s_g1n, s_g1p, s_g1o,
        s_a2n, s_a2p, s_a2k,
        s_g2n, s_g2p, s_g2o,
        USE_DOT: tl.constexpr,
        BLOCK_N1: tl.constexpr,
        BLOCK_P1: tl.constexpr,
        BLOCK_N2: tl.constexpr,
        BLOCK_P2: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        """OUT[n, m] = Σ_{p,q} (G1_n G2_mᵀ)_{pq} (A1_n A2_mᵀ)_{pq}  ([N1, N2], contiguous)."""
        pid = tl.program_id(0).to(tl.int64)
        dt = A1.dtype.element_ty
        R1: tl.constexpr = BLOCK_N1 * BLOCK_P1
        R2: tl.constexpr = BLOCK_N2 * BLOCK_P2
        nb2 = tl.cdiv(N2, BLOCK_N2)
        n1 = (pid // nb2) * BLOCK_N1 + tl.arange(0, BLOCK_N1)
        n2 = (pid % nb2) * BLOCK_N2 + tl.arange(0, BLOCK_N2)
        mask_n1 = n1 < N1
        mask_n2 = n2 < N2
        acc = tl.zeros([BLOCK_N1, BLOCK_N2], dt)
        for p0 in range(0, P1, BLOCK_P1):
            p1 = p0 + tl.arange(0, BLOCK_P1)
            mask_p1 = p1 < P1
            for q0 in range(0, P2, BLOCK_P2):
                p2 = q0 + tl.arange(0, BLOCK_P2)
                mask_p2 = p2 < P2
                ga = _cross_gram(A1, A2, n1, p1, n2, p2, s_a1n, s_a1p, s_a1k, s_a2n, s_a2p, s_a2k, K,
                                 mask_n1, mask_p1, mask_n2, mask_p2, USE_DOT, R1, R2, BLOCK_K)
                gg = _cross_gram(G1, G2, n1, p1, n2, p2, s_g1n, s_g1p, s_g1o, s_g2n, s_g2p, s_g2o, O,
                                 mask_n1, mask_p1, mask_n2, mask_p2, USE_DOT, R1, R2, BLOCK_O)
                prod = tl.reshape(ga * gg, [BLOCK_N1, BLOCK_P1, BLOCK_N2, BLOCK_P2])
                acc += tl.sum(tl.sum(prod, axis=3), axis=1)
        offs = n1[:, None] * N2 + n2[None, :]
        tl.store(OUT + offs, acc, mask=mask_n1[:, None] & mask_n2[None, :])

    @triton.jit
    def _ghost_materialize_kernel(
        A, G, W,
        n0, NB, P, K, O,
        s_an, s_ap, s_ak,
        s_gn, s_gp, s_go,
        USE_DOT: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        """W[i, o, k] = Σ_p G[n0+i, p, o] A[n0+i, p, k] for a [BLOCK_O, BLOCK_K] tile; W [NB, O, K] contiguous."""
        i = tl.program_id(0).to(tl.int64)
        tile = tl.program_id(1)
        nk = tl.cdiv(K, BLOCK_K)
        o = (tile // nk) * BLOCK_O + tl.arange(0, BLOCK_O)
        k = (tile % nk) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_o = o < O
        mask_k = k < K
        n = n0 + i
        dt = A.dtype.element_ty
        w = tl.zeros([BLOCK_O, BLOCK_K], dt)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask_p = p < P
            g = tl.load(G + n * s_gn + p[:, None] * s_gp + o[None, :] * s_go,
                        mask=mask_p[:, None] & mask_o[None, :], other=0.0)
            a = tl.load(A + n * s_an + p[:, None] * s_ap + k[None, :] * s_ak,
                        mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            if USE_DOT:
                w = tl.dot(tl.trans(g), a, w, input_precision="ieee")
            else:
                w += tl.sum(g[:, :, None] * a[:, None, :], axis=0)
        tl.store(W + i * O * K + o[:, None] * K + k[None, :], w, mask=mask_o[:, None] & mask_k[None, :])


# Whether the kernels were built for the Triton CPU interpreter (TRITON_INTERPRET set when the
# ``triton.jit`` decorators ran, i.e. at import). Only then can they run on CPU tensors.
_INTERPRETED = TRITON_AVAILABLE and not isinstance(_ghost_norms_fwd_kernel, triton.runtime.JITFunction)


# ---------------------------------------------------------------------- #
# Launch helpers                                                         #
# ---------------------------------------------------------------------- #


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _rows_split(P: int, rows: int):
    """(BLOCK_N, BLOCK_P) with BLOCK_N·BLOCK_P = rows: positions first, the rest examples."""
    bp = min(_next_pow2(P), rows)
    return rows // bp, bp


def not_supported_reasons(*tensors) -> List[str]:
    """Reasons these kernels cannot run on tensors like ``tensors`` ([] = supported)."""
    reasons: List[str] = []
    if not TRITON_AVAILABLE:
        reasons.append(TRITON_UNAVAILABLE_REASON)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return reasons + ["inputs must be torch tensors"]
    first = tensors[0]
    for t in tensors:
        if t.dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"dtype {t.dtype} not supported (float32/float64 only)")
            break
    dev = first.device.type
    if dev == "cpu":
        if not _INTERPRETED:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before ddfast.kernels is imported")
    elif dev != "cuda":
        reasons.append(f"device type {dev!r} not supported")
    return reasons


def _check_rows(name, t, last):
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a tensor of shape [N, P, {last}], got {got}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {t.dtype}")


def _check_pair(A, G, an="A", gn="G"):
    _check_rows(an, A, "K")
    _check_rows(gn, G, "O")
    if G.shape[:2] != A.shape[:2]:
        raise ValueError(f"{gn}: expected shape [N, P, O] with N, P = {A.shape[0]}, {A.shape[1]} (from {an}), "
                         f"got {tuple(G.shape)}")
    if G.dtype != A.dtype:
        raise TypeError(f"{gn}: expected dtype {A.dtype} (the dtype of {an}), got {G.dtype}")
    if G.device != A.device:
        raise ValueError(f"{gn}: expected device {A.device} (the device of {an}), got {G.device}")
    reasons = not_supported_reasons(A)
    if reasons:
        raise ValueError("triton ghost_products unsupported: " + "; ".join(reasons))


@triton_op("triton_ghost_bilinear_fwd")
def ghost_bilinear_fwd(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """out[n] = Σ_p G[n,p]ᵀ V A[n,p]; A ``[N, P, K]``, G ``[N, P, O]``, V ``[O, K]``; returns ``[N]``.

    Equivalent PyTorch: ``ddfast.reference.ghost_products.ghost_bilinear_ref``.
    """
    _check_pair(A, G)
    N, P, K = A.shape
    O = G.shape[2]
    if not isinstance(V, torch.Tensor) or tuple(V.shape) != (O, K):
        raise ValueError(f"V: expected shape [O, K] = [{O}, {K}], got {tuple(getattr(V, 'shape', ()))}")
    if V.dtype != A.dtype:
        raise TypeError(f"V: expected dtype {A.dtype} (the dtype of A), got {V.dtype}")
    out = torch.zeros((N,), dtype=A.dtype, device=A.device)
    if N == 0 or P == 0 or K == 0 or O == 0:
        return out
    use_dot = A.dtype == torch.float32
    rows, bk, bo = (32, 32, 32) if use_dot else (16, 16, 16)
    bn, bp = _rows_split(P, rows)
    grid = (triton.cdiv(N, bn),)
    wrap(_ghost_bilinear_fwd_kernel, A)[grid](
        A, G, V, out, N, P, K, O, *A.stride(), *G.stride(), *V.stride(),
        USE_DOT=use_dot, BLOCK_N=bn, BLOCK_P=bp, BLOCK_K=bk, BLOCK_O=bo, num_warps=4,
    )
    return out


@triton_op("triton_ghost_norms_fwd")
def ghost_norms_fwd(A: torch.Tensor, G: torch.Tensor, ghost: bool) -> torch.Tensor:
    """out[n] = ‖W_n‖²; ``ghost`` picks the Gram algorithm, else W_n tiles. Returns ``[N]``.

    Equivalent PyTorch: ``ddfast.reference.ghost_products.ghost_norms_ref``.
    """
    _check_pair(A, G)
    N, P, K = A.shape
    O = G.shape[2]
    out = torch.zeros((N,), dtype=A.dtype, device=A.device)
    if N == 0 or P == 0 or K == 0 or O == 0:
        return out
    f32 = A.dtype == torch.float32
    if ghost:
        if f32 and P >= 16:  # one example per program, Gram tiles by tl.dot
            use_dot, bn, bp, bk = True, 1, 32 if P >= 32 else 16, 32
        else:  # broadcast products: BLOCK_N·BLOCK_P²·BLOCK_K ≤ 4096 elements
            use_dot = False
            bp = min(_next_pow2(P), 16)
            bk = 16 if bp >= 4 else 64
            bn = max(1, 4096 // (bp * bp * bk))
        bo = bk
    else:
        use_dot, bn = f32, 1
        bp, bk, bo = (32, 32, 32) if f32 else (16, 16, 16)
    grid = (triton.cdiv(N, bn),)
    wrap(_ghost_norms_fwd_kernel, A)[grid](
        A, G, out, N, P, K, O, *A.stride(), *G.stride(),
        GHOST=bool(ghost), USE_DOT=use_dot, BLOCK_N=bn, BLOCK_P=bp, BLOCK_K=bk, BLOCK_O=bo, num_warps=4,
    )
    return out


@triton_op("triton_ghost_inner_fwd")
def ghost_inner_fwd(A1: torch.Tensor, G1: torch.Tensor, A2: torch.Tensor, G2: torch.Tensor, ghost: bool) -> torch.Tensor:
    """out[n, m] = ⟨W1_n, W2_m⟩; ``ghost`` picks cross-Gram tiles, else W blocks and ``torch.mm``.

    Returns ``[N1, N2]``. Equivalent PyTorch: ``ddfast.reference.ghost_products.ghost_inner_ref``.
    """
    _check_pair(A1, G1, "A1", "G1")
    _check_pair(A2, G2, "A2", "G2")
    N1, P1, K = A1.shape
    N2, P2 = A2.shape[:2]
    O = G1.shape[2]
    if A2.shape[2] != K or G2.shape[2] != O or A2.dtype != A1.dtype:
        raise ValueError(f"A2, G2: expected [N2, P2, {K}] and [N2, P2, {O}] of dtype {A1.dtype}, got "
                         f"{tuple(A2.shape)}, {tuple(G2.shape)} {A2.dtype}")
    out = torch.zeros((N1, N2), dtype=A1.dtype, device=A1.device)
    if min(N1, N2, P1, P2, K, O) == 0:
        return out
    use_dot = A1.dtype == torch.float32
    if ghost:
        rows, bc = (32, 32) if use_dot else (16, 16)
        bn1, bp1 = _rows_split(P1, rows)
        bn2, bp2 = _rows_split(P2, rows)
        grid = (triton.cdiv(N1, bn1) * triton.cdiv(N2, bn2),)
        wrap(_ghost_inner_fwd_kernel, A1)[grid](
            A1, G1, A2, G2, out, N1, P1, N2, P2, K, O,
            *A1.stride(), *G1.stride(), *A2.stride(), *G2.stride(),
            USE_DOT=use_dot, BLOCK_N1=bn1, BLOCK_P1=bp1, BLOCK_N2=bn2, BLOCK_P2=bp2, BLOCK_K=bc, BLOCK_O=bc,
            num_warps=4,
        )
        return out
    bp, bk, bo = (32, 32, 32) if use_dot else (16, 16, 16)
    OK = O * K
    b = max(1, MATERIALIZE_BLOCK_ELEMS // OK)

    def materialize(A, G, n0, nb):
        W = torch.empty((nb, O, K), dtype=A.dtype, device=A.device)
        grid = (nb, triton.cdiv(O, bo) * triton.cdiv(K, bk))
        wrap(_ghost_materialize_kernel, A)[grid](
            A, G, W, n0, nb, A.shape[1], K, O, *A.stride(), *G.stride(),
            USE_DOT=use_dot, BLOCK_P=bp, BLOCK_K=bk, BLOCK_O=bo, num_warps=4,
        )
        return W.reshape(nb, OK)

    W2_all = materialize(A2, G2, 0, N2) if N2 <= b else None
    for s1 in range(0, N1, b):
        n1 = min(b, N1 - s1)
        W1 = materialize(A1, G1, s1, n1)
        for s2 in range(0, N2, b):
            n2 = min(b, N2 - s2)
            W2 = W2_all if W2_all is not None else materialize(A2, G2, s2, n2)
            out[s1 : s1 + n1, s2 : s2 + n2] = W1 @ W2.t()
    return out
