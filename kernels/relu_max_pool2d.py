"""Fused ReLU + 2×2 max-pool (stride 2, floor) in Triton.

* ``_relu_max_pool2d_fwd_kernel`` — one lane per output::

      out[n,c,i,j]  = max_{a,b ∈ {0,1}} relu(x[n,c,2i+a,2j+b])
      code[n,c,i,j] = first window position 2a+b (row-major) holding the maximum when it is > 0,
                      the last NaN when there is one, else ``NO_GRAD`` (4)

* ``_relu_max_pool2d_bwd_kernel`` — one lane per input element: ``grad_in = 0 + grad_out`` at the
  coded window position, 0 elsewhere (and on the last row / column of an odd H / W).

Lanes walk the result in its memory order (NHWC, channels innermost, for channels_last tensors, so
neighbouring lanes touch neighbouring addresses); index math is int32 unless a lane index or an element
offset can reach 2³¹ (``_needs_int64``), which selects an int64 specialization.

Bit for bit ``F.max_pool2d(F.relu(x), 2)`` and its gradient (first maximum by strict ``>``, NaN
wins, ``relu(−0) = −0``, −0 gradients become +0 as in max_pool2d's accumulation).
Equivalent PyTorch: ``ddfast.reference.relu_max_pool2d.relu_max_pool2d_ref``.

Supported inputs (:func:`not_supported_reasons`): float32, float64 or bfloat16 (compared in float32:
exact), any strides; outputs channels_last when ``x`` is, else contiguous. CUDA tensors, or CPU
tensors when the module was imported with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = [
    "NO_GRAD",
    "TRITON_AVAILABLE",
    "TRITON_UNAVAILABLE_REASON",
    "not_supported_reasons",
    "relu_max_pool2d_bwd",
    "relu_max_pool2d_fwd",
]

#: Code of an output whose gradient goes nowhere (its window's maximum is 0).
NO_GRAD = 4
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_BLOCK = 1024
#: Index math runs in int32 while every lane index and element offset stays below this; above it the
#: kernels are specialized for int64 (INT64=True).
_INT32_LIMIT = 2**31

from ._triton import TRITON_AVAILABLE, TRITON_UNAVAILABLE_REASON, shapes_only, tl, triton, triton_op, wrap  # noqa: F401,E402


if TRITON_AVAILABLE:

    @triton.jit
    def _relu_max_pool2d_fwd_kernel(
        X, OUT, CODE,
        total, C, OH, OW,
        s_xn, s_xc, s_xh, s_xw,
        s_on, s_oc, s_oh, s_ow,
        WIDEN: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """OUT, CODE [N, C, OH, OW] (strides s_o*) from X [N, C, H, W]; lanes over outputs in the order of
        OUT's memory (NHWC: channels innermost, so a warp reads and writes consecutive channels). Index
        math in int32 unless INT64 (an offset or the lane count may reach 2³¹)."""
        if INT64:
            idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        if CHANNELS_LAST:
            c = idx % C
            t = idx // C
            j = t % OW
            t = t // OW
            i = t % OH
            n = t // OH
        else:
            j = idx % OW
            t = idx // OW
            i = t % OH
            t = t // OH
            c = t % C
            n = t // C
        p = X + n * s_xn + c * s_xc + (2 * i) * s_xh + (2 * j) * s_xw
        a = tl.load(p, mask=mask, other=0.0)
        b = tl.load(p + s_xw, mask=mask, other=0.0)
        cc = tl.load(p + s_xh, mask=mask, other=0.0)
        d = tl.load(p + s_xh + s_xw, mask=mask, other=0.0)
        if WIDEN:  # bfloat16: compare in float32 (exact)
            a, b, cc, d = a.to(tl.float32), b.to(tl.float32), cc.to(tl.float32), d.to(tl.float32)
        best = tl.where(a < 0, 0.0, a)  # relu(a): keeps −0 and NaN
        k = tl.where((a > 0) | (a != a), 0, 4)
        take = (b > best) | (b != b)
        best = tl.where(take, b, best)
        k = tl.where(take, 1, k)
        take = (cc > best) | (cc != cc)
        best = tl.where(take, cc, best)
        k = tl.where(take, 2, k)
        take = (d > best) | (d != d)
        best = tl.where(take, d, best)
        k = tl.where(take, 3, k)
        o = n * s_on + c * s_oc + i * s_oh + j * s_ow
        tl.store(OUT + o, best.to(OUT.dtype.element_ty), mask=mask)
        tl.store(CODE + o, k.to(tl.uint8), mask=mask)

    @triton.jit
    def _relu_max_pool2d_bwd_kernel(
        G, CODE, GI,
        total, C, H, W, OH, OW,
        s_gn, s_gc, s_gh, s_gw,
        s_kn, s_kc, s_kh, s_kw,
        s_in, s_ic, s_ih, s_iw,
        WIDEN: tl.constexpr,
        CHANNELS_LAST: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """GI [N, C, H, W] (strides s_i*) from G and CODE [N, C, OH, OW]; lanes over inputs in the order of
        GI's memory (NHWC: channels innermost). Index math in int32 unless INT64."""
        if INT64:
            idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        if CHANNELS_LAST:
            c = idx % C
            t = idx // C
            w = t % W
            t = t // W
            h = t % H
            n = t // H
        else:
            w = idx % W
            t = idx // W
            h = t % H
            t = t // H
            c = t % C
            n = t // C
        i = h // 2
        j = w // 2
        inside = mask & (i < OH) & (j < OW)
        k = tl.load(CODE + n * s_kn + c * s_kc + i * s_kh + j * s_kw, mask=inside, other=4)
        g = tl.load(G + n * s_gn + c * s_gc + i * s_gh + j * s_gw, mask=inside, other=0.0)
        if WIDEN:
            g = g.to(tl.float32)
        pos = (h % 2) * 2 + (w % 2)
        v = tl.where(k.to(tl.int32) == pos, g + 0.0, 0.0)  # 0 + g: −0 → +0
        tl.store(GI + n * s_in + c * s_ic + h * s_ih + w * s_iw, v.to(GI.dtype.element_ty), mask=mask)


