"""The self-supervised target model g_φ of KRR-ST (krr-st-selfsup §4.1), trained with Barlow Twins.

KRR-ST regresses the representations ``Y = g_φ(X)`` of a network pre-trained with Barlow Twins
(Zbontar et al. 2021) on the unlabeled source training set. The representation is the encoder
output after global average pooling (no projector): 512-d for the paper's ResNet-18.

Paper scale: §4.1 uses ResNet-18 (``arch="resnet18", width=64``, 512-d); the Barlow Twins recipe of
Zbontar et al. uses a projector 8192-8192-8192, λ = 5.1e-3 and LARS (batch 2048, lr 0.2 for weights /
0.0048 for biases and norms, weight decay 1.5e-6, 10 warm-up epochs, cosine decay) for hundreds of
epochs on GPUs. CPU scale (the defaults here): the ConvNet trunk with widths 32-64-128 (128-d after global
average pooling), projector 512-512-512, AdamW (lr 8e-3, weight decay 1e-4) with linear warm-up +
cosine decay, batch 256, 4 epochs: ``ddfast ssl --dataset mnist`` takes about 3 minutes on two CPU
cores (≈45 s per epoch) and its 128-d representation reaches 97.7% MNIST linear-probe accuracy
(logistic regression, 5k train / 2k test) against 92.8% for the randomly initialised encoder.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ddfast.artifacts import load_state, save_state, write_json_atomic
from ddfast.ssl.augment import make_ssl_augment

__all__ = [
    "barlow_twins_loss",
    "SSLEncoder",
    "build_encoder",
    "build_projector",
    "TargetModel",
    "train_barlow_twins",
    "load_target",
    "encode",
    "ARCHS",
    "DEFAULT_CONVNET_WIDTHS",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "DEFAULT_PROJECTOR",
    "PAPER_PROJECTOR",
    "TARGET_FILE",
    "CHECKPOINT_FILE",
]

ARCHS = ("convnet", "resnet18")
DEFAULT_CONVNET_WIDTHS = (32, 64, 128)
DEFAULT_EPOCHS = 4
DEFAULT_LR = 8e-3
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_PROJECTOR = (512, 512, 512)
PAPER_PROJECTOR = (8192, 8192, 8192)
WARMUP_FRACTION = 0.1
TARGET_FILE = "target.safetensors"
TARGET_META_FILE = "target.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
_KIND = "barlow_twins_target"


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float = 5.1e-3,
                      eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins redundancy-reduction loss (Zbontar et al. 2021, eq. 1; krr-st-selfsup §4.1).

    Each view is standardised along the batch like a BatchNorm without affine parameters,
    ``ẑ = (z − mean_b z) / sqrt(var_b z + eps)`` (biased variance), then

        C = ẑ1ᵀ ẑ2 / n,    L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij².

    Args:
        z1, z2: projections of the two views, ``[n, d]`` with n ≥ 2.
        lambda_offdiag: λ, the weight of the redundancy-reduction term (5.1e-3 in the paper).
        eps: added to the variance.

    Returns:
        the scalar loss.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1, z2: expected two [n, d] tensors of one shape, "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"z1, z2: the batch needs at least 2 rows to standardise, got {n}")

    def standardise(z):
        mean = z.mean(0, keepdim=True)
        var = (z - mean).square().mean(0, keepdim=True)
        return (z - mean) / torch.sqrt(var + eps)

    c = standardise(z1).T @ standardise(z2) / n
    diag = torch.diagonal(c)
    on = (1.0 - diag).square().sum()
    off = c.square().sum() - diag.square().sum()
    return on + lambda_offdiag * off


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


class SSLEncoder(nn.Module):
    """A convolutional trunk followed by global average pooling: x ``[n, c, h, w]`` → h ``[n, out_dim]``.

    A trunk that already returns ``[n, d]`` (e.g. ``ResNet18Features``) is used as is.
    """

    def __init__(self, trunk: nn.Module, out_dim: int):
        super().__init__()
        self.trunk = trunk
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if h.dim() == 4:
            h = h.mean((2, 3))
        return h


def build_encoder(arch: str, in_channels: int, image_size: int, *, widths: Sequence[int] | None = None,
                  width: int = 64) -> SSLEncoder:
    """A fresh encoder: ``"convnet"`` (the ConvNet blocks, widths default 32-64-128, out_dim = widths[-1])
    or ``"resnet18"`` (``ResNet18Features``, out_dim = 8·width; width 64 is the paper's 512-d)."""
    if arch == "convnet":
        from ddfast.models import ConvNet

        widths = tuple(int(w) for w in (widths if widths is not None else DEFAULT_CONVNET_WIDTHS))
        net = ConvNet(in_channels, num_classes=1, image_size=image_size, widths=widths, norm="batch")
        trunk = nn.Sequential(*[m for m in net.features if not isinstance(m, nn.Flatten)])
        return SSLEncoder(trunk, widths[-1])
    if arch == "resnet18":
        from ddfast.models.resnet import ResNet18Features

        if int(width) < 1:
            raise ValueError(f"width: expected a positive int, got {width}")
        return SSLEncoder(ResNet18Features(in_channels, int(width)), 8 * int(width))
    raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")


def build_projector(in_dim: int, dims: Sequence[int] = DEFAULT_PROJECTOR) -> nn.Sequential:
    """The Barlow Twins projector: (Linear–BN–ReLU) for every hidden width, then a Linear.

    ``dims=(512, 512, 512)`` gives Linear–BN–ReLU–Linear–BN–ReLU–Linear (CPU default); the paper
    uses 8192-8192-8192. Linear layers have no bias (the BatchNorm / the loss's standardisation removes it).
    """
    dims = tuple(int(d) for d in dims)
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"projector: expected positive layer widths, got {dims}")
    layers: list[nn.Module] = []
    cin = in_dim
    for d in dims[:-1]:
        layers += [nn.Linear(cin, d, bias=False), nn.BatchNorm1d(d), nn.ReLU()]
        cin = d
    layers.append(nn.Linear(cin, dims[-1], bias=False))
    return nn.Sequential(*layers)


