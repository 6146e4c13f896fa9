"""relu_max_pool2d on every backend against the eager reference F.max_pool2d(F.relu(x), 2), and LeNet with it.

Exact equality (a selection: no rounding) of the output and of the input gradient for float32, float64
and bfloat16: NaN where the reference has NaN, the same sign of zero elsewhere, the same memory
format. Shapes: N = 1, C = 1, odd H / W, a 2×2 input, LeNet's two pools; layouts: contiguous,
channels_last, non-contiguous views; values: random, integer-valued (ties), non-positive windows
(zeros, −0), NaN. Higher-order autograd (double backward, jvp, vmap) against the reference; float64
gradcheck / gradgradcheck; the contract suite (tests/contract.py); input errors; dispatch. LeNet and
VGG11 (whose ReLU → 2×2 max-pool pairs use the op) against their unfused forms, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddfast.errors import BackendUnavailableError
from ddfast.models import VGG11, LeNet
from ddfast.ops.relu_max_pool2d import NO_GRAD, ReluMaxPool2d, relu_max_pool2d, relu_max_pool2d_backends, window_select
from ddfast.reference.label_metagrad import label_metagrad_ref
from ddfast.reference.relu_max_pool2d import lenet_forward_ref, relu_max_pool2d_ref

from conftest import backend_param, op_backend_params
from contract import OpContract

# Tolerances: none. Every output is a copy of an input element (or 0) and every gradient a copy of a
# grad_out element (or 0): all backends must match the reference bit for bit, in every dtype (NaN
# payloads and the sign of a NaN aside).
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
KERNEL_BACKENDS = op_backend_params("relu_max_pool2d", reference=False)
BACKENDS = KERNEL_BACKENDS + [backend_param("reference")]


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def assert_identical(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same shape, dtype, values, NaN positions and sign of every non-NaN (±0 included)."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
    g, w = got.masked_fill(nan, 0), want.masked_fill(nan, 0)
    assert torch.equal(g, w), f"{what}: {(g != w).sum().item()} values differ"
    assert torch.equal(torch.signbit(g), torch.signbit(w)), f"{what}: signs of zeros differ"


# Model tests come first: they are torch-heavy, and after the Triton interpreter has run (numpy
# worker threads) the OpenMP threads of torch contend for the cores on small machines.

# --------------------------------------------------------------------------- models


class _LeNetComposed(LeNet):
    """LeNet as it was written before the fused op (pools as F.max_pool2d(F.relu(·), 2))."""

    def forward(self, x):
        return lenet_forward_ref(self, x)


def _lenets(channels, size, dtype=torch.float32):
    torch.manual_seed(0)
    new = LeNet(channels, 10, size).to(dtype)
    old = _LeNetComposed(channels, 10, size).to(dtype)
    old.load_state_dict(new.state_dict())
    return new, old


def _out_and_grads(model, x, y, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize(
    "channels, size, dtype, autocast, channels_last",
    [
        (1, 28, torch.float32, False, False),
        (1, 28, torch.float64, False, False),
        (3, 32, torch.float32, False, False),
        (1, 28, torch.float32, True, False),  # bf16 autocast (the network passes of LD's precision="bf16")
        (1, 28, torch.float32, False, True),
    ],
    ids=["mnist-f32", "mnist-f64", "cifar-f32", "mnist-bf16-autocast", "mnist-channels-last"],
)
def test_lenet_matches_the_composed_model_exactly(channels, size, dtype, autocast, channels_last):
    new, old = _lenets(channels, size, dtype)
    x = torch.randn(16, channels, size, size, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        new, old = new.to(memory_format=torch.channels_last), old.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    out_new, g_new = _out_and_grads(new, x, y, autocast)
    out_old, g_old = _out_and_grads(old, x, y, autocast)
    assert_identical(out_new, out_old, "logits")
    for k in g_old:
        assert_identical(g_new[k], g_old[k], f"grad {k}")


@pytest.mark.parametrize("norm, size, channels_last", [("batch", 16, False), ("instance", 8, False),
                                                     ("batch", 8, True)])
def test_vgg11_matches_the_unfused_layout_exactly(norm, size, channels_last):
    """VGG11's ReLU → MaxPool2d(2) pairs run fused: the same logits, parameter gradients, BatchNorm
    statistics and state_dict keys as nn.ReLU, nn.MaxPool2d."""
    torch.manual_seed(0)
    new = VGG11(3, 10, size, width=4, norm=norm)
    old = copy.deepcopy(new)
    for i, m in enumerate(old.features):
        if isinstance(m, ReluMaxPool2d):
            old.features[i], old.features[i + 1] = nn.ReLU(), nn.MaxPool2d(2)
    assert list(old.state_dict()) == list(new.state_dict())
    x = torch.randn(8, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        new, old = new.to(memory_format=torch.channels_last), old.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    out_new, g_new = _out_and_grads(new, x, y)
    out_old, g_old = _out_and_grads(old, x, y)
    assert_identical(out_new, out_old, "logits")
    for k in g_old:
        assert_identical(g_new[k], g_old[k], f"grad {k}")
    for k, v in old.state_dict().items():
        assert_identical(new.state_dict()[k].float(), v.float(), k)


def test_lenet_label_metagrad_reference_double_backward_matches():
    """The LD reference differentiates through the inner step (create_graph=True): the second-order
    path through the fused op gives the composed model's label meta-gradient exactly."""
    new, old = _lenets(1, 28)
    g = torch.Generator().manual_seed(1)
    xb, xr = torch.randn(5, 1, 28, 28, generator=g), torch.randn(12, 1, 28, 28, generator=g)
    y = torch.softmax(torch.randn(5, 10, generator=g), -1)
    yr = torch.randint(0, 10, (12,), generator=g)
    loss_new, grad_new = label_metagrad_ref(new, xb, y, xr, yr, 0.05)
    loss_old, grad_old = label_metagrad_ref(old, xb, y, xr, yr, 0.05)
    assert_identical(loss_new, loss_old, "L_out")
    assert_identical(grad_new, grad_old, "∂L_out/∂ỹ")


