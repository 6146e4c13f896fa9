"""SRe2L (Squeeze, Recover, Relabel) and DWA (Directed Weight Adjustment): BatchNorm-statistics matching.

A teacher f_θ with BatchNorm layers is trained on the real set (squeeze; :func:`train_teacher`) and frozen in
eval mode. The synthetic images x̃ (Gaussian noise by default, or real images) are recovered with Adam by
minimising

    L(x̃) = CE(f_θ(x̃), y) + α_BN · L_BN(x̃)

    L_BN-SRe2L(x̃) = Σ_l ‖μ_l(x̃) − BN_l^RM‖₂ + Σ_l ‖σ²_l(x̃) − BN_l^RV‖₂                     (eq. 1)
    L_BN-DWA(x̃)   = Σ_l ‖μ_l(x̃) − BN_l^RM‖₂ + λ_var · Σ_l ‖σ²_l(x̃) − BN_l^RV‖₂            (eq. 2)

(soft-labels-hard-truths supplement §1.1), where μ_l, σ²_l are the per-channel mean and biased variance over
(N, H, W) of the input of BatchNorm layer l and BN_l^RM, BN_l^RV its running statistics. Each iteration may
jitter the synthetic batch (random pad-crop, optional horizontal flip). Pixels are clipped to the real
data's per-channel range. The image learning rate is constant by default; ``lr_schedule="cosine"`` anneals it
to 0 over ``config.iterations`` as SRe2L does (on digits both end at the same loss), so a cosine run resumed
with a larger ``iterations`` follows a different schedule from an uninterrupted one.

DWA (``method="dwa"``) additionally perturbs a copy of the teacher before every iteration along the
normalised gradient of the cross-entropy on a random real batch,

    θ' = θ + ρ · ∇_θ CE(f_θ(x_B), y_B) / ‖∇_θ CE(f_θ(x_B), y_B)‖₂        (``dwa_steps`` times, at the current θ')

and matches the statistics of x̃ to the running statistics of the perturbed copy (:func:`dwa_perturb`); the
teacher itself never changes.

Relabel: the synthetic images are scored by the teacher; :func:`relabel` returns its logits, which the
result carries as ``soft_labels`` for the SL / SL+KD evaluation regimes (supplement §2, Tab. 1), while
``labels`` stay the class-major hard labels.

Deviations from SRe2L / DWA, and why: the image learning rate is constant by default (SRe2L anneals it with
a cosine, ``lr_schedule="cosine"``; on digits both reach the same loss, and a constant rate keeps a resumed
run with more iterations identical to an uninterrupted one); the jitter is pad-and-crop (+ flip) at 8×8
rather than SRe2L's random resized crop at 224×224; teacher and budgets are CPU scale. ``process_group=``
replicates the whole step on every rank (no speed-up).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.distill.common import ImageDistiller, ImageDistillResult, check_train
from ddfast.augment.crop import random_crop_flip

__all__ = ["SRe2LConfig", "SRe2LResult", "SRe2LDistiller", "DWADistiller", "METHODS", "bn_statistics",
           "bn_matching_loss", "sre2l_loss", "dwa_perturb", "relabel", "train_teacher"]

METHODS = ("sre2l", "dwa")


@dataclass
class SRe2LConfig:
    """Hyper-parameters of SRe2L / DWA recovery; defaults are the CPU-scale digits preset.

    SRe2L on ImageNet uses Adam with lr 0.25, betas (0.5, 0.9); the normalised 8×8 / 28×28 images here
    move with a smaller step.
    """

    ipc: int = 10  # images per class
    iterations: int = 200
    lr_images: float = 0.1  # Adam
    betas: tuple[float, float] = (0.5, 0.9)
    lr_schedule: str = "constant"  # "constant" | "cosine" (SRe2L; annealed to 0 over ``iterations``)
    init: str = "noise"  # "noise" (SRe2L) | "real"
    alpha_bn: float = 1.0  # α_BN, weight of the BN loss
    lambda_var: float = 1.0  # λ_var of eq. 2 (eq. 1 is λ_var = 1)
    method: str = "sre2l"  # "sre2l" | "dwa"
    rho: float = 0.05  # DWA step length ρ (L2 norm of each weight step)
    dwa_steps: int = 1  # DWA ascent steps per iteration
    real_batch: int = 128  # DWA real batch
    jitter: int = 1  # random pad-crop by up to this many pixels (0: off)
    flip: bool = False  # random horizontal flips (off for digits)
    clip: bool = True  # clip pixels to the real per-channel [min, max]
    teacher_epochs: int = 15  # used only when no teacher is passed
    seed: int = 0


@dataclass
class SRe2LResult(ImageDistillResult):
    soft_labels: torch.Tensor | None = None  # teacher logits on ``images`` [N, C]


# --------------------------------------------------------------------------------------------------
# Loss functions
# --------------------------------------------------------------------------------------------------


def _check_images(x, name: str = "x_syn") -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected a float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected non-empty images [N, c, h, w], got {tuple(x.shape)}")


def _bn_layers(teacher) -> list[nn.BatchNorm2d]:
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    layers = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    if not layers:
        raise ValueError(f"teacher: expected a network with nn.BatchNorm2d layers, {type(teacher).__name__} has none")
    for m in layers:
        if m.running_mean is None or m.running_var is None:
            raise ValueError("teacher: BatchNorm2d layers must track running statistics (track_running_stats=True)")
    return layers


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block; every submodule's mode is restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def bn_statistics(teacher: nn.Module, x: torch.Tensor, name: str = "x"):
    """Logits of ``teacher`` (eval mode) on ``x`` and, per BatchNorm2d layer l in module order, the batch
    statistics of its input: ``(logits, [(μ_l, σ²_l, BN_l^RM, BN_l^RV), ...])``.

    μ_l is the input mean over (N, H, W) and σ²_l the biased variance (``unbiased=False``), both ``[C_l]``,
    differentiable w.r.t. ``x``. The teacher's modes are restored afterwards, its buffers never change.
    """
    _check_images(x, name)
    layers = _bn_layers(teacher)
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, inputs, output):
        h = inputs[0]
        stats[id(module)] = (h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with _eval_mode(teacher):
            logits = teacher(x)
    finally:
        for h in handles:
            h.remove()
    out = []
    for m in layers:
        if id(m) not in stats:
            raise ValueError(f"teacher: BatchNorm2d layer {m} was not used in the forward pass")
        mu, var = stats[id(m)]
        out.append((mu, var, m.running_mean, m.running_var))
    return logits, out


def _bn_terms(stats) -> tuple[torch.Tensor, torch.Tensor]:
    mean = sum(torch.linalg.vector_norm(mu - rm.to(mu)) for mu, _, rm, _ in stats)
    var = sum(torch.linalg.vector_norm(v - rv.to(v)) for _, v, _, rv in stats)
    return mean, var


def bn_matching_loss(teacher: nn.Module, x_syn: torch.Tensor, lambda_var: float = 1.0) -> torch.Tensor:
    """BatchNorm statistics matching loss of a synthetic batch (supplement §1.1, eq. 1 / eq. 2).

        L_BN(x̃) = Σ_l ‖μ_l(x̃) − BN_l^RM‖₂ + λ_var · Σ_l ‖σ²_l(x̃) − BN_l^RV‖₂

    ``lambda_var=1`` is SRe2L's eq. 1, other values DWA's eq. 2. The teacher runs in eval mode (its modes
    are restored afterwards).

    Args:
        teacher: network with ``nn.BatchNorm2d`` layers tracking running statistics.
        x_syn: synthetic images ``[N, c, h, w]``.
        lambda_var: weight λ_var of the variance term.

    Returns:
        A scalar tensor, differentiable w.r.t. ``x_syn`` (and the teacher's parameters).

    Equivalent PyTorch: :func:`bn_statistics` followed by the two sums of L2 norms.
    """
    _, stats = bn_statistics(teacher, x_syn, "x_syn")
    mean, var = _bn_terms(stats)
    return mean + float(lambda_var) * var


def _check_labels(y, n: int, name: str = "y_syn") -> None:
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (n,):
        raise ValueError(f"{name}: expected int64 class indices [{n}], got "
                         f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")


def sre2l_loss(teacher: nn.Module, x_syn: torch.Tensor, y_syn: torch.Tensor, alpha_bn: float,
               lambda_var: float = 1.0) -> torch.Tensor:
    """The SRe2L / DWA recovery objective of a GIVEN synthetic set (supplement §1.1, eq. 1 / eq. 2).

        L(x̃, y) = CE(f_θ(x̃), y) + α_BN · (Σ_l ‖μ_l(x̃) − BN_l^RM‖₂ + λ_var · Σ_l ‖σ²_l(x̃) − BN_l^RV‖₂)

    The whole set is one batch (its statistics are the set's statistics); no augmentation.

    Args:
        teacher: network with ``nn.BatchNorm2d`` layers, evaluated in eval mode (modes restored).
        x_syn: images ``[N, c, h, w]``.
        y_syn: int64 labels ``[N]``.
        alpha_bn: weight α_BN of the BN loss.
        lambda_var: λ_var (1 for SRe2L).

    Returns:
        A scalar float tensor.

    Equivalent PyTorch: ``F.cross_entropy(teacher.eval()(x_syn), y_syn) + alpha_bn * bn_matching_loss(...)``.
    """
    _check_images(x_syn)
    _check_labels(y_syn, x_syn.shape[0])
    logits, stats = bn_statistics(teacher, x_syn)
    mean, var = _bn_terms(stats)
    return F.cross_entropy(logits, y_syn) + float(alpha_bn) * (mean + float(lambda_var) * var)


def dwa_perturb(teacher: nn.Module, x_real: torch.Tensor, y_real: torch.Tensor, rho: float,
                steps: int = 1) -> nn.Module:
    """A perturbed copy of ``teacher`` (DWA's directed weight adjustment); ``teacher`` is not modified.

    ``steps`` times: θ' ← θ' + ρ · g / ‖g‖₂ with g = ∇_θ' CE(f_θ'(x_real), y_real) over all parameters
    (one global norm), the network in eval mode. BatchNorm running statistics are copied unchanged.

    Returns:
        The copy, in eval mode, parameters frozen.
    """
    _check_images(x_real, "x_real")
    _check_labels(y_real, x_real.shape[0], "y_real")
    if int(steps) < 0 or rho < 0:
        raise ValueError(f"rho, steps: expected non-negative values, got rho={rho}, steps={steps}")
    model = copy.deepcopy(teacher).eval()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    for _ in range(int(steps)):
        loss = F.cross_entropy(model(x_real), y_real)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        with torch.no_grad():
            scale = rho / (norm + 1e-12)
            for p, g in zip(params, grads):
                p.add_(g * scale)
    for p in params:
        p.requires_grad_(False)
    return model


@torch.no_grad()
def relabel(images: torch.Tensor, teacher: nn.Module, batch_size: int = 512) -> torch.Tensor:
    """Teacher logits on ``images`` (eval mode, batches of ``batch_size``): SRe2L's relabel step.

    Returns:
        float ``[N, num_classes]`` logits.
    """
    _check_images(images, "images")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    with _eval_mode(teacher):
        return torch.cat([teacher(chunk) for chunk in images.split(int(batch_size))])


def train_teacher(data, epochs: int = 15, num_classes: int | None = None, make_model=None, lr: float = 0.05,
                  momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 128,
                  seed: int = 0) -> nn.Module:
    """Squeeze: train a BatchNorm ConvNet on the real training split with SGD (cosine lr), then freeze it.

    Args:
        data: an ``ImageDataset`` (``train_x``, ``train_y``, ``num_classes``) or a tuple ``(x, y)``.
        epochs: passes over the training split.
        num_classes: required for a tuple; default ``y.max() + 1``.
        make_model: ``() -> nn.Module``; default ``build_model("convnet", c, C, size, widths=(16, 32),
            norm="batch")``.

    Returns:
        The trained network in eval mode with ``requires_grad=False`` parameters.
    """
    from ddfast.models import build_model

    if isinstance(data, tuple):
        x, y = data
        check_train(x, y, "data")
        num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
    else:
        x, y = data.train_x, data.train_y
        check_train(x, y, "data")
        num_classes = int(num_classes if num_classes is not None else data.num_classes)
    if int(epochs) < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    torch.manual_seed(seed)
    if make_model is None:
        model = build_model("convnet", x.shape[1], num_classes, x.shape[-1], widths=(16, 32), norm="batch")
    else:
        model = make_model()
    model = model.to(device=x.device, dtype=x.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    batches = math.ceil(n / batch_size)
    total, k = int(epochs) * batches, 0
    model.train()
    for _ in range(int(epochs)):
        order = torch.randperm(n, generator=generator)
        for i in range(batches):
            idx = order[i * batch_size:(i + 1) * batch_size]
            if idx.numel() < 2:  # BatchNorm needs two examples
                continue
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * k / total))
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            k += 1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# Distillers
# --------------------------------------------------------------------------------------------------


def _fingerprint(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum((v.detach().cpu().double() * (i + 1)).sum() for i, v in enumerate(model.state_dict().values())
                         if v.is_floating_point()))


class SRe2LDistiller(ImageDistiller):
    """SRe2L (``config.method="sre2l"``) or DWA (``"dwa"``) recovery against a frozen BatchNorm teacher.

    Args:
        train: real ``(x, y)``: float ``[N, c, h, w]``, int64 ``[N]``.
        num_classes: number of classes.
        config: :class:`SRe2LConfig`.
        make_model: ``() -> nn.Module`` for the teacher trained by :func:`train_teacher` when ``teacher`` is
            None (default: a BatchNorm ConvNet, widths (16, 32)). Ignored when ``teacher`` is given.
        teacher: a pre-trained network with BatchNorm layers. A frozen eval-mode copy is used; the
            argument itself is never modified.

    ``step()`` runs one recovery iteration; ``fit`` returns an :class:`SRe2LResult` whose ``soft_labels``
    are the teacher's logits on the final images (:func:`relabel`). The teacher is not stored in
    checkpoints; a resumed run must pass the same teacher (checked by a fingerprint).
    """

    method = "sre2l"

    def __init__(self, train, num_classes: int, config: SRe2LConfig | None = None, make_model=None,
                 teacher: nn.Module | None = None, *, process_group=None):
        cfg = config if config is not None else SRe2LConfig()
        if not isinstance(cfg, SRe2LConfig):
            raise TypeError(f"config: expected an SRe2LConfig, got {type(cfg).__name__}")
        if cfg.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {cfg.method!r}")
        if cfg.init not in ("real", "noise"):
            raise ValueError(f"init: expected 'real' or 'noise', got {cfg.init!r}")
        if cfg.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule: expected 'cosine' or 'constant', got {cfg.lr_schedule!r}")
        if cfg.jitter < 0 or cfg.dwa_steps < 0 or cfg.rho < 0 or cfg.real_batch < 1:
            raise ValueError(f"jitter, dwa_steps, rho, real_batch: expected jitter>=0, dwa_steps>=0, rho>=0, "
                             f"real_batch>=1, got {cfg.jitter}, {cfg.dwa_steps}, {cfg.rho}, {cfg.real_batch}")
        self.config = cfg
        self.method = cfg.method
        if not isinstance(train, (tuple, list)) or len(train) != 2:
            raise ValueError("train: expected a tuple (x, y)")
        x, y = train
        self._init_synthetic(x, y, num_classes, process_group)
        if teacher is None:
            teacher = train_teacher((x, y), epochs=cfg.teacher_epochs, num_classes=self.num_classes,
                                    make_model=make_model, seed=cfg.seed)
        _bn_layers(teacher)
        self.teacher = copy.deepcopy(teacher).to(device=x.device, dtype=x.dtype).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_fingerprint = _fingerprint(self.teacher)
        self.image_opt = torch.optim.Adam([self.images], lr=cfg.lr_images, betas=tuple(cfg.betas))
        dims = (0, 2, 3)
        self._lo = x.amin(dim=dims).view(1, -1, 1, 1)
        self._hi = x.amax(dim=dims).view(1, -1, 1, 1)

    # one recovery iteration --------------------------------------------------------------------
    def _lr(self) -> float:
        cfg = self.config
        if cfg.lr_schedule == "constant":
            return cfg.lr_images
        return 0.5 * cfg.lr_images * (1.0 + math.cos(math.pi * self.iteration / max(1, cfg.iterations)))

    def matching_teacher(self) -> nn.Module:
        """The network of this iteration: the teacher (SRe2L) or a DWA-perturbed copy (draws a real batch)."""
        cfg = self.config
        if cfg.method != "dwa" or cfg.dwa_steps == 0 or cfg.rho == 0:
            return self.teacher
        n = self.x.shape[0]
        idx = torch.randperm(n, generator=self.generator)[:min(cfg.real_batch, n)]
        return dwa_perturb(self.teacher, self.x[idx], self.y[idx], cfg.rho, cfg.dwa_steps)

    def step(self) -> dict:
        cfg = self.config
        teacher = self.matching_teacher()
        lr = self._lr()
        for g in self.image_opt.param_groups:
            g["lr"] = lr
        x = self.images
        if cfg.jitter > 0 or cfg.flip:
            x = random_crop_flip(x, self.generator, cfg.jitter, cfg.flip)
        logits, stats = bn_statistics(teacher, x)
        mean, var = _bn_terms(stats)
        ce = F.cross_entropy(logits, self.labels)
        loss = ce + cfg.alpha_bn * (mean + cfg.lambda_var * var)
        self.image_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.image_opt.step()
        if cfg.clip:
            with torch.no_grad():
                self.images.copy_(torch.maximum(torch.minimum(self.images, self._hi), self._lo))
        return {"loss": float(loss.detach()), "ce": float(ce.detach()), "bn_mean": float(mean.detach()),
                "bn_var": float(var.detach()), "lr": lr}

    # relabel / result / state ------------------------------------------------------------------
    def soft_labels(self) -> torch.Tensor:
        """Teacher logits on the current synthetic images ``[N, C]``."""
        return relabel(self.images.detach(), self.teacher)

    def result(self) -> SRe2LResult:
        base = super().result()
        return SRe2LResult(**{f: getattr(base, f) for f in base.__dataclass_fields__}, soft_labels=self.soft_labels())

    def _replicated_extra(self) -> list[torch.Tensor]:
        return [*self.teacher.state_dict().values()]

    def _extra_state(self) -> dict:
        return {"teacher_fingerprint": self.teacher_fingerprint, "method": self.config.method}

    def _load_extra_state(self, state: dict) -> None:
        if state.get("method", self.config.method) != self.config.method:
            raise ValueError(f"resume: checkpoint has method={state['method']!r}, this run {self.config.method!r}")
        fp = state.get("teacher_fingerprint")
        if fp is not None and fp != self.teacher_fingerprint:
            raise ValueError("teacher: differs from the teacher of the checkpoint being resumed")


class DWADistiller(SRe2LDistiller):
    """:class:`SRe2LDistiller` with ``method="dwa"`` (eq. 2 with directed weight perturbations)."""

    method = "dwa"

    def __init__(self, train, num_classes: int, config: SRe2LConfig | None = None, make_model=None,
                 teacher: nn.Module | None = None, *, process_group=None):
        cfg = replace(config if config is not None else SRe2LConfig(), method="dwa")
        super().__init__(train, num_classes, cfg, make_model=make_model, teacher=teacher, process_group=process_group)
