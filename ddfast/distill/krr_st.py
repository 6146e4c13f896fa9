"""KRR-ST: kernel ridge regression on a self-supervised target (krr-st-selfsup §3.2, Algorithm 1).

Distils unlabeled images X_t into (X_s, Y_s): m images and m target representations. With a pool
model's feature extractor f_ω (features with a bias column appended, as the method's code does),

    L_outer(X_s, Y_s) = mean ‖g_φ(X̄_t) − f_ω(X̄_t) f_ω(X_s)ᵀ (K_ss + λ·tr(K_ss) I)⁻¹ Y_s‖²       (eq. 4)

computed by :func:`ddfast.ops.krr_predict` (one Cholesky factor in the forward, reused by the
backward), with the regulariser's trace detached.

Loss scale: the paper writes ½‖·‖²_F (eq. 2, 4, 5 and Algorithm 1); the method's code uses the mean
(``F.mse_loss``), i.e. the paper's loss divided by b·d_y/2, and its learning rates are tuned for the mean,
so the mean is used here for eq. 4 and eq. 2 alike. AdamW on X_s, Y_s is invariant to that constant
(up to ε); the pool's SGD is not, so ``pool_lr`` is the code's value for the mean. Each meta-step samples a real batch X̄_t and a pool model uniformly, updates X_s and
Y_s by AdamW with a linearly decayed learning rate, then trains the sampled model one full-batch SGD
step on ``mean ‖h_W∘f_ω(X_s) − Y_s‖²`` (eq. 2), or re-initialises it after T steps (lines 11–15).
Pool models are initialised with t ~ U{1..T} such steps on the initial (X_s, Y_s) (§3.2).
g_φ(X_t) never changes: it is computed once for the whole training set and cached.

Paper vs the official code (both available; the defaults are the paper's):

* ``real_augment`` (default False, the paper's Algorithm 1): the official step augments the real batch
  (random crop, 4 px padding at 32 px — ``image_size // 8`` here —, and a horizontal flip) before both
  g_φ and f_ω, so g_φ is evaluated on every augmented batch (the target model is then required, the
  cache is not used). The code also uses b = 1024 (``batch_size``; default 256 here, CPU scale).
* ``pool_reset="paper"`` (default): a model that has taken T steps is re-initialised with t_i = 0
  (Algorithm 1, lines 11–15). ``"official"``: the official pool never resets t_i, so a model at T is
  re-initialised on every later visit (it is used fresh from then on).

README/docs numbers were produced with the defaults (paper) unless stated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.augment.crop import random_crop_flip
from ddfast.distill.base import Distiller
from ddfast.distributed import optimizer_state_tensors
from ddfast.models import build_model
from ddfast.network_passes import (PassOptions, autocast, check_pass_options, fold_batchnorm, prepare_images,
                                   prepare_model)
from ddfast.ops.ridge_solve import krr_predict
from ddfast.ssl.barlow_twins import encode

__all__ = ["KRRSTConfig", "KRRSTResult", "KRRSTDistiller", "ModelPool", "outer_loss"]

INITS = ("target", "gaussian")
POOL_RESETS = ("paper", "official")


@dataclass
class KRRSTConfig:
    """Hyper-parameters of Algorithm 1; defaults are the paper's (§4.1) unless marked CPU.

    m: synthetic examples. steps: meta-steps (paper 160,000). batch_size: b real images per meta-step
    (paper's code 1024). lr: AdamW initial learning rate (1e-3 CIFAR-100; 1e-5 Tiny/ImageNet), decayed
    linearly to ``lr * lr_end_factor``. pool_size: l. pool_steps: T. pool_lr/momentum/wd: the pool's SGD.
    lam: λ of the regulariser λ·tr(K_ss). init: ``"target"`` (Y_s = g_φ(X_s), Algorithm 1) or
    ``"gaussian"`` (the "w/o init" ablation of appendix E, Y_s ~ N(0, I)). arch/widths/norm: the pool
    network (ConvNet-D3 128-256-512 BN at 32×32). grad_clip: max-norm of each meta-gradient (0 = off).
    solve_dtype: dtype of the factorisation (None = the data's, float32 as in the method's code).
    real_augment: crop + flip of the real batch before g_φ and f_ω (the official code; paper: off).
    pool_reset: ``"paper"`` (t_i ← 0 after T steps) or ``"official"`` (t_i stays T: re-initialised on every
    visit from then on).
    """

    m: int = 100
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_end_factor: float = 1e-3
    pool_size: int = 10
    pool_steps: int = 1000
    pool_lr: float = 0.1
    pool_momentum: float = 0.9
    pool_wd: float = 1e-3
    lam: float = 1e-6
    init: str = "target"
    arch: str = "convnet"
    widths: tuple[int, ...] | None = None
    norm: str = "batch"
    grad_clip: float = 0.0
    solve_dtype: str | None = None
    backend: str = "auto"
    seed: int = 0
    precision: str = "fp32"  # network passes: "fp32" or "bf16" autocast; the solve stays float32/64
    channels_last: bool = False  # pool models and images in NHWC
    compile: bool = False  # torch.compile the pool models (opt-in)
    fold_bn: bool = False  # outer-loss passes with BatchNorm folded into the convolutions (eval mode)
    real_augment: bool = False  # official code: crop + flip of the real batch (needs the target model)
    pool_reset: str = "paper"  # "paper" | "official"

    def __post_init__(self):
        for name in ("m", "steps", "batch_size", "pool_size", "pool_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("lr", "lam", "pool_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        if not 0 < self.lr_end_factor <= 1:
            raise ValueError(f"lr_end_factor: expected a value in (0, 1], got {self.lr_end_factor!r}")
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")
        if self.pool_reset not in POOL_RESETS:
            raise ValueError(f"pool_reset: expected one of {POOL_RESETS}, got {self.pool_reset!r}")
        if self.solve_dtype not in (None, "float32", "float64"):
            raise ValueError(f"solve_dtype: expected None, 'float32' or 'float64', got {self.solve_dtype!r}")
        if self.widths is not None:
            self.widths = tuple(int(w) for w in self.widths)
        check_pass_options(self.precision, self.channels_last, self.compile)


@dataclass
class KRRSTResult:
    """The distilled set and how it was made."""

    images: torch.Tensor  # X_s [m, c, h, w]
    targets: torch.Tensor  # Y_s [m, d_y]
    init_indices: torch.Tensor  # rows of X_t that initialised X_s
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def outer_loss(features: nn.Module, x_syn, y_syn, x_real, y_real, *, lam: float = 1e-6, solve_dtype=None,
               backend: str = "auto", precision: str = "fp32") -> torch.Tensor:
    """Eq. 4 (mean form) for one feature extractor; the real features carry no graph.

    ``precision="bf16"`` runs the two feature passes under bf16 autocast; the features are cast back
    to Y_s's dtype, so the kernel-ridge solve and the loss stay float32 (or ``solve_dtype``).
    """
    with autocast(precision, x_syn.device):
        z_syn = features(x_syn)
        with torch.no_grad():
            z_real = features(x_real)
    z_syn, z_real = z_syn.to(y_syn.dtype), z_real.to(y_syn.dtype)
    pred = krr_predict(z_real, z_syn, y_syn, lam, reg="trace", detach_reg=True, bias=True,
                       solve_dtype=solve_dtype, backend=backend)
    return F.mse_loss(pred, y_real)


def _cpu_tree(tree):
    """``tree`` (nested dicts / lists of tensors, an optimizer state) with every tensor on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu_tree(v) for v in tree)
    return tree


