"""The torch.compile pattern the ops share (ddfast.ops._autograd): ``select_backend`` (a constant of the
graph while tracing), ``compile_apply`` (eager: the Function with its forward-mode rule; traced: the variant
without it; optionally a graph break under a traced torch.func transform) and ``FastFunction.fast_apply``."""

from __future__ import annotations

import pytest
import torch

from ddfast import dispatch
from ddfast.ops import _autograd
from ddfast.ops._autograd import FastFunction, compile_apply, select_backend, traced_variant


class _Cube(FastFunction):
    """y = x³ with its own backward (3x²·g, itself differentiable) and forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale):
        return scale * x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * ctx.scale * x**2 * g, None

    @staticmethod
    def jvp(ctx, xt, _):
        (x,) = ctx.saved_tensors
        return 3 * ctx.scale * x**2 * xt


class _Plain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_traced_variant_drops_only_the_forward_mode_rule():
    traced = traced_variant(_Cube)
    assert issubclass(traced, _Cube) and traced.jvp is torch.autograd.Function.jvp
    assert traced.forward is _Cube.forward and traced.backward is _Cube.backward
    x = torch.tensor([0.5, -2.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(traced.apply(x, 1.5).sum(), x)
    torch.testing.assert_close(g, 4.5 * x.detach() ** 2)


def test_compile_apply_eager_keeps_every_derivative():
    apply = compile_apply(_Cube)
    x = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(apply(x, 2.0), _Cube.apply(x, 2.0))
    (g,) = torch.autograd.grad(apply(x, 2.0).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, 12 * x.detach())
    _, t = torch.func.jvp(lambda v: apply(v, 2.0), (x.detach(),), (torch.ones(3, dtype=torch.float64),))
    torch.testing.assert_close(t, 6 * x.detach() ** 2)
    # A plain autograd.Function (no fast_apply) goes through its stock apply.
    torch.testing.assert_close(compile_apply(_Plain)(x), 2 * x)


@pytest.mark.parametrize("leave", [False, True])
def test_compile_apply_under_torch_compile(leave):
    apply = compile_apply(_Cube, eager_under_transforms=leave)

    def loss(x):
        return apply(x, 0.5).sum()

    x = torch.tensor([1.0, -2.0, 0.25])
    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(x).graph_break_count == 0
    torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="eager")(x), loss(x))
    if not leave:  # the graph break under a traced transform: the ridge ops in tests/test_compile.py
        torch._dynamo.reset()
        grad_of = torch.compile(lambda v: torch.func.grad(loss)(v), backend="eager")
        torch.testing.assert_close(grad_of(x), 1.5 * x**2)


@pytest.mark.parametrize("leave", [False, True])
def test_traced_transform_leaves_the_graph_only_when_asked(monkeypatch, leave):
    """While tracing (is_compiling), under an active torch.func transform: the graph-break hook runs only for
    ``eager_under_transforms=True``, and the traced variant (no jvp) computes the same gradient."""
    calls = []
    monkeypatch.setattr(_autograd, "_leave_graph_under_transforms", lambda: calls.append(1))
    apply = compile_apply(_Cube, eager_under_transforms=leave)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    g = torch.func.grad(lambda v: apply(v, 1.0).sum())(x)
    apply(x, 1.0)  # no transform active: never a graph break
    monkeypatch.undo()
    torch.testing.assert_close(g, 3 * x**2)
    assert len(calls) == (1 if leave else 0)


def test_select_backend_is_a_graph_constant():
    """The dispatch choice is made at trace time: no graph break, and the traced choice is the eager one."""
    seen = []

    def pick(x):
        name = select_backend("relu_max_pool2d", "auto", {"device": x.device, "dtype": x.dtype})
        seen.append(name)
        return x + 1 if name == "reference" else x - 1

    x = torch.randn(3)
    want = dispatch.select_for("relu_max_pool2d", "auto", {"device": x.device, "dtype": x.dtype})
    assert select_backend(dispatch.get_op("relu_max_pool2d"), "auto",
                          {"device": x.device, "dtype": x.dtype}) == want
    torch._dynamo.reset()
    assert torch._dynamo.explain(pick)(x).graph_break_count == 0
    got = torch.compile(pick, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, x + 1 if want == "reference" else x - 1)
    assert set(seen) == {want}


def test_fast_apply_matches_apply_under_vmap_and_grad():
    x = torch.randn(4, 3, dtype=torch.float64)
    got = torch.func.vmap(lambda v: _Cube.fast_apply(v, 1.0))(x)
    torch.testing.assert_close(got, x**3)
    g = torch.func.grad(lambda v: _Cube.fast_apply(v, 1.0).sum())(x)
    torch.testing.assert_close(g, 3 * x**2)
    assert _autograd.FastFunction.fast_apply.__func__ is _Cube.fast_apply.__func__