class TargetModel(nn.Module):
    """The frozen target g_φ: ``forward(x) = encoder(x)`` in eval mode (BatchNorm running statistics),
    float32 ``[n, out_dim]``.

    Attributes:
        out_dim, in_channels, image_size: representation width and expected input shape.
        meta: the training metadata (arch, widths/width, dataset, mean/std, epochs, final loss, …).
    """

    def __init__(self, encoder: SSLEncoder, meta: dict):
        super().__init__()
        self.encoder = encoder
        self.meta = dict(meta)
        self.out_dim = int(encoder.out_dim)
        self.in_channels = int(meta["in_channels"])
        self.image_size = int(meta["image_size"])
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "TargetModel":
        """The target stays in eval mode: its BatchNorm layers always use their running statistics."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"x: expected images [n, {self.in_channels}, {self.image_size}, {self.image_size}], "
                             f"got {tuple(x.shape)}")
        return self.encoder(x.float())


def encode(target, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Representations ``Y = g_φ(x)`` ``[n, d_y]`` (float32) without autograd, ``batch_size`` rows at a time.

    ``target`` is a :class:`TargetModel` or any module / callable mapping images to ``[k, d_y]`` (modules
    are put in eval mode).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if isinstance(target, nn.Module):
        target.eval()
    with torch.no_grad():
        if x.shape[0] == 0:
            return torch.zeros(0, target.out_dim, device=x.device)
        return torch.cat([target(x[s : s + batch_size]).float() for s in range(0, x.shape[0], batch_size)])


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _lr_at(step: int, total_steps: int, base_lr: float) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 0."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(*modules: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices / kernels only, not on biases and norm parameters."""
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


_RESUME_KEYS = ("dataset", "arch", "widths", "width", "in_channels", "image_size", "train_examples", "batch_size",
                "lr", "weight_decay", "projector", "lambda_offdiag", "seed", "max_train")