# Whether the kernels were built for the Triton CPU interpreter (TRITON_INTERPRET set when the
# ``triton.jit`` decorators ran, i.e. at import). Only then can they run on CPU tensors.
_INTERPRETED = TRITON_AVAILABLE and not isinstance(_relu_max_pool2d_fwd_kernel, triton.runtime.JITFunction)


def not_supported_reasons(x) -> List[str]:
    """Reasons these kernels cannot run on tensors like ``x`` ([] = supported)."""
    reasons: List[str] = []
    if not TRITON_AVAILABLE:
        reasons.append(TRITON_UNAVAILABLE_REASON)
    if not isinstance(x, torch.Tensor):
        return reasons + ["x must be a torch tensor"]
    if x.dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} not supported (float32/float64/bfloat16 only)")
    dev = x.device.type
    if dev == "cpu":
        if not _INTERPRETED:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before ddfast.kernels is imported")
    elif dev != "cuda":
        reasons.append(f"device type {dev!r} not supported")
    return reasons


def _memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


def _is_channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _needs_int64(total: int, *tensors: torch.Tensor) -> bool:
    """Whether a lane index (< total rounded up to a block) or an element offset of any tensor can reach
    ``_INT32_LIMIT`` (offsets: Σ (size − 1)·|stride| over the dimensions)."""
    reach = total + _BLOCK
    for t in tensors:
        reach = max(reach, sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) + 1)
    return reach >= _INT32_LIMIT


@triton_op("triton_relu_max_pool2d_fwd")
def relu_max_pool2d_fwd(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, code)`` of the fused ReLU + 2×2 max-pool.

    Args:
        x: ``[N, C, H, W]``, H, W ≥ 2, float32 / float64 / bfloat16, any strides.
    Returns:
        ``out = F.max_pool2d(F.relu(x), 2)`` and the uint8 window ``code`` (0..3 or ``NO_GRAD``),
        both ``[N, C, ⌊H/2⌋, ⌊W/2⌋]``, channels_last when ``x`` is (and not contiguous), else contiguous.
    Equivalent PyTorch: ``ddfast.reference.relu_max_pool2d.relu_max_pool2d_ref``.
    """
    reasons = not_supported_reasons(x)
    if reasons:
        raise ValueError("triton relu_max_pool2d_fwd unsupported: " + "; ".join(reasons))
    if x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x: expected a 4-D tensor [N, C, H, W] with H, W ≥ 2, got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    fmt = _memory_format(_is_channels_last(x))
    out = torch.empty((N, C, H // 2, W // 2), dtype=x.dtype, device=x.device, memory_format=fmt)
    code = torch.empty((N, C, H // 2, W // 2), dtype=torch.uint8, device=x.device, memory_format=fmt)
    total = out.numel()
    if total == 0 or (_INTERPRETED and shapes_only(x)):
        return out, code
    grid = (triton.cdiv(total, _BLOCK),)
    wrap(_relu_max_pool2d_fwd_kernel)[grid](
        x, out, code,
        total, C, H // 2, W // 2,
        *x.stride(), *out.stride(),
        WIDEN=x.dtype == torch.bfloat16,
        CHANNELS_LAST=fmt is torch.channels_last,
        INT64=_needs_int64(total, x, out),
        BLOCK=_BLOCK,
    )
    return out, code


@triton_op("triton_relu_max_pool2d_bwd")
def relu_max_pool2d_bwd(grad_out: torch.Tensor, code: torch.Tensor, H: int, W: int, channels_last: bool) -> torch.Tensor:
    """``grad_in`` of the fused ReLU + 2×2 max-pool: ``grad_out`` at the coded window positions.

    Args:
        grad_out: ``[N, C, OH, OW]`` (any strides); code: the forward's uint8 codes; H, W: the input
            size; channels_last: the forward's layout (that of ``grad_in``).
    Returns: ``grad_in`` ``[N, C, H, W]``.
    """
    reasons = not_supported_reasons(grad_out)
    if reasons:
        raise ValueError("triton relu_max_pool2d_bwd unsupported: " + "; ".join(reasons))
    N, C, OH, OW = code.shape
    if tuple(grad_out.shape) != (N, C, OH, OW) or OH != H // 2 or OW != W // 2:
        raise ValueError(f"grad_out: expected shape {(N, C, H // 2, W // 2)} and codes of that shape, got "
                         f"{tuple(grad_out.shape)} and {tuple(code.shape)}")
    gi = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device,
                     memory_format=_memory_format(channels_last))
    total = gi.numel()
    if total == 0 or (_INTERPRETED and shapes_only(grad_out)):
        return gi
    grid = (triton.cdiv(total, _BLOCK),)
    wrap(_relu_max_pool2d_bwd_kernel)[grid](
        grad_out, code, gi,
        total, C, H, W, OH, OW,
        *grad_out.stride(), *code.stride(), *gi.stride(),
        WIDEN=grad_out.dtype == torch.bfloat16,
        CHANNELS_LAST=channels_last,
        INT64=_needs_int64(total, grad_out, code, gi),
        BLOCK=_BLOCK,
    )
    return gi