class ModelPool:
    """The pool M = {(ω_i, W_i, t_i)} of Algorithm 1 with its SGD optimisers.

    Models are built by ``make_model()`` under a seed drawn from ``generator`` so that a re-initialised
    model is reproducible and a resumed run continues bit-identically.
    """

    def __init__(self, make_model: Callable[[], nn.Module], size: int, max_steps: int, lr: float,
                 momentum: float, weight_decay: float, generator: torch.Generator, precision: str = "fp32",
                 reset: str = "paper"):
        if reset not in POOL_RESETS:
            raise ValueError(f"reset: expected one of {POOL_RESETS}, got {reset!r}")
        self.make_model, self.size, self.max_steps = make_model, size, max_steps
        self.reset = reset
        self.precision = precision
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.generator = generator
        self.models: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.iterations: list[int] = []
        self.resets = 0

    def _fresh(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make_model()
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return model, opt

    def train_step(self, idx: int, x_syn: torch.Tensor, y_syn: torch.Tensor) -> float:
        """One full-batch SGD step of model ``idx`` on mean‖h_W∘f_ω(X_s) − Y_s‖² (eq. 2)."""
        model, opt = self.models[idx], self.optimizers[idx]
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(self.precision, x_syn.device):
            out = model(x_syn)
        loss = F.mse_loss(out.to(y_syn.dtype), y_syn)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def initialize(self, x_syn: torch.Tensor, y_syn: torch.Tensor, progress=None, dist=None) -> None:
        """Each model: fresh weights, then t ~ U{1..T} steps on the initial (X_s, Y_s) (§3.2).

        ``dist`` (a :class:`ddfast.distributed.DistContext`): the seeds and t_i are drawn on every rank
        from the shared generator, model i is trained by rank i mod R only, then broadcast from it
        (weights and SGD state), so every rank ends with the same pool as a single process.
        """
        self.models, self.optimizers, self.iterations = [], [], []
        spread = dist is not None and dist.active
        for i in range(self.size):
            model, opt = self._fresh()
            self.models.append(model)
            self.optimizers.append(opt)
            t = int(torch.randint(1, self.max_steps + 1, (1,), generator=self.generator))
            self.iterations.append(t)
            if not spread or i % dist.world_size == dist.rank:
                for _ in range(t):
                    self.train_step(i, x_syn, y_syn)
            if progress is not None:
                progress(i + 1, self.size)
        if spread:
            for i, (model, opt) in enumerate(zip(self.models, self.optimizers)):
                owner = i % dist.world_size
                dist.broadcast_(list(model.state_dict().values()), src=owner)
                # pickled with CPU tensors (a CUDA tensor would unpickle onto the owner's device index);
                # load_state_dict moves the state onto this rank's parameters' device
                opt_state = dist.broadcast_object(_cpu_tree(opt.state_dict()) if dist.rank == owner else None, src=owner)
                if dist.rank != owner:
                    opt.load_state_dict(opt_state)

    def update(self, idx: int, x_syn: torch.Tensor, y_syn: torch.Tensor) -> None:
        """Algorithm 1 lines 11–15: one more step while t_i < T, else re-initialise with t_i = 0
        (``reset="official"``: t_i stays T, so the model is re-initialised on every later visit)."""
        if self.iterations[idx] < self.max_steps:
            self.iterations[idx] += 1
            self.train_step(idx, x_syn, y_syn)
        else:
            self.models[idx], self.optimizers[idx] = self._fresh()
            if self.reset == "paper":
                self.iterations[idx] = 0
            self.resets += 1

    def state_dict(self) -> dict:
        return {
            "models": [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.models],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "iterations": list(self.iterations),
            "resets": self.resets,
        }

    def load_state_dict(self, state: dict) -> None:
        self.models, self.optimizers = [], []
        for msd, osd in zip(state["models"], state["optimizers"]):
            model = self.make_model()
            model.load_state_dict(msd)
            opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            opt.load_state_dict(osd)
            self.models.append(model)
            self.optimizers.append(opt)
        self.iterations = [int(t) for t in state["iterations"]]
        self.resets = int(state["resets"])


class KRRSTDistiller(Distiller):
    """KRR-ST (Algorithm 1) on unlabeled images.

    ``fit(out_dir=, resume=, progress=, checkpoint_every=100, callback=)`` (:class:`ddfast.distill.base.Distiller`)
    initialises the pool, then runs to ``config.steps`` meta-steps; a checkpoint (X_s, Y_s, optimiser, pool,
    RNG) is written after the pool and every ``checkpoint_every`` steps; a resumed run continues
    bit-identically, also with another number of ranks.

    Args:
        x_train: X_t ``[n, c, h, w]`` normalised images (labels are never used).
        target: g_φ, a module or callable mapping images to ``[k, d_y]`` representations; or None when
            ``train_targets`` is given.
        config: :class:`KRRSTConfig`.
        train_targets: g_φ(X_t) ``[n, d_y]`` if already computed (else computed once here).
        make_model: ``() -> nn.Module`` with ``features`` and a linear ``head`` of width d_y (default:
            ``build_model(config.arch, c, d_y, h, widths=..., norm=...)``).
        process_group: a ``torch.distributed`` group to distil on R ranks, or None (one process).
            X_s, Y_s, their optimizer, the RNG and the model pool are replicated (the pool's initial
            training is spread over the ranks, model i on rank i mod R, then broadcast); each rank takes
            its rows of the real batch b (eq. 4's mean is a sum over rows scaled by 1/(b·d_y)) and the
            gradients of X_s, Y_s are all-reduced (:mod:`ddfast.distributed`).
    """

    method = "KRR-ST"
    unit = "step"
    checkpoint_every = 100

    def __init__(self, x_train: torch.Tensor, target=None, config: KRRSTConfig | None = None, *,
                 train_targets: torch.Tensor | None = None, make_model: Callable[[], nn.Module] | None = None,
                 process_group=None):
        self.config = config = config or KRRSTConfig()
        if not isinstance(x_train, torch.Tensor) or x_train.dim() != 4 or x_train.dtype not in (torch.float32, torch.float64):
            got = f"{tuple(x_train.shape)} {x_train.dtype}" if isinstance(x_train, torch.Tensor) else type(x_train).__name__
            raise ValueError(f"x_train: expected float images [n, c, h, w], got {got}")
        n = x_train.shape[0]
        if config.m > n:
            raise ValueError(f"m: {config.m} synthetic examples requested but the data set has only {n} images")
        if config.real_augment and target is None:
            raise ValueError("target: real_augment=True evaluates g_φ on every augmented real batch; give the "
                             "target model (train_targets alone is not enough)")
        self.target = target
        if train_targets is None:
            if target is None:
                raise ValueError("target: give the target model g_φ or its outputs train_targets")
            train_targets = encode(target, x_train)
        if train_targets.dim() != 2 or train_targets.shape[0] != n:
            raise ValueError(f"train_targets: expected g_φ(X_t) of shape [{n}, d_y], got {tuple(train_targets.shape)}")
        if not bool(torch.isfinite(train_targets).all()):
            raise ValueError("train_targets: g_φ(X_t) has non-finite values")
        self.passes = PassOptions.of(config)
        self.x_train = prepare_images(x_train, self.passes)  # converted once: X_t never changes
        self.train_targets = train_targets.to(device=x_train.device, dtype=x_train.dtype)
        self.out_dim = train_targets.shape[1]
        c, h = x_train.shape[1], x_train.shape[-1]
        options = {"widths": config.widths, "norm": config.norm} if config.arch == "convnet" else {}
        self._make_net = make_model or (lambda: build_model(config.arch, c, self.out_dim, h, **options))
        self.solve_dtype = getattr(torch, config.solve_dtype) if config.solve_dtype else None
        self._init_run(config.seed, process_group)

        # Algorithm 1 lines 3–4: X_s a random subset, Y_s = g_φ(X_s) (or N(0, I) for "w/o init").
        self.init_indices = torch.randperm(n, generator=self.generator)[: config.m]
        self.images = prepare_images(x_train[self.init_indices].clone(), self.passes).requires_grad_(True)
        if config.init == "target":
            y0 = self.train_targets[self.init_indices].clone()
        else:
            # drawn on the CPU generator (the same Y_s on every device), then moved to the data's device
            y0 = torch.randn(config.m, self.out_dim, generator=self.generator, dtype=x_train.dtype).to(x_train.device)
        self.targets = y0.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([self.images, self.targets], lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=1.0,
                                                           end_factor=config.lr_end_factor, total_iters=config.steps)
        self.pool = ModelPool(self.make_model, config.pool_size, config.pool_steps, config.pool_lr,
                              config.pool_momentum, config.pool_wd, self.generator, config.precision,
                              reset=config.pool_reset)
        self.step_count = 0

    def make_model(self) -> nn.Module:
        return prepare_model(self._make_net().to(device=self.x_train.device, dtype=self.x_train.dtype), self.passes)

    # ------------------------------------------------------------------ Algorithm 1

    def initialize_pool(self, progress=None) -> None:
        """Line 5: the model pool, trained on the initial (X_s, Y_s)."""
        self._dist_start()
        self.pool.initialize(self.images.detach(), self.targets.detach(), progress, dist=self.dist)

    def step(self) -> float:
        """One meta-step (lines 7–15); returns the outer loss."""
        self._dist_start()
        if not self.pool.models:
            self.initialize_pool()
        cfg = self.config
        real = torch.randint(0, self.x_train.shape[0], (cfg.batch_size,), generator=self.generator)
        idx = int(torch.randint(0, cfg.pool_size, (1,), generator=self.generator))
        model = self.pool.models[idx]
        model.eval()
        x_real = self.x_train[real]
        if cfg.real_augment:  # the whole batch's draws, so that they do not depend on the number of ranks
            x_real = random_crop_flip(x_real, self.generator, padding=max(1, x_real.shape[-1] // 8), flip=True)
        rows = torch.arange(real.numel(), device=real.device)  # host indices, like the draw
        if self.dist.active:  # this rank's rows of the real batch
            rows, weight = self._real_rows(rows)
        x_real = x_real[rows]
        y_real = (encode(self.target, x_real).to(self.train_targets.dtype) if cfg.real_augment
                  else self.train_targets[real[rows]])
        features = fold_batchnorm(model.features) if cfg.fold_bn else model.features
        loss = outer_loss(features, self.images, self.targets, x_real, y_real,
                          lam=cfg.lam, solve_dtype=self.solve_dtype, backend=cfg.backend, precision=cfg.precision)
        self.optimizer.zero_grad(set_to_none=True)
        gx, gy = torch.autograd.grad(loss, [self.images, self.targets])
        if self.dist.active:
            gx, gy, loss = self._reduce(gx, gy, loss, weight)
        self.images.grad, self.targets.grad = gx, gy
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_([self.images], cfg.grad_clip)
            nn.utils.clip_grad_norm_([self.targets], cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.pool.update(idx, self.images.detach(), self.targets.detach())
        self.step_count += 1
        value = float(loss.detach())
        self.history.append({"step": self.step_count, "loss": value, "model": idx})
        return value

    # ------------------------------------------------------------------ the loop (ddfast.distill.base)

    def position(self) -> int:
        return self.step_count

    def total(self) -> int:
        return int(self.config.steps)

    def setup(self, bar) -> bool:
        """Line 5 (the model pool) unless a resumed checkpoint holds it."""
        if self.pool.models:
            return False
        if bar is not None:
            bar.set_postfix_str("initialising the model pool")
        self.initialize_pool()
        return True

    def advance(self, bar) -> dict:
        self.step()
        record = self.history[-1]
        self._tick(bar, record)
        return record

    def result(self) -> KRRSTResult:
        return KRRSTResult(images=self.images.detach().clone(), targets=self.targets.detach().clone(),
                           init_indices=self.init_indices.clone(), history=list(self.history),
                           steps=self.step_count, seconds=self.seconds)

    # ------------------------------------------------------------------ distributed

    def dist_info(self) -> dict:
        return {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "data": {"x_train": list(self.x_train.shape), "train_targets": list(self.train_targets.shape),
                     "dtype": str(self.x_train.dtype)},
            "state": {"step": self.step_count, "pool": len(self.pool.models), "pool_resets": self.pool.resets},
        }

    def replicated_tensors(self) -> list[torch.Tensor]:
        """X_s, Y_s, the optimizer and the pool (the generator is broadcast by the base)."""
        tensors = [self.images, self.targets, *optimizer_state_tensors(self.optimizer)]
        for model, opt in zip(self.pool.models, self.pool.optimizers):
            tensors += [*model.state_dict().values(), *optimizer_state_tensors(opt)]
        return tensors

    def _real_rows(self, real: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of the real batch indices and its weight b_local / b in eq. 4's mean."""
        lo, hi = self.dist.shard(real.numel())
        if hi == lo:  # fewer rows than ranks: one row with weight 0 keeps the replicated step in lockstep
            return real[:1], 0.0
        return real[lo:hi], (hi - lo) / real.numel()

    def _reduce(self, gx, gy, loss, weight):
        """Σ over ranks of weight · (∂L/∂X_s, ∂L/∂Y_s, L): each rank's loss is a mean over its rows, so the
        weighted sum is the mean over the global batch (one all-reduce of m·(c·h·w + d_y) + 1 numbers)."""
        buf = [gx * weight, gy * weight, (loss.detach() * weight).reshape(1)]
        self.dist.all_reduce_sum_(buf)
        return buf[0], buf[1], buf[2][0]

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
            "images": self.images.detach().clone(),
            "targets": self.targets.detach().clone(),
            "init_indices": self.init_indices.clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": json.dumps(self.scheduler.state_dict()),
            "pool": self.pool.state_dict(),
            "generator": self.generator.get_state(),
            "step_count": self.step_count,
            "seconds": self.seconds,
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in fields(KRRSTConfig)}}
        mine = asdict(self.config)
        for key in ("m", "batch_size", "pool_size", "arch", "widths", "norm", "init", "seed"):
            a, b = saved.get(key), mine.get(key)
            a, b = (list(a) if isinstance(a, (list, tuple)) else a), (list(b) if isinstance(b, (list, tuple)) else b)
            if a != b:
                raise ValueError(f"resume: checkpoint has {key}={a!r}, this run {b!r}")
        if tuple(state["images"].shape) != tuple(self.images.shape) or state["targets"].shape[1] != self.out_dim:
            raise ValueError(f"resume: checkpoint holds X_s {tuple(state['images'].shape)} / Y_s "
                             f"{tuple(state['targets'].shape)}, this run {tuple(self.images.shape)} / [m, {self.out_dim}]")
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.targets.copy_(state["targets"])
        self.init_indices = state["init_indices"].clone()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(json.loads(state["scheduler"]))
        self.pool.load_state_dict(state["pool"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step_count"])
        self.seconds = float(state["seconds"])
        self.history = json.loads(state["history"])
        self._dist_synced = False
