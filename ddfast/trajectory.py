"""Training trajectories {(θ_t, η_t)} of a network trained on the real set, stored on disk (effect-alignment §3.2).

The replacement-effect estimator of effect alignment (eq. 4–5) needs the parameters θ_t and learning
rates η_t of one SGD run on the real training set D, and samples t_m of its time steps with a
distribution P(t) that follows the learning rate. :func:`train_trajectory` trains that run and writes,
into one folder,

* ``ckpt-000123.safetensors``: the model ``state_dict`` (parameters and buffers) after 123 SGD steps,
  every ``every`` steps, always including step 0 (the initialisation) and the final step;
* ``trajectory.json``: the index: architecture and model options (to rebuild the network), data set
  name and a sha256 of the training tensors, optimizer settings, seed, batch size, and one record
  ``{"step", "lr", "epoch", "train_loss", "file"}`` per checkpoint, then ``"complete"`` and the final
  ``"test_accuracy"``;
* ``resume.safetensors``: model, optimizer, data order and RNG states, removed once the run is complete.

Every file is written atomically (temporary file, fsync, rename), the checkpoint before the resume
state and the resume state before the index, so an interrupt never leaves the index pointing at a
missing or half-written file, and ``resume=True`` continues bit-identically.

:class:`Trajectory` reads the index and streams checkpoints from disk one at a time, so memory does
not grow with the trajectory's length; :meth:`Trajectory.sample` draws t_m checkpoints with P(t) ∝ η_t.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ddfast.artifacts import _atomic_write, load_state, save_state, write_json_atomic
from ddfast.models import MODELS, build_model

__all__ = [
    "Trajectory",
    "train_trajectory",
    "data_hash",
    "lr_at",
    "INDEX_FILE",
    "RESUME_FILE",
    "FORMAT",
    "VERSION",
    "SCHEDULES",
]

INDEX_FILE = "trajectory.json"
RESUME_FILE = "resume.safetensors"
FORMAT = "ddfast-trajectory"
VERSION = 1
SCHEDULES = ("constant", "step", "cosine")

# Index keys that must match for a resumed run to continue the stored one.
_CONFIG_KEYS = ("format", "version", "arch", "model_options", "dataset", "data_hash", "train_examples",
                "in_channels", "num_classes", "image_size", "optimizer", "seed", "batch_size", "epochs", "every",
                "steps_per_epoch", "total_steps")


def _ckpt_name(step: int) -> str:
    return f"ckpt-{step:06d}.safetensors"


def data_hash(train_x: torch.Tensor, train_y: torch.Tensor) -> str:
    """``"sha256:<hex>"`` of the training tensors: dtype, shape and bytes of ``train_x`` then of ``train_y``."""
    h = hashlib.sha256()
    for name, t in (("train_x", train_x), ("train_y", train_y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{str(t.dtype)}:{list(t.shape)};".encode())
        if t.numel():
            h.update(memoryview(t.view(-1).view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def lr_at(step: int, optimizer: dict, steps_per_epoch: int, total_steps: int) -> float:
    """η_t, the learning rate of SGD step ``step`` (θ_t → θ_{t+1}); also the rate recorded for θ_t.

    ``constant``: η; ``step``: η·γ^(number of milestones ≤ the step's epoch); ``cosine``:
    η·½(1 + cos(π t / T)) with T the total steps (η_T = 0).
    """
    lr, schedule = float(optimizer["lr"]), optimizer["schedule"]
    if schedule == "constant":
        return lr
    if schedule == "step":
        epoch = step // steps_per_epoch
        return lr * float(optimizer["gamma"]) ** sum(1 for m in optimizer["milestones"] if epoch >= m)
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _jsonable(obj, name: str):
    """``obj`` with tuples as lists, checked to be JSON-serialisable (so the index can rebuild the model)."""
    def norm(v):
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError(f"{name}: values must be JSON-serialisable (numbers, strings, lists), got {type(v).__name__}")

    return norm(obj)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class Trajectory:
    """A stored training trajectory {(θ_t, η_t)}: the index in memory, checkpoints read from disk on demand.

    Open one with :meth:`open`. ``len(traj)`` checkpoints at SGD steps ``traj.steps`` with learning
    rates ``traj.lrs``; ``traj.load(i)`` reads the ``i``-th state dict, ``traj.iter(indices)`` streams
    several, and ``traj.sample(t_m, generator)`` draws checkpoint indices with P(t) ∝ η_t.
    """

    def __init__(self, path: str, index: dict):
        self.path = str(path)
        self.index = index
        self._checkpoints = index["checkpoints"]

    @classmethod
    def open(cls, path: str | os.PathLike) -> Trajectory:
        """Read and validate ``path/trajectory.json`` (``path`` may also be the index file itself).

        Raises:
            FileNotFoundError: no such folder, no index in it, or a checkpoint file it lists is missing.
            ValueError: not a trajectory index, no checkpoints, or steps not strictly increasing.
        """
        path = os.fspath(path)
        if os.path.basename(path) == INDEX_FILE and os.path.isfile(path):
            path = os.path.dirname(path) or "."
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such trajectory folder; write one with "
                                    f"`ddfast trajectory --dataset <name> --arch <arch> --out {path}`")
        index_path = os.path.join(path, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{index_path}: missing; {path} holds no trajectory (write one with "
                                    f"`ddfast trajectory --dataset <name> --arch <arch> --out {path}`)")
        try:
            with open(index_path) as f:
                index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index_path}: not valid JSON ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: not a ddfast trajectory index (expected format {FORMAT!r})")
        if index.get("version") != VERSION:
            raise ValueError(f"{index_path}: index version {index.get('version')!r}, this ddfast reads {VERSION}")
        checkpoints = index.get("checkpoints")
        if not isinstance(checkpoints, list) or not checkpoints:
            raise ValueError(f"{index_path}: the trajectory is empty (no checkpoints)")
        last = -1
        for i, c in enumerate(checkpoints):
            if not isinstance(c, dict) or not all(k in c for k in ("step", "lr", "file")):
                raise ValueError(f"{index_path}: checkpoint {i} lacks 'step', 'lr' or 'file'")
            if c["step"] <= last:
                raise ValueError(f"{index_path}: checkpoint steps must increase strictly, got step {c['step']} "
                                 f"after {last} (checkpoint {i})")
            if not (isinstance(c["lr"], (int, float)) and math.isfinite(c["lr"]) and c["lr"] >= 0):
                raise ValueError(f"{index_path}: checkpoint {i} (step {c['step']}) has learning rate {c['lr']!r}, "
                                 f"expected a finite value >= 0")
            last = c["step"]
            file = os.path.join(path, c["file"])
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: checkpoint {i} (step {c['step']}) listed in {index_path} is missing")
        return cls(path, index)

    def __len__(self) -> int:
        return len(self._checkpoints)

    def __repr__(self) -> str:
        return (f"Trajectory({self.path!r}, arch={self.arch!r}, dataset={self.index.get('dataset')!r}, "
                f"checkpoints={len(self)}, steps={self.steps[-1]}, complete={self.complete})")

    @property
    def arch(self) -> str:
        return self.index["arch"]

    @property
    def model_options(self) -> dict:
        return dict(self.index.get("model_options") or {})

    @property
    def steps(self) -> list[int]:
        """SGD step t of each checkpoint (0 = the initialisation)."""
        return [int(c["step"]) for c in self._checkpoints]

    @property
    def lrs(self) -> torch.Tensor:
        """η_t of each checkpoint, float64 ``[len(self)]``."""
        return torch.tensor([float(c["lr"]) for c in self._checkpoints], dtype=torch.float64)

    @property
    def complete(self) -> bool:
        """Whether training ran to its last step (the final state is the last checkpoint)."""
        return bool(self.index.get("complete", False))

    @property
    def test_accuracy(self) -> float | None:
        """Test accuracy (%) of the final state, once the run is complete."""
        return self.index.get("test_accuracy")

    def _index(self, i: int) -> int:
        n = len(self)
        if not isinstance(i, int) or isinstance(i, bool):
            if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point():
                i = int(i)
            else:
                raise TypeError(f"i: expected an int checkpoint index, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"i: checkpoint index {i} out of range for a trajectory of {n} checkpoints")
        return i % n

    def file(self, i: int) -> str:
        """Path of the ``i``-th checkpoint file."""
        return os.path.join(self.path, self._checkpoints[self._index(i)]["file"])

    def load(self, i: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The state dict θ_t of the ``i``-th checkpoint (parameters and buffers), read from disk now."""
        return load_file(self.file(i), device=str(device))

    def iter(self, indices: Iterable[int] | torch.Tensor | None = None,
             device: str | torch.device = "cpu") -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield ``(i, state)`` for each index (default: all), reading one checkpoint at a time."""
        if indices is None:
            indices = range(len(self))
        elif isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        for i in indices:
            yield int(i), self.load(int(i), device=device)

    def final(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The last stored state (θ_T once the run is :attr:`complete`)."""
        return self.load(len(self) - 1, device=device)

    def build_model(self) -> nn.Module:
        """A fresh, randomly initialised network of the stored architecture and options."""
        ix = self.index
        return build_model(ix["arch"], ix["in_channels"], ix["num_classes"], ix["image_size"], **self.model_options)

    def load_model(self, i: int = -1) -> nn.Module:
        """:meth:`build_model` with the ``i``-th checkpoint loaded (default: the last)."""
        model = self.build_model()
        model.load_state_dict(self.load(i))
        return model

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every tensor of a checkpoint, read from the first file's header only."""
        with safe_open(self.file(0), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the first parameter/buffer whose name or shape differs from the stored ones."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        want = self.shapes()
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        what = f"the trajectory's {self.arch} {self.model_options or ''}".rstrip()
        hint = "build the model with traj.build_model()"
        for name, shape in got.items():
            if name not in want:
                raise ValueError(f"model: parameter/buffer {name!r} {list(shape)} is not in {what}; {hint}")
            if want[name] != shape:
                raise ValueError(f"model: {name!r} has shape {list(shape)}, {what} has {list(want[name])}; {hint}")
        missing = [k for k in want if k not in got]
        if missing:
            names = ", ".join(repr(k) for k in missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
            raise ValueError(f"model: has no parameter/buffer {names} of {what}; {hint}")

    def check_data(self, train_x: torch.Tensor, train_y: torch.Tensor) -> None:
        """Raise ``ValueError`` unless (train_x, train_y) is the training set the trajectory was trained on."""
        h = data_hash(train_x, train_y)
        if h != self.index.get("data_hash"):
            raise ValueError(f"train_x, train_y: data hash {h[:19]}… of {list(train_x.shape)} differs from the "
                             f"trajectory's {str(self.index.get('data_hash'))[:19]}… ({self.index.get('dataset')}, "
                             f"{self.index.get('train_examples')} examples); load the same data set and split")

    def sample(self, m: int, generator: torch.Generator | None = None, weights: str = "lr",
               exclude_last: bool = False) -> torch.Tensor:
        """Indices of ``m`` = t_m distinct checkpoints, P(t) ∝ η_t (effect-alignment eq. 4–5).

        Drawn without replacement by :func:`torch.multinomial`: the first index with probability
        η_t / Σ η, each further one from the remaining checkpoints in the same proportion. With a
        constant learning rate (or ``weights="uniform"``) every checkpoint is equally likely.

        Args:
            m: t_m, how many checkpoints; ``1 <= m <= len(self)`` (``len(self) - 1`` with ``exclude_last``).
            generator: source of randomness (default: the global RNG).
            weights: ``"lr"`` (P(t) ∝ η_t) or ``"uniform"``.
            exclude_last: never draw the last checkpoint (e.g. θ_T when it serves as the teacher).

        Returns:
            int64 ``[m]`` checkpoint indices in draw order.
        """
        count = len(self) - (1 if exclude_last else 0)
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"m: expected t_m as an int >= 1, got {m!r}")
        if m > count:
            raise ValueError(f"m: cannot draw t_m={m} distinct checkpoints from a trajectory of {count} "
                             f"checkpoints{' (last excluded)' if exclude_last else ''}")
        if weights == "lr":
            w = self.lrs[:count]
        elif weights == "uniform":
            w = torch.ones(count, dtype=torch.float64)
        else:
            raise ValueError(f"weights: expected 'lr' or 'uniform', got {weights!r}")
        positive = int((w > 0).sum())
        if m > positive:
            raise ValueError(f"m: cannot draw t_m={m} distinct checkpoints with P(t) ∝ η_t: only {positive} of the "
                             f"{count} checkpoints have a learning rate > 0")
        return torch.multinomial(w, m, replacement=False, generator=generator)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """One SGD step on the cross-entropy of a minibatch with hard labels; returns the (detached) loss."""
    loss = F.cross_entropy(model(xb), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _sgd_step_sharded(ddp: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
                      ctx) -> torch.Tensor:
    """One DistributedDataParallel step on this rank's rows of the global minibatch (xb, yb).

    Loss_r = (R / B) Σ_{i ∈ rows_r} CE_i: DDP averages over the R ranks, so the summed gradient is that of
    the global mean (1/B) Σ_i CE_i whatever the shard sizes. Returns the global mean loss (all-reduced).
    """
    B = xb.shape[0]
    lo, hi = ctx.shard(B)
    loss_sum = F.cross_entropy(ddp(xb[lo:hi]), yb[lo:hi], reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    (loss_sum * (ctx.world_size / B)).backward()
    optimizer.step()
    total = (loss_sum.detach() / B).reshape(1).to(torch.float64)
    ctx.all_reduce_sum_([total])
    return total[0]


def _save_checkpoint(path: str, model: nn.Module, step: int, lr: float) -> None:
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "step": str(step), "lr": repr(float(lr))}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _config_mismatch(saved: dict, config: dict) -> str | None:
    """The first index key (``optimizer.lr`` for a nested one) whose value differs, or None."""
    for key in _CONFIG_KEYS:
        a, b = saved.get(key), config.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                sub = next(k for k in [*b, *a] if a.get(k) != b.get(k))
                return f"{key}.{sub}"
            return key
    return None


def _lookup(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _mismatch_error(where: str, key: str, saved: dict, config: dict) -> ValueError:
    if key == "data_hash":
        return ValueError(f"resume: {where} was trained on other data ({saved.get('dataset')}, "
                          f"{saved.get('train_examples')} examples, {saved.get('data_hash')}); this run's data "
                          f"{config.get('dataset')} has {config.get('data_hash')}; pass another out")
    return ValueError(f"resume: {where} was written with {key}={_lookup(saved, key)!r}, this run has "
                      f"{key}={_lookup(config, key)!r}; pass the same settings or another out")


def train_trajectory(
    data,
    arch: str,
    out: str | os.PathLike,
    *,
    epochs: int,
    every: int,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    model_options: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    process_group=None,
) -> Trajectory:
    """Train ``arch`` on ``data.train_x``/``train_y`` with SGD and store the trajectory {(θ_t, η_t)} in ``out``.

    The network is ``build_model(arch, data.channels, data.num_classes, data.image_size, **model_options)``
    initialised after ``torch.manual_seed(seed)`` (the caller's global RNG is left untouched). Each
    epoch visits the training set in a fresh random order (``torch.randperm`` on a generator seeded
    with ``seed``) in minibatches of ``batch_size`` (the last one may be smaller); each step minimises
    the cross-entropy with the hard labels by ``torch.optim.SGD`` at η_t (:func:`lr_at`), on the device
    of ``data.train_x`` (the tensors stay resident; minibatches are gathered by index). θ_t is saved
    at t = 0, every, 2·every, … and at the final step T = epochs · ⌈n / batch_size⌉. The test accuracy
    of θ_T on ``data.test_x``/``test_y`` is recorded when training finishes.

    Args:
        data: an :class:`ddfast.data.datasets.ImageDataset` (``train_x [n, c, h, w]``, ``train_y [n]``,
            ``test_x``, ``test_y``, ``channels``, ``num_classes``, ``image_size``, ``name``).
        arch: a name of :data:`ddfast.models.MODELS` (``convnet``, ``mlp``, ``lenet``, ``resnet18``, …).
        out: folder for the checkpoints, the index and the resume state.
        epochs: passes over the training set.
        every: k, SGD steps between checkpoints.
        lr, momentum, weight_decay: SGD settings (η is the base learning rate).
        schedule: ``"constant"`` (default), ``"step"`` (η multiplied by ``gamma`` at each epoch in
            ``milestones``; default milestone ``epochs // 2``) or ``"cosine"`` (to 0 at the last step).
        batch_size: examples per step (capped at the training set size).
        seed: initialisation and data order.
        model_options: keyword arguments of the model class, passed through unchanged and stored in
            the index (e.g. ``{"widths": [64, 64], "norm": "instance"}`` for ``convnet``,
            ``{"width": 32}`` for ``resnet18``, ``{"hidden": [128]}`` for ``mlp``). JSON values only.
        resume: continue the run in ``out`` from its resume state (bit-identical to an uninterrupted run
            with the same arguments); a complete run is returned as is; a folder without a trajectory
            index or resume state starts from scratch.
        progress: show a tqdm progress bar.
        process_group: train on the R ranks of a ``torch.distributed`` group with
            ``DistributedDataParallel``: every rank draws the same global minibatch and takes its rows
            (:func:`ddfast.distributed.shard`), the loss is the rank's share of the global mean, DDP sums
            the gradients, so each step equals the single-process step on the global batch (to
            rounding; BatchNorm normalises per rank's rows). Rank 0 writes the checkpoints, the index
            and the resume state; every rank returns the :class:`Trajectory`. ``batch_size`` must be ≥ R.

    Returns:
        the :class:`Trajectory` in ``out``.

    Raises:
        ValueError: a bad argument (named in the message), or ``resume`` with a run in ``out`` written
            with other settings or other data.
        FileExistsError: ``out`` already holds a trajectory and ``resume`` is false.
    """
    if not isinstance(arch, str) or arch.lower() not in MODELS:
        raise ValueError(f"arch: expected one of {sorted(MODELS)}, got {arch!r}")
    arch = arch.lower()
    for name, value in (("epochs", epochs), ("every", every), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a finite value > 0, got {lr!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1), got {momentum!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay: expected a finite value >= 0, got {weight_decay!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if schedule == "step":
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma: expected a value in (0, 1], got {gamma!r}")
        if milestones is None:
            if epochs < 2:
                raise ValueError("milestones: the step schedule needs milestones (epochs) when epochs=1")
            milestones = (epochs // 2,)
        milestones = sorted(int(m) for m in milestones)
        if any(m < 1 for m in milestones):
            raise ValueError(f"milestones: expected epochs >= 1, got {milestones}")
    else:
        milestones = []
    if model_options is not None and not isinstance(model_options, dict):
        raise TypeError(f"model_options: expected a dict or None, got {type(model_options).__name__}")
    model_options = _jsonable(model_options or {}, "model_options")

    x, y = data.train_x, data.train_y
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"data.train_x: expected float images [n, c, h, w], got "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.dtype != torch.int64:
        raise ValueError(f"data.train_y: expected int64 labels [{x.shape[0]}], got "
                         f"{tuple(getattr(y, 'shape', ()))} {getattr(y, 'dtype', type(y).__name__)}")
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("data.train_x: the training set is empty")
    batch_size = min(batch_size, n)
    steps_per_epoch = -(-n // batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer_cfg = {"name": "sgd", "lr": float(lr), "momentum": float(momentum), "weight_decay": float(weight_decay),
                     "schedule": schedule, "milestones": milestones, "gamma": float(gamma) if schedule == "step" else None}
    config = {
        "format": FORMAT, "version": VERSION, "arch": arch, "model_options": model_options,
        "dataset": str(getattr(data, "name", "unknown")), "data_hash": data_hash(x, y), "train_examples": n,
        "in_channels": int(data.channels), "num_classes": int(data.num_classes), "image_size": int(data.image_size),
        "optimizer": optimizer_cfg, "seed": int(seed), "batch_size": batch_size, "epochs": epochs, "every": every,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
    }

    from ddfast.distributed import DistContext

    ctx = DistContext(process_group)
    if ctx.active and batch_size < ctx.world_size:
        raise ValueError(f"batch_size: {batch_size} examples cannot be split over {ctx.world_size} ranks")
    if ctx.active:
        ctx.check_consistent({"config": config, "resume": bool(resume)})
    out = os.fspath(out)
    index_path, resume_path = os.path.join(out, INDEX_FILE), os.path.join(out, RESUME_FILE)
    # What is on disk, as rank 0 sees it before anyone writes (every rank takes the same branch).
    has_index, has_resume = ctx.broadcast_object((os.path.isfile(index_path), os.path.isfile(resume_path)))
    # Until the index exists (it is written right after checkpoint 0 and its resume state), the folder
    # holds no trajectory: leftovers of a run interrupted before that are overwritten.
    if has_index and not resume:
        raise FileExistsError(f"out: {out} already holds a trajectory; pass resume=True (--resume) to continue it "
                              f"or choose another folder")
    state = None
    if resume and has_resume:
        state = load_state(resume_path)
        key = _config_mismatch(state["config"], config)
        if key is not None:
            raise _mismatch_error(resume_path, key, state["config"], config)
    elif resume and has_index:
        with open(index_path) as f:
            saved = json.load(f)
        key = _config_mismatch(saved, config)
        if key is not None:
            raise _mismatch_error(index_path, key, saved, config)
        if not saved.get("complete"):
            raise ValueError(f"resume: {resume_path} is missing, so the incomplete run in {out} cannot be "
                             f"continued; pass another out")
        return Trajectory.open(out)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, config["in_channels"], config["num_classes"], config["image_size"], **model_options)
        model.to(x.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        net = model
        if ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, process_group=process_group)
        generator = torch.Generator().manual_seed(int(seed))
        perm = torch.arange(n, device="cpu")  # host indices, as the randperm draws below
        step, checkpoints, seconds = 0, [], 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["rng"])
            perm = state["perm"]
            step, checkpoints, seconds = int(state["step"]), list(state["checkpoints"]), float(state["seconds"])

        def index(complete=False, test_accuracy=None):
            return {**config, "checkpoints": checkpoints, "complete": complete, "test_accuracy": test_accuracy,
                    "final_train_loss": next((c["train_loss"] for c in reversed(checkpoints)
                                              if c["train_loss"] is not None), None),
                    "seconds": seconds}

        def checkpoint(train_loss):
            if not ctx.is_main:
                return
            eta = lr_at(step, optimizer_cfg, steps_per_epoch, total_steps)
            name = _ckpt_name(step)
            _save_checkpoint(os.path.join(out, name), model, step, eta)
            checkpoints.append({"step": step, "lr": eta, "file": name, "epoch": step / steps_per_epoch,
                                "train_loss": train_loss})
            save_state(resume_path, {
                "config": config, "step": step, "checkpoints": checkpoints, "seconds": seconds,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "perm": perm,
                "generator": generator.get_state(), "rng": torch.get_rng_state(),
            })
            write_json_atomic(index_path, index())

        if ctx.is_main:
            os.makedirs(out, exist_ok=True)
        if state is None:
            checkpoint(None)
        elif ctx.is_main:
            write_json_atomic(index_path, index())  # the resume state may be one checkpoint ahead of the index

        bar = None
        if progress and step < total_steps and ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=step, desc=f"trajectory {arch}", unit="step", dynamic_ncols=True)
        model.train()
        loss_sum, loss_count = torch.zeros((), dtype=torch.float64, device=x.device), 0
        t0 = time.perf_counter()
        try:
            while step < total_steps:
                pos = step % steps_per_epoch
                if pos == 0:
                    perm = torch.randperm(n, generator=generator)
                idx = perm[pos * batch_size : (pos + 1) * batch_size]
                eta = lr_at(step, optimizer_cfg, steps_per_epoch, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = eta
                if ctx.active:
                    loss_sum += _sgd_step_sharded(net, optimizer, x[idx], y[idx], ctx)
                else:
                    loss_sum += _sgd_step(model, optimizer, x[idx], y[idx])
                loss_count += 1
                step += 1
                if bar is not None:
                    bar.update(1)
                if step % every == 0 or step == total_steps:
                    mean_loss = loss_sum.item() / loss_count
                    if not math.isfinite(mean_loss):
                        raise FloatingPointError(f"training loss is {mean_loss} at step {step}; lower lr (now {lr})")
                    seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    checkpoint(mean_loss)
                    loss_sum.zero_()
                    loss_count = 0
                    if bar is not None:
                        bar.set_postfix(epoch=f"{step / steps_per_epoch:.2f}", loss=f"{mean_loss:.3f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()

    if ctx.is_main:
        test_accuracy = None
        if data.test_x is not None and len(data.test_y):
            from ddfast.evaluate.train import accuracy

            test_accuracy = accuracy(model, data.test_x, data.test_y)
        write_json_atomic(index_path, index(complete=True, test_accuracy=test_accuracy))
        os.unlink(resume_path)
    ctx.barrier()  # the other ranks open the index rank 0 has just written
    return Trajectory.open(out)
