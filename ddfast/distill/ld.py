"""Label distillation, LD and LD-RR (label-distillation §3, Algorithm 1, §4.1).

Soft labels ỹ ∈ ℝ^{N×C} are learned for N fixed base examples x̃ so that a model trained on (x̃, ỹ)
does well on the real task. Online meta-learning: the model and the labels are updated in turn;
the model is re-initialised when it overfits.

* ``second_order``: one inner SGD step θ' = θ − α∇θ L_in(x̃, ỹ), label step on CE(f_θ'(x), y) over a
  real minibatch (:func:`ddfast.ops.label_metagrad`), then an Adam step of θ on the inner loss.
* ``rr``: a ridge-regression head. W_l = [Z̃,1]ᵀ([Z̃,1][Z̃,1]ᵀ+λI)⁻¹ỹ (eq. 3, :func:`ddfast.ops.ridge_weights`),
  global W ← (1−α)W + αW_l (pseudo-gradient), label step on CE(s·[z,1]W, y), then an Adam step of the
  feature extractor and the calibration scale s on the base minibatch with the updated labels.

Details (as the method's reference implementation does them):

* labels start uniform 1/C; Adam (lr β = 1e-3) on labels and model; after each label step the labels
  are projected back to distributions: clamp to [0, 1], divide each row by its sum (an all-zero row
  becomes uniform);
* reset: the moving sum of the stepped (RR: global) model's error on the real minibatches over the
  last N_m iterations; when it has not strictly improved on its best for N_w further iterations the
  model (and W, s for RR) is re-initialised and T_i = the iteration of the best window is recorded;
* epochs count passes over the real training set in minibatches of N_o;
* label early stopping: every ``val_every`` epochs a fresh model is trained on the current labels for
  T = mean of the last three T_i steps and scored on the validation split; the best labels (ties: the
  later) and their T are kept.

Presets (§4.1): N_o = 1024; N_i = :func:`default_inner_batch` (10 / 10 / 25 for 10 / 20 / 50 base
examples, 50 from 100 on, 100 for CIFAR-100); epochs = :func:`default_epochs` (400; 800 with more than 100
base examples or for CIFAR-100; Kuzushiji-49 100 / 200); ``model="resnet18-ld"`` is the paper's ResNet-18
with 64 features into the RR layer (Table 14). :meth:`LabelDistiller.evaluate_architectures` trains other
architectures on the labels (Tables 13–14).

Deviations from the paper, and why:

* The second-order label gradient is computed in closed form (:func:`ddfast.ops.label_metagrad`, no
  double backward) — the same quantity as backpropagating through the inner step (tested equal).
* The reset rule's window statistics, the calibration scale's Adam and the simplex projection follow the
  reference implementation where the paper is silent (listed above).
* Digits (8×8) runs use an MLP and CPU-scale presets (fewer epochs / smaller N_o), not a paper setting.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch
from torch import nn

from ddfast.distill.base import Distiller
from ddfast.losses import outer_loss, soft_cross_entropy
from ddfast.distributed import optimizer_state_tensors
from ddfast.evaluate.train import EvalResult, TrainSettings, accuracy, evaluate_labels, make_optimizers, train_on_labels
from ddfast.models import build_model
from ddfast.models.ridge_head import RidgeClassifier
from ddfast.network_passes import PassOptions, autocast, check_pass_options, prepare_images, prepare_model
from ddfast.ops.label_metagrad import label_metagrad, ridge_logits
from ddfast.ops.ridge_solve import ridge_weights

__all__ = ["LDConfig", "LabelDistiller", "LDResult", "project_to_simplex_rows", "default_inner_batch", "default_stats_gap",
           "default_epochs"]

VARIANTS = ("second_order", "rr")


def default_inner_batch(n_base: int, num_classes: int | None = None) -> int:
    """N_i of §4.1: 10 for ≤ 20 base examples, 25 for ≤ 50, 50 above — 100 for CIFAR-100 (≥ 100 classes)
    with 100 or more base examples."""
    if n_base >= 100 and num_classes is not None and num_classes >= 100:
        return 100
    return min(n_base, 10 if n_base <= 20 else 25 if n_base <= 50 else 50)


def default_epochs(n_base: int, num_classes: int) -> int:
    """Epochs of §4.1: 400; 800 for the larger-scale runs (more than 100 base examples, or CIFAR-100's 100
    classes); Kuzushiji-49 (49 classes, a large training set): 100, 200 with more than 100 base examples."""
    if num_classes == 49:
        return 200 if n_base > 100 else 100
    return 800 if n_base > 100 or num_classes >= 100 else 400


def default_stats_gap(n_base: int, num_classes: int) -> int:
    """N_m = N_w of §4.1: 50; 100 for many classes (CIFAR-100, K-49); 200 for > 100 base examples."""
    if num_classes > 20:
        return 100
    return 200 if n_base > 100 else 50


@dataclass
class LDConfig:
    """Hyper-parameters of LD / LD-RR; defaults are the method's (§4.1)."""

    variant: str = "second_order"
    model: str = "lenet"
    epochs: int | None = None  # passes over the real training set (None: default_epochs, §4.1)
    outer_batch: int = 1024  # N_o
    inner_batch: int | None = None  # N_i (default_inner_batch)
    lr: float = 1e-3  # β: Adam on labels and model
    inner_lr: float = 0.01  # α of the inner SGD step (second order)
    pseudo_lr: float = 0.01  # α of the pseudo-gradient (RR)
    ridge_lambda: float = 1.0  # λ (RR)
    calibration_lr: float = 0.01  # Adam lr of the calibration scale (RR)
    stats_gap: int | None = None  # N_m = N_w (default_stats_gap)
    val_every: int = 5  # epochs between label validations
    seed: int = 0
    backend: str = "auto"
    outer_chunk: int | None = 256  # real examples per forward(/backward) chunk: bounds activation memory
    precision: str = "fp32"  # network passes: "fp32" or "bf16" autocast (ddfast.network_passes)
    channels_last: bool = False  # conv nets and images in NHWC
    compile: bool = False  # torch.compile the model (opt-in)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        for name in ("epochs", "outer_batch", "val_every"):
            if name == "epochs" and self.epochs is None:
                continue
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        check_pass_options(self.precision, self.channels_last, self.compile)
        if self.compile and self.variant == "second_order" and self.backend == "reference":
            raise ValueError("compile: the reference second-order path differentiates the network twice "
                             "(create_graph=True), which torch.compile's AOTAutograd does not support; "
                             "use backend='auto' (first-order fused path) or compile=False")


