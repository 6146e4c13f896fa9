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

The torch.compile pattern every op follows (one copy, here):

* :func:`select_backend` — the dispatch choice (:func:`ddfast.dispatch.select_for`); while torch.compile
  traces, evaluated once at trace time through ``torch.compiler.assume_constant_result`` (a constant of the
  graph, so the Python branch on the backend name does not break it).
* :func:`compile_apply` — an autograd.Function's ``apply``: in eager mode the Function itself (through
  :meth:`FastFunction.fast_apply` when it derives from :class:`FastFunction`); while torch.compile traces,
  a variant without the forward-mode rule (Dynamo traces no Function that defines ``jvp``, and
  ``torch.func.jvp`` inside a compiled region is not supported); optionally, under a traced ``torch.func``
  transform, a graph break, so the transform runs eagerly through the Function's own derivatives.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ddfast import dispatch as _dispatch
from ddfast.errors import HigherOrderUnsupportedError

__all__ = [
    "FastFunction",
    "HigherOrderUnsupportedError",
    "batch_first",
    "check_class_indices",
    "check_finite",
    "compile_apply",
    "first_order_only",
    "may_need_derivative",
    "select_backend",
    "traced_variant",
    "unwrap_value",
]


# --------------------------------------------------------------------------- torch.compile pattern


def select_backend(op, backend: str, inputs: Mapping) -> str:
    """The backend that runs ``op`` (an :class:`ddfast.dispatch.OpSpec` or a registered name) for the
    requested ``backend`` on inputs described by ``inputs`` (:func:`ddfast.dispatch.select_for`).

    While torch.compile traces, the choice is made once at trace time and becomes a constant of the graph:
    the values of ``inputs`` must then be Python constants (device, dtype, ints, bools, strings)."""
    if torch.compiler.is_compiling():
        name = op if isinstance(op, str) else op.name
        return _select_constant(name, backend, tuple(inputs), *inputs.values())
    return _dispatch.select_for(op, backend, inputs)


@torch.compiler.assume_constant_result
def _select_constant(op, backend, keys, *values):
    return _dispatch.select_for(op, backend, dict(zip(keys, values)))


try:  # torch's own apply() binds the arguments with inspect.signature on every call (~25 µs each)
    from torch._functorch.autograd_function import custom_function_call as _custom_function_call
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - other torch versions: the stock apply
    _custom_function_call = None


class FastFunction(torch.autograd.Function):
    """An autograd.Function whose ``fast_apply`` takes every argument positionally and skips the per-call
    signature binding of ``torch.autograd.Function.apply`` (the same two paths: plain autograd, or
    ``custom_function_call`` under torch.func transforms). Eager mode only: torch.compile traces ``apply``."""

    @classmethod
    def fast_apply(cls, *args):
        if _custom_function_call is None:
            return cls.apply(*args)
        if not torch._C._are_functorch_transforms_active():
            return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))
        return _custom_function_call(cls, *args)


def traced_variant(fn: type) -> type:
    """``fn`` as torch.compile sees it: the same forward, backward (double backward included), setup_context
    and vmap rule, without the forward-mode rule."""
    return type(fn.__name__ + "Traced", (fn,), {"jvp": torch.autograd.Function.jvp, "__doc__": fn.__doc__,
                                                "__module__": fn.__module__})


def compile_apply(fn: type, *, eager_under_transforms: bool = False):
    """``fn.apply`` for eager mode and torch.compile alike (see the module docstring); arguments positional.

    ``eager_under_transforms``: a torch.func transform over ``fn`` traced by torch.compile breaks the graph
    and runs eagerly (for Functions whose traced forward Dynamo would differentiate op by op, with kernels
    that have no autograd formula of their own); otherwise Dynamo traces the transform through ``fn``."""
    traced = traced_variant(fn)
    eager = fn.fast_apply if issubclass(fn, FastFunction) else fn.apply

    def apply(*args):
        if torch.compiler.is_compiling():
            if eager_under_transforms and torch._C._are_functorch_transforms_active():
                _leave_graph_under_transforms()
            return traced.apply(*args)
        return eager(*args)

    apply.__name__ = apply.__qualname__ = f"apply_{fn.__name__}"
    apply.__doc__ = f"{fn.__name__}.apply, usable under torch.compile (ddfast.ops._autograd.compile_apply)."
    return apply


@torch.compiler.disable
def _leave_graph_under_transforms():
    """A torch.func transform traced by torch.compile differentiates the ops inside a Function's forward,
    not through its backward, and the compiled kernels have no autograd formula of their own: a graph break
    here makes Dynamo run the whole transform eagerly, where the Function's own backward applies."""


# --------------------------------------------------------------------------- first-order guards


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
