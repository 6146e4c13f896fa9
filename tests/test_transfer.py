"""ddfast.evaluate.transfer, ddfast.select and the transfer architectures on tiny digits problems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddfast.data import load_dataset
from ddfast.evaluate.transfer import (
    TransferSettings,
    batch_stat_logits,
    batch_statistics,
    dsa_augment,
    finetune,
    finetune_model,
    format_transfer_table,
    kd_train_student,
    kd_transfer,
    load_pretrained_features,
    pretrain_classification,
    pretrain_regression,
    random_crop_flip,
    target_subset,
    train_teacher,
    transfer_table,
)
from ddfast.models import MODELS, ResNet10, VGG11, build_model
from ddfast.select import kmeans_select, random_select

TINY = dict(widths=(8, 16), pretrain_epochs=15, finetune_steps=20, target_train_size=200, teacher_steps=20,
            kd_epochs=2, kd_batch=64, pretrain_batch=32, finetune_batch=32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks run fastest single-threaded (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16)


@pytest.fixture(scope="module")
def source(digits):
    g = torch.Generator().manual_seed(1)
    x = digits.train_x[:48].clone()
    y = torch.randn(48, 6, generator=g)
    return x, y


@pytest.fixture()
def settings():
    return TransferSettings(**TINY)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- settings


def test_settings_paper_and_errors():
    p = TransferSettings.paper()
    assert (p.pretrain_epochs, p.pretrain_batch, p.pretrain_lr, p.pretrain_wd) == (1000, 256, 0.1, 1e-3)
    assert (p.finetune_steps, p.finetune_batch, p.finetune_lr, p.finetune_wd) == (10_000, 256, 0.01, 5e-4)
    # §4.1: 5,000 fine-tuning steps on the small targets, 10,000 on CIFAR / Tiny-ImageNet
    assert (p.steps_for("flowers"), p.steps_for("CUB2011"), p.steps_for("cifar10")) == (5_000, 5_000, 10_000)
    assert TransferSettings().steps_for("flowers") == TransferSettings().finetune_steps
    assert (p.kd_epochs, p.kd_batch, p.kd_lr, p.crop_padding, p.target_train_size) == (1000, 512, 1e-4, 4, None)
    assert (p.label_pretrain_lr, p.label_pretrain_wd) == (0.01, 5e-4)
    assert TransferSettings.paper(finetune_steps=5000).finetune_steps == 5000
    with pytest.raises(ValueError, match="arch"):
        TransferSettings(arch="transformer")
    with pytest.raises(ValueError, match="teacher_arch"):
        TransferSettings(teacher_arch="nope")
    with pytest.raises(ValueError, match="finetune_batch"):
        TransferSettings(finetune_batch=0)


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", [16, 28, 32])
@pytest.mark.parametrize("name", ["resnet10", "vgg11"])
def test_transfer_architectures_forward(name, size):
    model = build_model(name, 3, 7, size, width=8)
    x = torch.randn(2, 3, size, size)
    h = model.features(x)
    assert h.shape == (2, model.feature_dim)
    assert model(x).shape == (2, 7)
    assert torch.allclose(model(x), model.head(model.features(x)))


def test_resnet10_layout():
    assert {"resnet10", "vgg11", "convnet"} <= set(MODELS)
    net = ResNet10(in_channels=1, num_classes=3, image_size=28, width=4)
    assert len(net.features.layers) == 4 and net.feature_dim == 32
    assert VGG11(in_channels=1, image_size=28, width=4).feature_dim == 32


# ---------------------------------------------------------------------------------------------- pretraining


def test_pretrain_regression_lowers_mse(source, settings):
    x, y = source
    init = pretrain_regression(x, y, settings.replace(pretrain_epochs=0), seed=3)
    trained = pretrain_regression(x, y, settings.replace(pretrain_epochs=40), seed=3)
    assert trained.head.out_features == 6
    with batch_statistics(init, trained), torch.no_grad():
        before, after = F.mse_loss(init(x), y).item(), F.mse_loss(trained(x), y).item()
    assert after < 0.5 * before


def test_pretrain_regression_deterministic(source, settings):
    x, y = source
    a = pretrain_regression(x, y, settings.replace(pretrain_epochs=2), seed=5)
    b = pretrain_regression(x, y, settings.replace(pretrain_epochs=2), seed=5)
    assert _state_equal(a, b)


def test_pretrain_classification_hard_and_soft(digits, settings):
    x, labels = digits.train_x[:40], digits.train_y[:40]
    hard = pretrain_classification(x, labels, 10, settings.replace(pretrain_epochs=2), seed=0)
    soft = pretrain_classification(x, F.one_hot(labels, 10).float(), 10, settings.replace(pretrain_epochs=2), seed=0)
    assert hard.head.out_features == soft.head.out_features == 10


def test_pretrain_errors(source, settings):
    x, y = source
    with pytest.raises(ValueError, match="x_s"):
        pretrain_regression(x[:0], y[:0], settings)
    with pytest.raises(ValueError, match="y_s.*m=48"):
        pretrain_regression(x, y[:10], settings)
    bad = y.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="y_s.*finite"):
        pretrain_regression(x, bad, settings)
    with pytest.raises(ValueError, match="x_s.*\\[m, c, h, w\\]"):
        pretrain_regression(x[:, 0], y, settings)
    with pytest.raises(ValueError, match="labels"):
        pretrain_classification(x, torch.full((48,), 12), 10, settings)
    with pytest.raises(ValueError, match="arch"):
        s = settings.replace()
        s.arch = "nope"
        pretrain_regression(x, y, s)


# ---------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_copies_trunk_and_scores(digits, source, settings):
    x, y = source
    pre = pretrain_regression(x, y, settings, seed=0)
    fresh = finetune_model(pre, digits, settings.replace(finetune_steps=0), seed=1)
    assert _state_equal(fresh.features, pre.features)  # weights and BN buffers copied
    assert fresh.head.out_features == digits.num_classes
    acc_pre = finetune(pre, digits, settings, seed=0)
    acc_none = finetune(None, digits, settings, seed=0)
    assert 0.0 <= acc_pre <= 100.0 and 0.0 <= acc_none <= 100.0
    assert acc_none > 20.0  # learns something in 20 steps


def test_load_pretrained_features_helper(source, settings):
    x, y = source
    pre = pretrain_regression(x, y, settings.replace(pretrain_epochs=1), seed=0)
    model = build_model("convnet", 1, 10, 16, widths=(8, 16))
    assert not torch.equal(model.features[0].weight, pre.features[0].weight)
    load_pretrained_features(model, pre)
    assert torch.equal(model.features[0].weight, pre.features[0].weight)
    with pytest.raises(ValueError, match="pretrained"):
        load_pretrained_features(build_model("convnet", 1, 10, 16, widths=(4, 16)), pre)


def test_finetune_shape_mismatch(source, settings):
    x, y = source
    pre = pretrain_regression(x, y, settings.replace(pretrain_epochs=0), seed=0)
    small = load_dataset("digits", image_size=8)
    with pytest.raises(ValueError, match=r"\[1, 16, 16\].*\[1, 8, 8\]"):
        finetune(pre, small, settings)


def test_target_subset_balanced(digits):
    x, y = target_subset(digits, 105, seed=0)
    counts = torch.bincount(y, minlength=10)
    assert len(y) == 105 and counts.max() - counts.min() <= 1
    x2, y2 = target_subset(digits, 105, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(target_subset(digits, None)[1]) == len(digits.train_y)


def test_random_crop_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(random_crop_flip(x, g, padding=0, flip=False), x)
    out = random_crop_flip(x, g, padding=2, flip=False, fill=torch.tensor([-1.0, -2.0, -3.0]))
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    padded[:, :, :2] = padded[:, :, -2:] = padded[:, :, :, :2] = padded[:, :, :, -2:] = 0
    padded = padded + (F.pad(torch.zeros(1, 1, 6, 6), (2,) * 4, value=1.0) * torch.tensor([-1.0, -2, -3]).view(1, 3, 1, 1))
    for b in range(2):  # every output is one 6×6 window of the padded image
        windows = [padded[b, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    flipped = random_crop_flip(x.repeat(32, 1, 1, 1), g, padding=0, flip=True)
    is_flip = [torch.equal(f, x[i % 2].flip(2)) for i, f in enumerate(flipped)]
    assert 0 < sum(is_flip) < 64


def test_dsa_augment_shapes_and_determinism():
    x = torch.randn(5, 3, 16, 16)
    for seed in range(12):
        a = dsa_augment(x, torch.Generator().manual_seed(seed))
        b = dsa_augment(x, torch.Generator().manual_seed(seed))
        assert a.shape == x.shape and torch.equal(a, b) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="families"):
        dsa_augment(x, torch.Generator(), families=("blur",))


# ---------------------------------------------------------------------------------------------- KD


def test_batch_stat_logits_depend_on_batch():
    model = build_model("convnet", 1, 10, 16, widths=(8, 16))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = torch.randn(4, 1, 16, 16)
    with_noise = batch_stat_logits(model, torch.cat([a, torch.randn(4, 1, 16, 16) * 5]), batch_size=8)[:4]
    alone = batch_stat_logits(model, a, batch_size=8)
    assert not torch.allclose(with_noise, alone, atol=1e-4)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_kd_transfer_runs(digits, source, settings):
    x, y = source
    teacher = train_teacher(digits, settings, seed=0)
    buffers = {k: v.clone() for k, v in teacher.state_dict().items()}
    pre = pretrain_regression(x, y, settings, seed=0)
    acc = kd_transfer(pre, x, teacher, digits, settings, seed=0)
    acc_gauss = kd_transfer(None, x, teacher, digits, settings, seed=0, gaussian=True)
    assert 0.0 <= acc <= 100.0 and 0.0 <= acc_gauss <= 100.0
    assert all(torch.equal(buffers[k], v) for k, v in teacher.state_dict().items())
    student = kd_train_student(pre, x, teacher, digits, settings.replace(kd_epochs=0), seed=0)
    assert _state_equal(student.features, pre.features)
    with pytest.raises(ValueError, match="surrogate_x"):
        kd_transfer(pre, x[:, :, :8, :8], teacher, digits, settings)


# ---------------------------------------------------------------------------------------------- selection


def test_kmeans_select_nearest_to_centroid():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.0, 0.0], [0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])
    points = (centres[:, None] + offsets[None]).reshape(-1, 2)  # the first of each 5 is its cluster's mean
    idx = kmeans_select(points, 3, seed=0)
    assert sorted(idx.tolist()) == [0, 5, 10]


def test_kmeans_select_distinct_deterministic():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    a, b = kmeans_select(x, 40, seed=2), kmeans_select(x, 40, seed=2)
    assert torch.equal(a, b) and a.dtype == torch.long and len(a.unique()) == 40
    assert a.min() >= 0 and a.max() < 300
    dup = torch.zeros(10, 3)  # all examples identical: still m distinct indices
    assert len(kmeans_select(dup, 4, seed=0).unique()) == 4
    assert len(kmeans_select(x[:20], 20, seed=0).unique()) == 20


def test_select_errors_and_random():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="m"):
        kmeans_select(x, 11, seed=0)
    with pytest.raises(ValueError, match="m"):
        kmeans_select(x, 0, seed=0)
    with pytest.raises(ValueError, match="m"):
        random_select(5, 6)
    r = random_select(100, 10, seed=3)
    assert len(r.unique()) == 10 and torch.equal(r, random_select(100, 10, seed=3))


# ---------------------------------------------------------------------------------------------- tables


def test_transfer_table_and_format(digits, source, settings):
    x, y = source
    small = settings.replace(pretrain_epochs=2, finetune_steps=3)
    calls = []

    def krr(seed):
        calls.append(seed)
        return pretrain_regression(x, y, small, seed)

    results = transfer_table({"w/o pre": lambda seed: None, "KRR-ST": krr}, {"digits": digits}, small, runs=2,
                             progress=False)
    assert calls == [0, 1]
    assert set(results) == {"w/o pre", "KRR-ST"} and set(results["KRR-ST"]) == {"digits"}
    mean, std = results["KRR-ST"]["digits"]
    assert 0.0 <= mean <= 100.0 and std >= 0.0
    text = format_transfer_table(results)
    lines = text.splitlines()
    assert "digits" in lines[0] and lines[2].startswith("w/o pre") and lines[3].startswith("KRR-ST")
    assert f"{mean:.2f}±{std:.2f}" in text
    with pytest.raises(ValueError, match="runs"):
        transfer_table({"a": lambda s: None}, {"digits": digits}, small, runs=0)


def test_linear_eval_trains_only_a_head_on_frozen_features():
    from ddfast.evaluate.transfer import linear_eval

    ds = load_dataset("digits", image_size=16)
    settings = TransferSettings(widths=(8, 16), pretrain_epochs=2, linear_steps=30, protocol="linear")
    x = ds.train_x[:40]
    pre = pretrain_regression(x, torch.randn(40, 6), settings, seed=0)
    before = {k: v.clone() for k, v in pre.state_dict().items()}
    acc = linear_eval(pre, ds, settings, seed=0)
    assert 0.0 <= acc <= 100.0 and acc > 100.0 / ds.num_classes  # better than chance on digits
    for k, v in pre.state_dict().items():  # the pre-trained network is not modified
        assert torch.equal(v, before[k])
    assert linear_eval(pre, ds, settings, seed=0) == acc  # deterministic
    with pytest.raises(ValueError, match="protocol"):
        TransferSettings(protocol="probe")
