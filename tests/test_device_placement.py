"""Device placement of the distillers, evaluation regimes, coresets, augmentations and SSL paths, checked on CPU.

A GPU run puts the data and the models on ``cuda`` while the generators the code keeps stay on the CPU. Two
device errors are then possible: a tensor made without ``device=`` lands on the CPU and meets the data
(labels, masks, accumulators), or a CPU tensor is mixed with data without being moved. Without a GPU the
tests below make the first kind fail on CPU:

* :class:`HostFactoriesOnMeta` makes every tensor factory called **from ddfast's own code** without an
  explicit ``device=`` return a ``meta`` tensor. The data and the models stay on the CPU, so such a tensor
  raises ("not on the expected device") as soon as it meets them: exactly where it would meet CUDA data
  on a GPU. Factories called by PyTorch itself (module initialisation, optimisers) are untouched.
* Draws with an explicit ``generator=`` are left on the CPU: they are the host-side draws that keep resume
  bit-identical and must be moved before they meet the data. On CPU data that move is invisible, so this
  class of bug is not caught here; the code was reviewed for it (every draw used as data or combined with
  it is followed by ``.to(<data>.device)``), and ``tests/test_gpu_distillers.py`` runs each method on CUDA.
* ``ddfast.models`` (networks are built on the CPU RNG and then moved) and ``ddfast.augment`` (their
  parameters are host tensors by design) are left out of the redirect. The augmentations are checked the
  other way round: the images are ``meta`` tensors and the generator a CPU one, so any host tensor that
  reaches the images without ``.to(x.device)`` raises (stricter than CUDA: even 0-dim CPU tensors do).

What this cannot check: values computed from ``meta`` images cannot be read, so a distiller cannot run on
``meta`` data (its losses are read with ``float(...)``); the CUDA kernels and the NCCL collectives are
not exercised. Each test runs a couple of steps of one method with tiny shapes.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ddfast

_ROOT = os.path.dirname(os.path.abspath(ddfast.__file__)) + os.sep
_SKIP = (tuple(_ROOT + d + os.sep for d in ("models", "augment", "benchmarks", "data"))
         + tuple(_ROOT + f for f in ("runs.py", "artifacts.py")))  # host-side serialisation
_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.randn, torch.rand,
              torch.randint, torch.randperm, torch.tensor, torch.eye, torch.linspace, torch.as_tensor,
              torch.normal, torch.scalar_tensor}


class HostFactoriesOnMeta(TorchFunctionMode):
    """Tensor factories called from ddfast's code (outside ``models``/``augment``) without ``device=`` (and
    without a ``generator=``) return ``meta`` tensors; ``hits`` records where."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None and kwargs.get("generator") is None \
                and not (args and isinstance(args[0], torch.Tensor)):
            frame = sys._getframe(1)
            path = frame.f_code.co_filename
            if path.startswith(_ROOT) and not path.startswith(_SKIP):
                self.hits.append(f"{path[len(_ROOT):]}:{frame.f_lineno}")
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


@pytest.fixture
def host_on_meta():
    mode = HostFactoriesOnMeta()
    with mode:
        yield mode


def _images(n=40, c=1, h=8, classes=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g, dtype=dtype)
    y = torch.arange(n) % classes
    return x, y


def _on_cpu(*tensors):
    for t in tensors:
        assert t.device.type == "cpu", f"expected a tensor on the data's device (cpu), got {t.device}"


def _small_convnet(c, classes, h, norm="instance"):
    from ddfast.models import build_model

    return lambda: build_model("convnet", c, classes, h, widths=(4, 8), norm=norm)


# ------------------------------------------------------------------ the redirect itself


def test_redirect_catches_a_host_factory(host_on_meta):
    """The check can fail: a ddfast-style factory without device= meets CPU data and raises."""
    from ddfast.distill import common

    x, y = _images()
    mode_globals = {"torch": torch, "x": x, "__file__": common.__file__}
    code = compile("torch.arange(4).float() + x[:4, 0, 0, 0]", common.__file__, "eval")
    with pytest.raises((RuntimeError, NotImplementedError)):
        eval(code, mode_globals)
    assert host_on_meta.hits


# ------------------------------------------------------------------ distillers


@pytest.mark.parametrize("variant", ["second_order", "rr"])
def test_ld(host_on_meta, variant):
    from ddfast.distill.ld import LDConfig, LabelDistiller
    from ddfast.models import build_model

    x, y = _images(48)
    cfg = LDConfig(variant=variant, model="mlp", outer_batch=16, epochs=1, val_every=1, inner_batch=4, stats_gap=2)
    ld = LabelDistiller(x[:8], (x[8:40], y[8:40]), (x[40:], y[40:]), 4, cfg,
                        make_model=lambda: build_model("mlp", 1, 4, 8))
    res = ld.fit()
    _on_cpu(ld.labels, res.soft_labels)
    ld.evaluate(x[40:], y[40:], models=1)


