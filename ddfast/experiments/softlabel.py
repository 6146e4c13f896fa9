"""Hard vs soft labels on distilled and selected sets (soft-labels-hard-truths Table 1 regimes, Table 3 pattern).

For each IPC, sets are built by coreset selection (class-balanced Random, K-Centers in the teacher's feature
space) and by distillation (DM, DC, TM, DATM, SRe2L, DWA), and each is evaluated in the regimes of the seed's
Table 1 by :func:`ddfast.evaluate.regimes.evaluate`:

* ``hl`` — the set's hard labels (cross-entropy);
* ``sl`` — fixed teacher soft labels (the teacher's logits on the clean images, KL at T = 20);
* ``sl+kd`` — the teacher relabels every augmented view (RandomResizedCrop + CutMix; no flip on greyscale digits).

One teacher serves every row: the final checkpoint of one SGD run on the real training split (the ``ddfast
trajectory`` preset of the EAD runs, stored under ``out``), which is also TM's and DATM's expert. Rows therefore
differ only in their images (and, under HL, their hard labels):

* DATM learns label logits; its HL labels are their argmax (its own learned classes), while SL / SL+KD use the
  common teacher as for every other set. The learned logits are kept in the cached set (``learned_labels``).
* SRe2L / DWA match BatchNorm running statistics, which the instance-norm teacher does not have; they recover
  their images against a BatchNorm ConvNet of the same widths trained on the same real split
  (:func:`ddfast.distill.sre2l.train_teacher`, ``BN_TEACHER``, cached in ``out``): SRe2L's squeeze step. Their
  HL labels are the classes the images were recovered for; their SL / SL+KD labels come from the common teacher
  (SRe2L's own relabel would use the BatchNorm network).

Caching, so that a re-run resumes: each distilled set is stored in ``out/<name>-ipc<ipc>-seed<seed>.safetensors``
with the distiller settings it was made with (a file made with other settings is refused rather than silently
reused), the BatchNorm teacher in ``out/bn-teacher-<dataset>-seed<seed>.safetensors``, and each evaluated cell in
``out/cells/<name>-ipc<ipc>-seed<seed>-<regime>.json`` keyed by a fingerprint of the set, the teacher, the number of
models and the budget (a changed set or setting recomputes the cell).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddfast.artifacts import _atomic_write, write_json_atomic
from ddfast.data import load_dataset

__all__ = ["SETS", "REGIMES", "PRESETS", "BN_TEACHER", "softlabel_table", "format_softlabel_table", "build_set",
           "bn_teacher", "SET_NAMES"]

SETS = ("random", "kcenters", "dm", "dc", "tm", "datm", "sre2l", "dwa")
SET_NAMES = {"random": "Random real", "kcenters": "K-Centers", "dm": "DM", "dc": "DC", "tm": "TM", "datm": "DATM",
             "sre2l": "SRe2L", "dwa": "DWA"}
# CPU presets per distiller on digits-sized data, a few minutes each at IPC 50 on one thread.
# TM / DATM: early starts where the expert still moves, fixed synthetic lr (the defaults diverged on this
# trajectory); DATM adds learnable labels (SGD lr 10, momentum 0.5 on the logits), the lower start bound
# T⁻ = 1 checkpoint and correctly classified initial images (``datm_config``).
# SRe2L / DWA: 200 Adam steps from Gaussian noise (lr 0.1), α_BN = 1; DWA ρ = 0.05, one ascent step, λ_var = 1.
_TM = {"iterations": 100, "lr_images": 10.0, "lr_teacher": 0.02, "learn_lr": False, "max_start": 10, "syn_steps": 10}
PRESETS = {"dm": {"iterations": 200}, "dc": {"iterations": 30}, "tm": dict(_TM),
           "datm": {**_TM, "min_start": 1, "lr_labels": 10.0},
           "sre2l": {"iterations": 200, "lr_images": 0.1, "init": "noise"},
           "dwa": {"iterations": 200, "lr_images": 0.1, "init": "noise", "rho": 0.05, "dwa_steps": 1}}
# The BatchNorm teacher SRe2L / DWA recover against: the table's ConvNet widths with BatchNorm, SGD (cosine lr).
BN_TEACHER = {"epochs": 15, "norm": "batch"}
REGIMES = ("hl", "sl", "sl+kd")
EVAL_OPTIONS = {"widths": (32, 64), "norm": "instance"}
_FORMAT = "softlabel-set-v1"


@dataclass
class Cell:
    accuracies: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean(self):
        from ddfast.evaluate.train import mean_std

        return mean_std(self.accuracies)[0]

    @property
    def std(self):
        from ddfast.evaluate.train import mean_std

        return mean_std(self.accuracies)[1]


def _check_names(sets, regimes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(sets, str) or not all(isinstance(s, str) for s in sets):
        raise ValueError(f"sets: expected a sequence of names from {SETS}, got {sets!r}")
    if isinstance(regimes, str) or not all(isinstance(r, str) for r in regimes):
        raise ValueError(f"regimes: expected a sequence of names from {REGIMES}, got {regimes!r}")
    bad = [s for s in sets if s not in SETS]
    if bad or not sets:
        raise ValueError(f"sets: expected names from {SETS}, got unknown {bad!r}" if bad else
                         f"sets: expected at least one name from {SETS}, got none")
    regimes = tuple(r.lower() for r in regimes)
    bad = [r for r in regimes if r not in REGIMES]
    if bad or not regimes:
        raise ValueError(f"regimes: expected names from {REGIMES}, got unknown {bad!r}" if bad else
                         f"regimes: expected at least one name from {REGIMES}, got none")
    return tuple(sets), regimes


def _fingerprint(*tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _model_fingerprint(model) -> str:
    return _fingerprint(*[v for v in model.state_dict().values()])


def _teacher_and_trajectory(dataset, data, out, progress):
    from ddfast.experiments.ead import trajectory_for

    traj = trajectory_for(dataset, data, os.path.join(out, f"trajectory-{dataset}"), progress=progress)
    teacher = traj.build_model().to(data.train_x.device)
    teacher.load_state_dict(dict(traj.final()))
    teacher.eval()
    return teacher, traj


def bn_teacher(data, *, out=None, dataset="data", seed=0, epochs=None):
    """The BatchNorm ConvNet SRe2L / DWA recover against (``BN_TEACHER``), cached in ``out`` when given.

    Same widths as the evaluation ConvNets (``EVAL_OPTIONS``) with BatchNorm, trained by
    :func:`ddfast.distill.sre2l.train_teacher` on ``data``'s training split.
    """
    from ddfast.distill.sre2l import train_teacher
    from ddfast.models import build_model

    epochs = int(epochs if epochs is not None else BN_TEACHER["epochs"])
    c, size, C = data.channels, data.image_size, data.num_classes

    def make():
        return build_model("convnet", c, C, size, widths=EVAL_OPTIONS["widths"],
                           norm=BN_TEACHER["norm"]).to(data.train_x.device)

    path = os.path.join(out, f"bn-teacher-{dataset}-seed{seed}-e{epochs}.safetensors") if out else None
    if path and os.path.exists(path):
        model = make()
        model.load_state_dict(load_file(path))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    model = train_teacher(data, epochs=epochs, make_model=make, seed=seed)
    if path:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        _atomic_write(path, lambda tmp: save_file(state, tmp))
    return model


def _set_config(name, ipc, seed, iterations):
    overrides = {**PRESETS.get(name, {}), "ipc": ipc, "seed": seed}
    if iterations:
        overrides["iterations"] = iterations
    return overrides


def _load_cached(path, config, device="cpu"):
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if "config" in meta and json.loads(meta["config"]) != json.loads(json.dumps(config)):
        raise ValueError(f"out: {path} holds a set made with {meta['config']}, this run asks for "
                         f"{json.dumps(config)}; use another --out folder or remove the file")
    return load_file(path, device=str(device))


def build_set(name, ipc, data, teacher, traj, *, seed=0, out=None, progress=False, iterations=None,
              bn_teacher_model=None, dataset="data", return_extra=False):
    """``(images, hard labels)`` of one set; distilled sets are cached in ``out/<name>-ipc<ipc>-seed<seed>.safetensors``.

    ``teacher``: the table's teacher (K-Centers features); ``traj``: TM / DATM's expert trajectory;
    ``bn_teacher_model``: SRe2L / DWA's BatchNorm teacher (trained by :func:`bn_teacher` when None).
    Hard labels are int64 [N]; DATM's are the argmax of its learned label logits. With ``return_extra`` a third
    item is returned: a dict with DATM's ``learned_labels`` logits [N, C] (empty for other sets).
    """
    from ddfast.select import k_centers, model_features, random_coreset

    if name not in SETS:
        raise ValueError(f"name: expected one of {SETS}, got {name!r}")
    x, y, C = data.train_x, data.train_y, data.num_classes
    extra = {}
    if name == "random":
        idx = random_coreset(y, ipc, seed=seed, num_classes=C)
        return (x[idx], y[idx], extra) if return_extra else (x[idx], y[idx])
    if name == "kcenters":
        idx = k_centers(model_features(teacher, x), y, ipc, seed=seed, num_classes=C)
        return (x[idx], y[idx], extra) if return_extra else (x[idx], y[idx])
    config = _set_config(name, ipc, seed, iterations)
    path = os.path.join(out, f"{name}-ipc{ipc}-seed{seed}.safetensors") if out else None
    if path and os.path.exists(path):
        t = _load_cached(path, config, x.device)
        if "learned_labels" in t:
            extra["learned_labels"] = t["learned_labels"]
        return (t["images"], t["labels"], extra) if return_extra else (t["images"], t["labels"])
    if name == "dm":
        from ddfast.distill.dm import DMConfig, DMDistiller

        distiller = DMDistiller((x, y), C, DMConfig(**config))
    elif name == "dc":
        from ddfast.distill.dc import DCConfig, DCDistiller

        distiller = DCDistiller((x, y), C, DCConfig(**config))
    elif name in ("tm", "datm"):
        from ddfast.distill.tm import TMConfig, TMDistiller, datm_config

        cfg = TMConfig(**config) if name == "tm" else datm_config(**config)
        distiller = TMDistiller((x, y), C, cfg, trajectories=traj)
    else:  # sre2l, dwa
        from ddfast.distill.sre2l import DWADistiller, SRe2LConfig, SRe2LDistiller

        if bn_teacher_model is None:
            bn_teacher_model = bn_teacher(data, out=out, dataset=dataset, seed=seed)
        cls = SRe2LDistiller if name == "sre2l" else DWADistiller
        distiller = cls((x, y), C, SRe2LConfig(**{k: v for k, v in config.items()}), teacher=bn_teacher_model)
    res = distiller.fit(progress=progress)
    images = res.images.detach().float().contiguous()
    if res.labels.dtype == torch.int64:
        labels = res.labels
    else:  # DATM's learned logits
        extra["learned_labels"] = res.labels.detach().float().contiguous()
        labels = res.labels.argmax(-1)
    labels = labels.contiguous()
    if path:
        tensors = {"images": images, "labels": labels, **extra}
        meta = {"config": json.dumps(config), "format": _FORMAT}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return (images, labels, extra) if return_extra else (images, labels)


def _cell(out, name, ipc, seed, regime, key, compute):
    """The accuracies of one (set, IPC, regime) cell, from ``out/cells`` when ``key`` matches, else computed."""
    path = os.path.join(out, "cells", f"{name}-ipc{ipc}-seed{seed}-{regime.replace('+', '_')}.json")
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("key") == key:
            return Cell(list(stored["accuracies"]), float(stored.get("seconds", 0.0)))
    t0 = time.time()
    accs = compute()
    cell = Cell(list(accs), time.time() - t0)
    write_json_atomic(path, {"key": key, "accuracies": cell.accuracies, "seconds": cell.seconds})
    return cell


def softlabel_table(dataset: str = "digits", ipcs=(10, 50), *, sets=SETS, regimes=REGIMES, models: int = 5,
                    seed: int = 0, out: str = "runs/softlabel", budget: int | None = None, progress: bool = False,
                    iterations: int | None = None, root: str | None = None, log=None):
    """``{set: {ipc: {regime: Cell}}}`` and the teacher's test accuracy.

    Args:
        sets: names from ``SETS``, one row each. regimes: names from ``REGIMES``.
        models: fresh ConvNets per cell. budget: epochs per student (default 300, Table 1 small scale).
        iterations: overrides every distiller's preset iterations (tests). log: ``print``-like callable told
            when each set is built and each cell done.
    """
    from ddfast.evaluate.regimes import evaluate
    from ddfast.evaluate.train import accuracy

    sets, regimes = _check_names(sets, regimes)
    ipcs = tuple(int(i) for i in ipcs)
    if not ipcs or any(i < 1 for i in ipcs):
        raise ValueError(f"ipcs: expected one or more positive ints, got {ipcs!r}")
    say = log or (lambda *a, **k: None)
    data = load_dataset(dataset, root)
    os.makedirs(out, exist_ok=True)
    teacher, traj = _teacher_and_trajectory(dataset, data, out, progress)
    teacher_acc = accuracy(teacher, data.test_x, data.test_y)
    teacher_fp = _model_fingerprint(teacher)
    bn = None
    info = {"teacher_accuracy": teacher_acc, "set_seconds": {}}
    if any(s in ("sre2l", "dwa") for s in sets):
        t0 = time.time()
        bn = bn_teacher(data, out=out, dataset=dataset, seed=seed)
        info["bn_teacher_accuracy"] = accuracy(bn, data.test_x, data.test_y)
        say(f"BatchNorm teacher for SRe2L / DWA: {info['bn_teacher_accuracy']:.2f}% ({time.time() - t0:.0f} s)")
    table = {s: {} for s in sets}
    for ipc in ipcs:
        for name in sets:
            t0 = time.time()
            images, labels, extra = build_set(name, ipc, data, teacher, traj, seed=seed, out=out, progress=progress,
                                              iterations=iterations, bn_teacher_model=bn, dataset=dataset,
                                              return_extra=True)
            info["set_seconds"][f"{name}-ipc{ipc}"] = time.time() - t0
            if "learned_labels" in extra:
                counts = torch.bincount(labels, minlength=data.num_classes).tolist()
                info[f"{name}-ipc{ipc}-hard-label-counts"] = counts
                say(f"{name} IPC {ipc}: learned labels' argmax per class {counts}")
            say(f"{name} IPC {ipc}: set ready ({info['set_seconds'][f'{name}-ipc{ipc}']:.0f} s)")
            key = {"set": _fingerprint(images, labels), "teacher": teacher_fp, "models": models, "budget": budget,
                   "seed": seed, "eval": {k: list(v) if isinstance(v, tuple) else v for k, v in EVAL_OPTIONS.items()}}
            table[name][ipc] = {}
            for regime in regimes:
                def compute(regime=regime):
                    return evaluate(images, labels, regime, teacher=teacher, data=data, arch="convnet",
                                    model_options=dict(EVAL_OPTIONS), budget=budget, models=models,
                                    seed=seed).accuracies

                cell = _cell(out, name, ipc, seed, regime, key, compute)
                table[name][ipc][regime] = cell
                say(f"{name} IPC {ipc} {regime}: {cell.mean:.2f} ± {cell.std:.2f} ({cell.seconds:.0f} s)")
    write_json_atomic(os.path.join(out, f"softlabel-{dataset}.json"),
                      {"table": {s: {str(i): {r: c.accuracies for r, c in v.items()} for i, v in d.items()}
                                 for s, d in table.items()},
                       "seconds": {s: {str(i): {r: c.seconds for r, c in v.items()} for i, v in d.items()}
                                   for s, d in table.items()},
                       **info})
    return table, teacher_acc


def format_softlabel_table(table, ipcs, regimes=None) -> str:
    """A Markdown table: one row per set, one column per (regime, IPC); ``regimes`` default: those in ``table``."""
    if regimes is None:
        found = {r for row in table.values() for cells in row.values() for r in cells}
        regimes = [r for r in REGIMES if r in found] or list(REGIMES[:2])
    cols = [(r, i) for r in regimes for i in ipcs]
    lines = ["| set | " + " | ".join(f"{r.upper()} IPC {i}" for r, i in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for name, row in table.items():
        cells = [f"{row[i][r].mean:.2f} ± {row[i][r].std:.2f}" if i in row and r in row[i] else "—" for r, i in cols]
        lines.append(f"| {SET_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
