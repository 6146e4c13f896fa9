"""Input validation of the non-ridge public ops: every bad argument gives a ValueError / TypeError naming it,
non-finite inputs that make a result meaningless raise instead of returning NaN (``check_finite=False``
skips the value checks), and meta tensors either trace shapes or are refused with a clear message.

Ops: label_meta_loss, label_metagrad, checkpoint_grad_inner, ghost_bilinear / ghost_norms / ghost_inner,
relu_max_pool2d. (relu_max_pool2d and the ghost products pass NaN through exactly as their PyTorch
compositions do — ``F.max_pool2d(F.relu(x))``, the per-example gradient products — so they have no value check.)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import backend_param
from ddfast.ops.checkpoint_grad_inner import checkpoint_grad_inner
from ddfast.ops.ghost_products import ghost_bilinear, ghost_inner, ghost_norms
from ddfast.ops.label_metagrad import label_meta_loss, label_metagrad
from ddfast.ops.relu_max_pool2d import relu_max_pool2d

D = torch.float64
LD_BACKENDS = [backend_param("cpu"), backend_param("reference")]


class _Net(nn.Module):
    def __init__(self, C=3):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head = nn.Linear(6, C)

    def forward(self, x):
        return self.head(self.features(x))


def _ld_args(**over):
    torch.manual_seed(0)
    a = dict(model=_Net().double(), x_base=torch.randn(4, 5, dtype=D),
             y_soft=torch.softmax(torch.randn(4, 3, dtype=D), -1), x_real=torch.randn(6, 5, dtype=D),
             y_real=torch.randint(0, 3, (6,)))
    a.update(over)
    return a


def _call(fn, a, **kw):
    a = dict(a)
    return fn(a.pop("model"), a.pop("x_base"), a.pop("y_soft"), a.pop("x_real"), a.pop("y_real"), **a, **kw)


def _nan(t, value=math.nan):
    t = t.clone()
    t.view(-1)[1] = value
    return t


def _ld_bad_cases():
    base = _ld_args()
    return [
        ("y_soft NaN", dict(y_soft=_nan(base["y_soft"])), {}, ValueError, r"y_soft: contains non-finite"),
        ("x_base NaN", dict(x_base=_nan(base["x_base"])), {}, ValueError, r"x_base: contains non-finite"),
        ("x_real Inf", dict(x_real=_nan(base["x_real"], math.inf)), {}, ValueError, r"x_real: contains non-finite"),
        ("soft y_real NaN", dict(y_real=_nan(torch.softmax(torch.randn(6, 3, dtype=D), -1))), {}, ValueError,
         r"y_real: contains non-finite"),
        ("inner_lr inf", {}, dict(inner_lr=math.inf), ValueError, r"inner_lr: expected a finite number > 0, got inf"),
        ("inner_lr nan", {}, dict(inner_lr=math.nan), ValueError, r"inner_lr: expected a finite number"),
        ("inner_lr 0", {}, dict(inner_lr=0.0), ValueError, r"inner_lr"),
        ("inner_lr str", {}, dict(inner_lr="0.1"), TypeError, r"inner_lr: expected a number"),
        ("label width", dict(y_soft=base["y_soft"][:, :2], y_real=base["y_real"].clamp(max=1)), {}, ValueError,
         r"y_soft: the model outputs 3 classes, but the labels have C = 2 columns"),
        ("y_real too large", dict(y_real=torch.tensor([0, 1, 2, 3, 0, 1])), {}, ValueError,
         r"y_real: class indices outside \[0, 3\)"),
        ("y_real negative", dict(y_real=torch.tensor([0, -1, 2, 0, 0, 1])), {}, ValueError,
         r"y_real: class indices outside \[0, 3\)"),
        ("y_real bool", dict(y_real=torch.ones(6, dtype=torch.bool)), {}, TypeError, r"y_real: expected int64"),
        ("y_real device", dict(y_real=base["y_real"].to("meta")), {}, ValueError, r"y_real: expected device cpu"),
        ("outer_chunk negative", {}, dict(outer_chunk=-2), ValueError, r"outer_chunk: expected None or a positive"),
        ("outer_chunk float", {}, dict(outer_chunk=2.5), ValueError, r"outer_chunk"),
        ("x_real empty", dict(x_real=base["x_real"][:0], y_real=base["y_real"][:0]), {}, ValueError, r"x_real"),
        ("backend", {}, dict(backend="gpu"), ValueError, r"backend: expected one of"),
        ("precision", {}, dict(precision="fp8"), ValueError, r"precision"),
        ("reduction", {}, dict(reduction="max"), ValueError, r"reduction"),
        ("model", dict(model=lambda x: x), {}, TypeError, r"model: expected an nn.Module"),
    ]


@pytest.mark.parametrize("backend", LD_BACKENDS)
@pytest.mark.parametrize("fn", [label_meta_loss, label_metagrad], ids=["label_meta_loss", "label_metagrad"])
@pytest.mark.parametrize("case", _ld_bad_cases(), ids=lambda c: c[0])
def test_label_metagrad_bad_inputs(fn, backend, case):
    _, over, kw, exc, match = case
    if backend == "reference" and kw.get("backend"):
        pytest.skip("the case sets the backend itself")
    kw = {"backend": backend, **kw}
    with pytest.raises(exc, match=match):
        _call(fn, _ld_args(**over), **kw)


@pytest.mark.parametrize("backend", LD_BACKENDS)
def test_label_metagrad_check_finite_opt_out(backend):
    a = _ld_args()
    a["y_soft"] = _nan(a["y_soft"])
    loss = _call(label_meta_loss, a, backend=backend, check_finite=False)
    assert torch.isnan(loss)  # the opt-out skips the check; the caller owns the result
    from ddfast import settings

    old = settings.check_finite
    settings.check_finite = False
    try:
        assert torch.isnan(_call(label_meta_loss, a, backend=backend))
    finally:
        settings.check_finite = old


def test_label_metagrad_meta_tensors():
    a = _ld_args()
    meta = {k: (v.to("meta") if isinstance(v, (torch.Tensor, nn.Module)) else v) for k, v in a.items()}
    loss = _call(label_meta_loss, meta)  # auto picks the reference, which traces shapes on meta
    assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(ValueError, match=r"y_soft: label_metagrad .* meta tensors"):
        _call(label_metagrad, meta)


def test_label_meta_loss_fused_and_reference_agree_after_validation():
    """The checks do not change the result (one random case, both paths)."""
    a = _ld_args()
    torch.testing.assert_close(_call(label_meta_loss, a, backend="cpu"), _call(label_meta_loss, a, backend="reference"))


# --------------------------------------------------------------------------- checkpoint_grad_inner


def _cgi_args():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ckpts = [{k: v.clone() for k, v in model.state_dict().items()} for _ in range(2)]
    return dict(model=model, checkpoints=ckpts, probe=(torch.randn(4, 6, dtype=D), torch.randint(0, 3, (4,))),
                real=(torch.randn(5, 6, dtype=D), torch.randint(0, 3, (5,))), images=torch.randn(3, 6, dtype=D),
                soft_labels=torch.randn(3, 3, dtype=D))


def _cgi(a, **kw):
    a = dict(a)
    return checkpoint_grad_inner(a.pop("model"), a.pop("checkpoints"), a.pop("probe"), a.pop("real"), a.pop("images"),
                                 a.pop("soft_labels"), **kw)


def _cgi_bad_cases():
    a = _cgi_args()
    bad_ckpt = [a["checkpoints"][0], {**a["checkpoints"][1], "2.weight": _nan(a["checkpoints"][1]["2.weight"])}]
    return [
        ("checkpoint NaN", dict(checkpoints=bad_ckpt), {}, ValueError, r"checkpoints\[1\]\['2.weight'\]: contains non-finite"),
        ("probe images NaN", dict(probe=(_nan(a["probe"][0]), a["probe"][1])), {}, ValueError,
         r"probe images: contains non-finite"),
        ("real images Inf", dict(real=(_nan(a["real"][0], math.inf), a["real"][1])), {}, ValueError,
         r"real images: contains non-finite"),
        ("images NaN", dict(images=_nan(a["images"])), {}, ValueError, r"images: contains non-finite"),
        ("soft_labels NaN", dict(soft_labels=_nan(a["soft_labels"])), {}, ValueError, r"soft_labels: contains non-finite"),
        ("probe labels negative", dict(probe=(a["probe"][0], torch.tensor([0, -1, 1, 2]))), {}, ValueError,
         r"probe labels: class indices must be ≥ 0"),
        ("real labels too large", dict(real=(a["real"][0], torch.tensor([0, 1, 2, 7, 1]))), {}, ValueError,
         r"soft_labels: expected 8 columns or more \(real labels hold class index 7\)"),
        ("chunk negative", {}, dict(chunk=-1), ValueError, r"chunk: expected None or a positive"),
        ("chunk float", {}, dict(chunk=1.5), ValueError, r"chunk"),
        ("checkpoints dict", dict(checkpoints=a["checkpoints"][0]), {}, TypeError, r"checkpoints: expected an iterable"),
        ("probe device", dict(probe=(a["probe"][0].to("meta"), a["probe"][1])), {}, ValueError,
         r"probe: expected images on cpu"),
        ("label_mode", {}, dict(label_mode="soft"), ValueError, r"label_mode"),
        ("real_mode", {}, dict(real_mode="fast"), ValueError, r"real_mode"),
        ("meta", dict(images=a["images"].to("meta"), soft_labels=a["soft_labels"].to("meta"),
                      probe=tuple(t.to("meta") for t in a["probe"]), real=tuple(t.to("meta") for t in a["real"])),
         {}, ValueError, r"images: checkpoint_grad_inner .* meta tensors"),
    ]


@pytest.mark.parametrize("backend", [backend_param("cpu"), backend_param("reference")])
@pytest.mark.parametrize("case", _cgi_bad_cases(), ids=lambda c: c[0])
def test_checkpoint_grad_inner_bad_inputs(backend, case):
    _, over, kw, exc, match = case
    with pytest.raises(exc, match=match):
        _cgi({**_cgi_args(), **over}, backend=backend, **kw)


def test_checkpoint_grad_inner_check_finite_opt_out():
    a = _cgi_args()
    a["images"] = _nan(a["images"])
    r, s = _cgi(a, check_finite=False)
    assert torch.isnan(s)


# --------------------------------------------------------------------------- ghost products, relu_max_pool2d


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ghost_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5), algorithm="exact"), ValueError, r"algorithm"),
    (lambda: ghost_norms(torch.randn(2, 3, 4), torch.randn(2, 3, 5), backend="gpu"), ValueError, r"backend"),
    (lambda: ghost_norms(torch.randn(2, 3, 4), torch.randn(2, 4, 5)), ValueError, r"G: expected output gradients"),
    (lambda: ghost_norms(torch.randn(2, 3, 4).int(), torch.randn(2, 3, 5)), TypeError, r"A: expected float32"),
    (lambda: ghost_bilinear(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(4, 5)), ValueError,
     r"V: expected shape \[O, K\] = \[5, 4\]"),
    (lambda: ghost_inner(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(2, 3, 6), torch.randn(2, 3, 5)),
     ValueError, r"A2: expected \[N2, P2, K\] with K = 4"),
    (lambda: relu_max_pool2d([1.0]), TypeError, r"x: expected a tensor"),
    (lambda: relu_max_pool2d(torch.randn(3, 8, 8)), ValueError, r"x: expected a 4-D tensor"),
    (lambda: relu_max_pool2d(torch.ones(1, 1, 4, 4, dtype=torch.int64)), TypeError, r"x: expected a floating-point"),
    (lambda: relu_max_pool2d(torch.randn(1, 1, 1, 4)), ValueError, r"x: expected H, W ≥ 2"),
    (lambda: relu_max_pool2d(torch.randn(1, 1, 4, 4), backend="gpu"), ValueError, r"backend"),
])
def test_layer_ops_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_layer_ops_meta_tensors_trace_shapes():
    A, G = torch.randn(2, 3, 4, device="meta"), torch.randn(2, 3, 5, device="meta")
    assert ghost_norms(A, G).shape == (2,)
    assert ghost_bilinear(A, G, torch.randn(5, 4, device="meta")).shape == (2,)
    assert ghost_inner(A, G, A[:1], G[:1]).shape == (2, 1)
    out = relu_max_pool2d(torch.randn(2, 3, 7, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 3, 4)