def test_krr_st(host_on_meta):
    from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller

    x, _ = _images(30, dtype=torch.float64)
    t = torch.randn(30, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for init in ("target", "gaussian"):
        cfg = KRRSTConfig(m=6, steps=2, batch_size=10, pool_size=2, pool_steps=2, widths=(4, 8), init=init)
        res = KRRSTDistiller(x, train_targets=t, config=cfg).fit()
        _on_cpu(res.images, res.targets)


def test_ead(host_on_meta):
    from ddfast.benchmarks.e2e import MemoryTrajectory
    from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller

    x, y = _images(40, dtype=torch.float64)
    make = lambda: _small_convnet(1, 4, 8)().double()  # noqa: E731
    traj = MemoryTrajectory(make, 3)
    res = EffectAlignmentDistiller(traj, (x, y), EADConfig(ipc=2, iterations=2, t_m=2, probe_batch=8,
                                                           real_batch=8)).fit()
    _on_cpu(res.images, res.soft_labels)


@pytest.mark.parametrize("init", ["real", "noise"])
def test_dm(host_on_meta, init):
    from ddfast.distill.dm import DMConfig, DMDistiller

    x, y = _images()
    res = DMDistiller((x, y), 4, DMConfig(ipc=2, iterations=2, widths=(4, 8), real_batch=4, init=init)).fit()
    _on_cpu(res.images, res.labels)


def test_dc(host_on_meta):
    from ddfast.distill.dc import DCConfig, DCDistiller

    x, y = _images()
    cfg = DCConfig(ipc=2, iterations=1, widths=(4, 8), real_batch=4, outer_loop=2, inner_loop=1, augment=True)
    res = DCDistiller((x, y), 4, cfg).fit()
    _on_cpu(res.images, res.labels)


@pytest.fixture
def trajectory(tmp_path):
    from ddfast.trajectory import train_trajectory

    data = _tiny_dataset()
    return train_trajectory(data, "mlp", str(tmp_path / "traj"), epochs=4, every=4, lr=0.1, momentum=0.0,
                            batch_size=10, model_options={"hidden": [16]}, progress=False), data


def _tiny_dataset(n=40, classes=4):
    import dataclasses

    from ddfast.data import load_dataset

    d = load_dataset("digits")
    keep = torch.nonzero(d.train_y < classes).flatten()[:n]
    test = torch.nonzero(d.test_y < classes).flatten()[:20]
    return dataclasses.replace(d, train_x=d.train_x[keep], train_y=d.train_y[keep], test_x=d.test_x[test],
                               test_y=d.test_y[test], num_classes=classes,
                               classes=d.classes[:classes] if getattr(d, "classes", None) else d.classes)


def test_trajectory_training(host_on_meta, tmp_path):
    from ddfast.trajectory import train_trajectory

    data = _tiny_dataset()
    traj = train_trajectory(data, "mlp", str(tmp_path / "traj"), epochs=1, every=2, lr=0.05, momentum=0.0,
                            batch_size=10, model_options={"hidden": [8]}, progress=False)
    assert len(traj) >= 2


@pytest.mark.parametrize("datm", [False, True])
def test_tm(host_on_meta, trajectory, datm):
    from ddfast.distill.tm import TMConfig, TMDistiller, datm_config

    traj, data = trajectory
    opts = dict(ipc=1, iterations=2, syn_steps=2, expert_steps=1, learn_lr=True)
    cfg = datm_config(**opts) if datm else TMConfig(**opts)
    res = TMDistiller((data.train_x, data.train_y), 4, cfg, trajectories=traj).fit()
    _on_cpu(res.images, res.labels)


@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_sre2l(host_on_meta, method):
    from ddfast.distill.sre2l import SRe2LConfig, SRe2LDistiller

    x, y = _images()
    cfg = SRe2LConfig(method=method, ipc=2, iterations=2, real_batch=8, teacher_epochs=1, jitter=1, flip=True)
    d = SRe2LDistiller((x, y), 4, cfg, make_model=_small_convnet(1, 4, 8, norm="batch"))
    res = d.fit()
    _on_cpu(res.images, res.labels, res.soft_labels)


# ------------------------------------------------------------------ resume onto the run's device


def test_resume_loads_onto_the_data_device(host_on_meta, tmp_path):
    """State comes back from safetensors on the CPU; loading copies it into the live (device) tensors."""
    from ddfast.distill.dm import DMConfig, DMDistiller
    from ddfast.distill.ld import LDConfig, LabelDistiller
    from ddfast.models import build_model

    x, y = _images()
    cfg = DMConfig(ipc=2, iterations=2, widths=(4, 8), real_batch=4)
    DMDistiller((x, y), 4, cfg).fit(out_dir=str(tmp_path / "dm"), checkpoint_every=1)
    again = DMDistiller((x, y), 4, DMConfig(**{**cfg.__dict__, "iterations": 3}))
    _on_cpu(again.fit(out_dir=str(tmp_path / "dm"), resume=True).images)
    ld_cfg = LDConfig(model="mlp", outer_batch=16, epochs=1, val_every=1, inner_batch=4)
    args = (x[:8], (x[8:32], y[8:32]), (x[32:], y[32:]), 4)
    LabelDistiller(*args, ld_cfg, make_model=lambda: build_model("mlp", 1, 4, 8)).fit(out_dir=str(tmp_path / "ld"))
    ld = LabelDistiller(*args, LDConfig(**{**ld_cfg.__dict__, "epochs": 2}), make_model=lambda: build_model("mlp", 1, 4, 8))
    ld.fit(out_dir=str(tmp_path / "ld"), resume=True)
    _on_cpu(ld.labels, ld.best_labels)


# ------------------------------------------------------------------ evaluation and selection


@pytest.mark.parametrize("regime", ["hl", "sl", "sl+kd"])
def test_regimes(host_on_meta, regime):
    from ddfast.evaluate.regimes import RegimeSettings, evaluate

    data = _tiny_dataset()
    x, y = data.train_x[:8], data.train_y[:8]
    teacher = _small_convnet(1, 4, 8)()
    labels = y if regime == "hl" else None
    augment = {"hl": "dsa", "sl": "crop_flip", "sl+kd": None}[regime]
    settings = RegimeSettings(epochs=1, batch_size=4, augment=augment)
    res = evaluate(x, labels, regime, teacher=None if regime == "hl" else teacher, data=data, budget=1,
                   settings=settings, models=1, arch="convnet", model_options={"widths": (4, 8)})
    assert len(res.accuracies) == 1


def test_evaluate_labels_and_transfer(host_on_meta):
    from ddfast.evaluate.train import TrainSettings, choose_steps, evaluate_labels
    from ddfast.evaluate.transfer import (TransferSettings, finetune, kd_transfer, linear_eval,
                                          pretrain_regression, train_teacher)
    from ddfast.models import build_model

    data = _tiny_dataset()
    x, y = data.train_x[:8], torch.nn.functional.one_hot(data.train_y[:8], 4).float()
    make = lambda: build_model("mlp", 1, 4, 8)  # noqa: E731
    evaluate_labels(make, x, y, data.test_x, data.test_y, TrainSettings(steps=2, batch_size=4), models=1)
    choose_steps(make, x, y, data.test_x, data.test_y, TrainSettings(batch_size=4), grid=[1, 2])
    s = TransferSettings(arch="convnet", widths=(4, 8), pretrain_epochs=1, pretrain_batch=4, finetune_steps=2,
                         finetune_batch=4, linear_steps=2, linear_batch=4, teacher_steps=2, kd_epochs=1, kd_batch=4)
    net = pretrain_regression(x, torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), s)
    finetune(net, data, s)
    linear_eval(None, data, s)
    kd_transfer(net, x, train_teacher(data, s), data, s, gaussian=True)


