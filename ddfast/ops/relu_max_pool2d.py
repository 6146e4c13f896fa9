"""Fused ReLU + 2×2 max-pool: ``relu_max_pool2d(x) = F.max_pool2d(F.relu(x), 2)``.

    out[n, c, i, j] = max_{(a, b) ∈ {0,1}²} relu(x[n, c, 2i + a, 2j + b])      i < ⌊H/2⌋, j < ⌊W/2⌋

The forward reads x once and writes ``out`` and a uint8 window code per output: the position
k = 2a + b (row-major) of the first maximum when it is > 0 (the last NaN when there is one), or
``NO_GRAD`` when the maximum is 0. The backward scatters ``grad_out`` to the coded positions:

    ∂L/∂x[n, c, 2i + a, 2j + b] = ∂L/∂out[n, c, i, j]  if code[n, c, i, j] = 2a + b,  else 0

which is the gradient of the composition exactly (values, NaN handling, signed zeros), with a uint8
code saved in place of relu(x) and int64 indices. Forward values and gradients are identical to the
PyTorch composition in float32, float64 and bfloat16 (a selection: no rounding).

Autograd: first and higher derivatives (the backward is linear in ``grad_out``; its own derivative is
the selection of the coded positions, plain torch), forward mode (``torch.func.jvp``) and
``torch.func.vmap``. The derivative w.r.t. ``x`` of the backward is zero almost everywhere; it is
left out of the graph (``x`` is not reached by a second backward).
Used by LeNet (label-distillation §4.1: conv–ReLU–pool twice) and VGG11's ReLU → 2×2 max-pool pairs.
Equivalent PyTorch: :func:`ddfast.reference.relu_max_pool2d.relu_max_pool2d_ref`.
"""

from __future__ import annotations


import torch
from torch import nn

from ddfast import dispatch as _backends
from ddfast.ops._autograd import compile_apply, select_backend
from ddfast.reference.relu_max_pool2d import relu_max_pool2d_ref

__all__ = [
    "NO_GRAD",
    "ReluMaxPool2d",
    "ReluMaxPool2dBackward",
    "ReluMaxPool2dFunction",
    "relu_max_pool2d",
    "relu_max_pool2d_backends",
    "window_select",
]

#: Window code of an output whose gradient goes nowhere (its window's maximum is 0).
NO_GRAD = 4
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _is_channels_last(x: torch.Tensor) -> bool:
    """The layout the kernels run in (and give outputs in): channels_last when x is and is not contiguous."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- backends


def _triton():
    from ddfast.kernels import relu_max_pool2d

    return relu_max_pool2d


_COMPILED = dict(fwd=lambda x: torch.ops.ddfast.relu_max_pool2d_fwd(x),
                 bwd=lambda grad_out, code, H, W, channels_last: torch.ops.ddfast.relu_max_pool2d_bwd(
                     grad_out, code, H, W, channels_last))
RELU_MAX_POOL2D = _backends.register_op(
    "relu_max_pool2d",
    [
        _backends.Impl("cuda", _backends.Kernels("cuda", **_COMPILED), dtypes=_KERNEL_DTYPES),
        _backends.Impl("triton", _backends.Kernels(
            "triton", fwd=lambda x: _triton().relu_max_pool2d_fwd(x),
            bwd=lambda grad_out, code, H, W, channels_last: _triton().relu_max_pool2d_bwd(
                grad_out, code, H, W, channels_last)), dtypes=_KERNEL_DTYPES),
        _backends.Impl("cpu", _backends.Kernels("cpu", **_COMPILED), dtypes=_KERNEL_DTYPES),
    ],
    describe={"relu_max_pool2d": lambda x, **_: {"device": x.device, "dtype": x.dtype}},
)
_KERNELS = {name: impl.kernels for name, impl in RELU_MAX_POOL2D.impls.items() if impl.kernels is not None}


def _select(backend, device, dtype):
    return _backends.select_for(RELU_MAX_POOL2D, backend, {"device": device, "dtype": dtype})


def relu_max_pool2d_backends(device="cpu", dtype=torch.float32) -> dict:
    """``{backend: reasons it cannot run}`` for inputs on ``device`` of ``dtype`` ([] = it can), and
    ``"auto"``: the backend ``backend="auto"`` picks (shown by ``python -m ddfast.info``)."""
    inputs = {"device": torch.device(device), "dtype": dtype}
    report = {n: _backends.not_supported_reasons(RELU_MAX_POOL2D, n, inputs) for n in _backends.BACKENDS}
    report["auto"] = _backends.select_for(RELU_MAX_POOL2D, "auto", inputs)
    return report


# --------------------------------------------------------------------------- autograd


def window_select(t: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``t[..., 2i + a, 2j + b]`` at the coded position ``2a + b`` of each window, 0 where the code is
    ``NO_GRAD``: ``[..., OH, OW]`` for ``t [..., H, W]`` and ``code [..., OH, OW]`` (plain torch,
    differentiable). The transpose of the backward's scatter, and the forward-mode derivative."""
    OH, OW = code.shape[-2:]
    w = t[..., : 2 * OH, : 2 * OW].unflatten(-1, (OW, 2)).unflatten(-3, (OH, 2))  # [..., OH, 2, OW, 2]
    w = w.transpose(-3, -2).flatten(-2)  # [..., OH, OW, 4], position 2a + b
    picked = w.gather(-1, code.long().clamp(max=3).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(code == NO_GRAD, 0)


def _batch_first(t, bdim, size):
    return t.unsqueeze(0).expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)


