"""ridge_weights / krr_predict: higher-order autograd and torch.func on the fused and reference paths.

Every path claims exact derivatives of every order: gradgradcheck in float64, a gradient penalty against
plain torch, and the torch.func transforms (grad, jacrev, jacfwd, jvp, hessian, vmap over tasks, forward
AD) against the same function written with ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

from ddfast.ops import krr_predict, ridge_weights

from conftest import backend_param

BACKENDS = [backend_param("cpu"), backend_param("reference")]
F64 = torch.float64


def plain_w(Z, Y, lam, bias=False):
    """What a user writes: W = Zᵀ(ZZᵀ+λI)⁻¹Y with torch.linalg.solve (LD-RR eq. 3)."""
    if bias:
        Z = torch.cat([Z, torch.ones_like(Z[..., :1])], -1)
    A = Z @ Z.mT + lam * torch.eye(Z.shape[-2], dtype=Z.dtype)
    return Z.mT @ torch.linalg.solve(A, Y)


def plain_krr(Zq, Zs, Ys, lam, bias=False):
    if bias:
        Zq, Zs = (torch.cat([x, torch.ones_like(x[..., :1])], -1) for x in (Zq, Zs))
    A = Zs @ Zs.mT + lam * torch.eye(Zs.shape[-2], dtype=Zs.dtype)
    return (Zq @ Zs.mT) @ torch.linalg.solve(A, Ys)


def close(a, b, tol=1e-9):
    scale = max(b.abs().max().item(), 1.0)
    torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol)


# (N, d, C, M, bias): dual (N ≤ d), primal (d < N), bias; M/C chosen so that krr_predict takes the Zq·W
# association in the first three and the K_qs·α one (KrrPredictFunction) in the last.
SHAPES = [(3, 4, 2, 2, False), (5, 2, 2, 2, False), (3, 3, 2, 2, True), (3, 4, 5, 1, True)]
SHAPE_IDS = ["dual", "primal", "bias-dual", "krr-Kqs-route"]
# The reference is plain torch ops: two shapes suffice for its gradgradcheck.
GG_CASES = [pytest.param(b.values[0], s, marks=b.marks, id=f"{i}-{b.id}") for s, i in zip(SHAPES, SHAPE_IDS)
            for b in BACKENDS if b.id == "cpu" or i in ("dual", "primal")]


@pytest.mark.parametrize("backend, shape", GG_CASES)
def test_gradgradcheck_ridge_weights(backend, shape):
    N, d, C, _, bias = shape
    Z = torch.randn(1, N, d, dtype=F64, requires_grad=True)
    Y = torch.randn(1, N, C, dtype=F64, requires_grad=True)
    lam = torch.tensor([0.7], dtype=F64, requires_grad=True)

    def f(Z, Y, lam):
        return ridge_weights(Z, Y, lam, reg="trace_mean", bias=bias, backend=backend)

    assert torch.autograd.gradgradcheck(f, (Z, Y, lam), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend, shape", GG_CASES)
def test_gradgradcheck_krr_predict(backend, shape):
    N, d, C, M, bias = shape
    Zq = torch.randn(1, M, d, dtype=F64, requires_grad=True)
    Zs = torch.randn(1, N, d, dtype=F64, requires_grad=True)
    Ys = torch.randn(1, N, C, dtype=F64, requires_grad=True)
    lam = torch.tensor([0.7], dtype=F64, requires_grad=True)

    def f(Zq, Zs, Ys, lam):
        return krr_predict(Zq, Zs, Ys, lam, reg="trace", bias=bias, backend=backend)

    assert torch.autograd.gradgradcheck(f, (Zq, Zs, Ys, lam), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["ridge_weights", "krr_predict_W", "krr_predict_Kqs"])
def test_gradient_penalty_matches_plain_torch(backend, op):
    """create_graph=True: the gradient is itself differentiable and its gradient is the true one."""
    N, d, C = (6, 9, 3) if op != "krr_predict_Kqs" else (5, 7, 12)
    Zq = torch.randn(3, d, dtype=F64)
    Z0, Y = torch.randn(N, d, dtype=F64), torch.randn(N, C, dtype=F64)

    def total(fn):
        Z = Z0.clone().requires_grad_()
        out = fn(Z)
        g, = torch.autograd.grad(out.square().sum(), Z, create_graph=True)
        assert g.requires_grad
        penalty = out.sum() + g.square().sum()
        return torch.autograd.grad(penalty, Z)[0]

    if op == "ridge_weights":
        ours = total(lambda Z: ridge_weights(Z, Y, 0.3, bias=True, backend=backend))
        ref = total(lambda Z: plain_w(Z, Y, 0.3, bias=True))
    else:
        ours = total(lambda Z: krr_predict(Zq, Z, Y, 0.3, bias=True, backend=backend))
        ref = total(lambda Z: plain_krr(Zq, Z, Y, 0.3, bias=True))
    close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_torch_func_transforms_match_plain_torch(backend, shape):
    N, d, C, M, bias = shape
    Zq, Z, Y = torch.randn(M, d, dtype=F64), torch.randn(N, d, dtype=F64), torch.randn(N, C, dtype=F64)
    lam = 0.4

    def ours(Z, Y=Y):
        return krr_predict(Zq, Z, Y, lam, bias=bias, backend=backend)

    def ref(Z, Y=Y):
        return plain_krr(Zq, Z, Y, lam, bias=bias)

    def loss(fn):
        return lambda Z: fn(Z).square().sum()

    close(grad(loss(ours))(Z), grad(loss(ref))(Z))
    close(jacrev(ours)(Z), jacrev(ref)(Z))
    close(jacfwd(ours)(Z), jacfwd(ref)(Z))
    t = torch.randn_like(Z)
    close(jvp(ours, (Z,), (t,))[1], jvp(ref, (Z,), (t,))[1])
    close(hessian(loss(ours))(Z), hessian(loss(ref))(Z), tol=1e-8)
    # the targets and λ too
    close(jacrev(lambda Y: ours(Z, Y))(Y), jacrev(lambda Y: ref(Z, Y))(Y))
    close(jacfwd(lambda lam: krr_predict(Zq, Z, Y, lam, bias=bias, backend=backend))(torch.tensor(lam, dtype=F64)),
          jacfwd(lambda lam: plain_krr(Zq, Z, Y, lam, bias=bias))(torch.tensor(lam, dtype=F64)))
    # ridge_weights the same way
    w_ours = lambda Z: ridge_weights(Z, Y, lam, bias=bias, backend=backend)  # noqa: E731
    w_ref = lambda Z: plain_w(Z, Y, lam, bias=bias)  # noqa: E731
    close(jacrev(w_ours)(Z), jacrev(w_ref)(Z))
    close(jacfwd(w_ours)(Z), jacfwd(w_ref)(Z))
    close(hessian(loss(w_ours))(Z), hessian(loss(w_ref))(Z), tol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_tasks_few_shot(backend):
    """MetaOptNet / R2D2: a shared embedding, a ridge head per task, vmap over tasks, grad of the mean loss."""
    tasks, n_way, shots, queries, dim, emb = 4, 3, 2, 5, 6, 8
    xs = torch.randn(tasks, n_way * shots, dim, dtype=F64)
    xq = torch.randn(tasks, n_way * queries, dim, dtype=F64)
    ys = torch.nn.functional.one_hot(torch.arange(n_way).repeat(shots), n_way).to(F64).expand(tasks, -1, -1)
    yq = torch.arange(n_way).repeat(queries).expand(tasks, -1)
    P0 = torch.randn(dim, emb, dtype=F64)
    lam = torch.tensor(0.5, dtype=F64)

    def task_loss(P, lam, xs, ys, xq, yq, head):
        logits = head(torch.tanh(xq @ P), torch.tanh(xs @ P), ys, lam)
        return torch.nn.functional.cross_entropy(logits, yq)

    ours = lambda q, s, y, lam: krr_predict(q, s, y, lam, bias=True, backend=backend)  # noqa: E731
    ref = lambda q, s, y, lam: plain_krr(q, s, y, lam, bias=True)  # noqa: E731

    def meta_loss(P, lam, head):
        return vmap(task_loss, in_dims=(None, None, 0, 0, 0, 0, None))(P, lam, xs, ys, xq, yq, head).mean()

    gP, glam = grad(meta_loss, argnums=(0, 1))(P0, lam, ours)
    rP, rlam = grad(meta_loss, argnums=(0, 1))(P0, lam, ref)
    close(gP, rP)
    close(glam, rlam)
    # the same gradients from a plain loop with torch.autograd
    P = P0.clone().requires_grad_()
    loop = torch.stack([task_loss(P, lam, xs[i], ys[i], xq[i], yq[i], ours) for i in range(tasks)]).mean()
    close(torch.autograd.grad(loop, P)[0], rP)
    # batched tasks without vmap (the op's own batch dims) give the same predictions
    feats_s, feats_q = torch.tanh(xs @ P0), torch.tanh(xq @ P0)
    close(vmap(lambda q, s, y: ours(q, s, y, lam))(feats_q, feats_s, ys), ours(feats_q, feats_s, ys, lam))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_with_batched_and_unbatched_arguments(backend):
    Z, Y = torch.randn(5, 2, 4, 6, dtype=F64), torch.randn(2, 4, 3, dtype=F64)
    lam = torch.tensor([0.3, 0.6, 0.9, 1.2, 1.5], dtype=F64)
    out = vmap(lambda z, lam: ridge_weights(z, Y, lam, reg="trace", backend=backend))(Z, lam)
    loop = torch.stack([plain_w(Z[i], Y, lam[i] * Z[i].square().sum((-2, -1))[:, None, None]) for i in range(5)])
    close(out, loop)
    # nested vmap
    out2 = vmap(vmap(lambda z: ridge_weights(z, Y[0], 0.5, backend=backend)))(Z)
    close(out2, plain_w(Z, Y[0], 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad(backend):
    import torch.autograd.forward_ad as fwAD

    Z, Y, t = torch.randn(3, 5, 4, dtype=F64), torch.randn(3, 5, 2, dtype=F64), torch.randn(3, 5, 4, dtype=F64)
    with fwAD.dual_level():
        out = ridge_weights(fwAD.make_dual(Z, t), Y, 0.2, backend=backend)
        tangent = fwAD.unpack_dual(out).tangent
    close(tangent, jvp(lambda z: plain_w(z, Y, 0.2), (Z,), (t,))[1])


def test_mixed_precision_double_backward_is_differentiable():
    """float32 features, float64 factor: the gradient stays differentiable and close to float64 truth."""
    Z64, Y64 = torch.randn(6, 9, dtype=F64), torch.randn(6, 3, dtype=F64)
    Z = Z64.float().requires_grad_()
    W = ridge_weights(Z, Y64.float(), 0.5, solve_dtype=torch.float64, backend="cpu")
    g, = torch.autograd.grad(W.square().sum(), Z, create_graph=True)
    gg, = torch.autograd.grad(g.square().sum(), Z)
    Zr = Z64.clone().requires_grad_()
    Wr = plain_w(Zr, Y64, 0.5)
    gr, = torch.autograd.grad(Wr.square().sum(), Zr, create_graph=True)
    ggr, = torch.autograd.grad(gr.square().sum(), Zr)
    torch.testing.assert_close(gg.double(), ggr, rtol=1e-3, atol=1e-3 * ggr.abs().max().item())


@pytest.mark.parametrize("n, C", [(1, 3), (4, 1), (1, 1), (5, 3)])
def test_cpu_cholesky_solve_leaves_right_hand_sides_alone(n, C):
    """The CPU solve works in place on its own buffer, never on the caller's right-hand sides."""
    ext = pytest.importorskip("ddfast._C")
    A = torch.randn(2, n, n, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.mT + n * torch.eye(n, dtype=torch.float64))
    R = torch.randn(2, n, C, dtype=torch.float64)
    before = R.clone()
    solve = getattr(torch.ops.ddfast, "cholesky_solve", None) if hasattr(torch.ops, "ddfast") else None
    X = (solve or ext.cholesky_solve)(R, L)
    assert torch.equal(R, before)
    torch.testing.assert_close(X, torch.cholesky_solve(before, L))


def test_grad_through_one_sample_ridge_does_not_touch_targets():
    y = torch.randn(1, 3, dtype=torch.float64)
    before = y.clone()
    z = torch.randn(1, 5, dtype=torch.float64)
    torch.func.grad(lambda t: ridge_weights(z, t, 1.0, bias=True, backend="cpu").sum())(y)
    assert torch.equal(y, before)