# --------------------------------------------------------------------------- exact parity


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    layout: str = "contiguous"  # contiguous | channels_last | strided (H/W-transposed storage) | sliced

    @property
    def id(self):
        return "x".join(map(str, self.shape)) + "-" + self.layout


# 2×2; odd H and W; C = 1 with odd H; LeNet's pools (⌊W/2⌋ = 14: SIMD rows, 5: gathered windows);
# odd H, W with ⌊W/2⌋ = 9 (a row's last group of 8 overlaps) and C = 8 (channels_last by 8).
SHAPES = [(1, 1, 2, 2), (1, 3, 5, 7), (2, 1, 9, 8), (2, 6, 28, 28), (2, 16, 10, 10), (2, 8, 7, 19)]
CASES = [Case(s) for s in SHAPES] + [Case(s, "channels_last") for s in SHAPES] + [
    Case((2, 3, 7, 6), "strided"),
    Case((2, 6, 12, 10), "sliced"),
]
KINDS = ["randn", "ties", "nan"]


def _make_x(case: Case, kind: str, dtype, device):
    g = torch.Generator().manual_seed(sum(case.shape) * 7 + KINDS.index(kind))
    N, C, H, W = case.shape
    shape = (N, C, W, H) if case.layout == "strided" else (N, C, 2 * H, W) if case.layout == "sliced" else case.shape
    if kind == "randn":
        x = torch.randn(shape, generator=g)
    else:  # integer values: ties inside windows, all-nonpositive windows, exact zeros
        x = torch.randint(-3, 4, shape, generator=g).float()
        if kind == "ties":
            x[..., ::3, :] = -x[..., ::3, :].abs()
            x[..., ::4, ::3] = -0.0
        elif kind == "nan":
            x.view(-1)[torch.randperm(x.numel(), generator=g)[: max(1, x.numel() // 6)]] = float("nan")
            x.view(-1)[::5] = -0.0
    x = x.to(dtype=dtype, device=device)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case.layout == "strided":
        x = x.transpose(2, 3)
    elif case.layout == "sliced":
        x = x[:, :, ::2]
    assert tuple(x.shape) == case.shape
    return x


def _grad_out(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(shape, generator=g)
    go.view(-1)[::4] = -0.0  # max_pool2d's backward adds into zeros: −0 comes back as +0
    return go.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_and_gradient_identical_to_reference(backend, case, kind, dtype):
    device = _device(backend)
    x = _make_x(case, kind, dtype, device)
    xr = x.detach().requires_grad_(True)
    out_ref = relu_max_pool2d_ref(xr)
    grad_out = _grad_out(out_ref.shape, dtype, device, sum(case.shape))
    (gx_ref,) = torch.autograd.grad(out_ref, xr, grad_out)
    xk = x.detach().requires_grad_(True)
    out = relu_max_pool2d(xk, backend=backend)
    (gx,) = torch.autograd.grad(out, xk, grad_out)
    assert_identical(out.detach(), out_ref.detach(), "output")
    assert_identical(gx, gx_ref, "grad x")
    if case.layout in ("contiguous", "channels_last"):  # other strides: the kernels give contiguous results
        fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_and_transposed_grad_out(backend):
    """grad_out as autograd hands it over: expanded zero-stride (from .sum()) or a transposed view."""
    device = _device(backend)
    x = torch.randn(2, 3, 8, 7, device=device)
    for layout in (torch.contiguous_format, torch.channels_last):
        xk = x.contiguous(memory_format=layout).requires_grad_(True)
        xr = x.contiguous(memory_format=layout).requires_grad_(True)
        (gk,) = torch.autograd.grad(relu_max_pool2d(xk, backend=backend).sum(), xk)
        (gr,) = torch.autograd.grad(relu_max_pool2d_ref(xr).sum(), xr)
        assert_identical(gk, gr, "grad from sum()")
        go = torch.randn(2, 3, 3, 4, device=device).transpose(2, 3)
        (gk,) = torch.autograd.grad(relu_max_pool2d(xk, backend=backend), xk, go)
        (gr,) = torch.autograd.grad(relu_max_pool2d_ref(xr), xr, go)
        assert_identical(gk, gr, "grad from a transposed grad_out")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_codes_agree_with_reference_indices(backend):
    """The uint8 code: the reference's argmax (as a window position) where relu(max) > 0 or NaN, NO_GRAD else."""
    from ddfast.ops.relu_max_pool2d import _KERNELS

    device = _device(backend)
    x = _make_x(Case((2, 5, 9, 11)), "nan", torch.float32, device)
    out, code = _KERNELS[backend].fwd(x)
    ref, idx = F.max_pool2d_with_indices(F.relu(x), 2)
    W = x.shape[-1]
    pos = (idx // W % 2) * 2 + idx % W % 2
    live = (ref > 0) | ref.isnan()
    assert code.dtype == torch.uint8
    assert torch.equal(code, torch.where(live, pos, torch.full_like(pos, NO_GRAD)).to(torch.uint8))
    assert_identical(window_select(x, code), torch.where(live, ref, torch.zeros_like(ref)), "window_select")


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_jvp_vmap_match_reference(backend):
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=g).to(device)
    v, t = torch.randn_like(x), torch.randn_like(x)

    def hvp(fn):
        xx = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad((fn(xx) ** 3).sum(), xx, create_graph=True)
        return gx, torch.autograd.grad((gx * v).sum(), xx)[0]

    op = lambda z: relu_max_pool2d(z, backend=backend)  # noqa: E731
    for got, want in zip(hvp(op), hvp(relu_max_pool2d_ref)):
        assert_identical(got.detach(), want.detach(), "double backward")
    for got, want in zip(torch.func.jvp(op, (x,), (t,)), torch.func.jvp(relu_max_pool2d_ref, (x,), (t,))):
        assert_identical(got, want, "jvp")
    xs = torch.randn(4, 2, 3, 6, 5, dtype=torch.float64, generator=g).to(device)
    per_sample = lambda fn: torch.func.vmap(torch.func.grad(lambda z: (fn(z) ** 2).sum()))(xs)  # noqa: E731
    assert_identical(per_sample(op), per_sample(relu_max_pool2d_ref), "vmap(grad)")


class TestReluMaxPool2dContract(OpContract):
    """float64 gradcheck and float32 parity of the shared suite (exactness is tested above)."""

    backends = KERNEL_BACKENDS
    gradcheck_cases = [Case((2, 3, 5, 6)), Case((1, 2, 4, 4), "channels_last")]
    parity_cases = [Case((3, 4, 9, 8)), Case((2, 8, 6, 7), "channels_last")]

    def make_inputs(self, case, dtype):
        return {"x": _make_x(case, "randn", dtype, "cpu").requires_grad_(True)}

    def reference(self, inputs):
        return relu_max_pool2d_ref(inputs["x"])

    def kernel(self, inputs, backend):
        return relu_max_pool2d(inputs["x"].to(_device(backend)), backend=backend).to(inputs["x"].device)

    def gradcheck_fast_mode(self, backend):
        return backend == "triton"


@pytest.mark.parametrize("backend", [backend_param("cpu"), backend_param("triton")])
def test_gradgradcheck_float64(backend):
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda z: relu_max_pool2d(z, backend=backend), (x,))


def test_no_grad_and_inputs_not_requiring_grad():
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_identical(relu_max_pool2d(x, backend="cpu"), relu_max_pool2d_ref(x), "no_grad")
    out = relu_max_pool2d(x, backend="cpu")
    assert not out.requires_grad


# --------------------------------------------------------------------------- errors and dispatch


def test_input_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"x: expected a tensor of shape \[N, C, H, W\], got list"):
        relu_max_pool2d([1.0])
    with pytest.raises(ValueError, match=r"x: expected a 4-D tensor of shape \[N, C, H, W\], got shape \(3, 4, 4\)"):
        relu_max_pool2d(torch.randn(3, 4, 4))
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor, got dtype torch.int64"):
        relu_max_pool2d(torch.ones(1, 1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x: expected H, W ≥ 2 for a 2×2 pool, got shape \(1, 2, 1, 5\)"):
        relu_max_pool2d(torch.randn(1, 2, 1, 5))
    with pytest.raises(ValueError, match="backend: expected one of"):
        relu_max_pool2d(torch.randn(1, 1, 2, 2), backend="gpu")


def test_dispatch_auto_and_unsupported():
    from conftest import available_backends

    report = relu_max_pool2d_backends("cpu", torch.float32)
    assert report["auto"] == ("cpu" if "cpu" in available_backends() else "reference")
    assert report["reference"] == [] and report["cuda"]  # CPU tensors: never the CUDA kernels
    # float16: no kernel takes it; auto falls back to the reference, a forced kernel says why.
    x = torch.randn(2, 3, 6, 5, dtype=torch.float16)
    assert relu_max_pool2d_backends("cpu", torch.float16)["auto"] == "reference"
    assert_identical(relu_max_pool2d(x), relu_max_pool2d_ref(x), "float16 via auto")
    with pytest.raises(BackendUnavailableError, match="dtype torch.float16 not supported"):
        relu_max_pool2d(x, backend="cpu")
    with pytest.raises(BackendUnavailableError, match="relu_max_pool2d: backend 'cuda' cannot run these inputs"):
        relu_max_pool2d(torch.randn(1, 1, 2, 2), backend="cuda")


def test_empty_batch():
    for backend in ("cpu", "reference"):
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        out = relu_max_pool2d(x, backend=backend)
        assert out.shape == (0, 3, 2, 2)
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert gx.shape == x.shape