class ReluMaxPool2dFunction(torch.autograd.Function):
    """``(out, code)`` = fused ReLU + 2×2 max-pool of ``x [N, C, H, W]`` (``code`` not differentiable).

    Backward: ``∂x = scatter(∂out)`` to the coded window positions (:class:`ReluMaxPool2dBackward`,
    itself differentiable); forward mode: ``out_t = window_select(x_t, code)``.
    """

    @staticmethod
    def forward(x, kernels):
        return kernels.fwd(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, kernels = inputs
        code = output[1]
        ctx.mark_non_differentiable(code)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(code)
        ctx.save_for_forward(code)
        ctx.kernels = kernels
        ctx.geometry = (x.shape[-2], x.shape[-1], _is_channels_last(x))

    @staticmethod
    def backward(ctx, grad_out, _grad_code):
        if grad_out is None or not ctx.needs_input_grad[0]:
            return None, None
        (code,) = ctx.saved_tensors
        return ReluMaxPool2dBackward.apply(grad_out, code, ctx.kernels, *ctx.geometry), None

    @staticmethod
    def jvp(ctx, x_t, _kernels_t):
        (code,) = ctx.saved_tensors
        return window_select(x_t, code), None

    @staticmethod
    def vmap(info, in_dims, x, kernels):
        B = info.batch_size
        out, code = ReluMaxPool2dFunction.apply(_batch_first(x, in_dims[0], B).flatten(0, 1), kernels)
        return (out.unflatten(0, (B, -1)), code.unflatten(0, (B, -1))), (0, 0)


class ReluMaxPool2dBackward(torch.autograd.Function):
    """``grad_in [N, C, H, W]`` = ``grad_out`` scattered to the coded window positions (linear in
    ``grad_out``); its backward is :func:`window_select` of the incoming gradient."""

    @staticmethod
    def forward(grad_out, code, kernels, H, W, channels_last):
        return kernels.bwd(grad_out, code, H, W, channels_last)

    @staticmethod
    def setup_context(ctx, inputs, output):
        code = inputs[1]
        ctx.save_for_backward(code)
        ctx.save_for_forward(code)
        ctx.kernels, ctx.geometry = inputs[2], inputs[3:]

    @staticmethod
    def backward(ctx, gg):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        (code,) = ctx.saved_tensors
        return window_select(gg, code), None, None, None, None, None

    @staticmethod
    def jvp(ctx, g_t, *_):
        (code,) = ctx.saved_tensors
        # Through the Function (not the raw kernel): its vmap rule folds a batched tangent (jacfwd).
        return ReluMaxPool2dBackward.apply(g_t, code, ctx.kernels, *ctx.geometry)

    @staticmethod
    def vmap(info, in_dims, grad_out, code, kernels, H, W, channels_last):
        B = info.batch_size
        g = _batch_first(grad_out, in_dims[0], B).flatten(0, 1)
        k = _batch_first(code, in_dims[1], B).flatten(0, 1)
        return ReluMaxPool2dBackward.apply(g, k, kernels, H, W, channels_last).unflatten(0, (B, -1)), 0


# The Function's apply for eager mode and torch.compile (ddfast.ops._autograd.compile_apply).
_apply_relu_max_pool2d = compile_apply(ReluMaxPool2dFunction)


# --------------------------------------------------------------------------- public API


def _backend_name(backend, device, dtype):
    """The selected backend; under torch.compile a constant of the graph (``select_backend``)."""
    return select_backend(RELU_MAX_POOL2D, backend, {"device": device, "dtype": dtype})


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor of shape [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor of shape [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x: expected H, W ≥ 2 for a 2×2 pool, got shape {tuple(x.shape)}")


def relu_max_pool2d(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """ReLU then 2×2 max-pool with stride 2 (floor for odd H / W), fused.

    Args:
        x: ``[N, C, H, W]``, H, W ≥ 2, a floating-point tensor (kernels: float32, float64, bfloat16;
            other dtypes take the reference), contiguous, channels_last or any strides.
        backend: ``"auto" | "fused" | "cpu" | "triton" | "cuda" | "reference"``; ``auto`` takes the
            C++ kernel for CPU tensors when ``ddfast._C`` is built, else the reference
            (``python -m ddfast.info`` says why).
    Shape: ``[N, C, ⌊H/2⌋, ⌊W/2⌋]``, channels_last when ``x`` is, else contiguous.
    Returns: ``max_{a,b ∈ {0,1}} relu(x[n, c, 2i+a, 2j+b])``, with the gradient of the composition
        exactly (to the first maximum in row-major window order when it is > 0, else nowhere).
    Equivalent PyTorch: ``ddfast.reference.relu_max_pool2d.relu_max_pool2d_ref`` =
        ``F.max_pool2d(F.relu(x), 2)``.
    """
    _check_input(x)
    name = _backend_name(backend, x.device, x.dtype)
    if name == "reference":
        return relu_max_pool2d_ref(x)
    return _apply_relu_max_pool2d(x, _KERNELS[name])[0]


class ReluMaxPool2d(nn.Module):
    """``nn.ReLU()`` followed by ``nn.MaxPool2d(2)``, fused (:func:`relu_max_pool2d`); no parameters."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_max_pool2d(x, backend=self.backend)

    def extra_repr(self) -> str:
        return "" if self.backend == "auto" else f"backend={self.backend!r}"
