"""HL / SL / SL+KD evaluation regimes (soft-labels-hard-truths supp. §2, Table 1) on the real digits set."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddfast.data import load_dataset
from ddfast.data.datasets import balanced_subset
from ddfast.evaluate.regimes import REGIMES, RegimeResult, RegimeSettings, cutmix, evaluate, kd_kl_loss
from ddfast.evaluate.train import accuracy
from ddfast.models import build_model

SMALL = {"widths": (8, 16), "norm": "instance"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def subset(digits):
    """A class-balanced 10-per-class subset of the digits training split (N = 100)."""
    idx = balanced_subset(digits.train_y, 10, seed=0)
    return digits.train_x[idx], digits.train_y[idx]


@pytest.fixture(scope="module")
def tiny(digits):
    """Two images per class (N = 20)."""
    idx = balanced_subset(digits.train_y, 2, seed=1)
    return digits.train_x[idx], digits.train_y[idx]


@pytest.fixture(scope="module")
def teacher(digits):
    """A ConvNet trained on the whole digits training split for 10 epochs (≈ 97% test accuracy)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("convnet", 1, 10, 8, widths=(16, 32), norm="instance")
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(10):
            for b in torch.randperm(len(digits.train_y), generator=gen).split(64):
                loss = F.cross_entropy(model(digits.train_x[b]), digits.train_y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    assert accuracy(model, digits.test_x, digits.test_y) > 90.0
    return model


class _Recorder:
    """Forward hook on the teacher: its inputs, train flag and grad mode at every call."""

    def __init__(self, module):
        self.inputs, self.training, self.grad = [], [], []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.inputs.append(args[0].detach().clone())
        self.training.append(module.training)
        self.grad.append(torch.is_grad_enabled())

    def remove(self):
        self.handle.remove()


# --------------------------------------------------------------------------------------------------
# Loss and CutMix
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 20.0])
def test_kd_kl_loss_matches_hand_computation(T):
    s = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.2, 4.0, -1.5], [-3.0, 2.0, 10.0]], dtype=torch.float64)
    total = 0.0
    for b in range(2):
        zs = [math.exp(v / T) for v in s[b].tolist()]
        zt = [math.exp(v / T) for v in t[b].tolist()]
        q = [z / sum(zs) for z in zs]
        p = [z / sum(zt) for z in zt]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    expected = total / 2 * T * T
    got = kd_kl_loss(s, t, T)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert kd_kl_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_kl_loss_shape_mismatch_names_argument():
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4), 20.0)


def test_cutmix_pastes_one_box_from_the_batch():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    gen = torch.Generator().manual_seed(3)
    out = cutmix(x, gen)
    assert out.shape == x.shape
    for b in range(4):
        assert len(out[b].unique()) <= 2  # its own pixels and one pasted box from another image
    assert any(not torch.equal(cutmix(x, torch.Generator().manual_seed(s)), x) for s in range(5))
    assert torch.equal(cutmix(x, torch.Generator().manual_seed(5)), cutmix(x, torch.Generator().manual_seed(5)))


# --------------------------------------------------------------------------------------------------
# Runs and reports
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("regime", REGIMES)
def test_each_regime_runs_and_reports(regime, digits, tiny, teacher):
    x, y = tiny
    settings = RegimeSettings(cutmix=regime == "sl+kd")
    res = evaluate(x, y, regime, teacher=teacher, data=digits, model_options=SMALL, budget=3, models=2,
                   settings=settings)
    assert isinstance(res, RegimeResult) and res.regime == regime
    assert len(res.accuracies) == 2 and all(0.0 <= a <= 100.0 for a in res.accuracies)
    assert (res.epochs, res.num_images, res.batch_size, res.steps, res.compute) == (3, 20, 20, 3, 60)
    assert str(res) == f"{res.mean:.2f} ± {res.std:.2f}"


def test_steps_follow_batches_per_epoch(digits, subset):
    x, y = subset
    res = evaluate(x, y, "hl", data=digits, arch="mlp", budget=2, models=1, settings=RegimeSettings(batch_size=32))
    assert (res.steps, res.batch_size, res.compute) == (2 * 4, 32, 200)


@pytest.mark.parametrize("regime", REGIMES)
def test_deterministic_given_seed(regime, digits, tiny, teacher):
    x, y = tiny
    kw = dict(teacher=teacher, data=digits, model_options=SMALL, budget=4, models=2, seed=7)
    a = evaluate(x, y, regime, **kw)
    torch.manual_seed(123)  # the global RNG does not matter
    b = evaluate(x, y, regime, **kw)
    assert a.accuracies == b.accuracies


def test_hl_beats_chance(digits, subset):
    x, y = subset
    res = evaluate(x, y, "hl", data=digits, model_options=SMALL, budget=150, models=2)
    assert res.mean > 60.0  # chance is 10%; observed ≈ 80–86%


def test_sl_with_teacher_learns(digits, subset, teacher):
    x, y = subset
    res = evaluate(x, y, "sl", teacher=teacher, data=digits, model_options=SMALL, budget=300, models=2)
    assert res.mean > 60.0  # observed ≈ 83–87%


def test_sl_labels_computed_once_on_clean_images(digits, tiny, teacher):
    x, y = tiny
    rec = _Recorder(teacher)
    try:
        res = evaluate(x, y, "sl", teacher=teacher, data=digits, model_options=SMALL, budget=5, models=2)
    finally:
        rec.remove()
    full = [inp for inp in rec.inputs if inp.shape[0] == x.shape[0]]
    assert len(full) == 1 and torch.equal(full[0], x)  # once, un-augmented, not per model or per step
    assert not any(rec.training) and not any(rec.grad)
    # teacher logits passed as labels give the same students
    with torch.no_grad():
        logits = teacher(x)
    same = evaluate(x, logits, "sl", data=digits, model_options=SMALL, budget=5, models=2)
    assert same.accuracies == res.accuracies