def project_to_simplex_rows(labels: torch.Tensor) -> torch.Tensor:
    """In place: clamp to [0, 1] and normalise each row to sum 1 (an all-zero row becomes uniform)."""
    with torch.no_grad():
        labels.clamp_(0.0, 1.0)
        s = labels.sum(-1, keepdim=True)
        zero = s <= 0
        labels.div_(torch.where(zero, torch.ones_like(s), s))
        if bool(zero.any()):
            labels[zero.expand_as(labels)] = 1.0 / labels.shape[-1]
    return labels


@dataclass
class LDResult:
    """Distilled labels and how to train on them."""

    soft_labels: torch.Tensor  # [N, C], best on validation
    steps_to_overfit: int  # T used to train a fresh model on them
    val_accuracy: float
    calibration: float  # RR: calibration scale of the distillation model at the best labels
    steps_to_overfit_history: list = field(default_factory=list)  # every recorded T_i
    history: list = field(default_factory=list)  # per validation: epoch, iteration, T, val acc
    iterations: int = 0
    resets: int = 0
    seconds: float = 0.0


class LabelDistiller(Distiller):
    """LD / LD-RR on fixed base examples (Algorithm 1).

    ``fit(out_dir=, resume=, progress=, checkpoint_every=1, callback=)`` (:class:`ddfast.distill.base.Distiller`)
    runs ``config.epochs`` epochs, checkpointing every ``checkpoint_every`` epochs; a resumed run continues
    bit-identically, also with another number of ranks.

    Args:
        base_images: x̃ ``[N, c, h, w]`` (normalised like the real data).
        train: real training examples ``(x [M, c, h, w], y [M] int64)`` of the target task.
        val: validation split ``(x, y)`` for label early stopping.
        num_classes: C of the target task (may differ from the base examples' own classes).
        config: :class:`LDConfig`.
        make_model: ``() -> nn.Module`` with ``features`` and a linear ``head`` (default:
            ``ddfast.models.build_model(config.model, c, C, h)``).
        process_group: a ``torch.distributed`` group to distil on R ranks, or None (one process). The
            labels, the distillation model and all RNG state are replicated; each rank takes its rows of
            the real minibatch N_o (the outer loss is a sum over rows scaled by 1/N_o, the label gradient
            and the correct count are all-reduced) and of the validation split (:mod:`ddfast.distributed`).
    """

    checkpoint_every = 1  # epochs

    def __init__(self, base_images, train, val, num_classes: int, config: LDConfig | None = None,
                 make_model: Callable[[], nn.Module] | None = None, *, process_group=None):
        self.config = config = config or LDConfig()
        x_train, y_train = train
        x_val, y_val = val
        _check_images("base_images", base_images)
        _check_images("train x", x_train)
        _check_images("val x", x_val)
        if base_images.shape[0] == 0:
            raise ValueError("base_images: the base set is empty (N = 0)")
        if tuple(base_images.shape[1:]) != tuple(x_train.shape[1:]):
            raise ValueError(f"base_images: expected images shaped like the real data {tuple(x_train.shape[1:])}, got {tuple(base_images.shape[1:])}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        for name, x, y in (("train", x_train, y_train), ("val", x_val, y_val)):
            if y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
                raise ValueError(f"{name} y: expected int64 class indices [{x.shape[0]}], got {tuple(y.shape)} {y.dtype}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise ValueError(f"{name} y: class indices must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
        if x_train.shape[0] == 0 or x_val.shape[0] == 0:
            raise ValueError("train / val: the real data splits must not be empty")
        # Images never change: converted once to the passes' memory format.
        self.passes = PassOptions.of(config)
        base_images, x_train, x_val = (prepare_images(x, self.passes) for x in (base_images, x_train, x_val))
        self.base_images = base_images
        self.x_train, self.y_train, self.x_val, self.y_val = x_train, y_train, x_val, y_val
        self.num_classes = num_classes
        n = base_images.shape[0]
        if config.epochs is None:  # resolved once, so that checkpoints and the loop see a number
            self.config = config = replace(config, epochs=default_epochs(n, num_classes))
        self.inner_batch = min(config.inner_batch or default_inner_batch(n, num_classes), n)
        self.stats_gap = config.stats_gap or default_stats_gap(n, num_classes)
        c, h = base_images.shape[1], base_images.shape[-1]
        self._make_net = make_model or (lambda: build_model(config.model, c, num_classes, h))
        self.train_settings = TrainSettings(
            steps=1, batch_size=self.inner_batch, lr=config.lr, pseudo_lr=config.pseudo_lr,
            ridge_lambda=config.ridge_lambda, calibration_lr=config.calibration_lr, backend=config.backend,
            precision=config.precision,
        )
        self._init_run(config.seed, process_group)
        self.method = f"LD {config.variant}"
        self._outer = None  # distributed: (global real-batch size, this rank's weight n_local / N)
        dtype = base_images.dtype
        self.labels = torch.full((n, num_classes), 1.0 / num_classes, dtype=dtype, device=base_images.device)
        self.labels.requires_grad_(True)
        self.label_opt = torch.optim.Adam([self.labels], lr=config.lr)
        self.epoch = 0  # completed epochs
        self.iteration = 0
        self.resets = 0
        self.steps_list: list[int] = []
        self.best_val_acc = -1.0
        self.best_labels = self.labels.detach().clone()
        self.best_steps = 1
        self.best_calibration = 1.0
        self._reset_model()

    # ------------------------------------------------------------------ model state

    def make_model(self) -> nn.Module:
        """A fresh model of the variant (RR: the feature extractor with a ridge head, W = 0, s = 1)."""
        net = self._make_net()
        if self.config.variant == "rr":
            net = RidgeClassifier.from_model(net)
        return prepare_model(net.to(device=self.base_images.device, dtype=self.base_images.dtype), self.passes)

    def _fresh_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def _reset_model(self):
        seed = self._fresh_seed()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = self.make_model()
        self.optimizers = make_optimizers(self.model, self.train_settings)
        self.window: deque = deque(maxlen=self.stats_gap)
        self.steps_since_reset = 0
        self.lowest_sum = math.inf
        self.since_min = 0

    # ------------------------------------------------------------------ one meta-iteration

    def step(self, x_real, y_real, *, global_batch: int | None = None) -> float:
        """One meta-iteration on a real minibatch; returns the monitored error (%).

        Distributed: ``(x_real, y_real)`` is the global minibatch (the same on every rank) and each rank
        takes its rows; with ``global_batch`` it is already this rank's rows of a minibatch of that size.
        """
        if self.dist.active:
            self._dist_start()
            x_real, y_real = self._outer_rows(x_real, y_real, global_batch)
        idx = torch.randperm(self.labels.shape[0], generator=self.generator)[: self.inner_batch]
        xb = self.base_images[idx]
        yb = self.labels.detach()[idx]
        if self.config.variant == "second_order":
            err = self._step_second_order(idx, xb, yb, x_real, y_real)
        else:
            err = self._step_rr(idx, xb, yb, x_real, y_real)
        self.iteration += 1
        self._monitor(err)
        return err

    def _label_step(self, idx, grad):
        g = torch.zeros_like(self.labels)
        g[idx] = grad.to(g.dtype)
        self.labels.grad = g
        self.label_opt.step()
        project_to_simplex_rows(self.labels)

    def _step_second_order(self, idx, xb, yb, x_real, y_real):
        cfg = self.config
        r = label_metagrad(self.model, xb, yb, x_real, y_real, inner_lr=cfg.inner_lr,
                           outer_chunk=cfg.outer_chunk, backend=cfg.backend, precision=cfg.precision)
        grad, correct, n_real = self._outer_reduce(r.grad, r.outer_correct, x_real.shape[0])
        self._label_step(idx, grad)
        # Model step: Adam on the inner loss with the labels used for the inner step.
        (opt,) = self.optimizers
        opt.zero_grad(set_to_none=True)
        for name, p in self.model.named_parameters():
            p.grad = r.inner_grads[name].clone()
        opt.step()
        return 100.0 * (1.0 - correct / n_real)

    def _step_rr(self, idx, xb, yb, x_real, y_real):
        cfg, model = self.config, self.model
        y = yb.clone().requires_grad_(True)
        dtype = yb.dtype
        with autocast(cfg.precision, xb.device):
            z = model.features(xb).to(dtype)  # float32 features into the ridge solve
            with torch.no_grad():  # real features are constants here: no graph, in chunks (activation memory)
                step = cfg.outer_chunk or x_real.shape[0]
                z_real = torch.cat([model.features(x_real[s : s + step]).to(dtype)
                                    for s in range(0, x_real.shape[0], step)])
        w_local = ridge_weights(z, y, cfg.ridge_lambda, bias=True, backend=cfg.backend)
        w = (1.0 - cfg.pseudo_lr) * model.weight + cfg.pseudo_lr * w_local
        scale = model.scale.detach()
        logits_real = ridge_logits(z_real, w, scale)
        label_loss = outer_loss(logits_real, y_real)
        (gy,) = torch.autograd.grad(label_loss, y, retain_graph=True)
        correct = int((logits_real.detach().argmax(-1) == y_real).sum())
        gy, correct, n_real = self._outer_reduce(gy, correct, x_real.shape[0])
        self._label_step(idx, gy)
        # Feature extractor + calibration on the base minibatch with the updated labels; the
        # gradient also flows through W_l (Algorithm 1, line 12).
        feat_loss = soft_cross_entropy(ridge_logits(z, w, model.scale), self.labels.detach()[idx])
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        feat_loss.backward()
        for opt in self.optimizers:
            opt.step()
        model.weight.copy_(w.detach())
        return 100.0 * (1.0 - correct / n_real)

    def _monitor(self, err: float):
        """Moving-window error; reset after N_w non-improving iterations (Algorithm 1, lines 13–17)."""
        gap = self.stats_gap
        self.window.append(float(err))
        self.steps_since_reset += 1
        if self.steps_since_reset < gap:
            return
        total = math.fsum(self.window)
        if self.steps_since_reset == gap:
            self.lowest_sum, self.since_min = total, 0
        elif total < self.lowest_sum:
            self.lowest_sum, self.since_min = total, 0
        elif self.since_min < gap:
            self.since_min += 1
        else:
            self.steps_list.append(self.steps_since_reset - self.since_min - 1)
            self.resets += 1
            self._reset_model()

    # ------------------------------------------------------------------ validation

    def current_steps(self) -> int:
        """T for training on the labels: mean of the last three T_i (steps so far if no reset yet)."""
        if self.steps_list:
            return max(1, int(sum(self.steps_list[-3:]) / len(self.steps_list[-3:])))
        return max(1, self.steps_since_reset)

    def validate(self) -> float:
        """Train a fresh model on the current labels for T steps; keep the labels if val accuracy ≥ best.

        Distributed: a collective (every rank trains the same model, scores its rows of the split)."""
        steps = self.current_steps()
        seed = self._fresh_seed()
        settings = TrainSettings(**{**self.train_settings.__dict__, "steps": steps})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.make_model()
        labels = self.labels.detach().clone()
        train_on_labels(model, self.base_images, labels, settings, torch.Generator().manual_seed(seed))
        acc = self._val_accuracy(model)
        self.history.append({"epoch": self.epoch, "iteration": self.iteration, "steps": steps, "val_accuracy": acc,
                             "resets": self.resets})
        if acc >= self.best_val_acc:
            self.best_val_acc, self.best_labels, self.best_steps = acc, labels, steps
            self.best_calibration = float(self.model.scale.detach()) if isinstance(self.model, RidgeClassifier) else 1.0
        return acc

    # ------------------------------------------------------------------ training loop

    def iterations_per_epoch(self) -> int:
        return math.ceil(self.x_train.shape[0] / self.config.outer_batch)

    def run_epoch(self, progress=None):
        n, b = self.x_train.shape[0], self.config.outer_batch
        perm = torch.randperm(n, generator=self.generator)
        for s in range(0, n, b):
            sel = perm[s : s + b]
            if self.dist.active:  # gather only this rank's rows of the minibatch
                lo, hi = self.dist.shard(sel.numel())
                err = self.step(self.x_train[sel[lo:hi]], self.y_train[sel[lo:hi]], global_batch=sel.numel())
            else:
                err = self.step(self.x_train[sel], self.y_train[sel])
            if progress is not None:
                progress.update(1)
                progress.set_postfix(resets=self.resets, err=f"{err:.1f}", val=f"{self.best_val_acc:.1f}", refresh=False)
        self.epoch += 1
        if self.epoch % self.config.val_every == 0 or self.epoch == self.config.epochs:
            self.validate()

    # ------------------------------------------------------------------ the loop (ddfast.distill.base)

    def position(self) -> int:
        return self.epoch

    def total(self) -> int:
        return int(self.config.epochs)

    def bar_counts(self) -> tuple[int, int]:
        return self.config.epochs * self.iterations_per_epoch(), self.iteration

    def advance(self, bar) -> dict:
        """One epoch (the checkpoint unit); the bar advances per meta-iteration."""
        self.run_epoch(bar)
        return {"epoch": self.epoch, "iteration": self.iteration, "resets": self.resets,
                "val_accuracy": self.best_val_acc}

    def result(self) -> LDResult:
        return LDResult(
            soft_labels=self.best_labels.clone(), steps_to_overfit=int(self.best_steps),
            val_accuracy=float(self.best_val_acc), calibration=float(self.best_calibration),
            steps_to_overfit_history=list(self.steps_list), history=list(self.history),
            iterations=self.iteration, resets=self.resets, seconds=self.seconds,
        )

    def evaluate(self, x_test, y_test, models: int = 20, seed: int = 0, result: LDResult | None = None) -> EvalResult:
        """Test accuracy of ``models`` fresh models trained on the best labels for T steps (§4.1)."""
        result = result or self.result()
        # The evaluation protocol trains in float32 whatever precision the distillation used.
        settings = TrainSettings(**{**self.train_settings.__dict__, "steps": result.steps_to_overfit, "precision": "fp32"})
        return evaluate_labels(self.make_model, self.base_images, result.soft_labels, x_test, y_test, settings, models, seed)

    def evaluate_architectures(self, x_test, y_test, architectures, models: int = 20, seed: int = 0,
                               result: LDResult | None = None) -> dict[str, EvalResult]:
        """Architecture transfer (§4, Tables 13–14): labels distilled with this distiller's model, then
        ``models`` fresh networks of each other architecture trained on (base images, labels) for T steps
        and scored on ``(x_test, y_test)``.

        Args:
            architectures: ``{name: () -> nn.Module}`` (each with ``features`` and a linear ``head``), or
                a list of :data:`ddfast.models.MODELS` names built for the base images' shape and C.
                LD-RR wraps each in a ridge-regression head, as the distillation model was.
        Returns:
            ``{name: EvalResult}``.
        """
        result = result or self.result()
        if not isinstance(architectures, dict):
            c, h = self.base_images.shape[1], self.base_images.shape[-1]
            architectures = {name: (lambda name=name: build_model(name, c, self.num_classes, h))
                             for name in architectures}
        if not architectures:
            raise ValueError("architectures: expected at least one architecture")
        settings = TrainSettings(**{**self.train_settings.__dict__, "steps": result.steps_to_overfit, "precision": "fp32"})
        out = {}
        for name, factory in architectures.items():
            def make(factory=factory):
                net = factory()
                if self.config.variant == "rr":
                    net = RidgeClassifier.from_model(net)
                return net.to(device=self.base_images.device, dtype=self.base_images.dtype)

            out[name] = evaluate_labels(make, self.base_images, result.soft_labels, x_test, y_test, settings, models, seed)
        return out

    # ------------------------------------------------------------------ distributed

    def dist_info(self) -> dict:
        return {
            "config": asdict(self.config),
            "data": {"base_images": list(self.base_images.shape), "train": list(self.x_train.shape),
                     "val": list(self.x_val.shape), "num_classes": self.num_classes,
                     "dtype": str(self.base_images.dtype)},
            "state": {"epoch": self.epoch, "iteration": self.iteration, "resets": self.resets},
        }

    def replicated_tensors(self) -> list[torch.Tensor]:
        """Labels, model, optimizers (the generator is broadcast by the base)."""
        tensors = [self.labels, self.best_labels, *optimizer_state_tensors(self.label_opt),
                   *self.model.state_dict().values()]
        for opt in self.optimizers:
            tensors += optimizer_state_tensors(opt)
        return tensors

    def _outer_rows(self, x_real, y_real, global_batch):
        """This rank's rows of the real minibatch; records (N, n_local / N) for :meth:`_outer_reduce`."""
        if global_batch is None:
            global_batch = x_real.shape[0]
            lo, hi = self.dist.shard(global_batch)
            x_real, y_real = x_real[lo:hi], y_real[lo:hi]
        n_local = x_real.shape[0]
        if global_batch < max(n_local, 1):
            raise ValueError(f"global_batch: expected ≥ {max(n_local, 1)} (this rank's rows), got {global_batch}")
        if n_local == 0:  # fewer rows than ranks: one row with weight 0 keeps the replicated step in lockstep
            x_real, y_real = self.x_train[:1], self.y_train[:1]
        self._outer = (int(global_batch), n_local / global_batch)
        return x_real, y_real

    def _outer_reduce(self, grad, correct, n_local):
        """``(∂L_out/∂ỹ, correct, N)`` over the global minibatch. L_out is a mean over real rows, so each
        rank's mean-gradient is weighted by n_local / N and summed with the correct counts (one
        all-reduce of N_i·C + 1 numbers). One process: returned unchanged."""
        if not self.dist.active:
            return grad, correct, n_local
        n, weight = self._outer
        buf = [grad * weight, grad.new_tensor([float(correct) if weight > 0 else 0.0])]
        self.dist.all_reduce_sum_(buf)
        return buf[0], int(round(float(buf[1]))), n

    def _val_accuracy(self, model) -> float:
        """Validation accuracy (%); distributed: each rank scores its rows, the correct counts are summed."""
        if not self.dist.active:
            return accuracy(model, self.x_val, self.y_val)
        n = self.x_val.shape[0]
        lo, hi = self.dist.shard(n)
        acc = accuracy(model, self.x_val[lo:hi], self.y_val[lo:hi])
        (correct,) = self.dist.all_reduce_sum_([torch.tensor([round(acc * (hi - lo) / 100.0)], dtype=torch.float64)])
        return 100.0 * int(correct.item()) / n

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "labels": self.labels.detach().clone(),
            "label_opt": self.label_opt.state_dict(),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "generator": self.generator.get_state(),
            "window": list(self.window),
            "counters": {"epoch": self.epoch, "iteration": self.iteration, "resets": self.resets,
                         "steps_since_reset": self.steps_since_reset, "since_min": self.since_min,
                         "lowest_sum": None if math.isinf(self.lowest_sum) else self.lowest_sum,
                         "best_val_acc": self.best_val_acc, "best_steps": self.best_steps,
                         "best_calibration": self.best_calibration, "seconds": self.seconds},
            "steps_list": list(self.steps_list),
            "best_labels": self.best_labels,
            "history": json.dumps(self.history),
        }

    def load_state_dict(self, state: dict):
        saved = {k: v for k, v in state["config"].items() if k in {f.name for f in fields(LDConfig)}}
        mine = asdict(self.config)
        for key in ("variant", "model", "outer_batch", "inner_batch", "seed"):
            if saved.get(key) != mine.get(key):
                raise ValueError(f"resume: checkpoint has {key}={saved.get(key)!r}, this run {mine.get(key)!r}")
        with torch.no_grad():
            self.labels.copy_(state["labels"])
        self.label_opt.load_state_dict(state["label_opt"])
        self.model = self.make_model()
        self.model.load_state_dict(state["model"])
        self.optimizers = make_optimizers(self.model, self.train_settings)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self.generator.set_state(state["generator"])
        self.window = deque((float(v) for v in state["window"]), maxlen=self.stats_gap)
        c = state["counters"]
        self.epoch, self.iteration, self.resets = c["epoch"], c["iteration"], c["resets"]
        self.steps_since_reset, self.since_min = c["steps_since_reset"], c["since_min"]
        self.lowest_sum = math.inf if c["lowest_sum"] is None else c["lowest_sum"]
        self.best_val_acc, self.best_steps = c["best_val_acc"], c["best_steps"]
        self.best_calibration, self.seconds = c["best_calibration"], c["seconds"]
        self.steps_list = [int(s) for s in state["steps_list"]]
        self.best_labels = state["best_labels"].to(self.labels.device, copy=True)
        self.history = json.loads(state["history"])
        self._dist_synced = False


def _check_images(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: expected float images [n, c, h, w], got {tuple(x.shape)} {x.dtype}")
