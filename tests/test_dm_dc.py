"""DM (eq. 5) and DC (eq. 6): hand checks of the losses, descent on digits, shapes, resume, input errors."""

import pytest
import torch
from torch import nn

from ddfast.data import load_dataset
from ddfast.distill.dc import DCConfig, DCDistiller, dc_loss, gradient_distance
from ddfast.distill.dm import DMConfig, DMDistiller, dm_loss
from ddfast.models import build_model

SMALL = dict(widths=(8, 16), real_batch=32)


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    return d.train_x, d.train_y, d.num_classes


def _small_net(num_classes=10):
    torch.manual_seed(1)
    return build_model("convnet", 1, num_classes, 8, widths=(8, 16), norm="instance")


def _make(kind, digits, **overrides):
    x, y, c = digits
    if kind == "dm":
        return DMDistiller((x, y), c, DMConfig(**{"ipc": 2, **SMALL, **overrides}))
    cfg = {"ipc": 2, "outer_loop": 2, "inner_loop": 1, **SMALL, **overrides}
    return DCDistiller((x, y), c, DCConfig(**cfg))


# ------------------------------------------------------------------ hand checks


def test_dm_loss_zero_when_synthetic_equals_real(digits):
    x, y, _ = digits
    xs, ys = x[:40], y[:40]
    net = _small_net()
    assert float(dm_loss(xs, ys, xs, ys, net, augment=False).detach()) == 0.0
    # Siamese: the same seed augments identical batches identically, so the loss is still 0.
    g = torch.Generator().manual_seed(3)
    assert float(dm_loss(xs, ys, xs, ys, net, generator=g, augment=True).detach()) == 0.0


def test_dm_loss_hand_value_identity_features():
    # ψ = flatten (no ``features``): the loss is Σ_c ‖mean real_c − mean syn_c‖².
    x_real = torch.tensor([[1.0, 3.0], [3.0, 5.0], [0.0, 0.0], [4.0, 2.0]]).view(4, 1, 1, 2)
    y_real = torch.tensor([0, 0, 1, 1])
    x_syn = torch.tensor([[2.0, 2.0], [1.0, 1.0]]).view(2, 1, 1, 2).requires_grad_(True)
    y_syn = torch.tensor([0, 1])
    loss = dm_loss(x_syn, y_syn, x_real, y_real, nn.Flatten(), augment=False)
    # class 0: mean (2, 4) vs (2, 2) -> 4; class 1: mean (2, 1) vs (1, 1) -> 1
    assert float(loss.detach()) == pytest.approx(5.0)
    loss.backward()
    torch.testing.assert_close(x_syn.grad.view(2, 2), torch.tensor([[0.0, -4.0], [-2.0, 0.0]]))


def test_gradient_distance_hand_values():
    w = torch.randn(6, 3, 3, 3)
    b = torch.randn(6)
    # identical: ≈ 0 (1e-6 in the cosine's denominator)
    assert abs(float(gradient_distance([w, b], [w.clone(), b.clone()]))) < 1e-5
    # opposite: 2 per row; 1-D skipped by default, one row with bias="row"
    assert float(gradient_distance([w, b], [-w, -b])) == pytest.approx(12.0, abs=1e-5)
    assert float(gradient_distance([w, b], [-w, -b], bias="row")) == pytest.approx(14.0, abs=1e-5)
    # orthogonal rows: 1 per row
    e = torch.eye(2)
    assert float(gradient_distance([e], [e.flip(0)])) == pytest.approx(2.0, abs=1e-6)
    # only 1-D gradients with "skip": 0
    assert float(gradient_distance([b], [-b])) == 0.0


def test_dc_loss_zero_when_synthetic_equals_real(digits):
    x, y, _ = digits
    idx = torch.cat([torch.nonzero(y == c).flatten()[:6] for c in range(3)])
    first, second = idx.view(3, 6)[:, :3].flatten(), idx.view(3, 6)[:, 3:].flatten()
    net = _small_net()
    # not exactly 0: the DC cosine has 1e-6 in its denominator, which matters for rows of tiny norm
    # (head rows of classes absent from the batch)
    assert abs(float(dc_loss(x[first], y[first], x[first], y[first], net).detach())) < 1e-2
    assert float(dc_loss(x[second], y[second], x[first], y[first], net).detach()) > 1.0


def test_dc_loss_differentiable_in_images(digits):
    x, y, _ = digits
    net = _small_net()
    xs = x[:10].clone().requires_grad_(True)
    loss = dc_loss(xs, y[:10], x[10:200], y[10:200], net)
    (g,) = torch.autograd.grad(loss, [xs])
    assert g.shape == xs.shape and torch.isfinite(g).all() and g.abs().sum() > 0


# ------------------------------------------------------------------ distillation


@pytest.mark.parametrize("kind,overrides", [("dm", dict(iterations=10)), ("dc", dict(iterations=6, lr_images=0.5))])
def test_loss_decreases(digits, kind, overrides):
    dist = _make(kind, digits, init="noise", **overrides)
    losses = [h["loss"] for h in dist.fit().history]
    assert len(losses) == overrides["iterations"]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("kind", ["dm", "dc"])
def test_fit_shapes(digits, kind):
    x, _, c = digits
    r = _make(kind, digits, ipc=3, iterations=1).fit()
    assert r.images.shape == (3 * c,) + tuple(x.shape[1:])
    assert torch.equal(r.labels, torch.arange(c).repeat_interleave(3))
    assert r.init_indices.shape == (3 * c,) and r.iterations == 1 and len(r.history) == 1


@pytest.mark.parametrize("kind", ["dm", "dc"])
def test_resume_bit_identical(digits, kind, tmp_path):
    _make(kind, digits, iterations=2).fit(out_dir=str(tmp_path), checkpoint_every=1)
    resumed = _make(kind, digits, iterations=4).fit(out_dir=str(tmp_path), resume=True)
    straight = _make(kind, digits, iterations=4).fit()
    assert torch.equal(resumed.images, straight.images)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def test_no_backend_switch(digits):
    # DM / DC route through no ddfast op: the configs take no ``backend``.
    with pytest.raises(TypeError, match="backend"):
        _make("dm", digits, backend="fused")


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kind", ["dm", "dc"])
def test_bad_config(digits, kind):
    x, y, c = digits
    with pytest.raises(ValueError, match="per_class=500"):
        _make(kind, digits, ipc=500)
    with pytest.raises(ValueError, match="real_batch"):
        _make(kind, digits, real_batch=0)
    cls = DMDistiller if kind == "dm" else DCDistiller
    with pytest.raises(ValueError, match="train x"):
        cls((x[:, 0], y), c)
    with pytest.raises(ValueError, match="train y"):
        cls((x, y[:-1]), c)


def test_bad_loss_inputs(digits):
    x, y, _ = digits
    net = _small_net()
    for fn in (dm_loss, dc_loss):
        with pytest.raises(ValueError, match="x_syn"):
            fn(x[:4, 0], y[:4], x, y, net)
        with pytest.raises(ValueError, match="y_syn"):
            fn(x[:4], y[:3], x, y, net)
        with pytest.raises(ValueError, match="y_real"):  # a synthetic class with no real examples
            fn(x[:4], torch.full((4,), 3), x[y != 3], y[y != 3], net)
    with pytest.raises(ValueError, match="g_syn_list"):
        gradient_distance([torch.ones(2, 2)], [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="bias"):
        gradient_distance([torch.ones(2, 2)], [torch.ones(2, 2)], bias="full")
