"""Fused residuals of the per-example label meta-gradient in Triton.

Forward (inner-loss residual), one program per ``BLOCK_N`` rows::

    p = softmax(Z),  s_i = Σ_c Y_ic
    R = scale · (p · s − Y)                  = d(scale · Σ_i CE(p_i, Y_i)) / dZ
    loss_rows_i = −Σ_c Y_ic log_softmax(Z)_ic

Backward (head residual), one program per ``BLOCK_N`` rows::

    v = H GWᵀ + gb + Vb,  p = softmax(Z)
    out = scale · (v − (p · v) 1)

The backward loops over ``d`` in ``BLOCK_D`` tiles accumulating a ``[BLOCK_N, BLOCK_C]`` tile of
``H GWᵀ`` in registers, then adds the biases and applies the masked, max-subtracted softmax residual
to the tile before its only store: no N×C intermediate besides the output.

Seed: label-distillation §3 eq. 1, Appendix B.
Equivalent PyTorch: ``ddfast.reference.label_metagrad.soft_cross_entropy`` (forward) and
``ddfast.reference.label_metagrad.head_residual_ref`` (backward).

Supported inputs (see :func:`not_supported_reasons_fwd` / :func:`not_supported_reasons_bwd`):

* number of classes ``C`` with ``next_pow2(C) <= MAX_CLASSES`` (1024): a row lives in registers;
* ``N`` and ``d`` unbounded (rows over programs, ``d`` in tiles); any strides;
* float32 or float64; CUDA tensors, or CPU tensors when the module was imported with
  ``TRITON_INTERPRET=1``.

Numerics: float32 products use ``tl.dot(..., input_precision="ieee")`` (no TF32); float64 products a
broadcast multiply + ``tl.sum`` (``tl.dot`` on float64 is not available on every GPU code path).
``scale`` is passed as a float32 pair ``hi + lo`` (a Python float argument is a float32 scalar on the
GPU), which keeps float64 results at float64 accuracy.
"""

from __future__ import annotations

import math
import struct
from typing import List, Optional, Tuple

import torch

__all__ = [
    "MAX_CLASSES",
    "TRITON_AVAILABLE",
    "TRITON_UNAVAILABLE_REASON",
    "label_metagrad_bwd",
    "label_metagrad_fwd",
    "not_supported_reasons_bwd",
    "not_supported_reasons_fwd",
]

#: Largest class tile (``C`` padded to a power of two) held in registers.
MAX_CLASSES = 1024

_SUPPORTED_DTYPES = (torch.float32, torch.float64)

from ._triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON, shapes_only, tl, triton, triton_op, wrap  # noqa: F401,E402


