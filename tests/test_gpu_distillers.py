"""One short run of each distiller on the device, fused backends vs the reference on the same device:
LD (second order), LD-RR, KRR-ST and EAD; then one short run of every method and evaluation regime with
its default model factory (LD/LD-RR with a resume and a CPU test set, KRR-ST with a target model and real
augmentation, EAD on a stored trajectory, DM, DC, TM, DATM, SRe2L, DWA, and the HL / SL / SL+KD regimes),
outputs checked to live on the device. Skipped without CUDA; DDFAST_GPU_TESTS_ON_CPU=1 runs them on CPU
tensors as a dry run. Data: the digits set (scikit-learn, always installed) and random tensors."""

from __future__ import annotations

import pytest
import torch

from ddfast.benchmarks.e2e import MemoryTrajectory
from ddfast.data import load_dataset
from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller
from ddfast.distill.ld import LDConfig, LabelDistiller
from ddfast.models import build_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("variant", ["second_order", "rr"])
def test_ld_fused_equals_reference_on_device(gpu_device, digits, variant):
    idx = torch.cat([torch.nonzero(digits.train_y == c).flatten()[:1] for c in range(10)])
    x, y = digits.train_x.to(gpu_device), digits.train_y.to(gpu_device)
    runs = {}
    for backend in ("reference", "fused"):
        cfg = LDConfig(variant=variant, model="mlp", outer_batch=128, epochs=1, val_every=1, backend=backend)
        ld = LabelDistiller(x[idx.to(gpu_device)], (x[:400], y[:400]), (digits.val_x.to(gpu_device),
                            digits.val_y.to(gpu_device)), 10, cfg,
                            make_model=lambda: build_model("mlp", 1, 10, 8).to(gpu_device))
        for _ in range(4):
            ld.step(x[:128], y[:128])
        assert ld.labels.device.type == gpu_device.type
        runs[backend] = ld.labels.detach().clone()
    # float32 on both sides; the fused path's GPU kernels round differently (contract.TOLERANCES_CUDA).
    atol = 2e-5 if gpu_device.type == "cpu" else 1e-4
    torch.testing.assert_close(runs["fused"], runs["reference"], rtol=0, atol=atol)


