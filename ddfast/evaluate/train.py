"""Train fresh models on a small labelled set and score them (label-distillation §4.1 evaluation).

A model is trained from random initialisation on base examples with (soft) labels for a given number
of steps with Adam at its default parameters, on minibatches of the base examples, then scored on
held-out real data. For LD-RR models (:class:`ddfast.models.ridge_head.RidgeClassifier`) each step
first moves the global ridge weights by the pseudo-gradient (Algorithm 1, lines 9–10) and then
trains the feature extractor and the calibration scale on the minibatch (line 12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ddfast.models.ridge_head import RidgeClassifier
from ddfast.network_passes import autocast
from ddfast.ops.label_metagrad import ridge_logits
from ddfast.losses import soft_cross_entropy

__all__ = ["TrainSettings", "train_on_labels", "train_step", "make_optimizers", "accuracy", "evaluate_labels", "choose_steps", "steps_grid", "EvalResult", "mean_std"]


@dataclass
class TrainSettings:
    """How a fresh model is trained on base examples + labels."""

    steps: int = 300
    batch_size: int = 50
    lr: float = 1e-3
    pseudo_lr: float = 0.01  # RR: α of W ← (1−α)W + αW_l
    ridge_lambda: float = 1.0  # RR: λ
    calibration_lr: float = 0.01  # RR: Adam lr of the calibration scale
    backend: str = "auto"
    precision: str = "fp32"  # "bf16": the network passes under bf16 autocast (ddfast.network_passes)


def make_optimizers(model: nn.Module, settings: TrainSettings):
    """Adam at its defaults (lr ``settings.lr``); an RR model's calibration scale gets its own Adam (lr 0.01)."""
    if isinstance(model, RidgeClassifier):
        return [torch.optim.Adam(model.features.parameters(), lr=settings.lr), torch.optim.Adam([model.scale], lr=settings.calibration_lr)]
    return [torch.optim.Adam(model.parameters(), lr=settings.lr)]


def train_step(model, optimizers, xb, yb, settings: TrainSettings):
    """One step on a minibatch: pseudo-gradient for RR models, then Adam on the soft-label CE.

    RR (Algorithm 1, lines 9–12): W = (1−α)W + αW_l with W_l solved on this minibatch's features
    (the feature extractor's gradient also flows through W_l), logits s·[z,1]W.
    """
    if isinstance(model, RidgeClassifier):
        with autocast(settings.precision, xb.device):
            z = model.features(xb)
        z = z.to(yb.dtype)
        w_local = model.local_weights(z, yb, settings.ridge_lambda, settings.backend)
        w = (1.0 - settings.pseudo_lr) * model.weight + settings.pseudo_lr * w_local
        model.weight.copy_(w.detach())
        logits = ridge_logits(z, w, model.scale, model.bias)
    else:
        with autocast(settings.precision, xb.device):
            logits = model(xb)
    loss = soft_cross_entropy(logits.to(yb.dtype), yb)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.detach()


def train_on_labels(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    callback: Callable[[int, nn.Module], None] | None = None,
    callback_steps: Sequence[int] = (),
) -> nn.Module:
    """Train ``model`` in place on (x, y) for ``settings.steps`` steps; y is ``[N, C]`` (soft or one-hot).

    Each step uses a random minibatch of ``settings.batch_size`` examples (a fresh random subset per
    step). ``callback(step, model)`` runs after each step listed in ``callback_steps``.
    """
    model.train()
    optimizers = make_optimizers(model, settings)
    want = set(int(s) for s in callback_steps)
    n, b = x.shape[0], min(settings.batch_size, x.shape[0])
    for step in range(1, settings.steps + 1):
        idx = torch.randperm(n, generator=generator)[:b]
        train_step(model, optimizers, x[idx], y[idx], settings)
        if callback is not None and step in want:
            callback(step, model)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Top-1 accuracy (%) of ``model`` on (x, y); batches move to the model's device (a test set may stay on
    the CPU while the model runs on a GPU)."""
    was = model.training
    model.eval()
    dev = next((p.device for p in model.parameters()), x.device)
    correct = 0
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s : s + batch_size].to(dev), y[s : s + batch_size].to(dev)
        correct += (model(xb).argmax(-1) == yb).sum().item()
    model.train(was)
    return 100.0 * correct / max(x.shape[0], 1)


@dataclass
class EvalResult:
    accuracies: list = field(default_factory=list)

    @property
    def mean(self) -> float:
        return mean_std(self.accuracies)[0]

    @property
    def std(self) -> float:
        return mean_std(self.accuracies)[1]

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


def mean_std(values) -> tuple[float, float]:
    v = [float(a) for a in values]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    s = math.sqrt(sum((a - m) ** 2 for a in v) / len(v)) if len(v) > 1 else 0.0
    return m, s


def evaluate_labels(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    settings: TrainSettings,
    models: int = 20,
    seed: int = 0,
) -> EvalResult:
    """Train ``models`` fresh models (seeds seed, seed+1, …) on (x, y); test accuracy of each (§4.1).
    Each model is initialised on the CPU RNG and trained on ``x``'s device."""
    out = EvalResult()
    for k in range(models):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            model = make_model().to(x.device)
        g = torch.Generator().manual_seed(seed + k)
        train_on_labels(model, x, y, settings, g)
        out.accuracies.append(accuracy(model, x_test, y_test))
    return out


def choose_steps(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    settings: TrainSettings,
    grid: Sequence[int],
    seed: int = 0,
) -> tuple[int, float]:
    """Number of training steps for a baseline chosen on validation (label-distillation §4.2).

    One fresh model is trained up to ``max(grid)`` steps and scored on (x_val, y_val) at each grid
    step; the first step with the highest validation accuracy wins. Returns ``(steps, val_acc)``.
    """
    scores = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model().to(x.device)
    run = TrainSettings(**{**settings.__dict__, "steps": int(max(grid))})
    train_on_labels(model, x, y, run, torch.Generator().manual_seed(seed),
                    callback=lambda step, m: scores.__setitem__(step, accuracy(m, x_val, y_val)), callback_steps=grid)
    best = max(scores.values())
    step = min(s for s, a in scores.items() if a == best)
    return step, best


def steps_grid(max_steps: int = 1000) -> list[int]:
    """10, 25, 50, 75, 100, 150, …, max_steps (every 50 after 100) — the baselines' step grid."""
    return [10, 25, 50, 75] + list(range(100, max_steps + 1, 50))
