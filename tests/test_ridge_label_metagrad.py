"""ridge_label_metagrad (LD-RR label step): the closed form against differentiating the ridge solve.

The fused path computes ∂L_out/∂ỹ = α A⁻¹Z̃ G_W (A = Z̃Z̃ᵀ + λI, G_W = ∂L_out/∂W) from the ridge kernel's
factor, with no autograd; the truth is ``backend="reference"`` (torch.func.grad_and_value through
``ridge_weights_ref``) and plain backpropagation through ``ridge_weights_ref`` in float64.

Shapes: N < d+1 (the N×N dual system) and N > d+1 (the d×d primal one), N = d+1, N = 1, C = 1; bias on and
off; class indices (int64, int32, with ignored rows) and soft targets (not normalised).

Tolerances: float64 rtol 1e-9 / atol 1e-12 (two orderings of the same products and one Cholesky solve;
condition numbers here ≤ 1e3). float32: the pass rule of the style guide, error vs the float64 truth
≤ 2 × the float32 reference's error + atol 1e-6 (the float32 rounding of the solve is the same size on
both paths, the orderings differ).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import interpreted, op_backend_params
from ddfast.losses import soft_cross_entropy
from ddfast.ops.label_metagrad import ridge_label_metagrad
from ddfast.reference.ridge_solve import ridge_weights_ref

FUSED = op_backend_params("ridge_solve", reference=False)
F64 = dict(rtol=1e-9, atol=1e-12)
F32_ATOL = 1e-6
KW = dict(pseudo_lr=0.3, lam=0.7, scale=1.3)

# (N, d, C, M, bias): dual N < d+1, primal N > d+1, N = d+1 (dual), N = 1, C = 1, LeNet's d = 84.
SHAPES = [(10, 84, 10, 64, True), (100, 84, 10, 48, True), (50, 20, 3, 30, False), (13, 12, 5, 16, True),
          (1, 5, 3, 4, True), (30, 40, 1, 16, False), (7, 16, 4, 9, False), (20, 6, 4, 12, True)]
TARGETS = ["hard", "hard_int32", "hard_ignore", "soft"]


def _inputs(N, d, C, M, bias, target, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * N + d)
    zb, zr = torch.randn(N, d, generator=g, dtype=dtype), torch.randn(M, d, generator=g, dtype=dtype)
    y = torch.softmax(torch.randn(N, C, generator=g, dtype=dtype), -1)
    w0 = 0.1 * torch.randn(d + int(bias), C, generator=g, dtype=dtype)
    if target == "soft":  # rows sum to 1.2: the gradient's Σ_c t_c factor is exercised
        yr = 1.2 * torch.softmax(torch.randn(M, C, generator=g, dtype=dtype), -1)
    else:
        yr = torch.randint(0, C, (M,), generator=g)
        if target == "hard_int32":
            yr = yr.int()
        elif target == "hard_ignore":
            yr[::3] = -100  # F.cross_entropy's ignore_index: left out of the loss and its mean
    return zb, y, zr, yr, w0


def _skip_unsupported(backend, N, d, C, bias, target):
    if backend == "triton" and (min(N, d + int(bias)) > 64 or C > 64):
        pytest.skip("triton ridge kernel: factor size and C ≤ 64")
    if interpreted(backend) and (N * d > 500 or target not in ("hard", "soft")):
        pytest.skip("the Triton interpreter: small shapes, one target kind each (the targets are backend-free)")


def _autograd_truth(zb, y, zr, yr, w0, bias, pseudo_lr, lam, scale):
    """∂L_out/∂ỹ by backpropagation through ridge_weights_ref (independent of ridge_label_metagrad)."""
    yy = y.clone().requires_grad_(True)
    w = (1 - pseudo_lr) * w0 + pseudo_lr * ridge_weights_ref(zb, yy, lam, bias=bias)
    logits = scale * (zr @ w[:-1] + w[-1] if bias else zr @ w)
    loss = soft_cross_entropy(logits, yr) if yr.is_floating_point() else F.cross_entropy(logits, yr.long())
    (gy,) = torch.autograd.grad(loss, yy)
    return gy


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("N,d,C,M,bias", SHAPES)
def test_float64_matches_reference_and_autograd(backend, N, d, C, M, bias, target):
    _skip_unsupported(backend, N, d, C, bias, target)
    args = _inputs(N, d, C, M, bias, target)
    ref = ridge_label_metagrad(*args, bias=bias, backend="reference", **KW)
    out = ridge_label_metagrad(*args, bias=bias, backend=backend, **KW)
    assert [tuple(t.shape) for t in out] == [(), (N, C), (d + int(bias), C), (d + int(bias), C)]
    for a, b in zip(out, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, **F64)
    torch.testing.assert_close(out[1], _autograd_truth(*args, bias, **KW), **F64)
    if C > 1:
        assert out[1].abs().max() > 0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("target", ["hard", "soft"])
@pytest.mark.parametrize("N,d,C,M,bias", SHAPES)
def test_float32_error_within_twice_the_reference_error(backend, N, d, C, M, bias, target):
    _skip_unsupported(backend, N, d, C, bias, target)
    args64 = _inputs(N, d, C, M, bias, target)
    args32 = [t.float() if t.is_floating_point() else t for t in args64]
    truth = ridge_label_metagrad(*args64, bias=bias, backend="reference", **KW)
    ref = ridge_label_metagrad(*args32, bias=bias, backend="reference", **KW)
    out = ridge_label_metagrad(*args32, bias=bias, backend=backend, **KW)
    for name, a, r, t in zip(("loss", "grad", "w_local", "w"), out, ref, truth):
        assert a.dtype == torch.float32
        err, ref_err = (a.double() - t).abs().max(), (r.double() - t).abs().max()
        assert err <= 2 * ref_err + F32_ATOL, f"{name}: error {err:.3g} vs the reference's {ref_err:.3g}"


def test_inputs_untouched_and_outputs_without_graph():
    zb, y, zr, yr, w0 = _inputs(10, 6, 3, 8, True, "soft")
    zb.requires_grad_(True)
    w0.requires_grad_(True)
    before = [t.detach().clone() for t in (zb, y, zr, yr, w0)]
    out = ridge_label_metagrad(zb, y, zr, yr, w0, **KW)
    for t, b in zip((zb, y, zr, yr, w0), before):
        assert torch.equal(t.detach(), b)
    assert not any(t.requires_grad for t in out)


def test_vmap_over_label_sets_matches_a_loop():
    """Under an enclosing torch.func transform the step goes through the ridge op's autograd rules."""
    zb, y, zr, yr, w0 = _inputs(8, 5, 3, 6, True, "hard")
    ys = torch.stack([y, y.flip(0), torch.full_like(y, 1 / 3)])
    got = torch.vmap(lambda t: ridge_label_metagrad(zb, t, zr, yr, w0, check_finite=False, **KW))(ys)
    for b in range(ys.shape[0]):
        want = ridge_label_metagrad(zb, ys[b], zr, yr, w0, **KW)
        for a, w in zip(got, want):
            torch.testing.assert_close(a[b], w, **F64)


