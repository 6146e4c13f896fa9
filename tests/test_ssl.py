"""Barlow Twins target model g_φ (krr-st-selfsup §4.1): loss, augmentations, training, checkpoints, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddfast.data import COLOUR_MEAN, COLOUR_STD, GREY_MEAN, GREY_STD, load_dataset
from ddfast.ssl import (
    TargetModel,
    barlow_twins_loss,
    build_encoder,
    build_projector,
    encode,
    load_target,
    make_ssl_augment,
    train_barlow_twins,
)

TINY = dict(widths=(8, 16), projector=(32, 32), batch_size=64, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _loss_by_hand(z1: np.ndarray, z2: np.ndarray, lam: float, eps: float = 1e-5) -> float:
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)
    b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total += (1.0 - c) ** 2 if i == j else lam * c**2
    return total


# ---------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("lam", [0.0, 5.1e-3, 0.3])
def test_loss_matches_float64_hand_computation(lam):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    got = barlow_twins_loss(z1, z2, lam)
    assert got.dtype == torch.float64
    assert math.isclose(float(got), _loss_by_hand(z1.numpy(), z2.numpy(), lam), rel_tol=1e-12)
    got32 = barlow_twins_loss(z1.float(), z2.float(), lam)
    assert math.isclose(float(got32), float(got), rel_tol=1e-5)


def test_identical_views_without_redundancy_term_give_zero():
    z = torch.randn(128, 16, dtype=torch.float64)
    assert float(barlow_twins_loss(z, z, lambda_offdiag=0.0)) < 1e-8
    assert float(barlow_twins_loss(z, z)) > 0.0  # off-diagonal correlations of random features remain


def test_loss_is_invariant_to_affine_rescaling_of_features():
    z1, z2 = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    scale, shift = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    a = barlow_twins_loss(z1, z2, eps=0.0)
    b = barlow_twins_loss(z1 * scale + shift, z2, eps=0.0)
    assert torch.allclose(a, b, rtol=1e-10)


def test_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="z1, z2"):
        barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        barlow_twins_loss(torch.randn(1, 3), torch.randn(1, 3))


# ---------------------------------------------------------------------------------------------- augment


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_shape_dtype_determinism(channels):
    mean, std = (GREY_MEAN, GREY_STD) if channels == 1 else (COLOUR_MEAN, COLOUR_STD)
    aug = make_ssl_augment(channels, mean, std)
    x = torch.randn(16, channels, 16, 16)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)
    g = torch.Generator().manual_seed(3)
    v1, v2 = aug(x, g), aug(x, g)
    assert not torch.allclose(v1, v2)  # two views of one batch differ


def test_augment_stays_in_pixel_range():
    mean, std = COLOUR_MEAN, COLOUR_STD
    aug = make_ssl_augment(3, mean, std)
    pixels = torch.rand(32, 3, 16, 16)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out = aug((pixels - m) / s, torch.Generator().manual_seed(0)) * s + m
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5


def test_augment_identity_when_everything_is_off():
    aug = make_ssl_augment(3, COLOUR_MEAN, COLOUR_STD, crop_scale=(1.0, 1.0), flip=False, jitter=False, affine=False)
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(aug(x, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_augment_greyscale_default_does_not_flip():
    # With everything but the flip switched off, a greyscale view equals its input.
    aug = make_ssl_augment(1, GREY_MEAN, GREY_STD, crop_scale=(1.0, 1.0), affine=False)
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(aug(x, torch.Generator().manual_seed(0)), x, atol=1e-5)
    flip = make_ssl_augment(1, GREY_MEAN, GREY_STD, crop_scale=(1.0, 1.0), affine=False, flip=True)
    out = flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x)]
    kept = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_augment_rejects_bad_input():
    aug = make_ssl_augment(1, GREY_MEAN, GREY_STD)
    with pytest.raises(ValueError, match="x"):
        aug(torch.randn(2, 3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="jitter"):
        make_ssl_augment(1, GREY_MEAN, GREY_STD, jitter=True)
    with pytest.raises(ValueError, match="crop_scale"):
        make_ssl_augment(3, COLOUR_MEAN, COLOUR_STD, crop_scale=(0.0, 1.0))


# ---------------------------------------------------------------------------------------------- networks


def test_encoders_and_projector_shapes():
    conv = build_encoder("convnet", 1, 16, widths=(8, 16, 24))
    assert conv.out_dim == 24 and conv(torch.randn(3, 1, 16, 16)).shape == (3, 24)
    res = build_encoder("resnet18", 3, 8, width=4)
    assert res.out_dim == 32 and res(torch.randn(2, 3, 8, 8)).shape == (2, 32)
    proj = build_projector(24, (32, 32, 16))
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert proj(torch.randn(5, 24)).shape == (5, 16)
    with pytest.raises(ValueError, match="arch"):
        build_encoder("vit", 1, 16)


# ---------------------------------------------------------------------------------------------- training


def test_few_steps_lower_the_loss(digits):
    target = train_barlow_twins(digits, epochs=4, lr=3e-3, max_train=256, **TINY)
    history = target.meta["loss_history"]
    assert len(history) == 4 and all(math.isfinite(v) for v in history)
    assert history[-1] < history[0]
    assert isinstance(target, TargetModel) and target.out_dim == 16
    y = encode(target, digits.test_x)
    assert y.shape == (len(digits.test_y), 16) and y.dtype == torch.float32
    assert not target.training
    target.train()
    assert not target.training and not target.encoder.training


def test_save_load_round_trip(digits, tmp_path):
    target = train_barlow_twins(digits, epochs=1, max_train=128, out=tmp_path, **TINY)
    assert (tmp_path / "target.safetensors").is_file() and (tmp_path / "target.json").is_file()
    loaded = load_target(tmp_path)
    again = load_target(tmp_path / "target.safetensors")
    x = digits.test_x[:50]
    assert torch.equal(encode(target, x), encode(loaded, x))
    assert torch.equal(encode(loaded, x), encode(again, x))
    assert torch.allclose(encode(loaded, x, batch_size=7), encode(loaded, x), rtol=1e-5, atol=1e-6)
    meta = loaded.meta
    assert meta["arch"] == "convnet" and meta["widths"] == [8, 16] and meta["out_dim"] == 16
    assert meta["dataset"] == "digits" and meta["in_channels"] == 1 and meta["image_size"] == 8
    assert meta["epochs"] == 1 and math.isclose(meta["final_loss"], target.meta["final_loss"])
    assert (loaded.out_dim, loaded.in_channels, loaded.image_size) == (16, 1, 8)


def test_resnet18_target_round_trip(digits, tmp_path):
    target = train_barlow_twins(digits, arch="resnet18", width=4, epochs=1, max_train=128, out=tmp_path,
                                projector=(32, 32), batch_size=64, progress=False)
    assert target.out_dim == 32 and target.meta["width"] == 4 and target.meta["widths"] is None
    loaded = load_target(tmp_path)
    x = digits.test_x[:16]
    assert torch.equal(encode(target, x), encode(loaded, x))


def test_resume_is_bit_identical(digits, tmp_path):
    cfg = dict(epochs=2, max_train=192, seed=5, **TINY)
    fresh = train_barlow_twins(digits, out=tmp_path / "fresh", **cfg)

    def interrupt(epoch, loss):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_barlow_twins(digits, out=tmp_path / "killed", on_epoch_end=interrupt, **cfg)
    assert not (tmp_path / "killed" / "target.safetensors").exists()
    resumed = train_barlow_twins(digits, out=tmp_path / "killed", **cfg)
    for (name, a), (_, b) in zip(fresh.encoder.state_dict().items(), resumed.encoder.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh.meta["loss_history"] == resumed.meta["loss_history"]
    # A finished run with more epochs requested continues from its checkpoint.
    longer = train_barlow_twins(digits, out=tmp_path / "fresh", **{**cfg, "epochs": 3})
    assert longer.meta["epochs"] == 3 and longer.meta["loss_history"][:2] == fresh.meta["loss_history"]
    with pytest.raises(ValueError, match="seed"):
        train_barlow_twins(digits, out=tmp_path / "fresh", **{**cfg, "seed": 6})


def test_training_is_deterministic_under_a_seed(digits):
    a = train_barlow_twins(digits, epochs=1, max_train=128, seed=1, **TINY)
    b = train_barlow_twins(digits, epochs=1, max_train=128, seed=1, **TINY)
    c = train_barlow_twins(digits, epochs=1, max_train=128, seed=2, **TINY)
    x = digits.test_x[:20]
    assert torch.equal(encode(a, x), encode(b, x))
    assert not torch.equal(encode(a, x), encode(c, x))


def test_bad_arguments(digits):
    with pytest.raises(ValueError, match="epochs"):
        train_barlow_twins(digits, epochs=0, **TINY)
    with pytest.raises(ValueError, match="batch_size"):
        train_barlow_twins(digits, epochs=1, **{**TINY, "batch_size": 1})
    with pytest.raises(ValueError, match="batch_size"):
        train_barlow_twins(digits, epochs=1, max_train=32, **TINY)
    with pytest.raises(ValueError, match="arch"):
        train_barlow_twins(digits, epochs=1, arch="vgg", **TINY)


def test_load_target_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ddfast ssl"):
        load_target(tmp_path / "nowhere")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_target(bad)
    from ddfast.artifacts import save_state

    other = tmp_path / "other.safetensors"
    save_state(str(other), {"weights": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a Barlow Twins target"):
        load_target(other)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_trains_one_epoch(tmp_path, capsys):
    from ddfast.cli import main

    out = tmp_path / "target"
    rc = main(["ssl", "--dataset", "digits", "--epochs", "1", "--out", str(out), "--widths", "8", "16",
               "--projector", "32", "32", "--batch-size", "64", "--max-train", "256", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "final loss" in printed and "target.safetensors" in printed
    target = load_target(out)
    assert target.meta["epochs"] == 1 and target.out_dim == 16
    # the default resolution is the one `ddfast distill krr-st --dataset digits` uses, so the two commands chain
    from ddfast.experiments.krr_st import PRESETS

    assert target.image_size == PRESETS["digits"]["image_size"]
