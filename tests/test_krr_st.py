"""KRR-ST distiller (krr-st-selfsup Algorithm 1): outer loss, model pool, backends, resume, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller, ModelPool, outer_loss
from ddfast.models import ConvNet
from ddfast.ssl import encode

TINY = dict(m=12, steps=6, batch_size=40, pool_size=3, pool_steps=4, widths=(4, 8))


def _data(n=90, c=1, side=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, side, side, generator=g, dtype=dtype)


def _target(c=1, side=8, d_y=6, dtype=torch.float64):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, d_y)).to(dtype)


def test_outer_loss_matches_hand_computation_float64():
    torch.manual_seed(0)
    feats = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh()).double()
    xs, xr = torch.randn(4, 1, 3, 4, dtype=torch.float64), torch.randn(7, 1, 3, 4, dtype=torch.float64)
    ys, yr = torch.randn(4, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    lam = 1e-2
    for backend in ("reference", "fused"):
        got = outer_loss(feats, xs, ys, xr, yr, lam=lam, backend=backend)
        # Eq. 4 written out: features with a ones column, K = Z_s Z_sᵀ, μ = λ·tr(K), mean squared error.
        with torch.no_grad():
            zs = torch.cat([feats(xs), torch.ones(4, 1, dtype=torch.float64)], 1)
            zr = torch.cat([feats(xr), torch.ones(7, 1, dtype=torch.float64)], 1)
            K = zs @ zs.T
            alpha = torch.linalg.solve(K + lam * torch.trace(K) * torch.eye(4, dtype=torch.float64), ys)
            want = ((zr @ zs.T @ alpha - yr) ** 2).sum() / (7 * 3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_outer_loss_gradient_fused_equals_reference():
    torch.manual_seed(0)
    feats = nn.Sequential(nn.Flatten(), nn.Linear(16, 9), nn.Tanh()).double()
    xs = torch.randn(6, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    xr, yr = torch.randn(11, 1, 4, 4, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "fused"):
        loss = outer_loss(feats, xs, ys, xr, yr, lam=1e-3, backend=backend)
        grads[backend] = torch.autograd.grad(loss, [xs, ys])
    for a, b in zip(grads["reference"], grads["fused"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # finite differences in Y_s (μ = λ·tr(K_ss) does not depend on Y_s; in X_s the method detaches it, so
    # the X_s gradient is checked against the reference above rather than against finite differences)
    assert torch.autograd.gradcheck(lambda y: outer_loss(feats, xs.detach(), y, xr, yr, lam=1e-3, backend="fused"), (ys,))


def test_pool_init_and_reset_logic():
    g = torch.Generator().manual_seed(0)
    made = []

    def make():
        m = ConvNet(1, 5, 8, widths=(2, 4)).double()
        made.append(m)
        return m

    pool = ModelPool(make, size=4, max_steps=3, lr=0.1, momentum=0.9, weight_decay=1e-3, generator=g)
    x, y = _data(6), torch.randn(6, 5, dtype=torch.float64)
    pool.initialize(x, y)
    assert len(pool.models) == 4 and all(1 <= t <= 3 for t in pool.iterations)
    i = 0
    t0 = pool.iterations[i]
    before = [p.clone() for p in pool.models[i].parameters()]
    for _ in range(3 - t0):  # steps until T, each trains the model once
        pool.update(i, x, y)
    assert pool.iterations[i] == 3 and pool.resets == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, pool.models[i].parameters())) or t0 == 3
    old = pool.models[i]
    pool.update(i, x, y)  # t_i == T: re-initialise, t_i = 0
    assert pool.iterations[i] == 0 and pool.resets == 1 and pool.models[i] is not old
    pool.update(i, x, y)
    assert pool.iterations[i] == 1


def test_pool_step_is_full_batch_mse_sgd():
    g = torch.Generator().manual_seed(0)
    pool = ModelPool(lambda: ConvNet(1, 3, 8, widths=(2, 4)).double(), 1, 5, 0.1, 0.0, 0.0, g)
    pool.models, pool.optimizers, pool.iterations = [], [], []
    m, o = pool._fresh()
    pool.models.append(m), pool.optimizers.append(o), pool.iterations.append(0)
    x, y = _data(5), torch.randn(5, 3, dtype=torch.float64)
    twin = ConvNet(1, 3, 8, widths=(2, 4)).double()
    twin.load_state_dict(m.state_dict())
    loss = nn.functional.mse_loss(twin(x), y)
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    want = [p - 0.1 * gr for p, gr in zip(twin.parameters(), grads)]
    pool.update(0, x, y)
    for a, b in zip(m.parameters(), want):
        torch.testing.assert_close(a, b)


def test_init_uses_target_outputs_and_gaussian_ablation():
    x, g = _data(), _target()
    d = KRRSTDistiller(x, g, KRRSTConfig(**TINY))
    torch.testing.assert_close(d.images.detach(), x[d.init_indices])
    torch.testing.assert_close(d.targets.detach(), encode(g, x[d.init_indices]).double())
    assert len(set(d.init_indices.tolist())) == TINY["m"]
    d2 = KRRSTDistiller(x, g, KRRSTConfig(**{**TINY, "init": "gaussian"}))
    assert not torch.allclose(d2.targets, d.targets)


def test_loss_decreases_and_fused_equals_reference_after_steps():
    x, g = _data(), _target()
    runs = {}
    for backend in ("reference", "fused"):
        d = KRRSTDistiller(x, g, KRRSTConfig(**{**TINY, "steps": 8, "backend": backend}))
        runs[backend] = d.fit()
    a, b = runs["reference"], runs["fused"]
    torch.testing.assert_close(a.images, b.images, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(a.targets, b.targets, rtol=1e-9, atol=1e-11)
    assert [h["model"] for h in a.history] == [h["model"] for h in b.history]
    assert not torch.equal(a.images, x[a.init_indices])  # the images moved


def test_outer_loss_goes_down_on_real_digits():
    from ddfast.data import load_dataset

    ds = load_dataset("digits")
    torch.manual_seed(0)
    g = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
    cfg = KRRSTConfig(m=30, steps=60, batch_size=128, pool_size=2, pool_steps=20, widths=(8, 16), lr=1e-2)
    d = KRRSTDistiller(ds.train_x, g, cfg)
    hist = [h["loss"] for h in d.fit().history]
    assert sum(hist[-10:]) / 10 < sum(hist[:10]) / 10


def test_resume_is_bit_identical(tmp_path):
    x, g = _data(), _target()
    full = KRRSTDistiller(x, g, KRRSTConfig(**{**TINY, "steps": 10})).fit()
    part = KRRSTDistiller(x, g, KRRSTConfig(**{**TINY, "steps": 10}))
    part.config.steps = 5  # stop half way, as a killed run would (checkpoint every step)
    part.fit(out_dir=str(tmp_path), checkpoint_every=1)
    resumed = KRRSTDistiller(x, g, KRRSTConfig(**{**TINY, "steps": 10}))
    res = resumed.fit(out_dir=str(tmp_path), resume=True)
    assert torch.equal(res.images, full.images) and torch.equal(res.targets, full.targets)
    assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history]


def test_resume_rejects_other_config(tmp_path):
    x, g = _data(), _target()
    KRRSTDistiller(x, g, KRRSTConfig(**{**TINY, "steps": 2})).fit(out_dir=str(tmp_path))
    other = KRRSTDistiller(x, g, KRRSTConfig(**{**TINY, "steps": 4, "seed": 3}))
    with pytest.raises(ValueError, match="seed"):
        other.fit(out_dir=str(tmp_path), resume=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(config=KRRSTConfig(**{**TINY, "m": 1000})), "m: 1000 synthetic"),
        (dict(train_targets=torch.zeros(5, 3, dtype=torch.float64)), r"train_targets: expected g_φ\(X_t\) of shape \[90"),
        (dict(train_targets=torch.full((90, 3), float("nan"), dtype=torch.float64)), "non-finite"),
        (dict(target=None), "target: give the target model"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(target=_target(), config=KRRSTConfig(**TINY))
    args.update(kwargs)
    if "train_targets" in kwargs:
        args["target"] = None
    with pytest.raises(ValueError, match=match):
        KRRSTDistiller(_data(), **args)


@pytest.mark.parametrize("field, value", [("m", 0), ("steps", -1), ("init", "zeros"), ("lr", 0.0), ("solve_dtype", "half")])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        KRRSTConfig(**{field: value})


def test_bad_images():
    with pytest.raises(ValueError, match="x_train"):
        KRRSTDistiller(torch.zeros(10, 64), _target())
