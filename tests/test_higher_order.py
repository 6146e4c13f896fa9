"""Second derivatives of the fused ops (non-ridge): exact where claimed, an error where not — never silent.

* ghost_bilinear / ghost_norms / ghost_inner and relu_max_pool2d: double backward exact, checked with
  float64 ``gradgradcheck`` on the fused (C++) path.
* label_meta_loss and checkpoint_grad_inner: the fused paths are first order. With ``create_graph=True``
  the gradient still carries a graph (so it is never a silent constant) and a second backward through it
  raises :class:`ddfast.errors.HigherOrderUnsupportedError`; the reference paths pass ``gradgradcheck``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import backend_param
from ddfast.errors import HigherOrderUnsupportedError
from ddfast.ops.checkpoint_grad_inner import checkpoint_grad_inner
from ddfast.ops.ghost_products import ghost_bilinear, ghost_inner, ghost_norms
from ddfast.ops.label_metagrad import label_meta_loss
from ddfast.ops.relu_max_pool2d import relu_max_pool2d
from ddfast.reference.label_metagrad import label_meta_loss_ref

D = torch.float64
CPU = [backend_param("cpu")]


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=D).requires_grad_(True)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("algorithm", ["ghost", "materialize"])
def test_ghost_products_gradgradcheck(backend, algorithm):
    A, G, V = _rand(2, 3, 4, seed=1), _rand(2, 3, 2, seed=2), _rand(2, 4, seed=3)
    A2, G2 = _rand(3, 2, 4, seed=4), _rand(3, 2, 2, seed=5)
    cases = [
        (lambda a, g, v: ghost_bilinear(a, g, v, backend=backend), (A, G, V)),
        (lambda a, g: ghost_norms(a, g, algorithm=algorithm, backend=backend), (A, G)),
        (lambda a, g, b, h: ghost_inner(a, g, b, h, algorithm=algorithm, backend=backend), (A, G, A2, G2)),
    ]
    for fn, args in cases:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("backend", CPU)
def test_relu_max_pool2d_gradgradcheck(backend):
    # Distinct values away from 0 and from each other: finite differences do not cross a kink.
    g = torch.Generator().manual_seed(6)
    x = (torch.randperm(2 * 2 * 5 * 4, generator=g).to(D).reshape(2, 2, 5, 4) - 30.5) / 7
    x.requires_grad_(True)
    fn = lambda t: relu_max_pool2d(t, backend=backend) ** 2  # noqa: E731  (a non-zero second derivative)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# --------------------------------------------------------------------------- first-order fused paths


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x))


def _ld():
    torch.manual_seed(0)
    model = _Net().double()
    xb, xr, yr = torch.randn(4, 5, dtype=D), torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    y = torch.softmax(torch.randn(4, 3, dtype=D), -1).requires_grad_(True)
    return model, xb, xr, yr, y


@pytest.mark.parametrize("backend", CPU)
def test_label_meta_loss_second_order(backend):
    model, xb, xr, yr, y = _ld()
    ref = lambda t: label_meta_loss(model, xb, t, xr, yr, inner_lr=0.5, backend="reference")  # noqa: E731
    fused = lambda t: label_meta_loss(model, xb, t, xr, yr, inner_lr=0.5, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (y,))
    assert torch.autograd.gradgradcheck(ref, (y,))
    torch.testing.assert_close(ref(y), label_meta_loss_ref(model, xb, y, xr, yr, 0.5))

    (g_ref,) = torch.autograd.grad(ref(y), y, create_graph=True)
    (g,) = torch.autograd.grad(fused(y), y, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert g.requires_grad, "a create_graph gradient must not silently be a constant"
    # A gradient penalty mixed with the loss: an error, not a silently dropped second-order term.
    with pytest.raises(HigherOrderUnsupportedError, match=r'label_meta_loss.*backend="reference"'):
        ((g ** 2).sum() + fused(y)).backward()
    with pytest.raises(HigherOrderUnsupportedError):
        torch.autograd.gradgradcheck(fused, (y,))
    # Without create_graph nothing changes: the plain gradient, no graph.
    (g1,) = torch.autograd.grad(fused(y), y)
    assert not g1.requires_grad
    torch.testing.assert_close(g1, g_ref.detach(), rtol=1e-9, atol=1e-12)


def _cgi():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ckpts = [{k: v + 0.1 * i * torch.randn_like(v) for k, v in model.state_dict().items()} for i in range(2)]
    probe = (torch.randn(4, 6, dtype=D), torch.randint(0, 3, (4,)))
    real = (torch.randn(5, 6, dtype=D), torch.randint(0, 3, (5,)))
    return model, ckpts, probe, real


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("reduce", ["sum", "none"])
def test_checkpoint_grad_inner_second_order(backend, reduce):
    model, ckpts, probe, real = _cgi()
    x, q = _rand(2, 6, seed=7), _rand(2, 3, seed=8)

    def make(b):
        return lambda a, c: checkpoint_grad_inner(model, ckpts, probe, real, a, c, backend=b, reduce=reduce)[1]

    fused, ref = make(backend), make("reference")
    assert torch.autograd.gradcheck(fused, (x, q))
    if reduce == "sum":  # the same graph either way; one check of the reference's second order is enough
        assert torch.autograd.gradgradcheck(ref, (x, q))
    gx_ref, gq_ref = torch.autograd.grad(ref(x, q).sum(), (x, q), create_graph=True)
    gx, gq = torch.autograd.grad(fused(x, q).sum(), (x, q), create_graph=True)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gq, gq_ref, rtol=1e-9, atol=1e-12)
    assert gx.requires_grad and gq.requires_grad
    with pytest.raises(HigherOrderUnsupportedError, match=r'checkpoint_grad_inner.*backend="reference"'):
        ((gx ** 2).sum() + fused(x, q).sum()).backward()
