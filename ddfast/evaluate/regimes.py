"""Evaluate a distilled (or selected) set under the three label regimes (soft-labels-hard-truths supp. §2, Table 1).

A fresh network is trained from random initialisation on the set and scored on ``data.test_x``; this is
repeated for ``models`` initialisations (``seed``, ``seed + 1``, ...) and the mean ± std is reported.

* ``"hl"`` — Hard Label: cross-entropy on the int64 labels, SGD (lr 1e-2, momentum 0.9, weight decay 5e-4),
  lr × 0.1 after half of the epochs (Table 1 "StepLR@151" of 300 epochs), batch 256, DSA augmentation.
* ``"sl"`` — Soft Label: the teacher's logits ``t`` on the *un-augmented* images are computed once and kept
  fixed; the student minimises ``KL(softmax(t/T) ‖ softmax(s/T)) · T²`` with T = 20 (:func:`kd_kl_loss`),
  AdamW (lr 1e-3, weight decay 0.01), cosine annealing per step (optional linear warm-up), batch 256, DSA.
* ``"sl+kd"`` — Soft Label + Knowledge Distillation: the teacher (eval mode, no grad) relabels *every*
  augmented view; same loss, optimiser and schedule as SL; RandomResizedCrop + horizontal flip and CutMix
  (λ ~ Beta(1, 1), one box per batch) applied before teacher and student see the batch (Table 1:
  "RRC + HFlip + CutMix"). The flip is left out for greyscale images by default (it changes what a digit
  means); ``flip=True`` forces it.

The compute budget is the number of epochs; one epoch is a shuffled pass over the N images in minibatches
of ``min(batch_size, N)``, so a run sees ``epochs × N`` images in ``epochs × ⌈N / batch⌉`` steps.
Defaults follow the small-scale columns of Table 1 (300 epochs, batch 256): the distilled sets are tiny
(N ≤ a few thousand), so the paper's budget runs on a CPU as it is; pass ``budget=`` for a smaller one.

All data stay resident tensors; minibatches are index slices and augmentations are batched torch ops.
Randomness: ``torch.manual_seed`` inside ``torch.random.fork_rng`` fixes each model's initialisation, and a
``torch.Generator`` seeded the same way draws minibatches, augmentations and CutMix boxes, so a result
depends only on ``seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.data.datasets import ImageDataset
from ddfast.evaluate.train import accuracy, mean_std
from ddfast.augment import DSA_FAMILIES, cutmix, dsa_augment, random_crop_flip, random_resized_crop
from ddfast.losses import kd_kl_loss  # noqa: F401 (re-exported)
from ddfast.models import build_model

__all__ = ["REGIMES", "RegimeSettings", "RegimeResult", "evaluate", "kd_kl_loss", "cutmix"]

REGIMES = ("hl", "sl", "sl+kd")
AUGMENTATIONS = ("dsa", "rrc_flip", "crop_flip", "none")


@dataclass
class RegimeSettings:
    """Hyper-parameters of the three regimes (seed Table 1, small-scale columns, unless noted).

    ``None`` fields take the regime's default: ``epochs`` 300; ``augment`` ``"dsa"`` for HL / SL and
    ``"rrc_flip"`` for SL+KD (Table 1's RRC + HFlip; ``rrc_scale`` the crop's area range, torchvision's
    (0.08, 1) by default); ``cutmix`` on for SL+KD (Table 1), never for HL / SL; ``flip`` only for colour
    images; ``crop_padding`` (``"crop_flip"``: pad-and-crop) an eighth of the side (at least 1 px).
    """

    epochs: int | None = None
    batch_size: int = 256
    # HL: SGD + StepLR
    hl_lr: float = 1e-2
    hl_momentum: float = 0.9
    hl_weight_decay: float = 5e-4
    hl_step_fraction: float = 0.5  # lr × hl_gamma from epoch ⌈fraction · epochs⌉ on (0-based)
    hl_gamma: float = 0.1
    # SL / SL+KD: KL-Div at temperature T, AdamW + cosine
    temperature: float = 20.0
    sl_lr: float = 1e-3
    sl_weight_decay: float = 0.01
    warmup_epochs: int = 0  # Table 1 large-scale: 5
    # augmentation
    augment: str | None = None
    dsa_families: tuple[str, ...] = DSA_FAMILIES
    crop_padding: int | None = None
    flip: bool | None = None
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    cutmix: bool | None = None  # SL+KD only; None: on (Table 1)
    eval_batch_size: int = 2048

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"settings.{name}: expected >= 1, got {getattr(self, name)}")
        if self.epochs is not None and int(self.epochs) < 1:
            raise ValueError(f"settings.epochs: expected >= 1, got {self.epochs}")
        if self.temperature <= 0:
            raise ValueError(f"settings.temperature: expected > 0, got {self.temperature}")
        if self.warmup_epochs < 0:
            raise ValueError(f"settings.warmup_epochs: expected >= 0, got {self.warmup_epochs}")
        if self.augment is not None and self.augment not in AUGMENTATIONS:
            raise ValueError(f"settings.augment: expected one of {AUGMENTATIONS} or None, got {self.augment!r}")
        bad = [f for f in self.dsa_families if f not in DSA_FAMILIES]
        if not self.dsa_families or bad:
            raise ValueError(f"settings.dsa_families: expected names from {DSA_FAMILIES}, got {self.dsa_families!r}")

    def replace(self, **changes) -> "RegimeSettings":
        return replace(self, **changes)


@dataclass
class RegimeResult:
    """Test accuracies (%) of the ``models`` students trained under ``regime``.

    ``compute`` = ``epochs × num_images`` (images seen per model); ``steps`` = optimiser steps per model.
    """

    regime: str
    accuracies: list = field(default_factory=list)
    epochs: int = 0
    num_images: int = 0
    steps: int = 0
    batch_size: int = 0

    @property
    def mean(self) -> float:
        return mean_std(self.accuracies)[0]

    @property
    def std(self) -> float:
        return mean_std(self.accuracies)[1]

    @property
    def compute(self) -> int:
        return self.epochs * self.num_images

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_data(data) -> tuple[int, int, int]:
    if not isinstance(data, ImageDataset):
        raise ValueError(f"data: expected an ImageDataset (ddfast.data.load_dataset), got {type(data).__name__}")
    return (data.channels, data.image_size, data.image_size)


def _check_images(images, shape: tuple[int, int, int]) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"{list(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a float tensor [N, c, h, w], got {got}")
    if images.shape[0] == 0:
        raise ValueError(f"images: expected at least one image [N >= 1, c, h, w], got {list(images.shape)}")
    if tuple(images.shape[1:]) != shape:
        raise ValueError(f"images: expected [N, {shape[0]}, {shape[1]}, {shape[2]}] to match data, "
                         f"got {list(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images: expected finite pixel values")


def _check_labels(labels, n: int, num_classes: int, regime: str) -> None:
    if labels is None:
        if regime == "hl":
            raise ValueError("labels: regime 'hl' needs int64 hard labels [N], got None")
        return
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels: expected a tensor, got {type(labels).__name__}")
    if labels.is_floating_point():
        if regime == "hl":
            raise ValueError(f"labels: regime 'hl' expects int64 hard labels [{n}], got {labels.dtype} "
                             f"{list(labels.shape)}")
        if tuple(labels.shape) != (n, num_classes):
            raise ValueError(f"labels: expected teacher logits [N, C] = [{n}, {num_classes}], got {list(labels.shape)}")
        if not torch.isfinite(labels).all():
            raise ValueError("labels: expected finite teacher logits")
        return
    if labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
        raise ValueError(f"labels: expected int64 hard labels [{n}] (or float logits [{n}, {num_classes}]), "
                         f"got {labels.dtype} {list(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels: expected class indices in [0, {num_classes}), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Teacher logits in eval mode without gradients; the teacher's train/eval flag is restored."""
    was = teacher.training
    teacher.eval()
    try:
        return torch.cat([teacher(x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)]).float()
    finally:
        teacher.train(was)


