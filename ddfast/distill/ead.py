"""Effect Alignment for dataset Distillation, EAD (effect-alignment Algorithm 1, eq. 4–7).

A network is trained on the real set D and its trajectory {(θ_t, η_t)} saved
(:mod:`ddfast.trajectory`). The synthetic set S starts as ``ipc`` random real images per class with
soft labels ŷ_i = f(x_i; θ_T) (logits of the final checkpoint). Each iteration samples S_t ⊂ S, a probe
batch D_p, a real batch D_t and t_m checkpoints with P(t) ∝ η_t, and minimises the replacement effect

    R̂(D, S) = | c Σ_t ⟨∇L(D_p, θ_t), ∇L(D_t, θ_t)⟩ − Σ_t ⟨∇L(D_p, θ_t), ∇L(S_t, θ_t)⟩ |        (eq. 7)

w.r.t. the images and soft labels of S_t, through :func:`ddfast.ops.checkpoint_grad_inner` (the
fused op streams checkpoints from disk and never takes a double backward).

``objective`` picks c:

* ``"printed"``: c = 1 − α with α = (|G| − |A|)/(|D| − |G| + |A|) (eq. 4) at G = D, A = S, i.e.
  c = (2|S| − |D|)/|S| — negative as soon as |D| > 2|S|, which asks the synthetic gradient to point
  *against* the probe gradient.
* ``"normalised"`` (default): α = 0, c = 1, both losses are means over their batches, so the synthetic
  set's gradient is matched to the real one in the probe direction.

Worked example: digits has |D| = 1,222 training images; at |S| = 100 the printed coefficient is
c = (2·100 − 1222)/100 = −10.22.

Deviations from the paper, and why:

* ``objective="normalised"`` is the default, not the printed eq. 4 coefficient: the printed one is
  negative for |D| > 2|S| (above). Which objective, learning rate and t_m to use is to be chosen on the
  data set's *validation* split (``ImageDataset.val_x``), with the test split scored once for the chosen
  setting (:func:`ddfast.evaluate.selection.choose_on_validation`). Earlier README numbers that picked
  them on test accuracy are not a validation-based choice.
* Plain SGD trajectories: the derivation of eq. 5–7 (first-order expansion of SGD steps, P(t) ∝ η_t)
  assumes plain SGD checkpoints. A trajectory trained with momentum > 0 is accepted with a warning (the
  inner products are then taken at the momentum run's checkpoints, not the SGD steps the derivation
  describes); train the trajectory with ``momentum=0`` for the method as derived.
* CPU scale: ``ipc``, ``iterations``, batch sizes and t_m default to a digits-sized preset.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ddfast.data.datasets import balanced_subset
from ddfast.distill.base import Distiller
from ddfast.distributed import optimizer_state_tensors, shard
from ddfast.network_passes import PassOptions, check_pass_options, prepare_images, prepare_model
from ddfast.ops.checkpoint_grad_inner import checkpoint_grad_inner, effect_alignment_loss, replacement_alpha

__all__ = ["EADConfig", "EADResult", "EffectAlignmentDistiller", "OBJECTIVES"]

OBJECTIVES = ("normalised", "printed")


@dataclass
class EADConfig:
    """Hyper-parameters of EAD (Algorithm 1); defaults are the CPU-scale digits preset."""

    ipc: int = 10  # images per class
    iterations: int = 300
    t_m: int = 5  # sampled checkpoints per iteration
    syn_batch: int | None = None  # |S_t|; None: all of S
    probe_batch: int = 256  # |D_p|
    real_batch: int = 256  # |D_t|
    lr_images: float = 1e-2  # Adam
    lr_labels: float = 1e-2  # Adam
    learn_labels: bool = True
    objective: str = "normalised"
    time_weights: str = "lr"  # P(t) ∝ η_t ("lr") or uniform
    label_mode: str = "logits"
    real_mode: str = "auto"
    chunk: int | None = None
    backend: str = "auto"
    seed: int = 0
    precision: str = "fp32"  # network passes: "fp32" or "bf16" autocast (ddfast.network_passes)
    channels_last: bool = False  # the network, its checkpoints and the images in NHWC
    compile: bool = False  # not supported: the op differentiates the network twice (clear error)
    cache_checkpoints: bool = True  # keep loaded trajectory checkpoints in memory (they never change)


@dataclass
class EADResult:
    images: torch.Tensor
    soft_labels: torch.Tensor  # logits; targets are softmax(soft_labels)
    init_images: torch.Tensor
    init_labels: torch.Tensor
    init_indices: torch.Tensor
    history: list = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0


def _check_images(name, x):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected a float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected images [N, c, h, w], got {tuple(x.shape)}")


class EffectAlignmentDistiller(Distiller):
    """EAD on a saved trajectory.

    ``fit(out_dir=, resume=, progress=, checkpoint_every=25, callback=)`` (:class:`ddfast.distill.base.Distiller`)
    runs to ``config.iterations``; a resumed run continues bit-identically, also with another number of
    ranks (``callback`` runs on every rank).

    Args:
        trajectory: a :class:`ddfast.trajectory.Trajectory` of a network trained on ``train``.
        train: the real training set ``(x [N, c, h, w], y [N] int64)``.
        config: :class:`EADConfig`.
        num_classes: C (default: the trajectory's).
        process_group: a ``torch.distributed`` group to distil on R ranks, or None (one process). S, its
            optimizers and the RNG are replicated; the t_m checkpoints drawn (identically) each iteration
            are shared out over the ranks, and when t_m < R the ranks on one checkpoint split D_t and S_t
            (the probe gradient v_t is needed whole, so P is not split). The scalar sums of eq. 7 are
            all-reduced before |·|, then the S-gradients (:mod:`ddfast.distributed`).
    """

    method = "EAD"
    checkpoint_every = 25

    def __init__(self, trajectory, train, config: EADConfig | None = None, *, process_group=None):
        self.config = cfg = config or EADConfig()
        x, y = train
        _check_images("train x", x)
        if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
            raise ValueError(f"train y: expected int64 class indices [{x.shape[0]}], got {tuple(y.shape)} {y.dtype}")
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {cfg.objective!r}")
        if cfg.time_weights not in ("lr", "uniform"):
            raise ValueError(f"time_weights: expected 'lr' or 'uniform', got {cfg.time_weights!r}")
        for name in ("ipc", "iterations", "t_m", "probe_batch", "real_batch"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(cfg, name)!r}")
        check_pass_options(cfg.precision, cfg.channels_last, cfg.compile)
        if cfg.compile:
            raise ValueError("compile: EAD differentiates the network twice per checkpoint (double backward or "
                             "forward-mode JVP of ⟨v_t, ∇L(S)⟩), which torch.compile's AOTAutograd does not support; "
                             "use compile=False")
        if len(trajectory) == 0:
            raise ValueError("trajectory: it has no checkpoints")
        if cfg.t_m > len(trajectory):
            raise ValueError(f"t_m: {cfg.t_m} checkpoints per iteration requested, the trajectory has {len(trajectory)}")
        self.trajectory = trajectory
        momentum = float(((getattr(trajectory, "index", None) or {}).get("optimizer") or {}).get("momentum", 0.0) or 0.0)
        if momentum > 0:
            warnings.warn(f"trajectory: trained with SGD momentum {momentum}; EAD's derivation assumes plain SGD "
                          "checkpoints (train the trajectory with momentum=0)", UserWarning, stacklevel=2)
        self.model = trajectory.build_model().to(device=x.device, dtype=x.dtype)
        trajectory.check_model(self.model)
        self.model.eval()  # BatchNorm uses the checkpoints' statistics; ConvNet/MLP have none
        self.num_classes = int(self.model(x[:1]).shape[-1])
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"train y: class indices must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]")
        if hasattr(trajectory, "check_data"):
            trajectory.check_data(x.float(), y)  # the hash is taken over the float32 tensors
        self.passes = PassOptions.of(cfg)
        prepare_model(self.model, self.passes)
        x = prepare_images(x, self.passes)  # converted once: the real set never changes
        self._checkpoint_cache: dict[int, dict] = {}
        self.x, self.y = x, y
        self._init_run(cfg.seed, process_group)
        # Initialisation: ipc class-balanced real images, soft labels from the final checkpoint.
        self.init_indices = balanced_subset(y, cfg.ipc, seed=cfg.seed, num_classes=self.num_classes)
        self.images = prepare_images(x[self.init_indices].clone(), self.passes).requires_grad_(True)
        with torch.no_grad():
            self.load_checkpoint(self.model, trajectory.final())
            labels = self.model(self.images.detach())
        self.labels = labels.clone().requires_grad_(cfg.learn_labels)
        self.init_images = self.images.detach().clone()
        self.init_labels = self.labels.detach().clone()
        self.image_opt = torch.optim.Adam([self.images], lr=cfg.lr_images)
        self.label_opt = torch.optim.Adam([self.labels], lr=cfg.lr_labels) if cfg.learn_labels else None
        n_syn = self.images.shape[0]
        self.syn_batch = min(cfg.syn_batch or n_syn, n_syn)
        alpha = 0.0 if cfg.objective == "normalised" else replacement_alpha(x.shape[0], x.shape[0], n_syn)
        self.coefficient = 1.0 - alpha
        self.iteration = 0

    @staticmethod
    def load_checkpoint(model: nn.Module, state) -> None:
        model.load_state_dict(dict(state))

    def checkpoint(self, t: int) -> dict:
        """θ_t in the passes' memory format; cached in memory with ``cache_checkpoints`` (read once)."""
        state = self._checkpoint_cache.get(t)
        if state is None:
            state = {k: v.to(self.x.device) for k, v in self.trajectory.load(t).items()}  # stored on the CPU
            state = {k: prepare_images(v, self.passes) if v.is_floating_point() else v for k, v in state.items()}
            if self.config.cache_checkpoints:
                self._checkpoint_cache[t] = state
        return state

    # ------------------------------------------------------------------ one iteration

    def _randperm(self, n, k):
        return torch.randperm(n, generator=self.generator)[: min(k, n)]

    def step(self) -> dict:
        """One iteration of Algorithm 1; returns ``{"loss", "inner_real", "inner_syn"}``."""
        cfg = self.config
        self._dist_start()
        n_syn, n = self.images.shape[0], self.x.shape[0]
        s_idx = self._randperm(n_syn, self.syn_batch) if self.syn_batch < n_syn else None
        p_idx, d_idx = self._randperm(n, cfg.probe_batch), self._randperm(n, cfg.real_batch)
        ts = self.trajectory.sample(cfg.t_m, self.generator, weights=cfg.time_weights)
        ts = [int(t) for t in ts]
        images = self.images if s_idx is None else self.images[s_idx]
        labels = self.labels if s_idx is None else self.labels[s_idx]
        mine = ts
        if self.dist.active:  # this rank's checkpoints (and, when t_m < R, its rows of S_t and D_t)
            mine, images, labels, d_idx, weights = self._dist_work(ts, images, labels, d_idx)
        states = (self.checkpoint(t) for t in mine)
        r, s = checkpoint_grad_inner(
            self.model, states, (self.x[p_idx], self.y[p_idx]), (self.x[d_idx], self.y[d_idx]), images, labels,
            label_mode=cfg.label_mode, real_mode=cfg.real_mode, chunk=cfg.chunk, backend=cfg.backend,
            precision=cfg.precision,
        )
        loss = effect_alignment_loss(r, s, self.coefficient)
        if self.dist.active:
            loss, r, s = self._dist_loss(r, s, weights)
        self.image_opt.zero_grad(set_to_none=True)
        if self.label_opt is not None:
            self.label_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.active:
            self._dist_reduce_grads(s_idx)
        self.image_opt.step()
        if self.label_opt is not None:
            self.label_opt.step()
        self.iteration += 1
        rec = {"iteration": self.iteration, "loss": float(loss.detach()), "inner_real": float(r), "inner_syn": float(s.detach()),
               "checkpoints": ts}
        self.history.append(rec)
        return rec

    # ------------------------------------------------------------------ the loop (ddfast.distill.base)

    def position(self) -> int:
        return self.iteration

    def total(self) -> int:
        return int(self.config.iterations)

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.3g}"}

    def result(self) -> EADResult:
        return EADResult(
            images=self.images.detach().clone(), soft_labels=self.labels.detach().clone(),
            init_images=self.init_images.clone(), init_labels=self.init_labels.clone(),
            init_indices=self.init_indices.clone(), history=list(self.history),
            iterations=self.iteration, seconds=self.seconds,
        )

    # ------------------------------------------------------------------ distributed

    def dist_info(self) -> dict:
        return {
            "config": asdict(self.config),
            "data": {"x": list(self.x.shape), "dtype": str(self.x.dtype), "checkpoints": len(self.trajectory)},
            "state": {"iteration": self.iteration},
        }

    def replicated_tensors(self) -> list[torch.Tensor]:
        """S (images, labels) and its optimizers (the generator is broadcast by the base)."""
        tensors = [self.images, self.labels, *optimizer_state_tensors(self.image_opt)]
        if self.label_opt is not None:
            tensors += optimizer_state_tensors(self.label_opt)
        return tensors

    def _dist_work(self, ts, images, labels, d_idx):
        """This rank's share of one iteration: ``(checkpoints, images, labels, real indices, (w_r, w_s))``.

        t_m ≥ R: checkpoints ``ts[rank::R]`` with all of S_t and D_t. t_m < R: checkpoint ``rank mod t_m``,
        whose rows of S_t and D_t are split over the ranks that share it; r and s are then means over a
        part of the rows and are weighted by the part's share (w_r, w_s). A part with no rows is replaced
        by one row with weight 0, so that every rank runs the same collectives.
        """
        R, rank, t_m = self.dist.world_size, self.dist.rank, len(ts)
        if t_m >= R:
            return ts[rank::R], images, labels, d_idx, (1.0, 1.0)
        j = rank % t_m
        sharers, part = len(range(j, R, t_m)), rank // t_m
        lo, hi = shard(images.shape[0], part, sharers)
        images, labels, w_s = ((images[lo:hi], labels[lo:hi], (hi - lo) / images.shape[0]) if hi > lo
                               else (images[:1], labels[:1], 0.0))
        lo, hi = shard(d_idx.numel(), part, sharers)
        d_idx, w_r = (d_idx[lo:hi], (hi - lo) / d_idx.numel()) if hi > lo else (d_idx[:1], 0.0)
        return [ts[j]], images, labels, d_idx, (w_r, w_s)

    def _dist_loss(self, r, s, weights):
        """Eq. 7 over all ranks: all-reduce (Σ_t r_t, Σ_t s_t) first, then |c·R − S|. Returns a loss whose
        value is |c·R − S| and whose gradient is −sign(c·R − S)·∂s_local, plus the global R and S."""
        w_r, w_s = weights
        s_local = s * w_s
        sums = torch.stack([r.detach().to(s.dtype) * w_r, s_local.detach()])
        self.dist.all_reduce_sum_([sums])
        r_all, s_all = sums[0], sums[1]
        value = self.coefficient * r_all - s_all
        loss = value.abs() - torch.sign(value) * (s_local - s_local.detach())
        return loss, r_all, s_all

    def _dist_reduce_grads(self, s_idx) -> None:
        """Sum the S-gradients over the ranks (only the rows of S_t when S_t ⊂ S)."""
        params = [self.images] + ([self.labels] if self.label_opt is not None else [])
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        rows = [p.grad if s_idx is None else p.grad[s_idx] for p in params]
        self.dist.all_reduce_sum_(rows)
        if s_idx is not None:
            for p, g in zip(params, rows):
                p.grad[s_idx] = g

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "images": self.images.detach().clone(),
            "labels": self.labels.detach().clone(),
            "image_opt": self.image_opt.state_dict(),
            "label_opt": self.label_opt.state_dict() if self.label_opt is not None else {},
            "generator": self.generator.get_state(),
            "counters": {"iteration": self.iteration, "seconds": self.seconds},
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict):
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in fields(EADConfig)}}
        mine = asdict(self.config)
        for key in ("ipc", "seed", "syn_batch", "objective", "learn_labels", "label_mode"):
            if saved.get(key) != mine.get(key):
                raise ValueError(f"resume: checkpoint has {key}={saved.get(key)!r}, this run {mine.get(key)!r}")
        if tuple(state["images"].shape) != tuple(self.images.shape):
            raise ValueError(f"resume: checkpoint images {tuple(state['images'].shape)} != {tuple(self.images.shape)}")
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.labels.copy_(state["labels"])
        self.image_opt.load_state_dict(state["image_opt"])
        if self.label_opt is not None:
            self.label_opt.load_state_dict(state["label_opt"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["counters"]["iteration"])
        self.seconds = float(state["counters"]["seconds"])
        self.history = json.loads(state["history"])
        self._dist_synced = False
