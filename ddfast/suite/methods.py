"""The methods a suite cell can run: every coreset and distiller of ddfast, and ``artifact`` (bring your own).

Each method turns a :class:`CellContext` (data set, IPC, seed, options, shared teacher / trajectory / SSL target)
into a :class:`SetData`: images normalised like the data set, their hard labels, and optionally the
method's own soft labels (logits) or regression targets (KRR-ST's representations). The size of every
set is ``ipc × C`` images, so a random real subset of the same size is the fair baseline.

A method's options (the ``[methods.<name>]`` table, or the keys of a ``[[cell]]`` entry) are the fields of
its config dataclass (``DMConfig``, ``TMConfig``, …) or, for the coresets, the keyword arguments listed in
``docs/suite.md``. Unknown keys are an error naming the method and its fields.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["METHODS", "MethodSpec", "SetData", "CellContext", "method_spec", "load_set", "save_set"]

LABEL_REGIMES = ("hl", "sl", "sl+kd")
TRANSFER = ("finetune", "linear")


@dataclass
class SetData:
    """A set to evaluate: ``images [N, c, h, w]``, ``labels [N]`` int64 (None for unlabeled sets),
    ``soft_labels [N, C]`` logits (the method's own, or None), ``targets [N, d]`` regression targets
    (KRR-ST's Y_s, or None), and the seconds its making took."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def save_set(path: str, s: SetData) -> None:
    """Write a set as safetensors (atomically): the format ``artifact`` cells read."""
    from safetensors.torch import save_file

    from ddfast.artifacts import _atomic_write

    tensors = {"images": s.images.detach().float().contiguous().cpu()}
    for name in ("labels", "soft_labels", "targets"):
        t = getattr(s, name)
        if t is not None:
            tensors[name] = t.detach().contiguous().cpu()
    meta = {"soft_labels": "logits", "seconds": repr(float(s.seconds)), "info": json.dumps(s.info, default=str)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_set(path: str, data=None) -> SetData:
    """Read a set file: ``images`` (required, float ``[N, c, h, w]``, normalised like the data set),
    ``labels`` (int64 ``[N]``), ``soft_labels`` (float ``[N, C]``; metadata ``soft_labels="probs"`` marks
    probabilities, which are turned into log-probabilities; default logits), ``targets`` (float ``[N, d]``).
    With ``data`` (an ImageDataset) the shapes and classes are checked against it. Reads safetensors only."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"path: {path} does not exist")
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in keys}
    unknown = keys - {"images", "labels", "soft_labels", "targets"}
    if "images" not in t:
        raise ValueError(f"{path}: expected a tensor 'images' [N, c, h, w], found {sorted(keys)}")
    x = t["images"]
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{path}: 'images' expected float [N, c, h, w], got {x.dtype} {list(x.shape)}")
    n = x.shape[0]
    labels, soft, targets = t.get("labels"), t.get("soft_labels"), t.get("targets")
    if labels is not None and (labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != (n,)):
        raise ValueError(f"{path}: 'labels' expected int64 [{n}], got {labels.dtype} {list(labels.shape)}")
    if soft is not None:
        if soft.dim() != 2 or soft.shape[0] != n or not soft.is_floating_point():
            raise ValueError(f"{path}: 'soft_labels' expected float [{n}, C], got {soft.dtype} {list(soft.shape)}")
        kind = meta.get("soft_labels", "logits")
        if kind not in ("logits", "probs"):
            raise ValueError(f"{path}: metadata soft_labels expected 'logits' or 'probs', got {kind!r}")
        soft = soft.float()
        if kind == "probs":
            soft = soft.clamp_min(1e-8).log()
    if targets is not None and (targets.dim() != 2 or targets.shape[0] != n):
        raise ValueError(f"{path}: 'targets' expected [{n}, d], got {list(targets.shape)}")
    if labels is None and soft is not None:
        labels = soft.argmax(1)
    if labels is None and targets is None:
        raise ValueError(f"{path}: expected 'labels' or 'soft_labels' (or 'targets' for transfer), found {sorted(keys)}")
    if data is not None:
        shape = (data.channels, data.image_size, data.image_size)
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"{path}: 'images' expected [N, {shape[0]}, {shape[1]}, {shape[2]}] for data set "
                             f"{data.name!r}, got {list(x.shape)}")
        C = data.num_classes
        if labels is not None and n and (int(labels.min()) < 0 or int(labels.max()) >= C):
            raise ValueError(f"{path}: 'labels' expected classes in [0, {C}), got [{int(labels.min())}, {int(labels.max())}]")
        if soft is not None and soft.shape[1] != C:
            raise ValueError(f"{path}: 'soft_labels' expected [N, {C}] for data set {data.name!r}, got {list(soft.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{path}: 'images' expected finite values")
    info = json.loads(meta["info"]) if "info" in meta else {}
    if unknown:
        info["ignored_tensors"] = sorted(unknown)
    return SetData(x.float(), None if labels is None else labels.long(), soft, targets,
                   float(meta.get("seconds", 0.0)), info)


@contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class CellContext:
    """What a method sees: the cell's configuration, its data set and run folder, and the shared teacher,
    trajectory and SSL target (built once per suite under ``<root>/shared``, guarded by a file lock so
    parallel cells and Slurm jobs wait for one another instead of training them twice)."""

    def __init__(self, config: dict, run_dir: str, shared_dir: str, *, progress: bool = False, process_group=None):
        from ddfast.data import load_dataset

        self.config = config
        self.run_dir = run_dir
        self.shared_dir = shared_dir
        self.progress = progress
        self.process_group = process_group
        self.data = load_dataset(config["dataset"], config.get("root"))
        self._trajectory = None
        self._teacher = None
        self._ssl = None

    @property
    def ipc(self) -> int:
        return int(self.config["ipc"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def options(self) -> dict:
        return dict(self.config.get("options") or {})

    def _shared(self, kind: str, cfg: dict) -> str:
        from ddfast.suite.config import cell_hash

        key = cell_hash({"dataset": self.config["dataset"], "root": self.config.get("root"), kind: cfg})
        return os.path.join(self.shared_dir, f"{kind}-{self.config['dataset']}-{key}")

    @property
    def trajectory(self):
        """SGD trajectory on the real training split (``[teacher]`` table); its last checkpoint is the teacher."""
        if self._trajectory is None:
            from ddfast.trajectory import Trajectory, train_trajectory

            t = self.config.get("teacher")
            if t is None:
                raise ValueError(f"method {self.config['method']!r}: needs a teacher, but the cell has no [teacher] settings")
            path = self._shared("trajectory", t)
            with _file_lock(path + ".lock"):
                index = os.path.join(path, "trajectory.json")
                traj = Trajectory.open(path) if os.path.exists(index) else None
                if traj is None or not getattr(traj, "complete", True):
                    traj = train_trajectory(self.data, t["arch"], path, epochs=int(t["epochs"]), every=int(t["every"]),
                                            lr=float(t["lr"]), momentum=float(t["momentum"]),
                                            batch_size=int(t["batch_size"]), seed=int(t["seed"]),
                                            model_options=_tuples(t["model_options"]), resume=traj is not None,
                                            progress=False)
            self._trajectory = traj
        return self._trajectory

    @property
    def teacher(self):
        if self._teacher is None:
            traj = self.trajectory
            net = traj.build_model()
            net.load_state_dict(dict(traj.final()))
            self._teacher = net.eval()
        return self._teacher

    @property
    def ssl_target(self):
        """Barlow Twins target g_φ (``[ssl]`` table) for KRR-ST."""
        if self._ssl is None:
            from ddfast.ssl.barlow_twins import load_target, train_barlow_twins

            s = self.config.get("ssl")
            if s is None:
                raise ValueError(f"method {self.config['method']!r}: needs an SSL target, but the cell has no [ssl] settings")
            path = self._shared("ssl", s)
            with _file_lock(path + ".lock"):
                done = os.path.join(path, "target.safetensors")
                if os.path.exists(done):
                    self._ssl = load_target(path)
                else:
                    self._ssl = train_barlow_twins(self.data, widths=tuple(s["widths"]), epochs=int(s["epochs"]),
                                                   batch_size=min(int(s["batch_size"]), self.data.train_x.shape[0]),
                                                   seed=int(s["seed"]), out=path, resume=True, progress=False)
        return self._ssl


def _tuples(options: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (options or {}).items()}


def _config(cls, method: str, fixed: dict, options: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"method {method!r}: unknown option(s) {unknown}; {cls.__name__} fields are {sorted(names)}")
    return cls(**{**_tuples(options), **fixed})


def _pop(options: dict, method: str, allowed: dict) -> dict:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method!r}: unknown option(s) {unknown}; expected keys from {sorted(allowed)}")
    return {**allowed, **options}


def _distill_dir(ctx: CellContext) -> str:
    d = os.path.join(ctx.run_dir, "distill")
    os.makedirs(d, exist_ok=True)
    return d


# --- coresets ----------------------------------------------------------------------------------------------


def _random(ctx: CellContext) -> SetData:
    from ddfast.select import random_coreset

    _pop(ctx.options, "random", {})
    d = ctx.data
    idx = random_coreset(d.train_y, ctx.ipc, seed=ctx.seed, num_classes=d.num_classes)
    return SetData(d.train_x[idx].clone(), d.train_y[idx].clone(), info={"indices": idx.tolist()})


def _kcenters(ctx: CellContext) -> SetData:
    from ddfast.select import k_centers, model_features

    o = _pop(ctx.options, "kcenters", {"start": "random"})
    d = ctx.data
    idx = k_centers(model_features(ctx.teacher, d.train_x), d.train_y, ctx.ipc, seed=ctx.seed, num_classes=d.num_classes,
                    start=o["start"])
    return SetData(d.train_x[idx].clone(), d.train_y[idx].clone(), info={"indices": idx.tolist()})


def _score_coreset(name: str):
    def build(ctx: CellContext) -> SetData:
        from ddfast.select import el2n_scores, forgetting_scores_from_trajectory, grand_scores, select_by_score

        o = _pop(ctx.options, name, {"checkpoint": None, "mode": "hard", "start": None})
        d, traj = ctx.data, ctx.trajectory
        if name == "forgetting":
            scores = forgetting_scores_from_trajectory(traj, d.train_x, d.train_y)
        else:
            i = o["checkpoint"] if o["checkpoint"] is not None else max(1, len(traj) // 5)  # an early checkpoint
            net = traj.load_model(int(i))
            fn = el2n_scores if name == "el2n" else grand_scores
            scores = fn(net, d.train_x, d.train_y)
        idx = select_by_score(scores, d.train_y, ctx.ipc, mode=o["mode"], start=o["start"], num_classes=d.num_classes)
        return SetData(d.train_x[idx].clone(), d.train_y[idx].clone(), info={"indices": idx.tolist()})

    return build


# --- image distillers --------------------------------------------------------------------------------------


def _image_distiller(name: str):
    def build(ctx: CellContext) -> SetData:
        d = ctx.data
        train, C = (d.train_x, d.train_y), d.num_classes
        fixed = {"ipc": ctx.ipc, "seed": ctx.seed}
        if name == "dm":
            from ddfast.distill.dm import DMConfig, DMDistiller

            distiller = DMDistiller(train, C, _config(DMConfig, name, fixed, ctx.options))
        elif name == "dc":
            from ddfast.distill.dc import DCConfig, DCDistiller

            distiller = DCDistiller(train, C, _config(DCConfig, name, fixed, ctx.options))
        elif name in ("tm", "datm"):
            from ddfast.distill.tm import TMConfig, TMDistiller, datm_config

            if name == "datm":
                _config(TMConfig, name, fixed, ctx.options)  # checks the option names
                cfg = datm_config(**{**_tuples(ctx.options), **fixed})
            else:
                cfg = _config(TMConfig, name, fixed, ctx.options)
            distiller = TMDistiller(train, C, cfg, trajectories=ctx.trajectory)
        elif name in ("sre2l", "dwa"):
            from ddfast.distill.sre2l import DWADistiller, SRe2LConfig, SRe2LDistiller

            cls = DWADistiller if name == "dwa" else SRe2LDistiller
            distiller = cls(train, C, _config(SRe2LConfig, name, {**fixed, "method": name}, ctx.options))
        else:  # pragma: no cover - registry and builders are listed together below
            raise ValueError(name)
        res = distiller.fit(out_dir=_distill_dir(ctx), resume=True, progress=ctx.progress)
        soft = None
        if res.labels.is_floating_point():  # DATM: learned label logits
            soft = res.labels.float()
        elif getattr(res, "soft_labels", None) is not None:  # SRe2L / DWA: the recovery teacher's logits
            soft = res.soft_labels.float()
        hard = res.labels if not res.labels.is_floating_point() else d.train_y[res.init_indices]
        return SetData(res.images.detach().float(), hard.long(), soft, seconds=float(res.seconds),
                       info={"iterations": int(res.iterations)})

    return build


def _ead(ctx: CellContext) -> SetData:
    from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller

    d = ctx.data
    cfg = _config(EADConfig, "ead", {"ipc": ctx.ipc, "seed": ctx.seed}, ctx.options)
    ead = EffectAlignmentDistiller(ctx.trajectory, (d.train_x, d.train_y), cfg, process_group=ctx.process_group)
    res = ead.fit(out_dir=_distill_dir(ctx), resume=True, progress=ctx.progress)
    return SetData(res.images.detach().float(), d.train_y[res.init_indices].clone(), res.soft_labels.detach().float(),
                   seconds=float(res.seconds), info={"iterations": int(res.iterations)})


def _ld(variant: str):
    def build(ctx: CellContext) -> SetData:
        from ddfast.distill.ld import LDConfig
        from ddfast.experiments import ld as ld_exp

        o = dict(ctx.options)
        names = {f.name for f in dataclasses.fields(LDConfig)} - {"variant", "seed"}
        unknown = sorted(set(o) - names)
        if unknown:
            raise ValueError(f"method {ctx.config['method']!r}: unknown option(s) {unknown}; LDConfig fields are {sorted(names)}")
        d = ctx.data
        _, res, prepared = ld_exp.distill(ctx.config["dataset"], ctx.ipc * d.num_classes, variant, out=_distill_dir(ctx),
                                          resume=True, root=ctx.config.get("root"), seed=ctx.seed, progress=ctx.progress,
                                          process_group=ctx.process_group, **o)
        if tuple(prepared.base_images.shape[1:]) != tuple(d.train_x.shape[1:]):
            raise ValueError(f"method {ctx.config['method']!r}: LD's preset resolution {list(prepared.base_images.shape[1:])} "
                             f"differs from the data set's {list(d.train_x.shape[1:])}")
        soft = res.soft_labels.detach().float().clamp_min(1e-8).log()  # distributions → log-probabilities (logits)
        return SetData(prepared.base_images.float(), prepared.base_true_labels.long(), soft, seconds=float(res.seconds),
                       info={"steps_to_overfit": int(res.steps_to_overfit), "val_accuracy": float(res.val_accuracy)})

    return build


def _krr_st(ctx: CellContext) -> SetData:
    from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller
    from ddfast.ssl.barlow_twins import encode

    d = ctx.data
    o = {"steps": 300, "batch_size": 256, "pool_steps": 100, "widths": (16, 32), "lr": 1e-2, **ctx.options}
    o["batch_size"] = min(int(o["batch_size"]), d.train_x.shape[0])
    cfg = _config(KRRSTConfig, "krr_st", {"m": ctx.ipc * d.num_classes, "seed": ctx.seed}, o)
    target = ctx.ssl_target
    krr = KRRSTDistiller(d.train_x, config=cfg, train_targets=encode(target, d.train_x), process_group=ctx.process_group)
    res = krr.fit(out_dir=_distill_dir(ctx), resume=True, progress=ctx.progress)
    return SetData(res.images.detach().float(), None, None, res.targets.detach().float(), seconds=float(res.seconds),
                   info={"steps": int(res.steps)})


def _artifact(ctx: CellContext) -> SetData:
    path = ctx.config.get("path")
    s = load_set(path, ctx.data)
    n = s.images.shape[0]
    if n != ctx.ipc * ctx.data.num_classes:
        raise ValueError(f"path: {path} holds {n} images; the cell's ipc = {ctx.ipc} with C = {ctx.data.num_classes} "
                         f"needs {ctx.ipc * ctx.data.num_classes} (set ipc to the file's images per class)")
    return s


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[CellContext], SetData]
    kind: str  # "coreset" | "distiller" | "artifact"
    regimes: tuple = LABEL_REGIMES + TRANSFER
    needs_teacher: bool = False
    needs_ssl: bool = False
    distributed: bool = False  # accepts a process group (torchrun / Slurm tasks)
    summary: str = ""


METHODS = {s.name: s for s in [
    MethodSpec("random", _random, "coreset", summary="class-balanced random real subset (the baseline)"),
    MethodSpec("kcenters", _kcenters, "coreset", needs_teacher=True,
               summary="greedy farthest point per class in the teacher's feature space"),
    MethodSpec("el2n", _score_coreset("el2n"), "coreset", needs_teacher=True,
               summary="EL2N score at an early trajectory checkpoint, per-class selection"),
    MethodSpec("grand", _score_coreset("grand"), "coreset", needs_teacher=True,
               summary="GraNd (per-example gradient norm via ghost norms) at an early checkpoint"),
    MethodSpec("forgetting", _score_coreset("forgetting"), "coreset", needs_teacher=True,
               summary="forgetting events over the trajectory's checkpoints"),
    MethodSpec("dm", _image_distiller("dm"), "distiller", summary="distribution matching"),
    MethodSpec("dc", _image_distiller("dc"), "distiller", summary="gradient matching"),
    MethodSpec("tm", _image_distiller("tm"), "distiller", needs_teacher=True, summary="trajectory matching (MTT)"),
    MethodSpec("datm", _image_distiller("datm"), "distiller", needs_teacher=True,
               summary="difficulty-aligned trajectory matching with soft labels"),
    MethodSpec("sre2l", _image_distiller("sre2l"), "distiller", summary="squeeze, recover, relabel"),
    MethodSpec("dwa", _image_distiller("dwa"), "distiller", summary="SRe2L with directed weight adjustment"),
    MethodSpec("ead", _ead, "distiller", needs_teacher=True, distributed=True,
               summary="effect alignment on the stored trajectory"),
    MethodSpec("ld", _ld("second_order"), "distiller", distributed=True,
               summary="label distillation (second order) of ipc·C real base images"),
    MethodSpec("ld_rr", _ld("rr"), "distiller", distributed=True, summary="label distillation, ridge-regression variant"),
    MethodSpec("krr_st", _krr_st, "distiller", regimes=TRANSFER, needs_ssl=True, distributed=True,
               summary="self-supervised KRR distillation; evaluated by transfer"),
    MethodSpec("artifact", _artifact, "artifact", summary="a set made by other code (safetensors)"),
]}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
