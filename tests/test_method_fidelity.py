"""Paper-fidelity options of the method layer: KRR-ST's official-code switches, LD's §4.1 presets and
architecture transfer, EAD's plain-SGD check, choosing on validation data."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller, ModelPool
from ddfast.distill.ld import LDConfig, LabelDistiller, default_epochs, default_inner_batch
from ddfast.evaluate.selection import choose_on_validation
from ddfast.models import MLP, build_model

KRR = dict(m=12, steps=3, batch_size=40, pool_size=3, pool_steps=4, widths=(4, 8))


def _images(n, seed, c=1, side=8):
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class _Recording(nn.Module):
    """g_φ: a fixed linear map that records every batch it sees."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6)).double()
        self.out_dim = 6
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


# ------------------------------------------------------------------ KRR-ST


def test_krr_pool_reset_paper_vs_official():
    pool_args = dict(make_model=lambda: nn.Linear(2, 2).double(), size=1, max_steps=2, lr=0.1, momentum=0.0,
                     weight_decay=0.0)
    xs, ys = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    seen = {}
    for reset in ("paper", "official"):
        pool = ModelPool(**pool_args, generator=torch.Generator().manual_seed(0), reset=reset)
        pool.initialize(xs, ys)
        pool.iterations = [2]
        ts = []
        for _ in range(3):
            pool.update(0, xs, ys)
            ts.append(pool.iterations[0])
        seen[reset] = (ts, pool.resets)
    # paper (Alg. 1 lines 11-15): re-initialise with t_i = 0, then train again; official: t_i stays T and
    # the model is re-initialised on every visit.
    assert seen["paper"] == ([0, 1, 2], 1)
    assert seen["official"] == ([2, 2, 2], 3)
    with pytest.raises(ValueError, match="pool_reset"):
        KRRSTConfig(pool_reset="never")


def test_krr_real_augment_feeds_augmented_batches_to_the_target():
    x = _images(90, 0)
    target = _Recording()
    d = KRRSTDistiller(x, target, KRRSTConfig(**KRR, real_augment=True))
    target.seen.clear()
    d.fit()
    batches = [b for b in target.seen if b.shape[0] == KRR["batch_size"]]
    assert len(batches) == KRR["steps"]  # g_φ evaluated on every (augmented) real batch
    flat = x.flatten(1)
    for b in batches:  # not rows of X_t: crops and flips moved them
        assert (torch.cdist(b.flatten(1), flat).min(1).values > 1e-9).any()
    # default (paper): cached g_φ(X_t), never called during the steps
    target2 = _Recording()
    d2 = KRRSTDistiller(x, target2, KRRSTConfig(**KRR))
    calls = len(target2.seen)
    d2.fit()
    assert len(target2.seen) == calls
    with pytest.raises(ValueError, match="real_augment"):
        KRRSTDistiller(x, None, KRRSTConfig(**KRR, real_augment=True), train_targets=torch.zeros(90, 6).double())


def test_krr_real_augment_resume_is_bit_identical(tmp_path):
    x = _images(90, 0)
    cfg = {**KRR, "steps": 4, "real_augment": True}
    part = KRRSTDistiller(x, _Recording(), KRRSTConfig(**cfg))
    part.config.steps = 2  # stop half way, as a killed run would
    part.fit(out_dir=str(tmp_path), checkpoint_every=1)
    a = KRRSTDistiller(x, _Recording(), KRRSTConfig(**cfg)).fit(out_dir=str(tmp_path), resume=True)
    b = KRRSTDistiller(x, _Recording(), KRRSTConfig(**cfg)).fit()
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


# ------------------------------------------------------------------ LD


def test_ld_section_4_1_presets():
    assert [default_inner_batch(n) for n in (10, 20, 50, 100, 200)] == [10, 10, 25, 50, 50]
    assert default_inner_batch(100, num_classes=100) == 100 and default_inner_batch(100, 10) == 50
    assert default_epochs(100, 10) == 400 and default_epochs(200, 10) == 800 and default_epochs(100, 100) == 800
    assert default_epochs(100, 49) == 100 and default_epochs(200, 49) == 200
    x, y = _images(60, 3), torch.arange(60) % 4
    xv, yv = _images(20, 4), torch.arange(20) % 4
    d = LabelDistiller(_images(101, 5), (x, y), (xv, yv), 4, LDConfig(model="mlp"),
                       make_model=lambda: MLP(1, 4, 8, hidden=(8,)))
    assert d.config.epochs == 800 and d.inner_batch == 50


def test_resnet18_with_ld_64_features():
    net = build_model("resnet18-ld", 1, 10, 8)
    assert net.feature_dim == 64 and net.head.in_features == 64
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert build_model("resnet18", 1, 10, 8, width=4).feature_dim == 32


@pytest.mark.parametrize("variant", ["second_order", "rr"])
def test_ld_architecture_transfer_evaluation(variant):
    x, y = _images(80, 6).float(), torch.arange(80) % 4
    d = LabelDistiller(x[:8], (x, y), (x[:20], y[:20]), 4,
                       LDConfig(variant=variant, model="mlp", epochs=1, outer_batch=40, stats_gap=2),
                       make_model=lambda: MLP(1, 4, 8, hidden=(8,)))
    d.fit()
    out = d.evaluate_architectures(x[:30], y[:30], ["mlp", "convnet"], models=2)
    assert set(out) == {"mlp", "convnet"} and all(len(r.accuracies) == 2 for r in out.values())
    custom = d.evaluate_architectures(x[:30], y[:30], {"wide": lambda: MLP(1, 4, 8, hidden=(32,))}, models=1)
    assert len(custom["wide"].accuracies) == 1


# ------------------------------------------------------------------ EAD, selection


def test_ead_warns_on_momentum_trajectory(tmp_path):
    from ddfast.data.datasets import ImageDataset
    from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
    from ddfast.trajectory import train_trajectory

    x, y = _images(64, 7).float(), torch.arange(64) % 4
    data = ImageDataset("random", x, y, x[:0], y[:0], x[:8], y[:8], 4, 1, 8, (0.0,), (1.0,))
    cfg = EADConfig(ipc=1, iterations=1, t_m=1, probe_batch=8, real_batch=8)
    for momentum, warns in ((0.9, True), (0.0, False)):
        traj = train_trajectory(data, "mlp", tmp_path / f"m{momentum}", epochs=1, every=2, lr=0.1, momentum=momentum,
                                batch_size=32, model_options={"hidden": (8,)}, progress=False)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            EffectAlignmentDistiller(traj, (x, y), cfg)
        assert any("plain SGD" in str(m.message) for m in w) == warns


def test_choose_on_validation_never_scores_test_for_the_choice():
    calls = []
    val = {"a": 70.0, "b": 80.0, "c": 80.0}
    test = {"a": 99.0, "b": 60.0, "c": 50.0}  # "a" would win on test: the choice must not see it

    def score(candidate, split):
        calls.append((candidate, split))
        return val[candidate] if split == "val" else test[candidate]

    sel = choose_on_validation(["a", "b", "c"], score)
    assert sel.chosen == "b" and sel.test_score == 60.0 and sel.val_score == 80.0
    assert [c for c in calls if c[1] == "test"] == [("b", "test")]  # test once, for the chosen only
    assert choose_on_validation(["a", "b"], lambda c, s: val[c], higher_is_better=False).chosen == "a"
    with pytest.raises(ValueError, match="candidates"):
        choose_on_validation([], score)
