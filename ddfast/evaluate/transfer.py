"""Transfer evaluation of a distilled source set (krr-st-selfsup §3.2, §4.1–4.2).

Pre-training (§3.2 eq. 5). A randomly initialised network f_ω with a linear head h_W of width d_y is
fitted to the distilled set (X_s, Y_s) by ``min ½‖f_ω(X_s)W − Y_s‖²`` (the official code uses the
mean squared error, SGD lr 0.1, momentum 0.9, weight decay 1e-3, 1000 epochs, batch 256, train mode;
:func:`pretrain_regression`). Baselines that carry source labels (Random subset, K-means) are fitted
with cross-entropy instead (SGD lr 0.01, momentum 0.9, weight decay 5e-4, 1000 epochs, batch 256,
DSA augmentation, lr ×0.1 at half time; :func:`pretrain_classification`).

Fine-tuning (§4.1). The head is dropped; the feature extractor (weights and BatchNorm statistics) is
copied into a fresh network with a fresh linear head for the target classes, and everything is trained
with cross-entropy on the labelled target set (SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128,
10,000 steps — 5,000 for the small sets —, cosine decay; random crop with 4 px padding, plus a
horizontal flip for colour images), then scored on the target test set in eval mode
(:func:`finetune`). "w/o pre" is the same fine-tuning from random initialisation.

Target data-free knowledge distillation (§4.2 eq. 6). A teacher T_ψ trained on the target set; the
student f_ω (pre-trained as above, fresh head Q) sees only the surrogate images x̂ (DSA-augmented, one
augmentation family per batch) and minimises ``(1/m) Σᵢ ℓ(T_ψ(x̂ᵢ), softmax(f_ω(x̂ᵢ)ᵀQ))``, ℓ the
cross-entropy to the teacher's softmax (AdamW lr 1e-4, no weight decay, 1000 epochs, batch 512, cosine
decay per epoch). Teacher and student always normalise with batch statistics (train-mode BatchNorm),
also when the student is scored (:func:`kd_transfer`). The "Gaussian" baseline feeds N(0, I) noise of
the image shape instead of X_s (lr 1e-3 in the official code).

All data stay resident tensors; minibatches are index slices and augmentations are vectorised torch ops.
Randomness: ``seed`` fixes the model initialisation (``torch.manual_seed`` inside ``fork_rng``) and a
``torch.Generator`` that draws minibatches and augmentations.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.augment.crop import random_crop_flip
from ddfast.augment.dsa import DSA_FAMILIES, dsa_augment
from ddfast.data.datasets import ImageDataset
from ddfast.evaluate.train import accuracy, mean_std
from ddfast.models import MODELS, build_model

__all__ = [
    "TransferSettings",
    "pretrain_regression",
    "pretrain_classification",
    "load_pretrained_features",
    "finetune_model",
    "finetune",
    "linear_eval",
    "PROTOCOLS",
    "SMALL_TARGETS",
    "train_teacher",
    "kd_train_student",
    "kd_transfer",
    "batch_stat_logits",
    "batch_statistics",
    "transfer_table",
    "format_transfer_table",
    "random_crop_flip",
    "dsa_augment",
    "target_subset",
    "DSA_FAMILIES",
]



# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


PROTOCOLS = ("finetune", "linear")
# The paper's fine-grained targets, fine-tuned for 5,000 steps instead of 10,000 (krr-st-selfsup §4.1).
SMALL_TARGETS = ("aircraft", "cars", "cub2011", "dogs", "flowers")


@dataclass
class TransferSettings:
    """Hyper-parameters of pre-training, fine-tuning and data-free KD; defaults are CPU scale.

    :meth:`paper` gives the official values (krr-st-selfsup §4.1–4.2 and its code). Fields:

    * ``arch``: a :data:`ddfast.models.MODELS` name (paper: ``"convnet"``, ConvNet-D3 at 32 px, D4 at
      64 px; ``resnet10``/``resnet18``/``vgg11``/``alexnet`` for architecture transfer — AlexNet
      takes 32×32 inputs only). ``widths``/``norm``: ConvNet options (None → paper widths
      128-256-512 …); ``width``: first-stage channels of ResNet/VGG (None → 64).
    * pre-training on (X_s, Y_s) by MSE: ``pretrain_epochs`` (paper 1000), ``pretrain_batch`` 256,
      ``pretrain_lr`` 0.1, ``pretrain_momentum`` 0.9, ``pretrain_wd`` 1e-3.
    * pre-training on labelled subsets by CE: ``label_pretrain_lr`` 0.01, ``label_pretrain_wd`` 5e-4,
      ``label_pretrain_augment`` (DSA per batch, as the official baseline code).
    * fine-tuning: ``finetune_steps`` (paper 10,000 on CIFAR-10/100 and Tiny-ImageNet),
      ``finetune_steps_small`` (paper 5,000 on the small targets of :data:`SMALL_TARGETS`: Aircraft, Cars,
      CUB-2011, Dogs, Flowers; None → ``finetune_steps``), ``finetune_batch`` (paper 256; 128 CPU scale),
      ``finetune_lr`` 0.01, ``finetune_momentum`` 0.9, ``finetune_wd`` 5e-4, cosine decay;
      ``augment`` (random crop + flip for colour), ``crop_padding`` (None → ``image_size // 8``,
      i.e. 4 px at 32; paper 4 at every size).
    * ``target_train_size``: keep this many labelled target training examples (class-balanced,
      drawn with ``target_subset_seed``; None → all). A low-data target regime, where pre-training
      matters most, and the CPU budget.
    * teacher for KD: ``teacher_arch`` (None → ``arch``; paper ResNet-18), ``teacher_steps``; trained
      with the fine-tuning recipe on the full target training set.
    * KD: ``kd_epochs`` (paper 1000), ``kd_batch`` 512, ``kd_lr`` 1e-4 (``kd_gaussian_lr`` 1e-3 for
      the Gaussian baseline), ``kd_wd`` 0 (AdamW).
    * ``protocol``: ``"finetune"`` (the paper's tables) or ``"linear"`` (the method's code's meta-test,
      ``linear_eval``: a linear head on the frozen trunk's eval-mode features of the whole target
      training set, SGD ``linear_lr`` 0.2, momentum 0.9, no weight decay, cosine, ``linear_steps``
      (code: 5000) batches of ``linear_batch`` 512).
    * ``eval_batch``: test-time batch of the eval-mode fine-tuning score (KD scores with batch
      statistics in batches of ``kd_batch``, as the official code).
    """

    arch: str = "convnet"
    widths: tuple[int, ...] | None = None
    norm: str = "batch"
    width: int | None = None
    pretrain_epochs: int = 200
    pretrain_batch: int = 256
    pretrain_lr: float = 0.1
    pretrain_momentum: float = 0.9
    pretrain_wd: float = 1e-3
    label_pretrain_lr: float = 0.01
    label_pretrain_wd: float = 5e-4
    label_pretrain_augment: bool = True
    finetune_steps: int = 300
    finetune_steps_small: int | None = None
    finetune_batch: int = 128
    finetune_lr: float = 0.01
    finetune_momentum: float = 0.9
    finetune_wd: float = 5e-4
    augment: bool = True
    crop_padding: int | None = None
    target_train_size: int | None = 100
    target_subset_seed: int = 0
    teacher_arch: str | None = None
    teacher_steps: int = 1000
    kd_epochs: int = 100
    kd_batch: int = 512
    kd_lr: float = 1e-4
    kd_gaussian_lr: float = 1e-3
    kd_wd: float = 0.0
    eval_batch: int = 1024
    protocol: str = "finetune"
    linear_steps: int = 1000
    linear_batch: int = 512
    linear_lr: float = 0.2

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {self.protocol!r}")
        _check_arch(self.arch, "arch")
        if self.teacher_arch is not None:
            _check_arch(self.teacher_arch, "teacher_arch")
        if self.widths is not None:
            self.widths = tuple(int(w) for w in self.widths)
        if self.finetune_steps_small is not None and (not isinstance(self.finetune_steps_small, int)
                                                      or self.finetune_steps_small < 0):
            raise ValueError(f"finetune_steps_small: expected None or a non-negative int, got {self.finetune_steps_small!r}")
        for name in ("pretrain_epochs", "finetune_steps", "teacher_steps", "kd_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {getattr(self, name)!r}")
        for name in ("pretrain_batch", "finetune_batch", "kd_batch", "eval_batch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.target_train_size is not None and self.target_train_size < 1:
            raise ValueError(f"target_train_size: expected None or a positive int, got {self.target_train_size}")

    @classmethod
    def paper(cls, **overrides) -> "TransferSettings":
        """The paper's values (krr-st-selfsup §4.1–4.2): 1000 pre-training epochs; fine-tuning in batches of
        256 for 10,000 steps (5,000 on the small targets, :data:`SMALL_TARGETS`) on the full target set;
        4 px crop padding; a ResNet-18 teacher; 1000 KD epochs."""
        base = dict(pretrain_epochs=1000, finetune_steps=10_000, finetune_steps_small=5_000, finetune_batch=256,
                    crop_padding=4, target_train_size=None, teacher_arch="resnet18", teacher_steps=10_000,
                    kd_epochs=1000)
        base.update(overrides)
        return cls(**base)

    def steps_for(self, target_name: str) -> int:
        """Fine-tuning steps on the target called ``target_name`` (the small targets take
        ``finetune_steps_small`` when it is set)."""
        if self.finetune_steps_small is not None and str(target_name).lower() in SMALL_TARGETS:
            return self.finetune_steps_small
        return self.finetune_steps

    def replace(self, **changes) -> "TransferSettings":
        """A copy with some fields changed."""
        return replace(self, **changes)


def _check_arch(arch, name: str) -> None:
    if not isinstance(arch, str) or arch.lower() not in MODELS:
        raise ValueError(f"{name}: expected one of {sorted(MODELS)}, got {arch!r}")


def _model_options(arch: str, settings: TransferSettings) -> dict:
    arch = arch.lower()
    if arch == "convnet":
        return {"widths": settings.widths, "norm": settings.norm}
    if arch in ("resnet18", "resnet10", "vgg11") and settings.width is not None:
        return {"width": settings.width}
    return {}


def _new_model(arch: str, options: dict, shape: tuple[int, int, int], num_outputs: int, seed: int,
               device: torch.device) -> nn.Module:
    """A freshly initialised network, the initialisation fixed by ``seed``; it remembers how it was built."""
    _check_arch(arch, "arch")
    channels, size, _ = shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, channels, num_outputs, size, **options)
    if not (hasattr(model, "features") and isinstance(getattr(model, "head", None), nn.Linear)):
        raise ValueError(f"arch: {arch!r} has no features/head split")
    model.transfer_spec = {"arch": arch.lower(), "options": dict(options), "input_shape": tuple(shape)}
    return model.to(device)


# --------------------------------------------------------------------------------------------------
# Minibatches and augmentation
# --------------------------------------------------------------------------------------------------


def _epoch_batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled pass over ``range(n)`` in batches of ``batch`` (a trailing batch of 1 joins the previous)."""
    order = torch.randperm(n, generator=generator)
    chunks = list(order.split(batch))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _index_stream(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: consecutive shuffled epochs, as a reshuffling loader cycled forever."""
    while True:
        yield from _epoch_batches(n, batch, generator)


# --------------------------------------------------------------------------------------------------
# Pre-training on the source set
# --------------------------------------------------------------------------------------------------


def _check_images(x, name: str = "x_s") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected images [m, c, h, w], got {got}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one image [m >= 1, c, h, w], got {list(x.shape)}")
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"{name}: expected square images [m, c, h, h], got {list(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite pixel values")


def _pretrain(x: torch.Tensor, targets: torch.Tensor, num_outputs: int, loss_fn, lr: float, wd: float,
              augment: bool, decay_at_half: bool, settings: TransferSettings, seed: int) -> nn.Module:
    x = x.detach()
    targets = targets.detach().to(x.device)
    model = _new_model(settings.arch, _model_options(settings.arch, settings), tuple(x.shape[1:]), num_outputs,
                       seed, x.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=settings.pretrain_momentum, weight_decay=wd)
    generator = torch.Generator().manual_seed(seed)
    half = settings.pretrain_epochs // 2
    model.train()
    for epoch in range(settings.pretrain_epochs):
        if decay_at_half and epoch == half and half > 0:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        for idx in _epoch_batches(x.shape[0], settings.pretrain_batch, generator):
            idx = idx.to(x.device)
            xb = x[idx]
            if augment:
                with torch.no_grad():
                    xb = dsa_augment(xb, generator)
            loss = loss_fn(model(xb), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def pretrain_regression(x_s: torch.Tensor, y_s: torch.Tensor, settings: TransferSettings, seed: int = 0) -> nn.Module:
    """Fit a fresh ``settings.arch`` network with a d_y-wide linear head to (X_s, Y_s) (§3.2 eq. 5).

    Loss: mean squared error ``mean (f_ω(X_s)W − Y_s)²`` (the official ``F.mse_loss``, i.e. ½‖·‖² up to
    a constant), SGD(``pretrain_lr``, ``pretrain_momentum``, ``pretrain_wd``), ``pretrain_epochs``
    shuffled passes in batches of ``pretrain_batch``, train mode, no augmentation.

    Args:
        x_s: distilled images ``[m, c, h, h]`` (normalised like the target).
        y_s: target representations ``[m, d_y]``, finite.
        seed: initialisation and minibatch order.

    Returns:
        the pre-trained network (``features`` + ``head``), in train mode.
    """
    _check_images(x_s)
    if not isinstance(y_s, torch.Tensor) or y_s.dim() != 2 or y_s.shape[0] != x_s.shape[0]:
        got = list(y_s.shape) if isinstance(y_s, torch.Tensor) else type(y_s).__name__
        raise ValueError(f"y_s: expected representations [m={x_s.shape[0]}, d_y] matching x_s, got {got}")
    if y_s.shape[1] < 1 or not torch.isfinite(y_s).all():
        raise ValueError(f"y_s: expected finite values [m, d_y >= 1], got shape {list(y_s.shape)}")
    return _pretrain(x_s, y_s.float(), y_s.shape[1], F.mse_loss, settings.pretrain_lr, settings.pretrain_wd,
                     augment=False, decay_at_half=False, settings=settings, seed=seed)


def pretrain_classification(x_s: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: TransferSettings,
                            seed: int = 0) -> nn.Module:
    """Pre-train on a labelled source subset with cross-entropy (Random / K-means baselines, §4.1).

    SGD(``label_pretrain_lr``, ``pretrain_momentum``, ``label_pretrain_wd``), ``pretrain_epochs`` passes
    in batches of ``pretrain_batch``, lr ×0.1 after half of them, DSA augmentation per batch when
    ``label_pretrain_augment`` (as the official baseline code).

    Args:
        x_s: images ``[m, c, h, h]``.
        labels: class indices ``[m]`` in ``[0, num_classes)`` or soft labels ``[m, num_classes]``.
        num_classes: head width.
        seed: initialisation, minibatch order and augmentation.
    """
    _check_images(x_s)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    m = x_s.shape[0]
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels: expected a tensor [m={m}] or [m={m}, {num_classes}], got {type(labels).__name__}")
    if labels.dim() == 1 and not labels.is_floating_point():
        if labels.shape[0] != m or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels: expected class indices [m={m}] in [0, {num_classes}), got shape "
                             f"{list(labels.shape)}, range [{int(labels.min())}, {int(labels.max())}]")
        targets = labels.long()
    elif labels.dim() == 2 and labels.is_floating_point():
        if tuple(labels.shape) != (m, num_classes) or not torch.isfinite(labels).all():
            raise ValueError(f"labels: expected finite soft labels [m={m}, {num_classes}], got {list(labels.shape)}")
        targets = labels.float()
    else:
        raise ValueError(f"labels: expected int64 [m={m}] or float [m={m}, {num_classes}], "
                         f"got {labels.dtype} {list(labels.shape)}")
    return _pretrain(x_s, targets, num_classes, F.cross_entropy, settings.label_pretrain_lr,
                     settings.label_pretrain_wd, augment=settings.label_pretrain_augment, decay_at_half=True,
                     settings=settings, seed=seed)


# --------------------------------------------------------------------------------------------------
# Fine-tuning on the target set
# --------------------------------------------------------------------------------------------------


def _input_shape(model: nn.Module) -> tuple[int, ...] | None:
    spec = getattr(model, "transfer_spec", None)
    if spec is not None:
        return tuple(spec["input_shape"])
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else (conv.in_channels,)


def _check_compatible(pretrained: nn.Module, shape: tuple[int, int, int], what: str) -> None:
    have = _input_shape(pretrained)
    if have is not None and tuple(have) != tuple(shape)[: len(have)]:
        raise ValueError(f"pretrained: was trained on inputs [c, h, w]={list(have)} but {what} has "
                         f"[c, h, w]={list(shape)}; resize the target to the source resolution and channels")


def load_pretrained_features(model: nn.Module, pretrained: nn.Module) -> nn.Module:
    """Copy ``pretrained.features`` (parameters and BatchNorm buffers) into ``model.features``; the head
    is left as it is. Returns ``model``."""
    try:
        model.features.load_state_dict(pretrained.features.state_dict(), strict=True)
    except (RuntimeError, AttributeError) as err:
        raise ValueError(f"pretrained: its feature extractor does not fit the new network ({err})") from None
    return model


def _fresh_student(pretrained: nn.Module | None, shape: tuple[int, int, int], num_classes: int,
                   settings: TransferSettings, seed: int, device) -> nn.Module:
    """A fresh network for ``num_classes`` with the pre-trained trunk copied in (random when None)."""
    if pretrained is None:
        return _new_model(settings.arch, _model_options(settings.arch, settings), shape, num_classes, seed, device)
    spec = getattr(pretrained, "transfer_spec", None)
    arch, options = (spec["arch"], spec["options"]) if spec else (settings.arch, _model_options(settings.arch, settings))
    model = _new_model(arch, options, shape, num_classes, seed, device)
    return load_pretrained_features(model, pretrained)


def target_subset(target: ImageDataset, size: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced subset of ``size`` labelled target training examples (all when None or larger).

    Each class gets ``size // C`` examples, the first ``size % C`` classes one more; a class with too
    few examples gives all it has. Deterministic given ``seed``.
    """
    x, y = target.train_x, target.train_y
    if size is None or size >= len(y):
        return x, y
    generator = torch.Generator().manual_seed(seed)
    c = target.num_classes
    keep = []
    for k in range(c):
        idx = torch.nonzero(y == k).flatten()
        quota = size // c + (1 if k < size % c else 0)
        keep.append(idx[torch.randperm(len(idx), generator=generator)[:quota]])
    keep = torch.cat(keep).sort().values
    return x[keep], y[keep]


def _train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, settings: TransferSettings,
                      generator: torch.Generator, channels: int, fill: torch.Tensor | None) -> nn.Module:
    """SGD with cosine decay on cross-entropy, batches of ``finetune_batch``, train mode (§4.1)."""
    opt = torch.optim.SGD(model.parameters(), lr=settings.finetune_lr, momentum=settings.finetune_momentum,
                          weight_decay=settings.finetune_wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    padding = settings.crop_padding if settings.crop_padding is not None else x.shape[-1] // 8
    model.train()
    batches = _index_stream(x.shape[0], settings.finetune_batch, generator)
    for _ in range(steps):
        idx = next(batches).to(x.device)
        xb = x[idx]
        if settings.augment:
            xb = random_crop_flip(xb, generator, padding, flip=channels == 3, fill=fill)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def _pixel_zero(target: ImageDataset) -> torch.Tensor:
    """A black pixel in normalised units (the padding value of the official crop, applied before normalising)."""
    return -torch.tensor(target.mean, device="cpu") / torch.tensor(target.std, device="cpu")  # moved by the crop


def _target_shape(target: ImageDataset) -> tuple[int, int, int]:
    return (target.channels, target.image_size, target.image_size)


def finetune_model(pretrained: nn.Module | None, target: ImageDataset, settings: TransferSettings,
                   seed: int = 0) -> nn.Module:
    """Fine-tune a fresh network (pre-trained trunk, new head) on the labelled target set; see :func:`finetune`."""
    shape = _target_shape(target)
    if pretrained is not None:
        _check_compatible(pretrained, shape, f"target {target.name!r}")
    device = next(pretrained.parameters()).device if pretrained is not None else target.train_x.device
    model = _fresh_student(pretrained, shape, target.num_classes, settings, seed, device)
    x, y = target_subset(target, settings.target_train_size, settings.target_subset_seed)
    generator = torch.Generator().manual_seed(seed)
    return _train_classifier(model, x.to(device), y.to(device), settings.steps_for(target.name), settings, generator,
                             target.channels, _pixel_zero(target))


def finetune(pretrained: nn.Module | None, target: ImageDataset, settings: TransferSettings, seed: int = 0) -> float:
    """Target test accuracy (%) after fine-tuning (§4.1); ``pretrained=None`` is "w/o pre".

    The pre-trained feature extractor (weights and BN statistics) is copied into a fresh network of the
    same architecture with a fresh ``target.num_classes`` head; all of it is trained with cross-entropy
    (SGD ``finetune_lr``/``finetune_momentum``/``finetune_wd``, cosine decay over ``finetune_steps``,
    batches of ``finetune_batch``, random crop + colour flip when ``augment``) on the target training
    set (capped by ``target_train_size``) and scored in eval mode on ``target.test_x``.

    Raises:
        ValueError: the pre-trained network's input ``[c, h, w]`` differs from the target's.
    """
    model = finetune_model(pretrained, target, settings, seed)
    device = next(model.parameters()).device
    return accuracy(model, target.test_x.to(device), target.test_y.to(device), batch_size=settings.eval_batch)


def linear_eval(pretrained: nn.Module | None, target: ImageDataset, settings: TransferSettings, seed: int = 0) -> float:
    """Target test accuracy (%) of a linear head on the frozen trunk (the method's code's ``linear_eval``).

    Features f_ω(x) of the whole target training set and test set are computed once in eval mode; a fresh
    ``nn.Linear`` is trained with cross-entropy (SGD ``linear_lr``, momentum 0.9, no weight decay, cosine
    over ``linear_steps`` shuffled batches of ``linear_batch``). ``pretrained=None`` probes a random trunk.
    """
    shape = _target_shape(target)
    if pretrained is not None:
        _check_compatible(pretrained, shape, f"target {target.name!r}")
    device = next(pretrained.parameters()).device if pretrained is not None else target.train_x.device
    model = _fresh_student(pretrained, shape, target.num_classes, settings, seed, device).eval()

    def feats(x):
        with torch.no_grad():
            return torch.cat([model.features(x[i:i + settings.eval_batch].to(device))
                              for i in range(0, x.shape[0], settings.eval_batch)])

    f_tr, y_tr = feats(target.train_x), target.train_y.to(device)
    f_te, y_te = feats(target.test_x), target.test_y.to(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(f_tr.shape[1], target.num_classes).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=settings.linear_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(settings.linear_steps, 1))
    batches = _index_stream(f_tr.shape[0], settings.linear_batch, generator)
    for _ in range(settings.linear_steps):
        idx = next(batches).to(device)
        loss = F.cross_entropy(head(f_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float((head(f_te).argmax(1) == y_te).double().mean() * 100)


# --------------------------------------------------------------------------------------------------
# Target data-free knowledge distillation
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def batch_statistics(*models: nn.Module):
    """Run ``models`` in train mode (BatchNorm normalises with each batch's statistics) and restore their
    modes and BatchNorm running buffers on exit, so using them this way changes nothing."""
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    saved = [{k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
             for model in models]
    try:
        for model in models:
            model.train()
        yield models
    finally:
        for model, buffers, mode in zip(models, saved, modes):
            if buffers:
                model.load_state_dict(buffers, strict=False)
            for module, was in mode:
                module.training = was


@torch.no_grad()
def batch_stat_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in consecutive batches of ``batch_size``, BatchNorm on batch statistics
    (a trailing batch of one joins the previous batch)."""
    chunks = list(x.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    with batch_statistics(model):
        return torch.cat([model(chunk) for chunk in chunks])


def train_teacher(target: ImageDataset, settings: TransferSettings, seed: int = 0) -> nn.Module:
    """The KD teacher T_ψ: a fresh ``teacher_arch`` (default ``arch``) trained on the whole target training
    set with the fine-tuning recipe for ``teacher_steps`` steps (§4.2). Parameters are frozen."""
    arch = settings.teacher_arch or settings.arch
    shape = _target_shape(target)
    model = _new_model(arch, _model_options(arch, settings), shape, target.num_classes, seed, target.train_x.device)
    generator = torch.Generator().manual_seed(seed)
    _train_classifier(model, target.train_x, target.train_y, settings.teacher_steps, settings, generator,
                      target.channels, _pixel_zero(target))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def kd_train_student(pretrained: nn.Module | None, surrogate_x: torch.Tensor, teacher: nn.Module,
                     target: ImageDataset, settings: TransferSettings, seed: int = 0,
                     gaussian: bool = False) -> nn.Module:
    """Train the KD student on surrogate images only (§4.2 eq. 6); see :func:`kd_transfer`."""
    _check_images(surrogate_x, "surrogate_x")
    shape = _target_shape(target)
    if tuple(surrogate_x.shape[1:]) != shape:
        raise ValueError(f"surrogate_x: expected images [m, {shape[0]}, {shape[1]}, {shape[2]}] like target "
                         f"{target.name!r}, got {list(surrogate_x.shape)}")
    if pretrained is not None:
        _check_compatible(pretrained, shape, f"target {target.name!r}")
    device = surrogate_x.device
    student = _fresh_student(pretrained, shape, target.num_classes, settings, seed, device)
    teacher = teacher.to(device)
    lr = settings.kd_gaussian_lr if gaussian else settings.kd_lr
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=settings.kd_wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(settings.kd_epochs, 1))
    generator = torch.Generator().manual_seed(seed)
    x_all = surrogate_x.detach()
    with batch_statistics(teacher):
        student.train()
        for _ in range(settings.kd_epochs):
            for idx in _epoch_batches(x_all.shape[0], settings.kd_batch, generator):
                with torch.no_grad():
                    if gaussian:
                        xb = torch.randn(len(idx), *shape, generator=generator).to(x_all)
                    else:
                        xb = dsa_augment(x_all[idx.to(device)], generator)
                    soft = F.softmax(teacher(xb), dim=-1)
                loss = F.cross_entropy(student(xb), soft)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return student


def kd_transfer(pretrained: nn.Module | None, surrogate_x: torch.Tensor, teacher: nn.Module, target: ImageDataset,
                settings: TransferSettings, seed: int = 0, gaussian: bool = False) -> float:
    """Target test accuracy (%) of a student distilled from ``teacher`` on surrogate images (§4.2 eq. 6).

    Minimises ``(1/m) Σᵢ ℓ(T_ψ(x̂ᵢ), softmax(f_ω(x̂ᵢ)ᵀQ))`` with ℓ the cross-entropy to the teacher's
    softmax, over ``kd_epochs`` passes of the surrogate set in batches of ``kd_batch`` (AdamW ``kd_lr``,
    ``kd_wd``, cosine decay per epoch). Each batch is DSA-augmented (one family per batch) before
    teacher and student see it; with ``gaussian=True`` it is replaced by N(0, I) noise of the same shape
    (lr ``kd_gaussian_lr``). Teacher and student use BatchNorm batch statistics throughout, also at
    test time (test batches of ``kd_batch``); the teacher's buffers are left unchanged.

    Args:
        pretrained: pre-trained network (its trunk initialises the student) or None (random init).
        surrogate_x: images ``[m, c, h, w]`` shaped like the target's.
        teacher: classifier for ``target.num_classes``.
    """
    student = kd_train_student(pretrained, surrogate_x, teacher, target, settings, seed, gaussian)
    device = next(student.parameters()).device
    logits = batch_stat_logits(student, target.test_x.to(device), settings.kd_batch)
    return 100.0 * (logits.argmax(-1) == target.test_y.to(device)).float().mean().item()


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def transfer_table(
    pretrain_sets: dict[str, Callable[[int], nn.Module | None]],
    targets: dict[str, ImageDataset],
    settings: TransferSettings,
    runs: int = 3,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, tuple[float, float]]]:
    """Transfer accuracy (``settings.protocol``: fine-tuning or linear evaluation) of every pre-training
    method on every target, mean ± std over ``runs``.

    ``pretrain_sets[name](seed)`` returns a pre-trained network (or None for "w/o pre"). Run r (seed
    ``seed + r``) pre-trains once per method and fine-tunes that network on every target, as the
    official test script does. Returns ``{method: {target: (mean, std)}}`` (population std).
    """
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs: expected a positive int, got {runs!r}")
    if not pretrain_sets or not targets:
        raise ValueError("pretrain_sets, targets: expected at least one method and one target")
    scores = {method: {name: [] for name in targets} for method in pretrain_sets}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=runs * len(pretrain_sets) * len(targets), desc="transfer", leave=False)
    try:
        for r in range(runs):
            for method, make in pretrain_sets.items():
                pretrained = make(seed + r)
                for name, target in targets.items():
                    if bar is not None:
                        bar.set_postfix_str(f"run {r + 1}/{runs} {method} → {name}")
                    score = linear_eval if settings.protocol == "linear" else finetune
                    scores[method][name].append(score(pretrained, target, settings, seed + r))
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {method: {name: mean_std(v) for name, v in per.items()} for method, per in scores.items()}


def format_transfer_table(results: dict[str, dict[str, tuple[float, float]]], digits: int = 2) -> str:
    """A plain-text table: methods as rows, targets as columns, cells ``mean±std``."""
    columns = []
    for per in results.values():
        columns += [t for t in per if t not in columns]
    cell = lambda ms: f"{ms[0]:.{digits}f}±{ms[1]:.{digits}f}" if ms is not None else "-"  # noqa: E731
    rows = [["method"] + columns] + [[m] + [cell(per.get(t)) for t in columns] for m, per in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