def _check_teacher(teacher, images: torch.Tensor, num_classes: int) -> None:
    if not isinstance(teacher, nn.Module):
        raise ValueError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    out = _teacher_logits(teacher, images[:1], 1)
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ValueError(f"teacher: expected logits [B, {num_classes}] for data.num_classes={num_classes}, "
                         f"got {list(out.shape)}")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _epoch_batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled pass over ``range(n)`` in ``⌈n / batch⌉`` batches (``batch ≥ n`` gives one full batch)."""
    order = torch.randperm(n, generator=generator)
    return list(order.split(batch))


def _augmenter(kind: str, settings: RegimeSettings, data: ImageDataset):
    if kind == "none":
        return lambda x, g: x
    if kind == "dsa":
        return lambda x, g: dsa_augment(x, g, settings.dsa_families)
    flip = settings.flip if settings.flip is not None else data.channels == 3
    if kind == "rrc_flip":
        scale = tuple(settings.rrc_scale)
        return lambda x, g: random_resized_crop(x, g, scale=scale, flip=flip)
    padding = settings.crop_padding if settings.crop_padding is not None else max(1, data.image_size // 8)
    # a black pixel in normalised units (a host constant: the crop moves it to the images' device)
    fill = -torch.tensor(data.mean, device="cpu") / torch.tensor(data.std, device="cpu")
    return lambda x, g: random_crop_flip(x, g, padding=padding, flip=flip, fill=fill)


def _schedule(regime: str, optimizer, epochs: int, steps_per_epoch: int, settings: RegimeSettings):
    """Per-step LR multiplier: HL StepLR at ``hl_step_fraction`` of the epochs; SL warm-up + cosine."""
    if regime == "hl":
        milestone = math.ceil(settings.hl_step_fraction * epochs)

        def factor(step: int) -> float:
            return settings.hl_gamma if step // steps_per_epoch >= milestone else 1.0
    else:
        total = epochs * steps_per_epoch
        warm = min(settings.warmup_epochs * steps_per_epoch, total)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_one(regime, images, targets, teacher, data, arch, options, epochs, settings, seed) -> tuple[float, int]:
    shape = _check_data(data)
    n, dev = images.shape[0], images.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, shape[0], data.num_classes, shape[1], **options).to(dev)
        model.train()
        gen = torch.Generator().manual_seed(seed)
        batch = min(settings.batch_size, n)
        steps_per_epoch = math.ceil(n / batch)
        if regime == "hl":
            opt = torch.optim.SGD(model.parameters(), lr=settings.hl_lr, momentum=settings.hl_momentum,
                                  weight_decay=settings.hl_weight_decay)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=settings.sl_lr, weight_decay=settings.sl_weight_decay)
        sched = _schedule(regime, opt, epochs, steps_per_epoch, settings)
        kind = settings.augment or ("rrc_flip" if regime == "sl+kd" else "dsa")
        augment = _augmenter(kind, settings, data)
        use_cutmix = regime == "sl+kd" and settings.cutmix is not False
        steps = 0
        for _ in range(epochs):
            for idx in _epoch_batches(n, batch, gen):
                idx = idx.to(dev)
                xb = augment(images[idx], gen)
                if use_cutmix:
                    xb = cutmix(xb, gen)
                logits = model(xb)
                if regime == "hl":
                    loss = F.cross_entropy(logits, targets[idx])
                elif regime == "sl":
                    loss = kd_kl_loss(logits, targets[idx], settings.temperature)
                else:
                    loss = kd_kl_loss(logits, _teacher_logits(teacher, xb, xb.shape[0]), settings.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                steps += 1
        acc = accuracy(model, data.test_x.to(dev), data.test_y.to(dev), settings.eval_batch_size)
    return acc, steps


def evaluate(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    regime: str = "hl",
    *,
    teacher: nn.Module | None = None,
    data: ImageDataset | None = None,
    arch: str = "convnet",
    model_options: dict | None = None,
    budget: int | None = None,
    settings: RegimeSettings | None = None,
    models: int = 5,
    seed: int = 0,
) -> RegimeResult:
    """Train ``models`` fresh networks on (``images``, ``labels``) under ``regime`` and score them on ``data``.

    Implements the student training of soft-labels-hard-truths supp. §2 / Table 1 (see the module docstring).

    Args:
        images: the set, normalised like ``data``.
        labels: ``"hl"``: int64 class indices. ``"sl"``: float teacher logits [N, C] used as they are, or
            int64 labels / ``None`` with ``teacher`` given (its logits on ``images`` are computed once).
            ``"sl+kd"``: unused beyond shape checks (``None`` allowed); ``teacher`` relabels every view.
        regime: ``"hl"``, ``"sl"`` or ``"sl+kd"``.
        teacher: a network with ``data.num_classes`` outputs (needed by SL without logits, and by SL+KD).
        data: the data set whose ``test_x`` / ``test_y`` score the students.
        arch, model_options: ``ddfast.models.build_model(arch, c, num_classes, image_size, **model_options)``.
        budget: epochs (the compute budget); overrides ``settings.epochs``; default 300.
        settings: :class:`RegimeSettings` (default: Table 1 small-scale).
        models: number of students, initialised with seeds ``seed, seed + 1, ...``.
        seed: first seed.

    Shape:
        images [N, c, h, w] float; labels [N] int64 or [N, C] float.

    Returns:
        :class:`RegimeResult` with the test accuracies (%), their mean ± std, epochs, N and the steps.
    """
    if not isinstance(regime, str) or regime.lower() not in REGIMES:
        raise ValueError(f"regime: expected one of {REGIMES}, got {regime!r}")
    regime = regime.lower()
    settings = settings if settings is not None else RegimeSettings()
    if not isinstance(settings, RegimeSettings):
        raise ValueError(f"settings: expected a RegimeSettings, got {type(settings).__name__}")
    if data is None:
        raise ValueError("data: expected an ImageDataset to score the students on, got None")
    shape = _check_data(data)
    _check_images(images, shape)
    n, c = images.shape[0], data.num_classes
    _check_labels(labels, n, c, regime)
    if isinstance(models, bool) or not isinstance(models, int) or models < 1:
        raise ValueError(f"models: expected an int >= 1, got {models!r}")
    epochs = budget if budget is not None else (settings.epochs if settings.epochs is not None else 300)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"budget: expected a number of epochs (int >= 1), got {epochs!r}")
    if not isinstance(arch, str):
        raise ValueError(f"arch: expected a model name, got {type(arch).__name__}")
    if settings.cutmix and regime != "sl+kd":
        raise ValueError(f"settings.cutmix: CutMix is part of regime 'sl+kd' only, got regime {regime!r}")
    if teacher is not None:
        _check_teacher(teacher, images, c)

    images = images.float()
    if regime == "hl":
        targets = labels
    elif regime == "sl":
        if labels is not None and labels.is_floating_point():
            targets = labels.float()
        elif teacher is None:
            raise ValueError("teacher: regime 'sl' needs a teacher or float teacher logits [N, C] as labels, got neither")
        else:
            targets = _teacher_logits(teacher, images, settings.eval_batch_size)
    else:
        if teacher is None:
            raise ValueError("teacher: regime 'sl+kd' relabels every augmented view and needs a teacher, got None")
        targets = None
    if targets is not None:
        targets = targets.to(images.device)

    options = dict(model_options or {})
    accs, steps = [], 0
    for i in range(models):
        acc, steps = _train_one(regime, images, targets, teacher, data, arch, options, epochs, settings, seed + i)
        accs.append(acc)
    return RegimeResult(regime=regime, accuracies=accs, epochs=epochs, num_images=n, steps=steps,
                        batch_size=min(settings.batch_size, n))
