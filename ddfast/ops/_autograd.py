"""Autograd helpers shared by the ops: first-order guards, functorch batching, value checks.

* :func:`first_order_only` — a closed-form backward (or forward-mode rule) that is exact to first
  order but not differentiable itself returns its result through this node. It is the identity
  forward; its backward and its forward-mode rule raise :class:`ddfast.errors.HigherOrderUnsupportedError`, so a
  second derivative (``create_graph=True`` then a second backward, ``torch.func.hessian``,
  ``jacrev(jacrev(f))``, ``jacfwd(jacfwd(f))``, ``grad(grad(f))``) is an error, never a silent zero.
  First-order ``torch.func.grad`` / ``jacrev`` / ``jacfwd`` / ``jvp`` are unaffected.
* :func:`batch_first` — a ``vmap`` rule's input with the vmapped dimension moved (or expanded) to 0.
* :func:`check_finite` — NaN / Inf checks that name the argument and work under ``torch.func``
  transforms (the check reads the unwrapped value: every batch member) and ``torch.compile``
  (``torch._assert_async``: no graph break, a ``RuntimeError`` naming the argument).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ddfast.errors import HigherOrderUnsupportedError

__all__ = [
    "HigherOrderUnsupportedError",
    "batch_first",
    "check_class_indices",
    "check_finite",
    "first_order_only",
    "may_need_derivative",
    "unwrap_value",
]




class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``value``; ``anchors`` are the tensors ``value`` depends on (so a later derivative
    reaches this node instead of treating ``value`` as a constant). Backward and jvp raise."""

    @staticmethod
    def forward(value, message, *anchors):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, _grad):
        raise HigherOrderUnsupportedError(ctx.message + " [reverse mode: a backward through the first-order gradient]")

    @staticmethod
    def jvp(ctx, *_tangents):
        raise HigherOrderUnsupportedError(ctx.message + " [forward mode: a jvp through the first-order gradient]")

    @staticmethod
    def vmap(info, in_dims, value, message, *anchors):
        return _FirstOrderOnly.apply(value, message, *anchors), in_dims[0]


def first_order_only(value: torch.Tensor, anchors, message: str, *, always: bool = False) -> torch.Tensor:
    """``value`` (a closed-form first derivative) guarded against being differentiated again.

    ``anchors``: the inputs ``value`` depends on (tensors or None). In a backward, the guard is added
    only when grad mode is on (``create_graph=True`` or a ``torch.func`` transform); ``always=True``
    (forward-mode rules) adds it unconditionally.
    """
    if not (always or torch.is_grad_enabled()):
        return value
    ts = tuple(a for a in anchors if isinstance(a, torch.Tensor))
    return _FirstOrderOnly.apply(value, message, *ts)


def batch_first(t, bdim, size):
    """``t`` with its vmapped dimension ``bdim`` moved to 0 (expanded to ``size`` when ``bdim`` is None)."""
    if t is None:
        return None
    return t.unsqueeze(0).expand(size, *t.shape) if bdim is None else t.movedim(bdim, 0)


def unwrap_value(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under ``torch.func`` wrappers (vmap: all batch members; grad / jvp: the primal)."""
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):
        t = ft.get_unwrapped(t)
    return t


def may_need_derivative(t: torch.Tensor) -> bool:
    """Whether a derivative w.r.t. ``t`` can be asked for: it requires grad (grad mode on), carries a
    forward-mode tangent, or is wrapped by a differentiating ``torch.func`` transform (grad / jvp)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return True
    from torch.autograd import forward_ad

    if forward_ad.unpack_dual(t).tangent is not None:
        return True
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):
        if not ft.is_batchedtensor(t):
            return True
        t = ft.get_unwrapped(t)
    return False


def _enabled(enabled):
    if enabled is None:
        from ddfast import settings

        return settings.check_finite
    return enabled


def check_class_indices(op: str, named: Mapping[str, torch.Tensor | None], C: int, enabled: bool | None = None) -> None:
    """Raise ``ValueError`` when an integer label tensor holds an index outside ``[0, C)`` (float labels,
    meta tensors and ``enabled=False`` are skipped; one host sync each)."""
    if not _enabled(enabled):
        return
    for k, y in named.items():
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.device.type == "meta" or y.numel() == 0:
            continue
        if torch.compiler.is_compiling():
            torch._assert_async(((y >= 0) & (y < C)).all(), f"{k}: class indices outside [0, {C}) in {op}")
            continue
        v = unwrap_value(y)
        if not bool(((v >= 0) & (v < C)).all()):
            raise ValueError(f"{k}: class indices outside [0, {C}) in {op} ({C} classes): min {int(v.min())}, "
                             f"max {int(v.max())}; pass check_finite=False to skip this check (one host sync)")


def check_finite(op: str, named: Mapping[str, torch.Tensor | None], enabled: bool | None = None,
                 hint: str = "") -> None:
    """Raise ``ValueError`` naming the first argument holding NaN or Inf (one host sync for all of them).

    ``enabled=None`` reads :data:`ddfast.settings.check_finite`. Meta tensors are skipped (no values);
    under ``torch.compile`` the check is ``torch._assert_async`` (no graph break; a ``RuntimeError``).
    """
    if not _enabled(enabled):
        return
    items = [(k, t) for k, t in named.items()
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta" and t.numel()]
    if not items:
        return
    suffix = "; pass check_finite=False to skip this check (one host sync)"
    if torch.compiler.is_compiling():
        for k, t in items:
            torch._assert_async(torch.isfinite(t).all(), f"{k}: contains non-finite values (NaN or Inf) in {op}{hint}")
        return
    values = [(k, unwrap_value(t)) for k, t in items]
    dev = values[0][1].device
    if all(v.device == dev for _, v in values):
        flags = torch.stack([torch.isfinite(v).all() for _, v in values])
        if bool(flags.all()):
            return
    for k, v in values:
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{k}: contains non-finite values (NaN or Inf) in {op} (shape {tuple(v.shape)}, "
                             f"{v.dtype}){hint}{suffix}")