def test_sl_kd_relabels_every_augmented_view(digits, tiny, teacher):
    x, y = tiny
    teacher.train()
    rec = _Recorder(teacher)
    try:
        res = evaluate(x, None, "sl+kd", teacher=teacher, data=digits, model_options=SMALL, budget=6, models=2,
                       settings=RegimeSettings(cutmix=True, batch_size=8))
    finally:
        rec.remove()
        train_flag = teacher.training
        teacher.eval()
    assert train_flag  # the caller's mode is restored
    views = [inp for inp in rec.inputs if inp.shape[0] > 1]
    assert res.steps == 6 * 3 and len(views) == 2 * res.steps  # one teacher call per step per model
    assert not any(rec.training) and not any(rec.grad)
    # the teacher sees augmented views, not the stored images
    flat = x.flatten(1)
    changed = sum(int((torch.cdist(v.flatten(1), flat).min(dim=1).values > 1e-6).any()) for v in views)
    assert changed == len(views)


def test_sl_kd_defaults_are_table_1_rrc_flip_cutmix(digits, tiny, teacher, monkeypatch):
    # Table 1, SL+KD: RandomResizedCrop + HFlip + CutMix by default; HL / SL: DSA, no CutMix.
    import ddfast.evaluate.regimes as regimes

    calls = {"rrc": 0, "cutmix": 0, "dsa": 0, "crop_flip": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(regimes, "random_resized_crop", counting("rrc", regimes.random_resized_crop))
    monkeypatch.setattr(regimes, "cutmix", counting("cutmix", regimes.cutmix))
    monkeypatch.setattr(regimes, "dsa_augment", counting("dsa", regimes.dsa_augment))
    monkeypatch.setattr(regimes, "random_crop_flip", counting("crop_flip", regimes.random_crop_flip))
    x, y = tiny
    res = evaluate(x, None, "sl+kd", teacher=teacher, data=digits, arch="mlp", budget=2, models=1,
                   settings=RegimeSettings(batch_size=10))
    assert calls == {"rrc": res.steps, "cutmix": res.steps, "dsa": 0, "crop_flip": 0}
    calls.update(rrc=0, cutmix=0)
    res = evaluate(x, y, "hl", data=digits, arch="mlp", budget=2, models=1, settings=RegimeSettings(batch_size=10))
    assert calls == {"rrc": 0, "cutmix": 0, "dsa": res.steps, "crop_flip": 0}


def test_settings_knobs_run(digits, tiny, teacher):
    x, y = tiny
    settings = RegimeSettings(augment="none", warmup_epochs=1, temperature=4.0)
    res = evaluate(x, y, "sl", teacher=teacher, data=digits, arch="mlp", budget=3, models=1, settings=settings)
    assert len(res.accuracies) == 1
    res = evaluate(x, y, "hl", data=digits, arch="mlp", models=1, settings=RegimeSettings(epochs=2, augment="crop_flip"))
    assert res.epochs == 2


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_errors(digits, tiny, teacher):
    x, y = tiny
    kw = dict(data=digits, model_options=SMALL, budget=1, models=1)
    with pytest.raises(ValueError, match=r"regime.*'hl', 'sl', 'sl\+kd'"):
        evaluate(x, y, "soft", **kw)
    wrong = build_model("mlp", 1, 7, 8)
    with pytest.raises(ValueError, match="teacher"):
        evaluate(x, y, "sl", teacher=wrong, **kw)
    with pytest.raises(ValueError, match="teacher"):
        evaluate(x, y, "sl", **kw)
    with pytest.raises(ValueError, match="teacher"):
        evaluate(x, y, "sl+kd", **kw)
    with pytest.raises(ValueError, match="images"):
        evaluate((x * 255).to(torch.uint8), y, "hl", **kw)
    with pytest.raises(ValueError, match="images"):
        evaluate(x[:, 0], y, "hl", **kw)
    with pytest.raises(ValueError, match="images"):
        evaluate(F.pad(x, (0, 2, 0, 2)), y, "hl", **kw)
    with pytest.raises(ValueError, match="images"):
        evaluate(x.expand(-1, 3, -1, -1), y, "hl", **kw)
    with pytest.raises(ValueError, match="images"):
        evaluate(x[:0], y[:0], "hl", **kw)
    with pytest.raises(ValueError, match="labels"):
        evaluate(x, y[:-1], "hl", **kw)
    with pytest.raises(ValueError, match="labels"):
        evaluate(x, y.float(), "hl", **kw)
    with pytest.raises(ValueError, match="labels"):
        evaluate(x, torch.zeros(len(y), 5), "sl", **kw)
    with pytest.raises(ValueError, match="labels"):
        evaluate(x, y + 10, "hl", **kw)
    with pytest.raises(ValueError, match="data"):
        evaluate(x, y, "hl", data=None, budget=1, models=1)
    with pytest.raises(ValueError, match="budget"):
        evaluate(x, y, "hl", data=digits, budget=0, models=1)
    with pytest.raises(ValueError, match="models"):
        evaluate(x, y, "hl", data=digits, budget=1, models=0)
    with pytest.raises(ValueError, match="cutmix"):
        evaluate(x, y, "hl", settings=RegimeSettings(cutmix=True), **kw)
    with pytest.raises(ValueError, match="augment"):
        RegimeSettings(augment="rrc")
