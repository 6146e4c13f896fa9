"""Per-example label meta-gradients of label distillation (label-distillation §3, Appendix B).

Second-order LD (``label_metagrad``): one inner SGD step on base examples x̃ with soft labels ỹ,
the outer cross-entropy of the stepped model on real examples (x, y), and ∂L_out/∂ỹ:

    θ' = θ − α ∇θ (1/N) Σᵢ CE(softmax f_θ(x̃ᵢ), ỹᵢ)          L_out = CE(f_θ'(x), y)
    ∂L_out/∂ỹᵢ = (α/N) (vᵢ − (pᵢ·vᵢ) 1),   vᵢ = Jᵢ g',  g' = ∇θ' L_out,  pᵢ = softmax f_θ(x̃ᵢ)

(the inner gradient (1/N) Σᵢ Jᵢᵀ(pᵢ 1ᵀỹᵢ − ỹᵢ) is linear in ỹ; pᵢ does not depend on ỹ). The fused
path is first-order only: one VJP at θ over the base batch (inner step), one backward at θ' over
the real batch (streamed in chunks: activations of one chunk alive at a time), one forward-mode
JVP at θ over the base batch; no double backward. For a model split as ``features`` + ``head``
(an ``nn.Linear``) the head's share of vᵢ, G_W hᵢ + g_b, is a GEMM that the kernel fuses with the
softmax residual (``label_metagrad_bwd``); the inner residual pᵢ 1ᵀỹᵢ − ỹᵢ and the inner loss come
from ``label_metagrad_fwd``.

RR (``ridge_label_metagrad``, Algorithm 1, eq. 2–3): W_l = Z̃ᵀ(Z̃Z̃ᵀ + λI)⁻¹ỹ, global weights
W = (1−α)W_prev + αW_l, outer loss on real features; the label gradient has the closed form
∂L_out/∂ỹ = α(Z̃Z̃ᵀ + λI)⁻¹Z̃ ∂L_out/∂W, computed by the ridge kernel's backward from the forward's
Cholesky factor (no autograd graph, no torch.func transform: it compiles with fullgraph=True).

Equivalent PyTorch: ``ddfast.reference.label_metagrad.label_metagrad_ref`` (``create_graph=True``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from ddfast import dispatch as _backends
from ddfast.network_passes import autocast, check_op_precision
from ddfast.ops._autograd import batch_first, check_class_indices, first_order_only
from ddfast.ops._autograd import check_finite as _check_finite
from ddfast.errors import NotPSDError
from ddfast.ops.ridge_solve import _KERNELS as _RIDGE_KERNELS
from ddfast.ops.ridge_solve import _check_finite_output, _checking, _kernel_view, _raise_if_nonfinite
from ddfast.ops.ridge_solve import _factor as _ridge_factor
from ddfast.ops.ridge_solve import _mu as _ridge_mu
from ddfast.ops.ridge_solve import _select as _ridge_select
from ddfast.ops.ridge_solve import _validate as _ridge_validate
from ddfast.ops.ridge_solve import ridge_weights
from ddfast.reference.label_metagrad import label_meta_loss_ref, label_metagrad_ref, outer_loss
from ddfast.reference.ridge_solve import ridge_weights_ref

__all__ = [
    "label_metagrad",
    "label_meta_loss",
    "LabelMetagrad",
    "LabelMetagradFunction",
    "ridge_label_metagrad",
    "ridge_logits",
    "split_model",
]

_FLOATS = (torch.float32, torch.float64)

# --------------------------------------------------------------------------- backends


class _TorchResiduals:
    """The residual formulas in plain torch (used to check kernels; not a dispatch target)."""

    @staticmethod
    def fwd(Z, Y, scale):
        logp = F.log_softmax(Z, dim=-1)
        R = scale * (logp.exp() * Y.sum(-1, keepdim=True) - Y)
        return R, -(Y * logp).sum(-1)

    @staticmethod
    def bwd(H, GW, gb, Vb, Z, scale):
        from ddfast.reference.label_metagrad import head_residual_ref

        return head_residual_ref(H, GW, gb, Vb, Z, scale)


def _triton():
    from ddfast.kernels import label_metagrad

    return label_metagrad


def _triton_classes(inputs):
    from ddfast.kernels.label_metagrad import MAX_CLASSES

    C = inputs["C"]
    if 1 << max(C - 1, 0).bit_length() > MAX_CLASSES:
        return f"C = {C} classes > {MAX_CLASSES} (a row is held in registers)"


_COMPILED = dict(fwd=lambda Z, Y, scale: torch.ops.ddfast.label_metagrad_fwd(Z, Y, scale),
                 bwd=lambda H, GW, gb, Vb, Z, scale: torch.ops.ddfast.label_metagrad_bwd(H, GW, gb, Vb, Z, scale))


def _describe(model=None, x_base=None, y_soft=None, *args, **_):
    return {"device": y_soft.device, "dtype": y_soft.dtype, "C": y_soft.shape[-1]}


LABEL_METAGRAD = _backends.register_op(
    "label_metagrad",
    [
        _backends.Impl("cuda", _backends.Kernels("cuda", **_COMPILED), dtypes=_FLOATS),
        _backends.Impl("triton", _backends.Kernels(
            "triton", fwd=lambda Z, Y, scale: _triton().label_metagrad_fwd(Z, Y, scale),
            bwd=lambda H, GW, gb, Vb, Z, scale: _triton().label_metagrad_bwd(H, GW, gb, Vb, Z, scale)),
            dtypes=_FLOATS, limits=(_triton_classes,)),
        _backends.Impl("cpu", _backends.Kernels("cpu", **_COMPILED), dtypes=_FLOATS),
    ],
    describe={"label_metagrad": _describe, "label_meta_loss": _describe},
)
_KERNELS = {name: impl.kernels for name, impl in LABEL_METAGRAD.impls.items() if impl.kernels is not None}


def _select(backend, device, dtype, C, op):
    return _backends.select_for(LABEL_METAGRAD, backend, {"device": device, "dtype": dtype, "C": C})


# --------------------------------------------------------------------------- model split


def split_model(model: nn.Module):
    """``(features, head)`` when ``model`` is ``head(features(x))`` with a linear head, else ``None``.

    ddfast's models (``ddfast.models``) expose ``features`` and ``head``; any module that does, with
    ``forward(x) == head(features(x))``, gets the fused head path.
    """
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if isinstance(features, nn.Module) and isinstance(head, nn.Linear):
        return features, head
    return None


# --------------------------------------------------------------------------- fused algorithm


def _param_dict(module):
    return {k: p.detach() for k, p in module.named_parameters()}


def _outer_grad(model, stepped, x_real, y_real, chunk, precision="fp32"):
    """L_out = CE(f_θ'(x), y) and g' = ∇θ' L_out, streaming the real batch in chunks (logits in float32)."""
    M = x_real.shape[0]
    names = list(stepped)
    leaves = {k: v.detach().requires_grad_(True) for k, v in stepped.items()}
    buffers = dict(model.named_buffers())
    grads = None
    total = x_real.new_zeros((), dtype=next(iter(leaves.values())).dtype)
    correct = x_real.new_zeros((), dtype=torch.int64)
    chunk = M if not chunk or chunk >= M else int(chunk)
    for s in range(0, M, chunk):
        xc, yc = x_real[s : s + chunk], y_real[s : s + chunk]
        with autocast(precision, xc.device):
            logits = functional_call(model, {**leaves, **buffers}, (xc,))
        logits = logits.to(total.dtype)
        loss = outer_loss(logits, yc) * (xc.shape[0] / M)
        gs = torch.autograd.grad(loss, [leaves[k] for k in names])
        grads = list(gs) if grads is None else [a.add_(b) for a, b in zip(grads, gs)]
        total = total + loss.detach()
        target = yc if yc.dtype in (torch.int64, torch.int32) else yc.argmax(-1)
        correct = correct + (logits.detach().argmax(-1) == target).sum()
    return total, dict(zip(names, grads)), correct


def _fused_metagrad(kernels, model, x_base, y_soft, x_real, y_real, inner_lr, reduction, outer_chunk, precision="fp32"):
    N = x_base.shape[0]
    dev = x_base.device
    scale = 1.0 / N if reduction == "mean" else 1.0
    y = y_soft.detach()
    split = split_model(model)
    with torch.enable_grad():
        if split is not None:
            features, head = split
            phi = {k: p.detach().requires_grad_(True) for k, p in features.named_parameters()}
            W, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
            with autocast(precision, dev):
                h_net = functional_call(features, phi, (x_base,))
            h = h_net.to(y.dtype)  # float32 features for the head and the kernels
            z = F.linear(h.detach(), W, b)
            _check_width(z, y)
            R, loss_rows = kernels.fwd(z, y, scale)
            # Inner gradient: head in closed form, body by one VJP with cotangent R W.
            g_phi = torch.autograd.grad(h_net, list(phi.values()), (R @ W).to(h_net.dtype)) if phi else ()
            g_in = dict(zip(phi, g_phi))
            head_names = {n: f"{_head_prefix(model, head)}{n}" for n, _ in head.named_parameters()}
            g_head = {"weight": R.transpose(0, 1) @ h.detach(), "bias": R.sum(0)}
            params, inner_grads = {}, {}
            feat_prefix = _module_prefix(model, features)
            for k, p in phi.items():
                inner_grads[feat_prefix + k] = g_in[k]
            for n, full in head_names.items():
                inner_grads[full] = g_head[n]
            for k, p in model.named_parameters():
                params[k] = p.detach() - inner_lr * inner_grads[k]
        else:
            theta = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
            buffers = dict(model.named_buffers())
            with autocast(precision, dev):
                z_net = functional_call(model, {**theta, **buffers}, (x_base,))
            z = z_net.to(y.dtype)
            _check_width(z, y)
            R, loss_rows = kernels.fwd(z.detach(), y, scale)
            g = torch.autograd.grad(z_net, list(theta.values()), R.to(z_net.dtype))
            inner_grads = dict(zip(theta, g))
            params = {k: p.detach() - inner_lr * inner_grads[k] for k, p in theta.items()}
        loss, g_out, correct = _outer_grad(model, params, x_real, y_real, outer_chunk, precision)
    # v = J g' at θ over the base batch (forward mode), then the fused residual.
    if split is not None:
        feat_prefix = _module_prefix(model, features)
        names = list(phi)
        if names:
            tangents = tuple(g_out[feat_prefix + k] for k in names)
            primals = tuple(phi[k].detach() for k in names)
            with autocast(precision, dev):
                _, dh = jvp(lambda *ps: functional_call(features, dict(zip(names, ps)), (x_base,)), primals, tangents)
            Vb = dh.to(y.dtype) @ W.transpose(0, 1)
        else:
            Vb = None
        hp = _head_prefix(model, head)
        GW = g_out[hp + "weight"]
        gb = g_out.get(hp + "bias")
        grad = kernels.bwd(h.detach(), GW, gb, Vb, z.detach(), inner_lr * scale)
    else:
        names = list(theta)
        buffers = dict(model.named_buffers())
        with autocast(precision, dev):
            _, v = jvp(
                lambda *ps: functional_call(model, {**dict(zip(names, ps)), **buffers}, (x_base,)),
                tuple(theta[k].detach() for k in names),
                tuple(g_out[k] for k in names),
            )
        v = v.to(y.dtype)
        eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
        grad = kernels.bwd(v, eye, None, None, z.detach(), inner_lr * scale)
    inner_loss = loss_rows.mean() if reduction == "mean" else loss_rows.sum()
    return LabelMetagrad(loss, grad, inner_loss, inner_grads, correct)


def _check_width(z, y):
    if z.shape[-1] != y.shape[-1]:
        raise ValueError(f"y_soft: the model outputs {z.shape[-1]} classes, but the labels have C = {y.shape[-1]} columns")


def _module_prefix(model, sub):
    for name, m in model.named_modules():
        if m is sub:
            return f"{name}." if name else ""
    raise ValueError("features: not a submodule of model")


_head_prefix = _module_prefix


class LabelMetagrad(NamedTuple):
    """Result of :func:`label_metagrad`."""

    loss: torch.Tensor  # L_out at θ'
    grad: torch.Tensor  # ∂L_out/∂ỹ  [N, C]
    inner_loss: torch.Tensor  # L_in at θ
    inner_grads: dict  # ∇θ L_in by parameter name (the first-order model step of LD uses it)
    outer_correct: int  # correct predictions of the stepped model on the real batch


_SECOND_ORDER = (
    "label_meta_loss: the fused path is first order (∂L_out/∂ỹ is a closed form computed with the loss); "
    "second derivatives w.r.t. y_soft (create_graph=True then another backward, torch.func.hessian, "
    "jacrev(jacrev(f)), jacfwd(jacfwd(f)), grad(grad(f))) are not supported. Use backend=\"reference\" "
    "(L_out through a functional inner step, differentiable to any order)"
)


class LabelMetagradFunction(torch.autograd.Function):
    """``(L_out, ∂L_out/∂ỹ)`` of ``y_soft``; ``∂L_out/∂ỹ`` is computed with the loss in the forward.

    ``metagrad(ỹ) -> (L_out, ∂L_out/∂ỹ)`` is the fused closed form. Backward: ``g · ∂L_out/∂ỹ``;
    forward mode: ``⟨∂L_out/∂ỹ, ỹ_t⟩`` (both exact to first order; a second derivative raises
    :class:`ddfast.errors.HigherOrderUnsupportedError`). ``vmap`` over label sets runs one meta-gradient
    per set (each set steps the model differently; nothing to fold). The second output is not
    differentiable.
    """

    @staticmethod
    def forward(y_soft, metagrad):
        loss, grad = metagrad(y_soft)
        return loss, grad

    @staticmethod
    def setup_context(ctx, inputs, output):
        y_soft = inputs[0]
        grad = output[1]
        ctx.mark_non_differentiable(grad)
        ctx.save_for_backward(grad, y_soft)
        ctx.save_for_forward(grad, y_soft)

    @staticmethod
    def backward(ctx, g, _g_grad):
        grad, y_soft = ctx.saved_tensors
        return first_order_only(g * grad, (y_soft, g), _SECOND_ORDER), None

    @staticmethod
    def jvp(ctx, y_t, _metagrad_t):
        grad, y_soft = ctx.saved_tensors
        return (first_order_only(grad, (y_soft,), _SECOND_ORDER, always=True) * y_t).sum(), None

    @staticmethod
    def vmap(info, in_dims, y_soft, metagrad):
        ys = batch_first(y_soft, in_dims[0], info.batch_size)
        outs = [LabelMetagradFunction.apply(ys[b], metagrad) for b in range(info.batch_size)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)


# --------------------------------------------------------------------------- validation


def _positive_chunk(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected None or a positive number of examples, got {value!r}")


def _validate(model, x_base, y_soft, x_real, y_real, inner_lr, reduction, outer_chunk=None):
    """Shape / dtype / device / scalar checks (no host sync); returns α as a float."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, t in (("x_base", x_base), ("y_soft", y_soft), ("x_real", x_real), ("y_real", y_real)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if y_soft.dim() != 2 or y_soft.dtype not in _FLOATS:
        raise ValueError(f"y_soft: expected float32/float64 soft labels [N, C], got {tuple(y_soft.shape)} {y_soft.dtype}")
    N, C = y_soft.shape
    if N == 0 or C == 0:
        raise ValueError(f"y_soft: expected a non-empty [N, C] (N base examples, C classes), got {tuple(y_soft.shape)}")
    if x_base.dim() < 1 or x_base.shape[0] != N:
        raise ValueError(f"x_base: expected {N} base examples (one per row of y_soft [N, C]), got shape {tuple(x_base.shape)}")
    if x_real.dim() < 1 or x_real.shape[0] == 0:
        raise ValueError(f"x_real: expected a non-empty batch of real examples [M, ...], got shape {tuple(x_real.shape)}")
    M = x_real.shape[0]
    if y_real.dtype in (torch.int64, torch.int32):
        if tuple(y_real.shape) != (M,):
            raise ValueError(f"y_real: expected class indices [{M}], got {tuple(y_real.shape)}")
    elif y_real.dtype in _FLOATS:
        if tuple(y_real.shape) != (M, C):
            raise ValueError(f"y_real: expected indices [{M}] or soft targets [{M}, {C}], got {tuple(y_real.shape)}")
    else:
        raise TypeError(f"y_real: expected int64/int32 class indices or float soft targets, got {y_real.dtype}")
    if x_base.dtype != y_soft.dtype or x_real.dtype != y_soft.dtype:
        raise ValueError(f"x_base, x_real: expected dtype {y_soft.dtype} like y_soft, got {x_base.dtype}, {x_real.dtype}")
    for name, t in (("x_base", x_base), ("x_real", x_real), ("y_real", y_real)):
        if t.device != y_soft.device:
            raise ValueError(f"{name}: expected device {y_soft.device} (the device of y_soft), got {t.device}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    _positive_chunk("outer_chunk", outer_chunk)
    return _learning_rate("inner_lr", inner_lr)


def _learning_rate(name, value, allow_zero=False):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type == "meta":
            raise TypeError(f"{name}: expected a Python number (or a one-element tensor with a value), got "
                            f"a tensor of shape {tuple(value.shape)} on {value.device}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a finite number {'≥' if allow_zero else '>'} 0, got {value}")
    return value


def _check_values(op, enabled, C, **named):
    """NaN / Inf in the float tensors and class indices outside [0, C) (``check_finite=False`` skips both)."""
    _check_finite(op, {k: t for k, t in named.items() if t.is_floating_point()}, enabled)
    check_class_indices(op, {k: t for k, t in named.items() if not t.is_floating_point()}, C, enabled)


def _check_classes(model, x_base, C):
    with torch.no_grad():
        out = model(x_base[:1])
    if out.shape[-1] != C:
        raise ValueError(f"y_soft: the model outputs {out.shape[-1]} classes, but the labels have C = {C} columns")


# --------------------------------------------------------------------------- public API


def label_meta_loss(model, x_base, y_soft, x_real, y_real, *, inner_lr=0.01, reduction="mean", outer_chunk=256, backend="auto",
                    precision="fp32", check_finite=None):
    """L_out(ỹ) of second-order LD, differentiable w.r.t. ``y_soft`` (label-distillation §3, eq. 1).

    Args:
        model: the network f_θ (its current parameters are θ; it is not modified).
        x_base: base examples x̃ ``[N, ...]``; y_soft: soft labels ỹ ``[N, C]`` (float32/float64).
        x_real: real examples ``[M, ...]``; y_real: class indices ``[M]`` or soft targets ``[M, C]``.
        inner_lr: α of the inner SGD step.  reduction: inner loss "mean" (1/N) or "sum".
        outer_chunk: fused path only: real examples per forward/backward chunk (bounds activation memory).
        backend: "auto" | "fused" | "cpu" | "triton" | "cuda" | "reference".
        precision: "fp32" or "bf16" (fused path only): the network passes under bf16 autocast; the
            soft labels, features fed to the kernels, losses and gradients stay float32
            (:mod:`ddfast.network_passes`).
        check_finite: raise ``ValueError`` naming the argument when ``y_soft``, ``x_base``, ``x_real``
            (or float ``y_real``) hold NaN / Inf or ``y_real`` holds an index outside ``[0, C)``; costs
            one host sync per check. ``None`` reads ``ddfast.settings.check_finite`` (default True);
            ``False`` skips it in hot loops.
    Returns: scalar L_out; its gradient w.r.t. ``y_soft`` is the label meta-gradient.

    Autograd: the fused path is first order (backward and ``torch.func`` ``grad`` / ``jacrev`` /
    ``jacfwd`` / ``jvp`` / ``vmap`` over label sets); a second derivative raises
    :class:`ddfast.errors.HigherOrderUnsupportedError`. ``backend="reference"`` is differentiable to any
    order (:func:`ddfast.reference.label_metagrad.label_meta_loss_ref`).
    Equivalent PyTorch: ``ddfast.reference.label_metagrad.label_meta_loss_ref``.
    """
    lr = _validate(model, x_base, y_soft, x_real, y_real, inner_lr, reduction, outer_chunk)
    _check_values("label_meta_loss", check_finite, y_soft.shape[1], y_soft=y_soft, x_base=x_base, x_real=x_real,
                  y_real=y_real)
    name = _select(backend, y_soft.device, y_soft.dtype, y_soft.shape[1], "label_metagrad")
    check_op_precision(precision, name == "reference")
    if name == "reference":
        return label_meta_loss_ref(model, x_base, y_soft, x_real, y_real, lr, reduction)
    kernels = _KERNELS[name]

    def metagrad(y):
        return _fused_metagrad(kernels, model, x_base, y, x_real, y_real, lr, reduction, outer_chunk, precision)[:2]

    return LabelMetagradFunction.apply(y_soft, metagrad)[0]


def label_metagrad(model, x_base, y_soft, x_real, y_real, *, inner_lr=0.01, reduction="mean", outer_chunk=256, backend="auto",
                   precision="fp32", check_finite=None):
    """L_out, ∂L_out/∂ỹ (and what LD's model step reuses) of second-order LD.

    Arguments as :func:`label_meta_loss` (``check_finite`` too). Returns a :class:`LabelMetagrad`.

    ∂L_out/∂ỹᵢ = (α/N)(vᵢ − (pᵢ·vᵢ)1), vᵢ = Jᵢ∇θ'L_out (label-distillation §3; Appendix B is the
    one-layer sigmoid case α(σ(θ'ᵀx) − y) xᵀx̃).
    """
    lr = _validate(model, x_base, y_soft, x_real, y_real, inner_lr, reduction, outer_chunk)
    if y_soft.device.type == "meta":
        raise ValueError("y_soft: label_metagrad computes values (it returns outer_correct, a count) and cannot run "
                         "on meta tensors; label_meta_loss(..., backend=\"reference\") traces shapes on meta")
    _check_classes(model, x_base, y_soft.shape[1])
    _check_values("label_metagrad", check_finite, y_soft.shape[1], y_soft=y_soft, x_base=x_base, x_real=x_real,
                  y_real=y_real)
    name = _select(backend, y_soft.device, y_soft.dtype, y_soft.shape[1], "label_metagrad")
    check_op_precision(precision, name == "reference")
    if name == "reference":
        return LabelMetagrad(*label_metagrad_ref(model, x_base, y_soft, x_real, y_real, lr, reduction, True))
    with torch.no_grad():
        out = _fused_metagrad(_KERNELS[name], model, x_base, y_soft, x_real, y_real, lr, reduction, outer_chunk, precision)
    return out._replace(outer_correct=int(out.outer_correct))


def ridge_logits(z, w, scale=1.0, bias=True):
    """Logits of the RR head: scale · [z, 1] W (label-distillation §3, Figure 5)."""
    if bias:
        return scale * (z @ w[:-1] + w[-1])
    return scale * (z @ w)


_IGNORE_INDEX = -100  # F.cross_entropy's default: rows holding this class index are left out of the mean


def _outer_loss_and_logit_grad(logits, y_real):
    """``outer_loss(logits, y_real)`` and its gradient with respect to the logits, in closed form.

    Class indices y: (softmax(z) − onehot(y)) / M', M' the rows whose index is not ``-100`` (the rows
    ``F.cross_entropy`` averages over; none: the loss is NaN and the gradient zero, as autograd gives).
    Soft targets t: (softmax(z)·Σ_c t_c − t) / M (the targets are not renormalised, as in
    :func:`ddfast.losses.soft_cross_entropy`).
    """
    loss = outer_loss(logits, y_real)
    p = torch.softmax(logits, dim=-1)
    if y_real.is_floating_point():
        t = y_real.to(p.dtype)
        return loss, (p * t.sum(-1, keepdim=True) - t) / y_real.shape[0]
    y = y_real.long()
    keep = y != _IGNORE_INDEX
    onehot = torch.zeros_like(p).scatter_(-1, torch.where(keep, y, 0).unsqueeze(-1), 1.0)
    weight = keep.to(p.dtype) / keep.sum().clamp(min=1).to(p.dtype)  # all ignored: gradient 0, as autograd
    return loss, (p - onehot) * weight.unsqueeze(-1)


def _ridge_weight_grad(g_logits, z_real, scale, bias):
    """∂L_out/∂W = scale · [z, 1]ᵀ ∂L_out/∂logits, ``[d(+1), C]`` (zᵀG formed as (Gᵀz)ᵀ: a thin output)."""
    gw = (g_logits.mT @ z_real.to(g_logits.dtype)).mT
    if bias:
        gw = torch.cat([gw, g_logits.sum(0, keepdim=True)], dim=0)
    return scale * gw


def _ridge_label_metagrad_fused(kernels, z_base, y_soft, z_real, y_real, w_prev, alpha, lam, scale, bias):
    """The LD-RR label step in closed form: one factorisation of the ridge system serves both solves.

    Forward: the fused ridge kernel factors A (N×N, or the d×d primal system when d < N) and returns W_l.
    Label gradient: the ridge kernel's backward with only ∂Y asked, ∂Y = A⁻¹Z̃G (dual) or Z̃H⁻¹G (primal)
    for G = α ∂L_out/∂W, through the saved factor (no autograd graph, no torch.func transform).
    """
    Zk, Yk = _kernel_view(z_base, bias), _kernel_view(y_soft, False)  # [1, N, d(+1)], [1, N, C]
    primal = Zk.shape[-1] < Zk.shape[-2]
    mu = _ridge_mu(z_base, lam, "absolute", False, bias, z_base.dtype)
    W_l, L, aux = _ridge_factor(kernels, Zk, Yk, mu, primal)
    w_local = W_l.reshape(W_l.shape[-2:])
    w = (1.0 - alpha) * w_prev + alpha * w_local
    loss, g_logits = _outer_loss_and_logit_grad(ridge_logits(z_real, w, scale, bias), y_real)
    G = (alpha * _ridge_weight_grad(g_logits, z_real, scale, bias)).to(Zk.dtype)
    _, dY, _ = kernels.bwd(G.unsqueeze(0), Zk, Yk, L, aux, primal, False, True, False)
    return loss, dY.reshape(y_soft.shape), w_local, w


def _ridge_label_metagrad_autodiff(solve, z_base, y_soft, z_real, y_real, w_prev, alpha, scale, bias):
    """The same quantities by differentiating the ridge solve with ``torch.func.grad_and_value`` (the truth the
    closed form is tested against; also the path under an enclosing torch.func transform)."""

    def outer(y):
        w_local = solve(z_base, y)
        w = (1.0 - alpha) * w_prev + alpha * w_local
        return outer_loss(ridge_logits(z_real, w, scale, bias), y_real), (w_local, w)

    # The labels go in as a private copy, so nothing working in place can reach the caller's tensor.
    with torch.enable_grad():
        grad, (loss, (w_local, w)) = torch.func.grad_and_value(outer, has_aux=True)(y_soft.clone())
    return loss.detach(), grad, w_local.detach(), w.detach()


def _check_inputs_finite(named):
    """ValueError naming the first input holding NaN / Inf (one host sync each); inside a compiled graph an
    on-device assertion with the same message instead (no host sync, no graph break)."""
    if torch.compiler.is_compiling():
        for name, x in named:
            torch._assert_async(torch.isfinite(x).all(), f"{name}: contains NaN or Inf")
        return
    _raise_if_nonfinite(named)


def ridge_label_metagrad(z_base, y_soft, z_real, y_real, w_prev, *, pseudo_lr=0.01, lam=1.0, scale=1.0, bias=True,
                         check_finite=None, backend="auto"):
    """LD-RR label step (Algorithm 1, lines 9–11): ``(L_out, ∂L_out/∂ỹ, W_l, W)``.

        W_l = Z̃ᵀ A⁻¹ ỹ,   A = Z̃Z̃ᵀ + λI,   Z̃ = [Z, 1] (bias) or Z          (eq. 3)
        W   = (1−α) W_prev + α W_l                                         (pseudo-gradient)
        L_out = CE(scale · [z, 1] W, y)
        ∂L_out/∂ỹ = α A⁻¹ Z̃ G_W,   G_W = ∂L_out/∂W = scale · [z, 1]ᵀ ∂L_out/∂logits

    ∂L_out/∂logits is (softmax − onehot(y))/M for class indices (rows labelled -100 left out, as in
    ``F.cross_entropy``) and (softmax·Σ_c t_c − t)/M for soft targets t. The fused path computes the
    whole step in closed form: the ridge kernel factors A once (or the d×d system H = Z̃ᵀZ̃ + λI when
    d+1 < N, where ∂L_out/∂ỹ = α Z̃ H⁻¹ G_W, the same value) and its backward reuses the factor for the
    label gradient; no autograd graph, no torch.func transform, so ``torch.compile(fullgraph=True)``
    traces it with no graph break. ``backend="reference"`` differentiates
    :func:`ddfast.reference.ridge_solve.ridge_weights_ref` with ``torch.func.grad_and_value`` (so does an
    enclosing torch.func transform, through the fused ridge op's autograd rules).

    Features are treated as constants (the labels' gradient only); the outputs carry no graph.
    Shapes: z_base ``[N, d]``, y_soft ``[N, C]`` (z_base's dtype), z_real ``[M, d]``, y_real ``[M]`` class
    indices (int64/int32) or ``[M, C]`` soft targets, w_prev ``[d(+1), C]``; all on one device. Returns the
    scalar L_out, ∂L_out/∂ỹ ``[N, C]``, W_l and W ``[d(+1), C]``. ``check_finite``: NaN/Inf in any input
    raises a ValueError naming it (one host sync per input; in a compiled graph an on-device assertion, a
    RuntimeError with the same message); ``False`` skips the checks in hot loops, None follows
    ``ddfast.settings.check_finite``. backend: "auto" | "fused" | "cpu" | "triton" | "cuda" |
    "reference" (the ridge solve's backends).
    Equivalent PyTorch: ``torch.func.grad`` of ``outer_loss`` through
    ``ddfast.reference.ridge_solve.ridge_weights_ref`` (``backend="reference"``).
    """
    for name, x in (("z_base", z_base), ("y_soft", y_soft), ("z_real", z_real), ("y_real", y_real), ("w_prev", w_prev)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    for name, x in (("z_base", z_base), ("y_soft", y_soft), ("z_real", z_real), ("w_prev", w_prev)):
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    for name, v, ok, what in (("pseudo_lr", pseudo_lr, lambda v: 0 < v <= 1, "in (0, 1]"),
                              ("scale", scale, lambda v: abs(v) < float("inf"), "finite"),
                              ("lam", lam, lambda v: 0 < v < float("inf"), "finite and > 0")):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
        if not ok(float(v)):
            raise ValueError(f"{name}: expected a float {what}, got {v}")
    if z_base.dim() != 2 or z_real.dim() != 2 or z_base.shape[1] != z_real.shape[1]:
        raise ValueError(f"z_base, z_real: expected features [N, d] and [M, d], got {tuple(z_base.shape)}, {tuple(z_real.shape)}")
    if y_soft.dim() != 2 or y_soft.shape[0] != z_base.shape[0]:
        raise ValueError(f"y_soft: expected [{z_base.shape[0]}, C] (one row per base example), got {tuple(y_soft.shape)}")
    d = z_base.shape[1] + int(bias)
    if tuple(w_prev.shape) != (d, y_soft.shape[1]):
        raise ValueError(f"w_prev: expected [{d}, {y_soft.shape[1]}], got {tuple(w_prev.shape)}")
    M, C = z_real.shape[0], y_soft.shape[1]
    if y_real.dim() < 1 or y_real.shape[0] != M:
        raise ValueError(f"y_real: expected {M} rows like z_real, got shape {tuple(y_real.shape)}")
    if y_real.dtype not in (torch.int64, torch.int32) + _FLOATS:
        raise TypeError(f"y_real: expected int64/int32 class indices or float32/float64 soft targets, "
                        f"got {y_real.dtype}")
    if tuple(y_real.shape) != ((M, C) if y_real.is_floating_point() else (M,)):
        raise ValueError(f"y_real: expected class indices [{M}] or soft targets [{M}, {C}], "
                         f"got {y_real.dtype} {tuple(y_real.shape)}")
    for name, x in (("z_real", z_real), ("y_real", y_real), ("w_prev", w_prev)):
        if x.device != z_base.device:
            raise ValueError(f"{name}: expected device {z_base.device} like z_base, got {x.device}")
    # dtype / device / emptiness of the ridge system, lam against the solve dtype, check_finite's type.
    _ridge_validate([("z_base", z_base), ("y_soft", y_soft)], lam, "absolute", None, check_finite=check_finite)
    if _checking(check_finite):
        _check_inputs_finite([("z_base", z_base), ("y_soft", y_soft), ("z_real", z_real), ("w_prev", w_prev)]
                             + ([("y_real", y_real)] if y_real.is_floating_point() else []))
    alpha, lam, scale = float(pseudo_lr), float(lam), float(scale)
    z_base, y_soft, z_real, y_real, w_prev = (x.detach() for x in (z_base, y_soft, z_real, y_real, w_prev))
    name = _ridge_select(backend, z_base, y_soft, d < z_base.shape[0], bias, z_base.dtype, "ridge_weights")
    if name == "reference":
        return _ridge_label_metagrad_autodiff(lambda z, y: ridge_weights_ref(z, y, lam, bias=bias), z_base, y_soft,
                                              z_real, y_real, w_prev, alpha, scale, bias)
    if torch._C._are_functorch_transforms_active():  # e.g. vmap over label sets: the ridge op's own rules
        return _ridge_label_metagrad_autodiff(
            lambda z, y: ridge_weights(z, y, lam, bias=bias, check_finite=check_finite, backend=name),
            z_base, y_soft, z_real, y_real, w_prev, alpha, scale, bias)
    named = [("z_base", z_base), ("y_soft", y_soft), ("lam", lam)]
    try:
        with torch.no_grad():
            loss, grad, w_local, w = _ridge_label_metagrad_fused(_RIDGE_KERNELS[name], z_base, y_soft, z_real, y_real,
                                                                 w_prev, alpha, lam, scale, bias)
    except NotPSDError:
        _raise_if_nonfinite(named)
        raise
    if name != "cpu":  # the C++ kernel reports a non-finite W itself (as in ridge_weights)
        w_local = _check_finite_output(w_local, named, "ridge_label_metagrad", check_finite)
    return loss, grad, w_local, w
