"""Trajectory matching: TM (MTT) and DATM (soft-labels-hard-truths supp. §1.2, eq. 4; §2, Table 2).

Expert networks are trained on the real set and their checkpoints stored (:mod:`ddfast.trajectory`).
Each iteration samples one expert and a start checkpoint t ∈ [T⁻, T⁺] (``min_start``, ``max_start``,
checkpoint indices), starts a student at θ_t, takes N (``syn_steps``) differentiable SGD steps on
minibatches of the synthetic set S (DSA-augmented) with a learnable learning rate α, and minimises

    L_TM(S, D) = ‖θ̂_{t+N} − θ_{t+M}‖² / ‖θ_t − θ_{t+M}‖²                                 (eq. 4)

over the flattened parameters, θ_{t+M} being the expert ``expert_steps`` checkpoints later. The loss
is back-propagated through the unrolled steps to the images, to α and, for DATM, to the labels.

* TM: ``min_start=0``, hard labels.
* DATM: a lower bound ``min_start`` = T⁻ as well, ``soft_labels=True`` (learnable logits initialised
  from the final expert's logits on the initial images, inner cross-entropy with softmax(logits)
  targets) and ``correct_init=True`` (initial real images drawn among those the final expert
  classifies correctly). :func:`datm_config` fills these in.

Differences from MTT / DATM, and why:

* Experts: MTT trains many experts (several trajectories) with plain SGD (no momentum, no weight
  decay); ``trajectories=`` takes a list and one is drawn per iteration, and the experts' optimiser is
  whatever :func:`ddfast.trajectory.train_trajectory` was given — train them with ``momentum=0`` and
  several seeds to match MTT (the CPU-scale soft-label runs used one trajectory).
* M (``expert_steps``) and T⁻ / T⁺ (``min_start`` / ``max_start``) count stored checkpoints, where MTT
  counts epochs: with a trajectory saved once per epoch (``every = steps_per_epoch``) they coincide;
  otherwise M epochs = M · steps_per_epoch / every checkpoints (:meth:`TMDistiller.checkpoints_per_epoch`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ddfast.data.datasets import balanced_subset
from ddfast.distill.common import ImageDistiller
from ddfast.distributed import optimizer_state_tensors
from ddfast.augment.dsa import DSA_FAMILIES, dsa_augment
from ddfast.trajectory import Trajectory

__all__ = ["TMConfig", "TMDistiller", "tm_loss", "datm_config", "flat_parameters", "LR_PARAMETERISATIONS"]

LR_PARAMETERISATIONS = ("plain", "log")


@dataclass
class TMConfig:
    """Hyper-parameters of TM / DATM; defaults are a CPU-scale digits preset of TM.

    Paper scale (DATM on Tiny-ImageNet, Table 2): syn_steps N=80, expert_steps M=2, T⁻=20, T⁺=35
    (epochs), synthetic batch 250, lr_labels 10, lr_images 100.
    """

    ipc: int = 10  # images per class
    iterations: int = 200
    expert_steps: int = 2  # M, checkpoints ahead of θ_t
    syn_steps: int = 20  # N, differentiable SGD steps on S
    syn_batch: int | None = None  # minibatch of S per inner step; None: all of S
    min_start: int = 0  # T⁻ (checkpoint index); TM: 0
    max_start: int | None = None  # T⁺ (checkpoint index); None: the last valid one, len(traj) - 1 - M
    lr_images: float = 1000.0  # SGD (momentum 0.5) on the pixels (MTT CIFAR-10: 1000; DATM Table 2: 100)
    lr_teacher: float = 0.01  # initial synthetic learning rate α
    lr_lr: float = 1e-5  # SGD (momentum 0.5) on α
    learn_lr: bool = True
    lr_parameterisation: str = "plain"  # α itself ("plain", as MTT) or log α ("log", stays positive)
    soft_labels: bool = False  # DATM: learnable label logits
    lr_labels: float = 10.0  # SGD (momentum 0.5) on the label logits
    correct_init: bool = False  # DATM: initial real images the final expert classifies correctly
    dsa: bool = True
    dsa_families: tuple = DSA_FAMILIES
    init: str = "real"  # "real" | "noise"
    seed: int = 0


def datm_config(**overrides) -> TMConfig:
    """:class:`TMConfig` with DATM's changes: soft labels, correctly classified initial images and a
    lower start bound T⁻ (default 1 checkpoint at CPU scale; Table 2 uses T⁻=20, T⁺=35 epochs)."""
    base = dict(soft_labels=True, correct_init=True, min_start=1)
    base.update(overrides)
    return TMConfig(**base)


# --------------------------------------------------------------------------------------------------
# The loss (eq. 4)
# --------------------------------------------------------------------------------------------------


def flat_parameters(model: nn.Module, state: dict, dtype=None) -> torch.Tensor:
    """The parameters of ``state`` (a checkpoint) concatenated in ``model.named_parameters()`` order."""
    parts = []
    for name, _ in model.named_parameters():
        if name not in state:
            raise ValueError(f"state: the checkpoint has no parameter {name!r}")
        parts.append(state[name].reshape(-1))
    flat = torch.cat(parts)
    return flat if dtype is None else flat.to(dtype)


def _unflatten(model: nn.Module, flat: torch.Tensor) -> dict:
    out, offset = {}, 0
    for name, p in model.named_parameters():
        n = p.numel()
        out[name] = flat[offset: offset + n].view(p.shape)
        offset += n
    return out


def _check_int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def _check_synthetic(x_syn, y_syn):
    if not isinstance(x_syn, torch.Tensor) or x_syn.dim() != 4 or x_syn.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x_syn: expected float images [N, c, h, w], got {getattr(x_syn, 'dtype', type(x_syn))} "
                         f"{tuple(getattr(x_syn, 'shape', ()))}")
    n = x_syn.shape[0]
    if n == 0:
        raise ValueError("x_syn: the synthetic set is empty")
    if not isinstance(y_syn, torch.Tensor):
        raise ValueError(f"y_syn: expected a tensor, got {type(y_syn).__name__}")
    if y_syn.dtype == torch.int64:
        if tuple(y_syn.shape) != (n,):
            raise ValueError(f"y_syn: expected int64 class indices [{n}], got {tuple(y_syn.shape)}")
    elif y_syn.is_floating_point():
        if y_syn.dim() != 2 or y_syn.shape[0] != n:
            raise ValueError(f"y_syn: expected soft-label logits [{n}, C], got {tuple(y_syn.shape)}")
    else:
        raise ValueError(f"y_syn: expected int64 [N] or float logits [N, C], got {y_syn.dtype}")


def tm_loss(x_syn: torch.Tensor, y_syn: torch.Tensor, traj, start: int, expert_steps: int, syn_steps: int,
            syn_lr, syn_batch: int | None = None, generator: torch.Generator | None = None, augment: bool = True,
            *, model: nn.Module | None = None, families: tuple = DSA_FAMILIES) -> torch.Tensor:
    """The trajectory-matching loss of a given synthetic set (eq. 4, seed supp. §1.2).

    θ̂_0 = θ_t (checkpoint ``start``), θ̂_{k+1} = θ̂_k − α ∇_θ CE(f(A(x_B); θ̂_k), y_B) for k < N on
    minibatches B of S (an epoch-wise random order of size ``syn_batch``; A the DSA augmentation),
    taken with ``create_graph=True``, then

        L = ‖θ̂_N − θ_{t+M}‖² / ‖θ_t − θ_{t+M}‖²

    over the flattened parameters (buffers are taken from θ_t and not matched). With hard labels the
    inner loss is the usual cross-entropy; with float ``y_syn`` it is the cross-entropy with
    softmax(y_syn) targets (DATM).

    Args:
        x_syn: synthetic images; gradients flow to it.
        y_syn: int64 class indices, or float soft-label logits (gradients flow to them).
        traj: a :class:`ddfast.trajectory.Trajectory` (or anything with ``len``, ``load(i)`` and
            ``build_model()``).
        start: t, the checkpoint index of θ_t; ``start + expert_steps < len(traj)``.
        expert_steps: M, checkpoints ahead of θ_t for the target θ_{t+M}.
        syn_steps: N, inner SGD steps on S (0 gives L = 1).
        syn_lr: α, a float or a 0-dim tensor (gradients flow to a tensor that requires them).
        syn_batch: minibatch size of S per inner step (default: all of S).
        generator: randomness of the minibatch order and of DSA (default: a fresh one seeded 0).
        augment: apply DSA (``families``) to each minibatch.
        model: the network to run the checkpoints in (default: ``traj.build_model()``).

    Shape:
        x_syn ``[N, c, h, w]``; y_syn ``[N]`` or ``[N, C]``.

    Returns:
        the loss, a 0-dim tensor of ``x_syn``'s dtype.

    Equivalent PyTorch: none beyond this function (no fused kernel routes this loss).
    """
    _check_synthetic(x_syn, y_syn)
    _check_int("expert_steps", expert_steps, 1)
    _check_int("syn_steps", syn_steps, 0)
    _check_int("start", start, 0)
    if start + expert_steps > len(traj) - 1:
        raise ValueError(f"start: θ_t at checkpoint {start} with expert_steps={expert_steps} needs checkpoint "
                         f"{start + expert_steps}; the trajectory has {len(traj)} (indices 0..{len(traj) - 1})")
    n = x_syn.shape[0]
    if syn_batch is None:
        syn_batch = n
    _check_int("syn_batch", syn_batch, 1)
    syn_batch = min(syn_batch, n)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if model is None:
        model = traj.build_model()
    model = model.to(device=x_syn.device, dtype=x_syn.dtype)
    dtype, device = x_syn.dtype, x_syn.device
    state_t = traj.load(start)
    names = {name for name, _ in model.named_parameters()}
    buffers = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
               for k, v in state_t.items() if k not in names}
    theta_t = flat_parameters(model, state_t).to(device=device, dtype=dtype)
    target = flat_parameters(model, traj.load(start + expert_steps)).to(device=device, dtype=dtype)
    if not torch.is_tensor(syn_lr):
        syn_lr = torch.tensor(float(syn_lr), dtype=dtype, device=device)
    soft = y_syn.is_floating_point()
    targets = F.softmax(y_syn, dim=-1) if soft else y_syn

    theta = theta_t.clone().requires_grad_(True)
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(syn_batch))[::-1]
        idx = chunks.pop().to(device)
        xb = x_syn[idx]
        if augment:
            xb = dsa_augment(xb, generator, tuple(families))
        out = functional_call(model, {**buffers, **_unflatten(model, theta)}, (xb,))
        ce = F.cross_entropy(out, targets[idx])
        (grad,) = torch.autograd.grad(ce, theta, create_graph=True)
        theta = theta - syn_lr * grad
    return ((theta - target) ** 2).sum() / ((theta_t - target) ** 2).sum()


# --------------------------------------------------------------------------------------------------
# The distiller
# --------------------------------------------------------------------------------------------------


def _as_trajectories(trajectories) -> list:
    if trajectories is None:
        raise ValueError("trajectories: TM needs expert trajectories (a Trajectory, a folder, or a list of them); "
                         "write one with ddfast.trajectory.train_trajectory")
    if isinstance(trajectories, (str, os.PathLike, Trajectory)):
        trajectories = [trajectories]
    out = []
    for t in trajectories:
        out.append(Trajectory.open(t) if isinstance(t, (str, os.PathLike)) else t)
    if not out:
        raise ValueError("trajectories: the list of experts is empty")
    return out


class TMDistiller(ImageDistiller):
    """TM / DATM on stored expert trajectories (see the module docstring).

    Args:
        train: the real training set ``(x [N, c, h, w], y [N] int64)``, used for the initial images.
        num_classes: C.
        config: :class:`TMConfig` (:func:`datm_config` for DATM).
        make_model: ``() -> nn.Module`` of the experts' architecture (default: ``traj.build_model()``
            of the first expert); checked against every trajectory.
        trajectories: one :class:`ddfast.trajectory.Trajectory` (or its folder) or a list of them;
            one expert is sampled per iteration.
    """

    method = "tm"

    def __init__(self, train, num_classes: int, config: TMConfig | None = None, make_model=None, *, trajectories=None,
                 process_group=None):
        self.config = cfg = config or TMConfig()
        self.trajectories = _as_trajectories(trajectories)
        if cfg.lr_parameterisation not in LR_PARAMETERISATIONS:
            raise ValueError(f"lr_parameterisation: expected one of {LR_PARAMETERISATIONS}, "
                             f"got {cfg.lr_parameterisation!r}")
        if cfg.init not in ("real", "noise"):
            raise ValueError(f"init: expected 'real' or 'noise', got {cfg.init!r}")
        for name in ("iterations", "expert_steps"):
            _check_int(name, getattr(cfg, name), 1)
        _check_int("syn_steps", cfg.syn_steps, 0)
        _check_int("min_start", cfg.min_start, 0)
        if cfg.syn_batch is not None:
            _check_int("syn_batch", cfg.syn_batch, 1)
        if not (cfg.lr_teacher > 0 and math.isfinite(cfg.lr_teacher)):
            raise ValueError(f"lr_teacher: expected a finite value > 0, got {cfg.lr_teacher!r}")
        if not cfg.dsa_families or any(f not in DSA_FAMILIES for f in cfg.dsa_families):
            raise ValueError(f"dsa_families: expected a non-empty subset of {DSA_FAMILIES}, got {cfg.dsa_families!r}")
        shortest = min(len(t) for t in self.trajectories)
        last_valid = shortest - 1 - cfg.expert_steps
        max_start = last_valid if cfg.max_start is None else cfg.max_start
        if cfg.max_start is not None:
            _check_int("max_start", cfg.max_start, 0)
        if max_start > last_valid:
            raise ValueError(f"max_start: T⁺={max_start} with expert_steps={cfg.expert_steps} needs checkpoint "
                             f"{max_start + cfg.expert_steps}, the shortest trajectory has {shortest} checkpoints "
                             f"(largest valid max_start: {last_valid})")
        if cfg.min_start > max_start:
            raise ValueError(f"min_start: T⁻={cfg.min_start} exceeds max_start={max_start}")
        self.max_start = max_start

        x, y = train
        self.model = (make_model() if make_model is not None else self.trajectories[0].build_model())
        for t in self.trajectories:
            t.check_model(self.model)
        if getattr(x, "dim", lambda: 0)() == 4:
            ix = self.trajectories[0].index
            want = (ix.get("in_channels"), ix.get("image_size"), ix.get("image_size"))
            if None not in want and tuple(x.shape[1:]) != want:
                raise ValueError(f"train x: images {tuple(x.shape[1:])}, the experts take {want}")
        self._init_synthetic(x, y, num_classes, process_group)
        self.model = self.model.to(device=x.device, dtype=x.dtype)
        if cfg.correct_init or cfg.soft_labels:
            final = self.model
            final.load_state_dict(self.trajectories[0].final())
        if cfg.correct_init and cfg.init == "real":
            with torch.no_grad():
                correct = final(x).argmax(-1) == y
            pool = torch.nonzero(correct).squeeze(1)
            sub = balanced_subset(y[pool], cfg.ipc, seed=cfg.seed, num_classes=self.num_classes)
            self.init_indices = pool[sub]
            with torch.no_grad():
                self.images.copy_(x[self.init_indices])
        self.soft_labels = None
        self.label_opt = None
        if cfg.soft_labels:
            with torch.no_grad():
                logits = final(self.images.detach())
            self.soft_labels = logits.clone().requires_grad_(True)
            self.label_opt = torch.optim.SGD([self.soft_labels], lr=cfg.lr_labels, momentum=0.5)
        lr0 = math.log(cfg.lr_teacher) if cfg.lr_parameterisation == "log" else cfg.lr_teacher
        self.lr_param = torch.tensor(lr0, dtype=x.dtype, device=x.device).requires_grad_(cfg.learn_lr)
        self.lr_opt = torch.optim.SGD([self.lr_param], lr=cfg.lr_lr, momentum=0.5) if cfg.learn_lr else None

    def checkpoints_per_epoch(self) -> float:
        """Stored checkpoints per expert epoch (``steps_per_epoch / every`` of the first trajectory), to
        convert MTT's epoch counts into ``expert_steps`` / ``min_start`` / ``max_start``."""
        ix = self.trajectories[0].index
        return float(ix.get("steps_per_epoch", 1)) / float(ix.get("every", 1))

    @property
    def syn_lr(self) -> torch.Tensor:
        """α, the synthetic learning rate (a differentiable function of :attr:`lr_param`)."""
        return self.lr_param.exp() if self.config.lr_parameterisation == "log" else self.lr_param

    def step(self) -> dict:
        """One iteration: sample an expert and t ∈ [T⁻, T⁺], one SGD step on S (and α, labels) on eq. 4."""
        cfg = self.config
        e = int(torch.randint(len(self.trajectories), (1,), generator=self.generator))
        start = int(torch.randint(cfg.min_start, self.max_start + 1, (1,), generator=self.generator))
        labels = self.soft_labels if self.soft_labels is not None else self.labels
        loss = tm_loss(self.images, labels, self.trajectories[e], start, cfg.expert_steps, cfg.syn_steps, self.syn_lr,
                       syn_batch=cfg.syn_batch, generator=self.generator, augment=cfg.dsa, model=self.model,
                       families=tuple(cfg.dsa_families))
        opts = [o for o in (self.image_opt, self.lr_opt, self.label_opt) if o is not None]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        return {"loss": float(loss.detach()), "syn_lr": float(self.syn_lr.detach()), "expert": e, "start": start}

    def result_labels(self) -> torch.Tensor:
        if self.soft_labels is not None:
            return self.soft_labels.detach().clone()
        return self.labels.clone()

    def _replicated_extra(self) -> list[torch.Tensor]:
        out = [self.lr_param]
        for t, opt in ((None, self.lr_opt), (self.soft_labels, self.label_opt)):
            if t is not None:
                out.append(t)
            if opt is not None:
                out += optimizer_state_tensors(opt)
        return out

    def _extra_state(self) -> dict:
        state = {"lr_param": self.lr_param.detach().clone()}
        if self.lr_opt is not None:
            state["lr_opt"] = self.lr_opt.state_dict()
        if self.soft_labels is not None:
            state["soft_labels"] = self.soft_labels.detach().clone()
            state["label_opt"] = self.label_opt.state_dict()
        return state

    def _load_extra_state(self, state: dict) -> None:
        if ("soft_labels" in state) != (self.soft_labels is not None):
            raise ValueError(f"resume: checkpoint has soft_labels={'soft_labels' in state}, "
                             f"this run {self.soft_labels is not None}")
        if ("lr_opt" in state) != (self.lr_opt is not None):
            raise ValueError(f"resume: checkpoint has learn_lr={'lr_opt' in state}, this run {self.lr_opt is not None}")
        with torch.no_grad():
            self.lr_param.copy_(state["lr_param"])
            if self.soft_labels is not None:
                self.soft_labels.copy_(state["soft_labels"])
        if self.lr_opt is not None:
            self.lr_opt.load_state_dict(state["lr_opt"])
        if self.label_opt is not None:
            self.label_opt.load_state_dict(state["label_opt"])