def train_barlow_twins(
    dataset,
    *,
    arch: str = "convnet",
    widths: Sequence[int] | None = None,
    width: int = 64,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 256,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    projector: Sequence[int] = DEFAULT_PROJECTOR,
    lambda_offdiag: float = 5.1e-3,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    max_train: int | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> TargetModel:
    """Train the target g_φ with Barlow Twins on ``dataset.train_x`` (labels unused; krr-st-selfsup §4.1).

    Each step draws a batch (last incomplete batch dropped), makes two views with ``augment``, and
    minimises :func:`barlow_twins_loss` of ``projector(encoder(view))``. AdamW with linear warm-up
    (10% of the steps) and cosine decay; the paper's LARS recipe is documented in the module docstring.

    Args:
        dataset: an ``ImageDataset`` (``train_x`` normalised ``[n, c, h, w]``, ``mean``, ``std``, ``name``).
        arch: ``"convnet"`` (CPU default) or ``"resnet18"`` (paper).
        widths: ConvNet block widths (default 32-64-128; representation = widths[-1]).
        width: ResNet-18 first-stage width (64 = paper, 512-d representation).
        epochs: passes over the training images.
        batch_size: images per step (each gives two views); 2 ≤ batch_size ≤ training images.
        lr, weight_decay: AdamW peak learning rate and decoupled weight decay.
        projector: projector widths (CPU 512-512-512; paper 8192-8192-8192).
        lambda_offdiag: λ of the loss.
        seed: initialisation, data order and augmentations all follow it.
        out: folder for ``checkpoint.safetensors`` (written atomically after every epoch) and the final
            ``target.safetensors`` + ``target.json``. ``None``: nothing is written.
        resume: continue from ``out/checkpoint.safetensors`` if present; with the same arguments the
            result is bit-identical to an uninterrupted run. A larger ``epochs`` extends a finished run
            (the cosine schedule is then laid out over the new total).
        progress: show a tqdm progress bar.
        max_train: use a seeded random subset of this many training images.
        augment: view augmentation ``(x, generator) -> x'``; default :func:`make_ssl_augment` for the data.
        on_epoch_end: called as ``on_epoch_end(epoch, mean_loss)`` after each epoch's checkpoint.

    Returns:
        the trained :class:`TargetModel`.

    Raises:
        ValueError: a bad argument (the message names it) or a checkpoint from different settings.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {ARCHS}, got {arch!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected an int >= 1, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    if lambda_offdiag < 0:
        raise ValueError(f"lambda_offdiag: expected >= 0, got {lambda_offdiag}")
    x_all = dataset.train_x
    if x_all.dim() != 4 or not x_all.is_floating_point():
        raise ValueError(f"dataset.train_x: expected float images [n, c, h, w], got {tuple(x_all.shape)} {x_all.dtype}")
    if max_train is not None:
        if not isinstance(max_train, int) or max_train < 1:
            raise ValueError(f"max_train: expected a positive int, got {max_train!r}")
        if max_train < x_all.shape[0]:
            from ddfast.data import random_subset

            x_all = x_all[random_subset(x_all.shape[0], max_train, seed=seed)]
    n = x_all.shape[0]
    if not isinstance(batch_size, int) or not 2 <= batch_size <= n:
        raise ValueError(f"batch_size: expected an int in [2, {n}] (the training images), got {batch_size!r}")
    x_all = x_all.float().contiguous()
    channels, image_size = int(x_all.shape[1]), int(x_all.shape[-1])
    widths = tuple(int(w) for w in (widths if widths is not None else DEFAULT_CONVNET_WIDTHS))
    projector = tuple(int(d) for d in projector)
    config = {
        "dataset": str(getattr(dataset, "name", "unknown")), "arch": arch,
        "widths": list(widths) if arch == "convnet" else None, "width": int(width) if arch == "resnet18" else None,
        "in_channels": channels, "image_size": image_size, "train_examples": n, "batch_size": batch_size,
        "lr": float(lr), "weight_decay": float(weight_decay), "projector": list(projector),
        "lambda_offdiag": float(lambda_offdiag), "seed": int(seed), "max_train": max_train,
        "mean": [float(m) for m in dataset.mean], "std": [float(s) for s in dataset.std],
    }
    augment = augment or make_ssl_augment(channels, dataset.mean, dataset.std)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(arch, channels, image_size, widths=widths, width=width)
        proj = build_projector(encoder.out_dim, projector)
    encoder.to(x_all.device)  # initialised on the CPU RNG (the same weights on every device), then moved
    proj.to(x_all.device)
    encoder.to(memory_format=torch.channels_last)  # faster oneDNN convolutions and norms on CPU
    optimizer = torch.optim.AdamW(_param_groups(encoder, proj, weight_decay=weight_decay), lr=lr)
    generator = torch.Generator().manual_seed(int(seed))
    steps_per_epoch = n // batch_size
    total_steps = epochs * steps_per_epoch
    epoch, step, history, seconds = 0, 0, [], 0.0

    ckpt = Path(out) / CHECKPOINT_FILE if out is not None else None
    if ckpt is not None and resume and ckpt.exists():
        state = load_state(str(ckpt))
        saved = state["config"]
        for key in _RESUME_KEYS:
            if saved.get(key) != config.get(key):
                raise ValueError(f"resume: {ckpt} was trained with {key}={saved.get(key)!r}, this run has "
                                 f"{key}={config.get(key)!r}; pass resume=False or another out")
        if state["epoch"] > epochs:
            raise ValueError(f"epochs: {ckpt} has already trained {state['epoch']} epochs, more than epochs={epochs}")
        encoder.load_state_dict(state["encoder"])
        proj.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        epoch, step, history, seconds = state["epoch"], state["step"], list(state["loss_history"]), state["seconds"]

    bar = None
    if progress and epoch < epochs:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"Barlow Twins {arch}", unit="step", dynamic_ncols=True)
    encoder.train()
    proj.train()
    try:
        with torch.random.fork_rng(devices=[]):
            while epoch < epochs:
                t0 = time.perf_counter()
                perm = torch.randperm(n, generator=generator)
                total = 0.0
                for b in range(steps_per_epoch):
                    xb = x_all[perm[b * batch_size : (b + 1) * batch_size]]
                    v1, v2 = (augment(xb, generator).contiguous(memory_format=torch.channels_last) for _ in range(2))
                    lr_now = _lr_at(step, total_steps, lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_now
                    loss = barlow_twins_loss(proj(encoder(v1)), proj(encoder(v2)), lambda_offdiag)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise FloatingPointError(f"Barlow Twins loss is {value} at epoch {epoch + 1}, step {step}; "
                                                 f"lower lr (now {lr})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    total += value
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{value:.1f}", refresh=False)
                epoch += 1
                history.append(total / steps_per_epoch)
                seconds += time.perf_counter() - t0
                if ckpt is not None:
                    save_state(str(ckpt), {
                        "config": config, "epoch": epoch, "step": step, "loss_history": history, "seconds": seconds,
                        "encoder": encoder.state_dict(), "projector": proj.state_dict(),
                        "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                    })
                if on_epoch_end is not None:
                    on_epoch_end(epoch, history[-1])
    finally:
        if bar is not None:
            bar.close()

    meta = {
        "kind": _KIND, **{k: config[k] for k in ("dataset", "arch", "widths", "width", "in_channels", "image_size",
                                               "mean", "std", "train_examples", "batch_size", "lr", "weight_decay",
                                               "projector", "lambda_offdiag", "seed", "max_train")},
        "out_dim": encoder.out_dim, "epochs": epoch, "steps": step,
        "final_loss": history[-1] if history else None, "loss_history": history, "seconds": seconds,
    }
    target_encoder = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format)
    target = TargetModel(target_encoder, meta)
    if out is not None:
        save_state(str(Path(out) / TARGET_FILE), {"meta": meta, "encoder": target_encoder.state_dict()})
        write_json_atomic(str(Path(out) / TARGET_META_FILE), meta)
    return target


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_target(path_or_dir: str | os.PathLike) -> TargetModel:
    """Load a target written by :func:`train_barlow_twins` (a ``target.safetensors`` or its folder).

    Raises:
        FileNotFoundError: no checkpoint there (the message names the ``ddfast ssl`` command that makes one).
        ValueError: the file is corrupt or not a Barlow Twins target.
    """
    path = Path(path_or_dir)
    if not path.is_file() and (path.is_dir() or path.suffix != ".safetensors"):
        path = path / TARGET_FILE
    if not path.is_file():
        folder = path.parent
        raise FileNotFoundError(f"{path}: no target model there; train one with "
                                f"`ddfast ssl --dataset <name> --out {folder}`")
    try:
        state = load_state(str(path))
    except ValueError:
        raise
    except Exception as e:  # safetensors reports truncated / foreign files with its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != _KIND or not isinstance(state.get("encoder"), dict):
        hint = " (a training checkpoint; load the target.safetensors next to it)" \
            if path.name == CHECKPOINT_FILE else ""
        raise ValueError(f"{path}: not a Barlow Twins target model{hint}")
    try:
        encoder = build_encoder(meta["arch"], int(meta["in_channels"]), int(meta["image_size"]),
                                widths=meta.get("widths"), width=meta.get("width") or 64)
        encoder.load_state_dict(state["encoder"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: the encoder does not match its metadata ({type(e).__name__}: {e})") from None
    return TargetModel(encoder, meta)