if TRITON_AVAILABLE:

    @triton.jit
    def _label_metagrad_fwd_kernel(
        Z, Y, R, LOSS,
        N, C,
        s_zn, s_zc,
        s_yn, s_yc,
        scale_hi, scale_lo,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """R = scale·(softmax(Z)·ΣY − Y) [N,C] and loss_rows = −Σ Y log_softmax(Z) [N]; outputs contiguous."""
        pid = tl.program_id(0).to(tl.int64)
        dt = Z.dtype.element_ty
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_C)
        mask_r = rows < N
        mask_c = cols < C
        mask = mask_r[:, None] & mask_c[None, :]
        z = tl.load(Z + rows[:, None] * s_zn + cols[None, :] * s_zc, mask=mask, other=0.0)
        y = tl.load(Y + rows[:, None] * s_yn + cols[None, :] * s_yc, mask=mask, other=0.0)
        z = tl.where(mask_c[None, :], z, float("-inf"))  # padded classes: zero probability
        zs = z - tl.max(z, axis=1)[:, None]
        e = tl.exp(zs)
        S = tl.sum(e, axis=1)
        s = tl.sum(y, axis=1)
        log_s = tl.log(S)
        logp = tl.where(mask_c[None, :], zs - log_s[:, None], 0.0)
        ce = -tl.sum(y * logp, axis=1)
        r = e * (s / S)[:, None] - y
        r = r * scale_hi + r * scale_lo  # fp64 data promotes the float32 pair
        tl.store(R + rows[:, None] * C + cols[None, :], r, mask=mask)
        tl.store(LOSS + rows, ce, mask=mask_r)

    @triton.jit
    def _label_metagrad_bwd_kernel(
        H, GW, GB, VB, Z, OUT,
        N, D, C,
        s_hn, s_hd,
        s_gc, s_gd,
        s_b,
        s_vn, s_vc,
        s_zn, s_zc,
        scale_hi, scale_lo,
        HAS_GB: tl.constexpr,
        HAS_VB: tl.constexpr,
        USE_DOT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """out = scale·(v − (softmax(Z)·v)1), v = H GWᵀ + gb + Vb  [N,C]; OUT contiguous."""
        pid = tl.program_id(0).to(tl.int64)
        dt = H.dtype.element_ty
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, BLOCK_D)
        mask_r = rows < N
        mask_c = cols < C
        mask = mask_r[:, None] & mask_c[None, :]

        acc = tl.zeros([BLOCK_N, BLOCK_C], dt)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + offs_d
            mask_k = ks < D
            h = tl.load(H + rows[:, None] * s_hn + ks[None, :] * s_hd,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            g = tl.load(GW + cols[:, None] * s_gc + ks[None, :] * s_gd,
                        mask=mask_c[:, None] & mask_k[None, :], other=0.0)
            if USE_DOT:
                acc = tl.dot(h, tl.trans(g), acc, input_precision="ieee")
            else:
                acc = acc + tl.sum(h[:, None, :] * g[None, :, :], axis=2)
        if HAS_GB:
            acc = acc + tl.load(GB + cols * s_b, mask=mask_c, other=0.0)[None, :]
        if HAS_VB:
            acc = acc + tl.load(VB + rows[:, None] * s_vn + cols[None, :] * s_vc, mask=mask, other=0.0)

        z = tl.load(Z + rows[:, None] * s_zn + cols[None, :] * s_zc, mask=mask, other=0.0)
        z = tl.where(mask_c[None, :], z, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        pv = tl.sum(e * acc, axis=1) / tl.sum(e, axis=1)
        out = acc - pv[:, None]
        out = out * scale_hi + out * scale_lo
        tl.store(OUT + rows[:, None] * C + cols[None, :], out, mask=mask)


# Whether the kernels were built for the Triton CPU interpreter (TRITON_INTERPRET set when the
# ``triton.jit`` decorators ran, i.e. at import). Only then can they run on CPU tensors.
_INTERPRETED = TRITON_AVAILABLE and not isinstance(_label_metagrad_fwd_kernel, triton.runtime.JITFunction)


# ---------------------------------------------------------------------- #
# Launch helpers                                                         #
# ---------------------------------------------------------------------- #


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _prev_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x.bit_length() - 1)


def _fwd_config(C: int) -> dict:
    block_c = _next_pow2(max(C, 1))
    block_n = max(1, min(64, 4096 // block_c))
    return dict(BLOCK_N=block_n, BLOCK_C=block_c, num_warps=8 if block_n * block_c >= 4096 else 4)


def _bwd_config(C: int, dtype: torch.dtype) -> dict:
    """Tile sizes. float32 tiles are >= 16 on every side (tl.dot minimum)."""
    block_c = max(16, _next_pow2(C))
    use_dot = dtype == torch.float32
    if use_dot:
        block_n = 32 if block_c <= 128 else 16
        block_d = 32 if block_c <= 64 else 16
    else:
        # the broadcast product materialises block_n * block_c * block_d elements
        block_n = max(1, min(16, 2048 // block_c))
        block_d = max(1, min(64, _prev_pow2(8192 // (block_n * block_c))))
    num_warps = 8 if block_n * block_c >= 4096 else 4
    return dict(USE_DOT=use_dot, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_C=block_c, num_warps=num_warps)


def _to_float32(x: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32's range: what a float32 conversion gives
        return math.copysign(math.inf, x)


def _split_scale(scale: float) -> Tuple[float, float]:
    """scale = hi + lo with hi, lo float32-representable (|lo| ≤ 2⁻²⁴|hi|): float64-exact to ~2⁻⁴⁸."""
    scale = float(scale)
    hi = _to_float32(scale)  # plain Python: also runs while torch.compile traces (no tensor to read back)
    return hi, _to_float32(scale - hi)


def _common_reasons(tensors, C: int) -> List[str]:
    reasons: List[str] = []
    first_name, first = tensors[0]
    for name, t in tensors:
        if t.dtype not in _SUPPORTED_DTYPES:
            reasons.append(f"{name}: dtype {t.dtype} not supported (float32/float64 only)")
        elif t.dtype != first.dtype:
            reasons.append(f"{name}: dtype {t.dtype} differs from {first_name}'s {first.dtype}")
        if t.device != first.device:
            reasons.append(f"{name}: on {t.device} but {first_name} on {first.device}")
    dev = first.device.type
    if dev == "cpu":
        if not _INTERPRETED:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before ddfast.kernels is imported")
    elif dev != "cuda":
        reasons.append(f"device type {dev!r} not supported")
    if _next_pow2(C) > MAX_CLASSES:
        reasons.append(f"C = {C} classes > {MAX_CLASSES} (a row is held in registers)")
    return reasons


def not_supported_reasons_fwd(Z, Y) -> List[str]:
    """Reasons this backend cannot run ``label_metagrad_fwd(Z, Y, scale)`` ([] = supported)."""
    reasons: List[str] = []
    if not TRITON_AVAILABLE:
        reasons.append(TRITON_UNAVAILABLE_REASON)
    if not isinstance(Z, torch.Tensor) or not isinstance(Y, torch.Tensor):
        return reasons + ["Z and Y must be torch tensors"]
    if Z.dim() != 2:
        return reasons + [f"Z: expected logits of shape [N, C], got {tuple(Z.shape)}"]
    if tuple(Y.shape) != tuple(Z.shape):
        reasons.append(f"Y: expected soft labels of shape {tuple(Z.shape)} (the shape of Z), got {tuple(Y.shape)}")
    return reasons + _common_reasons([("Z", Z), ("Y", Y)], Z.shape[1])


def not_supported_reasons_bwd(H, GW, Z) -> List[str]:
    """Reasons this backend cannot run ``label_metagrad_bwd(H, GW, gb, Vb, Z, scale)`` ([] = supported)."""
    reasons: List[str] = []
    if not TRITON_AVAILABLE:
        reasons.append(TRITON_UNAVAILABLE_REASON)
    if not all(isinstance(t, torch.Tensor) for t in (H, GW, Z)):
        return reasons + ["H, GW and Z must be torch tensors"]
    if H.dim() != 2:
        return reasons + [f"H: expected features of shape [N, d], got {tuple(H.shape)}"]
    N, d = H.shape
    if Z.dim() != 2 or Z.shape[0] != N:
        return reasons + [f"Z: expected logits of shape [N, C] with N = {N} (rows of H), got {tuple(Z.shape)}"]
    C = Z.shape[1]
    if tuple(GW.shape) != (C, d):
        reasons.append(f"GW: expected the head weight gradient of shape [C, d] = {(C, d)}, got {tuple(GW.shape)}")
    return reasons + _common_reasons([("H", H), ("GW", GW), ("Z", Z)], C)


def _check_optional(name: str, t, shape, like: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of H), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of H), got {t.device}")


@triton_op("triton_label_metagrad_fwd")
def label_metagrad_fwd(Z: torch.Tensor, Y: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inner-loss residual and per-row soft cross-entropy.

    Args:
        Z: logits ``[N, C]``; Y: soft labels ``[N, C]`` (rows need not sum to 1); float32/float64,
            any strides. scale: a float (e.g. ``1/N``).
    Returns:
        ``(R, loss_rows)``: ``R = scale·(softmax(Z)·s − Y)`` with ``s_i = Σ_c Y_ic`` (the gradient of
        ``scale·Σ_i CE_i`` w.r.t. Z) ``[N, C]``, and ``loss_rows_i = −Σ_c Y_ic log_softmax(Z)_ic``
        ``[N]``; contiguous.

    Seed: label-distillation §3 eq. 1.
    Equivalent PyTorch: ``ddfast.reference.label_metagrad.soft_cross_entropy(Z, Y, "none")`` and its
    gradient.
    """
    reasons = not_supported_reasons_fwd(Z, Y)
    if reasons:
        raise ValueError("triton label_metagrad_fwd unsupported: " + "; ".join(reasons))
    N, C = Z.shape
    R = torch.empty((N, C), dtype=Z.dtype, device=Z.device)
    loss = torch.empty((N,), dtype=Z.dtype, device=Z.device)
    if N == 0:
        return R, loss
    if C == 0:
        return R, loss.zero_()
    if _INTERPRETED and shapes_only(Z):
        return R, loss
    cfg = _fwd_config(C)
    hi, lo = _split_scale(scale)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    wrap(_label_metagrad_fwd_kernel)[grid](
        Z, Y, R, loss,
        N, C,
        *Z.stride(), *Y.stride(),
        hi, lo,
        **cfg,
    )
    return R, loss


@triton_op("triton_label_metagrad_bwd")
def label_metagrad_bwd(
    H: torch.Tensor,
    GW: torch.Tensor,
    gb: Optional[torch.Tensor],
    Vb: Optional[torch.Tensor],
    Z: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Head residual of the label meta-gradient, GEMM fused with the softmax residual.

    Args:
        H: features ``[N, d]``; GW: head weight gradient ``[C, d]``; gb: head bias gradient ``[C]``
            or None; Vb: body JVP ``[N, C]`` or None; Z: logits ``[N, C]``; all one float dtype, any
            strides. scale: a float (e.g. ``inner_lr/N``).
    Returns:
        ``out = scale·(v − (p·v)1)`` with ``v = H GWᵀ + gb + Vb``, ``p = softmax(Z)``; ``[N, C]``,
        contiguous.

    Seed: label-distillation Appendix B, (*).
    Equivalent PyTorch: ``ddfast.reference.label_metagrad.head_residual_ref``.
    """
    reasons = not_supported_reasons_bwd(H, GW, Z)
    if reasons:
        raise ValueError("triton label_metagrad_bwd unsupported: " + "; ".join(reasons))
    N, d = H.shape
    C = Z.shape[1]
    _check_optional("gb", gb, (C,), H)
    _check_optional("Vb", Vb, (N, C), H)
    out = torch.empty((N, C), dtype=H.dtype, device=H.device)
    if N == 0 or C == 0 or (_INTERPRETED and shapes_only(H)):
        return out
    cfg = _bwd_config(C, H.dtype)
    hi, lo = _split_scale(scale)
    dummy = out  # never read when the HAS_* flag is off
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    wrap(_label_metagrad_bwd_kernel)[grid](
        H, GW,
        gb if gb is not None else dummy,
        Vb if Vb is not None else dummy,
        Z, out,
        N, d, C,
        *H.stride(), *GW.stride(),
        gb.stride(0) if gb is not None else 0,
        *(Vb.stride() if Vb is not None else (0, 0)),
        *Z.stride(),
        hi, lo,
        HAS_GB=gb is not None,
        HAS_VB=Vb is not None,
        **cfg,
    )
    return out