def test_krr_st_fused_equals_reference_on_device(gpu_device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, 1, 8, 8, generator=g, dtype=torch.float64).to(gpu_device)
    t = torch.randn(90, 6, generator=g, dtype=torch.float64).to(gpu_device)
    runs = {}
    for backend in ("reference", "fused"):
        cfg = KRRSTConfig(m=12, steps=4, batch_size=40, pool_size=3, pool_steps=4, widths=(4, 8), backend=backend)
        d = KRRSTDistiller(x, train_targets=t, config=cfg,
                           make_model=lambda: build_model("convnet", 1, 6, 8, widths=(4, 8), norm="batch").to(gpu_device))
        runs[backend] = d.fit()
    a, b = runs["reference"], runs["fused"]
    assert a.images.device.type == gpu_device.type
    torch.testing.assert_close(a.images, b.images, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(a.targets, b.targets, rtol=1e-9, atol=1e-11)


def test_ead_fused_equals_reference_on_device(gpu_device, digits):
    x, y = digits.train_x.double().to(gpu_device), digits.train_y.to(gpu_device)
    make = lambda: build_model("convnet", 1, 10, 8, widths=(6, 8), norm="instance").double().to(gpu_device)  # noqa: E731
    out = {}
    for backend in ("reference", "auto"):
        traj = MemoryTrajectory(make, 4)
        d = EffectAlignmentDistiller(traj, (x, y), EADConfig(ipc=2, iterations=3, t_m=2, probe_batch=32, real_batch=32,
                                                             backend=backend))
        out[backend] = d.fit()
    a, b = out["reference"], out["auto"]
    assert a.images.device.type == gpu_device.type
    torch.testing.assert_close(a.images, b.images, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(a.soft_labels, b.soft_labels, atol=1e-9, rtol=1e-7)


# ------------------------------------------------------------------ every method and regime on the device
# One short run each with the default model factories (built on the CPU RNG, then moved to the data's
# device), the outputs checked to live on the device and to be finite.


def _on(device, *tensors):
    for t in tensors:
        assert t.device.type == device.type, f"expected a tensor on {device}, got {t.device}"
        assert not t.is_floating_point() or bool(torch.isfinite(t).all())


def _digits_on(digits, device):
    import dataclasses

    fields = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    return dataclasses.replace(digits, **{f: getattr(digits, f).to(device) for f in fields})


@pytest.fixture(scope="module")
def expert(digits, tmp_path_factory):
    """A digits trajectory trained on the device (MLP, 3 checkpoints) and the device copy of the data."""
    from ddfast.trajectory import train_trajectory

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    data = _digits_on(digits, device)
    out = str(tmp_path_factory.mktemp("expert"))
    traj = train_trajectory(data, "mlp", out, epochs=2, every=10, lr=0.1, momentum=0.0, batch_size=128,
                            model_options={"hidden": [32]}, progress=False)
    return traj, data


def test_ld_default_model_fit_resume_and_evaluate_on_device(gpu_device, digits, tmp_path):
    data = _digits_on(digits, gpu_device)
    idx = torch.cat([torch.nonzero(digits.train_y == c).flatten()[:1] for c in range(10)]).to(gpu_device)
    args = (data.train_x[idx], (data.train_x[:256], data.train_y[:256]), (data.val_x, data.val_y), 10)
    for variant in ("second_order", "rr"):
        cfg = LDConfig(variant=variant, model="mlp", outer_batch=128, epochs=1, val_every=1)
        LabelDistiller(*args, cfg).fit(out_dir=str(tmp_path / variant))
        ld = LabelDistiller(*args, LDConfig(**{**cfg.__dict__, "epochs": 2}))
        res = ld.fit(out_dir=str(tmp_path / variant), resume=True)  # CPU checkpoint back onto the device
        _on(gpu_device, ld.labels, ld.best_labels, res.soft_labels)
        assert len(ld.evaluate(digits.test_x, digits.test_y, models=1).accuracies) == 1  # CPU test set


def test_krr_st_default_model_with_target_on_device(gpu_device, digits):
    target = build_model("mlp", 1, 6, 8).to(gpu_device)
    x = digits.train_x[:120].to(gpu_device)
    for init in ("target", "gaussian"):
        cfg = KRRSTConfig(m=10, steps=3, batch_size=32, pool_size=2, pool_steps=2, widths=(4, 8), init=init,
                          real_augment=True)
        res = KRRSTDistiller(x, target, cfg).fit()
        _on(gpu_device, res.images, res.targets)


def test_ead_on_a_stored_trajectory_on_device(gpu_device, expert):
    traj, data = expert
    if gpu_device.type != data.train_x.device.type:
        pytest.skip("the expert fixture follows CUDA availability")
    res = EffectAlignmentDistiller(traj, (data.train_x, data.train_y),
                                   EADConfig(ipc=2, iterations=2, t_m=2, probe_batch=32, real_batch=32)).fit()
    _on(gpu_device, res.images, res.soft_labels)


@pytest.mark.parametrize("init", ["real", "noise"])
def test_dm_dc_on_device(gpu_device, digits, init):
    from ddfast.distill.dc import DCConfig, DCDistiller
    from ddfast.distill.dm import DMConfig, DMDistiller

    x, y = digits.train_x.to(gpu_device), digits.train_y.to(gpu_device)
    res = DMDistiller((x, y), 10, DMConfig(ipc=2, iterations=2, widths=(8, 16), real_batch=16, init=init)).fit()
    _on(gpu_device, res.images, res.labels)
    cfg = DCConfig(ipc=2, iterations=1, outer_loop=2, inner_loop=1, widths=(8, 16), real_batch=16, init=init,
                   augment=True)
    res = DCDistiller((x, y), 10, cfg).fit()
    _on(gpu_device, res.images, res.labels)


@pytest.mark.parametrize("datm", [False, True])
def test_tm_datm_on_device(gpu_device, expert, datm):
    from ddfast.distill.tm import TMConfig, TMDistiller, datm_config

    traj, data = expert
    if gpu_device.type != data.train_x.device.type:
        pytest.skip("the expert fixture follows CUDA availability")
    opts = dict(ipc=2, iterations=2, syn_steps=3, expert_steps=1, learn_lr=True, dsa=True)
    cfg = datm_config(**opts) if datm else TMConfig(**opts)
    d = TMDistiller((data.train_x, data.train_y), 10, cfg, trajectories=traj)
    res = d.fit()
    _on(gpu_device, res.images, res.labels, d.lr_param)


@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_sre2l_dwa_on_device(gpu_device, digits, method):
    from ddfast.distill.sre2l import SRe2LConfig, SRe2LDistiller

    x, y = digits.train_x.to(gpu_device), digits.train_y.to(gpu_device)
    cfg = SRe2LConfig(method=method, ipc=2, iterations=3, real_batch=64, teacher_epochs=1, jitter=1, flip=True)
    res = SRe2LDistiller((x, y), 10, cfg).fit()
    _on(gpu_device, res.images, res.labels, res.soft_labels)


@pytest.mark.parametrize("regime", ["hl", "sl", "sl+kd"])
def test_regimes_on_device(gpu_device, digits, regime):
    from ddfast.evaluate.regimes import RegimeSettings, evaluate

    data = _digits_on(digits, gpu_device)
    idx = torch.cat([torch.nonzero(digits.train_y == c).flatten()[:2] for c in range(10)]).to(gpu_device)
    images, labels = data.train_x[idx], data.train_y[idx]
    teacher = build_model("convnet", 1, 10, 8, widths=(8, 16), norm="instance").to(gpu_device)
    augment = {"hl": "dsa", "sl": "crop_flip", "sl+kd": None}[regime]
    res = evaluate(images, labels, regime, teacher=None if regime == "hl" else teacher, data=data, budget=2,
                   settings=RegimeSettings(batch_size=8, augment=augment), models=1, arch="convnet",
                   model_options={"widths": (8, 16)})
    assert len(res.accuracies) == 1 and 0.0 <= res.accuracies[0] <= 100.0