def test_coresets(host_on_meta):
    from ddfast.select import coresets

    data = _tiny_dataset()
    x, y = data.train_x, data.train_y
    net = _small_convnet(1, 4, 8)()
    feats = coresets.model_features(net, x)
    coresets.k_centers(feats, y, 2)
    coresets.random_coreset(y, 2)
    for scores in (coresets.el2n_scores(net, x, y), coresets.grand_scores(net, x, y, chunk=16),
                   coresets.el2n_sl_scores(net, x, teacher_logits=torch.randn(x.shape[0], 4))):
        coresets.select_by_score(scores, y, 2)


def test_ssl(host_on_meta):
    from ddfast.ssl import encode, train_barlow_twins

    data = _tiny_dataset()
    target = train_barlow_twins(data, arch="convnet", widths=(4, 8), epochs=1, batch_size=20, projector=(16,))
    z = encode(target, data.train_x[:4])
    _on_cpu(z)
    empty = encode(target, data.train_x[:0])
    _on_cpu(empty)
    assert empty.shape == (0, target.out_dim)


# ------------------------------------------------------------------ augmentations: meta images, CPU generator


def _meta_images(n=4, c=3, h=8):
    return torch.empty(n, c, h, h, device="meta")


@pytest.mark.parametrize("family", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_dsa_families_keep_the_images_device(family):
    from ddfast.augment.dsa import apply_dsa, dsa_augment, sample_dsa, siamese_dsa

    g = torch.Generator().manual_seed(0)
    x = _meta_images()
    for n in (1, x.shape[0]):
        assert apply_dsa(x, sample_dsa(n, (8, 8), g, (family,))).device.type == "meta"
    assert dsa_augment(x, g, (family,)).device.type == "meta"
    assert all(t.device.type == "meta" for t in siamese_dsa(x, x[:2], generator=g, families=(family,)))


def test_crop_cutmix_and_views_keep_the_images_device():
    from ddfast.augment.crop import random_crop_flip, random_resized_crop
    from ddfast.augment.cutmix import cutmix
    from ddfast.augment.views import make_ssl_augment

    g = torch.Generator().manual_seed(0)
    x = _meta_images()
    assert random_crop_flip(x, g, padding=1, flip=True, fill=torch.zeros(3)).device.type == "meta"
    assert random_resized_crop(x, g).device.type == "meta"
    assert cutmix(x, g).device.type == "meta"
    for channels in (1, 3):
        view = make_ssl_augment(channels, [0.5] * channels, [0.25] * channels)
        assert view(_meta_images(c=channels), g).device.type == "meta"
