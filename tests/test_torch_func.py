"""torch.func transforms on the fused ops (relu_max_pool2d, ghost products, label meta-loss, checkpoint inner
products) against the same transform of the eager reference.

Support matrix tested here (``cpu`` backend, float64):

=======================  ====  ====  ======  ======  ===  =======
op                       vmap  grad  jacrev  jacfwd  jvp  hessian
=======================  ====  ====  ======  ======  ===  =======
relu_max_pool2d          yes   yes   yes     yes     yes  yes
ghost_bilinear / norms   yes   yes   yes     yes     yes  yes
/ inner
label_meta_loss          yes   yes   yes     yes     yes  error (reference path: yes)
checkpoint_grad_inner    yes   yes   yes     yes     yes  error (reference path: yes)
=======================  ====  ====  ======  ======  ===  =======

"error": :class:`ddfast.errors.HigherOrderUnsupportedError` naming the op, the mode and ``backend="reference"``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap
from torch.utils._pytree import tree_leaves

from ddfast.errors import HigherOrderUnsupportedError
from ddfast.ops.checkpoint_grad_inner import checkpoint_grad_inner
from ddfast.ops.ghost_products import ghost_bilinear, ghost_inner, ghost_norms
from ddfast.ops.label_metagrad import label_meta_loss
from ddfast.ops.relu_max_pool2d import relu_max_pool2d
from ddfast.reference.checkpoint_grad_inner import checkpoint_grad_inner_ref
from ddfast.reference.ghost_products import ghost_bilinear_ref, ghost_inner_ref, ghost_norms_ref
from ddfast.reference.label_metagrad import label_metagrad_ref
from ddfast.reference.relu_max_pool2d import relu_max_pool2d_ref
from conftest import backend_param

D = torch.float64
# float64 on both sides; the kernels sum in another order than the reference's einsum / autograd.
TOL = dict(rtol=1e-9, atol=1e-11)


def assert_close_tree(got, want, what):
    for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _sq(fn):
    """A scalar of a tensor-valued op (grad / hessian need one): Σ out² (non-linear in the output)."""
    return lambda *a: (fn(*a) ** 2).sum()


def check_first_order(fused, ref, args, tangents, batched):
    """vmap, grad, jacrev, jacfwd, jvp of ``fused`` equal those of ``ref``."""
    n = tuple(range(len(args)))
    assert_close_tree(vmap(fused)(*batched), vmap(ref)(*batched), "vmap")
    assert_close_tree(vmap(grad(_sq(fused), argnums=n))(*batched), vmap(grad(_sq(ref), argnums=n))(*batched),
                      "vmap(grad)")
    assert_close_tree(grad(_sq(fused), argnums=n)(*args), grad(_sq(ref), argnums=n)(*args), "grad")
    assert_close_tree(jacrev(fused, argnums=n)(*args), jacrev(ref, argnums=n)(*args), "jacrev")
    assert_close_tree(jacfwd(fused, argnums=n)(*args), jacfwd(ref, argnums=n)(*args), "jacfwd")
    assert_close_tree(jvp(fused, args, tangents), jvp(ref, args, tangents), "jvp")


def _inputs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    args = tuple(torch.randn(s, generator=g, dtype=D) for s in shapes)
    tangents = tuple(torch.randn(s, generator=g, dtype=D) for s in shapes)
    batched = tuple(torch.randn((3, *s), generator=g, dtype=D) for s in shapes)
    return args, tangents, batched


# --------------------------------------------------------------------------- ops with exact higher derivatives


def _ghost_cases(backend):
    N, P, K, O = 3, 4, 5, 2
    return {
        "ghost_bilinear": (lambda A, G, V: ghost_bilinear(A, G, V, backend=backend), ghost_bilinear_ref,
                           [(N, P, K), (N, P, O), (O, K)]),
        "ghost_norms/ghost": (lambda A, G: ghost_norms(A, G, algorithm="ghost", backend=backend), ghost_norms_ref,
                              [(N, P, K), (N, P, O)]),
        "ghost_norms/materialize": (lambda A, G: ghost_norms(A, G, algorithm="materialize", backend=backend),
                                    ghost_norms_ref, [(N, P, K), (N, P, O)]),
        "ghost_inner": (lambda A1, G1, A2, G2: ghost_inner(A1, G1, A2, G2, backend=backend), ghost_inner_ref,
                        [(N, P, K), (N, P, O), (2, 3, K), (2, 3, O)]),
    }


@pytest.mark.parametrize("backend", [backend_param("cpu")])
@pytest.mark.parametrize("case", list(_ghost_cases("cpu")))
def test_ghost_products_all_transforms(backend, case):
    fused, ref, shapes = _ghost_cases(backend)[case]
    args, tangents, batched = _inputs(shapes)
    check_first_order(fused, ref, args, tangents, batched)
    assert_close_tree(hessian(_sq(fused))(*args), hessian(_sq(ref))(*args), "hessian")


@pytest.mark.parametrize("backend", [backend_param("cpu")])
def test_ghost_vmap_partial_batching(backend):
    """vmap with only some inputs batched: folded into N (one side of ghost_inner: N1 or N2), or a loop
    (per-batch V, both sides of ghost_inner batched)."""
    for case, (fused, ref, shapes) in _ghost_cases(backend).items():
        args, _, batched = _inputs(shapes, seed=1)
        for i in range(len(args)):
            xs = tuple(b if j == i else a for j, (a, b) in enumerate(zip(args, batched)))
            dims = tuple(0 if j == i else None for j in range(len(args)))
            assert_close_tree(vmap(fused, in_dims=dims)(*xs), vmap(ref, in_dims=dims)(*xs), f"{case} vmap arg {i}")
            # a vmapped dimension that is not the first one
            xs_t = tuple(x.movedim(0, -1) if d == 0 else x for x, d in zip(xs, dims))
            dims_t = tuple(-1 if d == 0 else None for d in dims)
            assert_close_tree(vmap(fused, in_dims=dims_t)(*xs_t), vmap(ref, in_dims=dims)(*xs),
                              f"{case} vmap arg {i} at dim -1")


@pytest.mark.parametrize("backend", [backend_param("cpu")])
def test_relu_max_pool2d_all_transforms(backend):
    args, tangents, batched = _inputs([(2, 3, 6, 5)], seed=2)
    fused = lambda x: relu_max_pool2d(x, backend=backend)  # noqa: E731
    check_first_order(fused, relu_max_pool2d_ref, args, tangents, batched)
    small = (args[0][:1, :1],)
    assert_close_tree(hessian(_sq(fused))(*small), hessian(_sq(relu_max_pool2d_ref))(*small), "hessian")


# --------------------------------------------------------------------------- first-order fused paths


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.features(x))


def _ld_problem():
    torch.manual_seed(0)
    model = _Net().double()
    xb, xr = torch.randn(4, 5, dtype=D), torch.randn(7, 5, dtype=D)
    yr = torch.randint(0, 3, (7,))
    y = torch.softmax(torch.randn(4, 3, dtype=D), -1)
    return model, xb, xr, yr, y


@pytest.mark.parametrize("backend", [backend_param("cpu")])
def test_label_meta_loss_transforms(backend):
    model, xb, xr, yr, y = _ld_problem()

    def make(b):
        return lambda yy: label_meta_loss(model, xb, yy, xr, yr, inner_lr=0.5, backend=b)

    fused, ref = make(backend), make("reference")
    g = torch.Generator().manual_seed(3)
    batched = (torch.softmax(torch.randn(3, 4, 3, generator=g, dtype=D), -1),)
    check_first_order(fused, ref, (y,), (torch.randn(4, 3, generator=g, dtype=D),), batched)
    # The reference path's gradient is the create_graph truth.
    torch.testing.assert_close(grad(ref)(y), label_metagrad_ref(model, xb, y, xr, yr, 0.5)[1], **TOL)
    # Second order: the reference goes through, the fused path says what to use instead.
    h = hessian(ref)(y)
    assert h.shape == (4, 3, 4, 3)
    torch.testing.assert_close(h.reshape(12, 12), h.reshape(12, 12).T, **TOL)
    for name, transform in [("hessian", hessian), ("jacfwd(jacfwd)", lambda f: jacfwd(jacfwd(f))),
                            ("jacrev(jacrev)", lambda f: jacrev(jacrev(f)))]:
        with pytest.raises(HigherOrderUnsupportedError, match=r'label_meta_loss.*backend="reference"'):
            transform(fused)(y)


def _cgi_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ckpts = [{k: v + 0.1 * i * torch.randn_like(v) for k, v in model.state_dict().items()} for i in range(2)]
    probe = (torch.randn(4, 6, dtype=D), torch.randint(0, 3, (4,)))
    real = (torch.randn(5, 6, dtype=D), torch.randint(0, 3, (5,)))
    return model, ckpts, probe, real


@pytest.mark.parametrize("backend", [backend_param("cpu")])
@pytest.mark.parametrize("reduce", ["sum", "none"])
def test_checkpoint_grad_inner_transforms(backend, reduce):
    model, ckpts, probe, real = _cgi_problem()

    def make(b):
        return lambda x, y: checkpoint_grad_inner(model, ckpts, probe, real, x, y, backend=b, reduce=reduce)[1]

    fused, ref = make(backend), make("reference")
    args, tangents, batched = _inputs([(3, 6), (3, 3)], seed=4)
    check_first_order(fused, ref, args, tangents, batched)
    s_ref = checkpoint_grad_inner_ref(model, ckpts, probe, real, *args)[1]
    torch.testing.assert_close(fused(*args), s_ref.sum() if reduce == "sum" else s_ref, **TOL)
    assert hessian(lambda x, y: ref(x, y).sum())(*args).shape == (3, 6, 3, 6)
    with pytest.raises(HigherOrderUnsupportedError, match=r'checkpoint_grad_inner.*backend="reference".*forward mode'):
        hessian(lambda x, y: fused(x, y).sum())(*args)
    with pytest.raises(HigherOrderUnsupportedError, match=r"reverse mode"):
        jacrev(jacrev(lambda x, y: fused(x, y).sum()))(*args)


def test_checkpoint_grad_inner_vmap_needs_reiterable_checkpoints():
    model, ckpts, probe, real = _cgi_problem()
    args, _, batched = _inputs([(3, 6), (3, 3)], seed=5)
    with pytest.raises(ValueError, match="checkpoints: torch.func.vmap .* re-iterable"):
        vmap(lambda x, y: checkpoint_grad_inner(model, iter(ckpts), probe, real, x, y)[1])(*batched)