def test_all_rows_ignored_like_cross_entropy():
    """F.cross_entropy over ignored rows only: a NaN loss, and autograd's gradient is zero."""
    zb, y, zr, yr, w0 = _inputs(6, 4, 3, 5, True, "hard")
    yr[:] = -100
    loss, grad, _, _ = ridge_label_metagrad(zb, y, zr, yr, w0, **KW)
    ref_loss, ref_grad, _, _ = ridge_label_metagrad(zb, y, zr, yr, w0, backend="reference", **KW)
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    assert torch.equal(ref_grad, torch.zeros_like(ref_grad))
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.__setitem__(3, a[3].float()), ValueError,
     r"y_real: expected class indices \[8\] or soft targets \[8, 3\], got torch.float32 \(8,\)"),
    (lambda a: a.__setitem__(3, a[3].to(torch.uint8)), TypeError, r"y_real: expected int64/int32 class indices"),
    (lambda a: a.__setitem__(3, a[3][:, None]), ValueError, r"y_real: expected class indices \[8\]"),
    (lambda a: a.__setitem__(3, a[3][:5]), ValueError, r"y_real: expected 8 rows like z_real"),
    (lambda a: a.__setitem__(1, a[1].float()), TypeError, r"y_soft: expected dtype torch.float64 like z_base"),
    (lambda a: a.__setitem__(0, a[0][:0]), ValueError, r"y_soft: expected \[0, C\]|z_base: empty input"),
    (lambda a: a.__setitem__(2, a[2].to("meta")), ValueError, r"z_real: expected device cpu like z_base"),
    (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, r"w_prev: expected \[7, 3\]"),
])
def test_bad_arguments_name_the_argument(mutate, exc, match):
    args = list(_inputs(9, 6, 3, 8, True, "hard"))
    mutate(args)
    with pytest.raises(exc, match=match):
        ridge_label_metagrad(*args, **KW)


def test_bad_check_finite_and_backend():
    args = _inputs(9, 6, 3, 8, True, "hard")
    with pytest.raises(TypeError, match="check_finite: expected None or a bool"):
        ridge_label_metagrad(*args, check_finite="yes", **KW)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ridge_label_metagrad(*args, backend="gpu", **KW)
