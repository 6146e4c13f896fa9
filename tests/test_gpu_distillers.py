"""One short run of each distiller on the device, fused backends vs the reference on the same device:
LD (second order), LD-RR, KRR-ST and EAD (skipped without CUDA; DDFAST_GPU_TESTS_ON_CPU=1 runs them on
CPU tensors as a dry run). Data: the digits set (scikit-learn, always installed) and random tensors."""

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
