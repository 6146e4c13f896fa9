"""EAD runs: trajectory + distiller + artifacts, and the evaluation table against real-subset baselines.

A run directory holds ``distilled.safetensors`` (images, soft labels, their initial values and the
indices of the real images that initialised them), ``meta.json`` (data set, trajectory, configuration,
loss history, time), ``images.png`` (initial vs distilled images with their soft labels) and, while
running, ``checkpoint.safetensors`` (atomic; ``resume=True`` continues bit-identically).

Table rows (effect-alignment §5, CPU scale), each the test accuracy of fresh models trained on the set:
``Random (hard)`` — ipc random real images per class with one-hot labels; ``Random + SL`` — the same
kind of subset with the final checkpoint's soft labels (a new subset per evaluation model); ``EAD init``
— the subset EAD starts from with its soft labels; ``EAD`` — the distilled set.

Choices on validation (:func:`ead_select`, ``ead_table(select=...)``): candidate settings (objective, learning
rate, t_m) are each distilled and scored on the data set's *validation* split; the best is kept and only it is
scored on the test split, once (:func:`ddfast.evaluate.selection.choose_on_validation`). The real set D the
distiller matches is the training split, which excludes the validation and test images.

Trajectories are plain SGD (momentum 0), as EAD's derivation assumes (the checkpoints are SGD steps θ_{t+1} =
θ_t − η_t ∇L(D, θ_t)). ``trajectory_momentum=`` trains a momentum trajectory instead; the distiller then warns,
because the inner products are taken at the momentum run's checkpoints, which are not the steps the method
describes.
"""

from __future__ import annotations

import os
import itertools
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddfast.artifacts import _atomic_write, write_json_atomic
from ddfast.data import load_dataset
from ddfast.data.datasets import balanced_subset
from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
from ddfast.evaluate.selection import Selection, choose_on_validation
from ddfast.evaluate.train import EvalResult, TrainSettings, accuracy, train_on_labels
from ddfast.runs import dataset_identity, dataset_spec, file_identity, maybe_run_folder, verify_run

__all__ = ["PRESETS", "preset", "trajectory_for", "distill", "load_distilled", "evaluate_set", "ead_select",
           "candidate_grid", "ead_table", "format_table", "TableRow"]

# CPU-scale settings per data set: the trajectory (SGD on the full training split), the distiller and
# the evaluation models (Adam on the distilled set). Trajectories are plain SGD (momentum 0): EAD's
# derivation takes the checkpoints to be SGD steps (``trajectory_momentum=`` overrides it, with a warning).
PRESETS = {
    "digits": dict(image_size=None, arch="convnet", model_options={"widths": (32, 64), "norm": "instance"},
                   traj=dict(epochs=20, every=5, lr=0.05, momentum=0.0, batch_size=128),
                   ead=dict(iterations=200, t_m=5, probe_batch=256, real_batch=256, lr_images=1e-2, lr_labels=1e-2),
                   eval=dict(steps=300, batch_size=100, lr=1e-3)),
    "mnist": dict(image_size=None, arch="convnet", model_options={"widths": (32, 32, 32), "norm": "instance"},
                  traj=dict(epochs=2, every=20, lr=0.05, momentum=0.0, batch_size=256),
                  ead=dict(iterations=100, t_m=3, probe_batch=256, real_batch=256, lr_images=1e-2, lr_labels=1e-2),
                  eval=dict(steps=500, batch_size=100, lr=1e-3)),
}
PRESETS["fashion-mnist"] = dict(PRESETS["mnist"])


# What a finished EAD run folder holds and the value checks each file must pass (recorded in the manifest).
ARTIFACTS = {
    "distilled.safetensors": {"tensors": {"images": ["finite"], "soft_labels": ["finite"], "init_images": ["finite"],
                                          "init_labels": ["finite"], "init_indices": ["integer", "nonnegative"]}},
    "meta.json": {"values": {"status": ["complete"], "method": ["ead"], "dataset": "present",
                             "config.objective": ["normalised", "printed"], "iterations": "nonnegative"}},
}
COMMAND = "ddfast distill ead"


def preset(dataset: str) -> dict:
    if dataset not in PRESETS:
        return dict(PRESETS["mnist"])
    return dict(PRESETS[dataset])


def _settings(p: dict) -> TrainSettings:
    return TrainSettings(**p["eval"])


def _stored_momentum(traj) -> float:
    return float(((getattr(traj, "index", None) or {}).get("optimizer") or {}).get("momentum", 0.0) or 0.0)


def trajectory_for(dataset: str, data, out: str, *, progress: bool = False, seed: int = 0, process_group=None,
                   strict: bool = True, **overrides):
    """The trajectory of ``dataset`` under ``out`` (trained, or resumed when a partial one is there); with a
    ``process_group`` every rank calls this and the training is DistributedDataParallel.

    ``overrides`` set trajectory settings (``momentum``, ``lr``, ...; None keeps the preset). With ``strict``
    an existing trajectory trained with another SGD momentum than the one asked for is refused (a folder
    made with an older momentum preset is not silently reused)."""
    from ddfast.distributed import DistContext
    from ddfast.trajectory import Trajectory, train_trajectory

    p = preset(dataset)
    index = os.path.join(out, "trajectory.json")
    exists = DistContext(process_group).broadcast_object(os.path.exists(index))  # rank 0's view, before writes
    kw = {**p["traj"], **{k: v for k, v in overrides.items() if v is not None}}
    if exists:
        traj = Trajectory.open(out)
        stored = _stored_momentum(traj)
        if strict and stored != float(kw.get("momentum", 0.0)):
            raise ValueError(f"trajectory: {out} was trained with SGD momentum {stored}, expected {kw.get('momentum', 0.0)} "
                             f"(EAD's preset is plain SGD); use another folder or pass the matching trajectory momentum")
        if getattr(traj, "complete", True):
            traj.check_data(data.train_x, data.train_y)
            return traj
    return train_trajectory(data, p["arch"], out, model_options=dict(p["model_options"]), seed=seed,
                            resume=exists, progress=progress, process_group=process_group, **kw)


def distill(dataset: str, ipc: int, *, out: str, trajectory: str | None = None, root: str | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = False, checkpoint_every: int = 25, process_group=None,
            trajectory_momentum: float | None = None, data=None, **overrides):
    """Distil ``dataset`` at ``ipc`` images per class with EAD into the run directory ``out``.

    ``trajectory`` is a trajectory directory (trained here with the preset when missing; default
    ``<out>/../trajectory-<dataset>``). ``trajectory_momentum``: SGD momentum of a trajectory trained here
    (default: the preset's 0, plain SGD; an existing default-path trajectory with another momentum is refused, a
    ``trajectory`` given explicitly is used as it is, with the distiller's warning when it has momentum).
    ``data``: the loaded data set (loaded from ``dataset`` / ``root`` when None). ``overrides`` set
    :class:`EADConfig` fields.
    ``process_group``: distil on the ranks of a ``torch.distributed`` group (every rank calls this with
    the same arguments; rank 0 trains a missing trajectory and writes the run directory).
    Returns ``(distiller, result, data)``.
    """
    from ddfast.distributed import DistContext

    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected a positive int, got {checkpoint_every!r}")
    ctx = DistContext(process_group)
    with maybe_run_folder(out, "ead", enabled=ctx.is_main, command=COMMAND,
                          owned=("images.png", "images_before.png")) as run:
        p = preset(dataset)
        data = data if data is not None else load_dataset(dataset, root)
        traj_dir = trajectory or os.path.join(os.path.dirname(os.path.abspath(out)), f"trajectory-{dataset}")
        # Every rank trains a missing trajectory with DistributedDataParallel (rank 0 writes it).
        traj = trajectory_for(dataset, data, traj_dir, progress=progress and ctx.is_main, process_group=process_group,
                              strict=trajectory is None or trajectory_momentum is not None, momentum=trajectory_momentum)
        cfg = EADConfig(**{**p["ead"], "ipc": ipc, **{k: v for k, v in overrides.items() if v is not None}})
        distiller = EffectAlignmentDistiller(traj, (data.train_x, data.train_y), cfg, process_group=process_group)
        if run is not None:
            spec, abs_root = dataset_spec(dataset, root)
            inputs = {"data": dataset_identity(data, dataset, root),
                      "trajectory": file_identity(os.path.join(traj_dir, "trajectory.json"))}
            resume = run.begin({"method": "ead", "dataset": spec, "root": abs_root, "ead": asdict(distiller.config)},
                               inputs=inputs, resume=resume, overwrite=overwrite, growable=("ead.iterations",))
            _write_meta(out, distiller, dataset, traj_dir, "running", root=root, data=inputs["data"])
        result = distiller.fit(out_dir=out, resume=resume, progress=progress, checkpoint_every=checkpoint_every)
        if run is not None:
            save_distilled(out, result)
            _write_meta(out, distiller, dataset, traj_dir, "complete", root=root, data=inputs["data"])
            _plot(out, data, result)
            run.finish(ARTIFACTS)
    return distiller, result, data


def _write_meta(out, distiller, dataset, traj_dir, status, root=None, data=None):
    spec, root = dataset_spec(dataset, root)
    write_json_atomic(os.path.join(out, "meta.json"), {
        "method": "ead", "dataset": spec, "root": root, "data": data, "trajectory": os.path.abspath(traj_dir),
        "status": status, "config": asdict(distiller.config), "coefficient": distiller.coefficient,
        "iterations": distiller.iteration, "seconds": distiller.seconds,
        "history": [{k: v for k, v in h.items() if k != "checkpoints"} for h in distiller.history],
    })


def save_distilled(out: str, result) -> str:
    path = os.path.join(out, "distilled.safetensors")
    tensors = {"images": result.images, "soft_labels": result.soft_labels, "init_images": result.init_images,
               "init_labels": result.init_labels, "init_indices": result.init_indices}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "ddfast-ead-1"}))
    return path


def load_distilled(run_dir: str):
    """``(tensors, meta)`` of an EAD run directory."""
    return verify_run(run_dir, "ead", defaults=ARTIFACTS, command=COMMAND)


def _plot(out, data, result):
    from ddfast.plots import plot_labels

    k = min(result.images.shape[0], 20)
    step = max(result.images.shape[0] // k, 1)
    sel = torch.arange(0, result.images.shape[0], step)[:k]
    y_init = result.init_labels[sel].softmax(-1)
    y_final = result.soft_labels[sel].softmax(-1)
    classes = data.classes
    n = result.images.shape[0]
    plot_labels(data.unnormalize(result.init_images[sel]), y_init, os.path.join(out, "images_before.png"), classes,
                title=f"EAD initial set: {len(sel)} of {n} real images with the final checkpoint's soft labels",
                xlabel="synthetic image")
    plot_labels(data.unnormalize(result.images[sel]), y_final, os.path.join(out, "images.png"), classes,
                title=f"EAD distilled set after {result.iterations} iterations: {len(sel)} of {n} images, soft labels",
                xlabel="synthetic image")


def make_model_factory(dataset: str, data):
    from ddfast.models import build_model

    p = preset(dataset)
    c, h = data.train_x.shape[1], data.train_x.shape[-1]
    return lambda: build_model(p["arch"], c, data.num_classes, h, **p["model_options"])


def evaluate_set(make_model, images, targets, data, settings: TrainSettings, models: int = 5, seed: int = 0,
                 subsets=None, split: str = "test") -> EvalResult:
    """Train ``models`` fresh models on (images, targets) — ``targets`` are probability rows — and
    score them on ``split`` (``"test"`` or ``"val"``). With ``subsets`` (a callable k → (images, targets))
    each model gets its own set (the random-subset baselines)."""
    if split not in ("test", "val"):
        raise ValueError(f"split: expected 'test' or 'val', got {split!r}")
    x_eval, y_eval = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    if split == "val" and len(y_eval) == 0:
        raise ValueError("split: the data set has an empty validation split (load it with val_fraction > 0)")
    out = EvalResult()
    for k in range(models):
        x, t = subsets(k) if subsets is not None else (images, targets)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            model = make_model().to(x.device)
        train_on_labels(model, x, t, settings, torch.Generator().manual_seed(seed + k))
        out.accuracies.append(accuracy(model, x_eval, y_eval))
    return out


@dataclass
class TableRow:
    name: str
    results: dict  # ipc -> EvalResult (test)
    selection: dict = field(default_factory=dict)  # ipc -> {"chosen", "val", "test"} when chosen on validation


# Settings ead_select may choose among (EADConfig fields; "lr" sets both learning rates).
SELECTABLE = ("objective", "lr", "t_m", "time_weights", "learn_labels")


def candidate_grid(**values) -> list[tuple]:
    """All combinations of the given settings as hashable candidates, e.g.
    ``candidate_grid(objective=["normalised", "printed"], lr=[1e-2, 3e-2])`` → four tuples of (name, value)
    pairs. Settings not in :data:`SELECTABLE` are refused."""
    unknown = set(values) - set(SELECTABLE)
    if unknown:
        raise ValueError(f"values: cannot select {sorted(unknown)}; expected settings among {list(SELECTABLE)}")
    names = sorted(k for k, v in values.items() if v is not None)
    for k in names:
        if isinstance(values[k], (str, bytes)) or not list(values[k]):
            raise ValueError(f"{k}: expected a non-empty list of values, got {values[k]!r}")
    return [tuple(zip(names, combo)) for combo in itertools.product(*(list(values[k]) for k in names))]


def _candidate_overrides(candidate) -> dict:
    kw = dict(candidate)
    if "lr" in kw:
        lr = kw.pop("lr")
        kw["lr_images"] = kw["lr_labels"] = lr
    return kw


def _candidate_tag(candidate) -> str:
    return "-".join(f"{k.replace('_', '')}{v}" for k, v in candidate) or "preset"


def ead_select(dataset: str, ipc: int, candidates, *, out: str, models: int = 5, seed: int = 0,
               root: str | None = None, progress: bool = False, resume: bool = True, data=None,
               trajectory: str | None = None, trajectory_momentum: float | None = None, **overrides) -> Selection:
    """Choose an EAD setting on validation, then test the chosen one once.

    Each candidate (a tuple of ``(setting, value)`` pairs, see :func:`candidate_grid`) is distilled into
    ``<out>/ead-<dataset>-ipc<ipc>-<tag>`` (finished runs are reused when ``resume``) and scored by the mean
    validation accuracy of ``models`` fresh models; the best one alone is then trained ``models`` times again
    and scored on the test split. The test split is read only after the choice, and only for the chosen
    candidate.

    Returns a :class:`~ddfast.evaluate.selection.Selection` whose ``chosen`` is the candidate,
    ``val_scores`` maps every candidate to its mean validation accuracy and ``test_score`` is the chosen
    one's mean test accuracy; ``selection.results`` holds the :class:`EvalResult` per ``(candidate, split)``.
    """
    candidates = [tuple(c) for c in candidates]
    for c in candidates:
        bad = {k for k, _ in c} - set(SELECTABLE)
        if bad:
            raise ValueError(f"candidates: cannot select {sorted(bad)}; expected settings among {list(SELECTABLE)}")
    p = preset(dataset)
    data = data if data is not None else load_dataset(dataset, root)
    traj_dir = trajectory or os.path.join(out, f"trajectory-{dataset}")
    trajectory_for(dataset, data, traj_dir, progress=progress, strict=trajectory is None or trajectory_momentum is not None,
                   momentum=trajectory_momentum)
    make_model = make_model_factory(dataset, data)
    settings = _settings(p)
    sets, results = {}, {}

    def distilled(c):
        if c not in sets:
            run = os.path.join(out, f"ead-{dataset}-ipc{ipc}-{_candidate_tag(c)}")
            if resume and os.path.exists(os.path.join(run, "distilled.safetensors")):
                tensors, _ = load_distilled(run)
                sets[c] = (tensors["images"], tensors["soft_labels"])
            else:
                _, res, _ = distill(dataset, ipc, out=run, trajectory=traj_dir, root=root, resume=resume,
                                    progress=progress, seed=seed, data=data,
                                    trajectory_momentum=trajectory_momentum,
                                    **{**overrides, **_candidate_overrides(c)})
                sets[c] = (res.images, res.soft_labels)
        return sets[c]

    def score(c, split):
        images, labels = distilled(c)
        results[(c, split)] = evaluate_set(make_model, images, labels.softmax(-1), data, settings, models, seed,
                                           split=split)
        return results[(c, split)].mean

    selection = choose_on_validation(candidates, score)
    selection.results = results
    return selection


def ead_table(dataset: str = "digits", ipcs=(1, 10), *, out: str, models: int = 5, seed: int = 0,
              objectives=("normalised", "printed"), progress: bool = False, root: str | None = None,
              resume: bool = True, select: dict | None = None, trajectory_momentum: float | None = None,
              **overrides) -> list[TableRow]:
    """Distil at each ipc (each objective) and evaluate against the real-subset baselines.

    ``select``: settings to choose among on validation, e.g. ``{"objective": [...], "lr": [...], "t_m": [...]}``
    (see :func:`candidate_grid`); the table then has one EAD row, ``EAD (chosen on validation)``, whose test
    cell is the chosen candidate's single test evaluation and whose ``selection[ipc]`` records the choice and
    every candidate's validation accuracy (:func:`ead_select`). Without it, one row per objective is tested
    (an ablation: nothing is chosen from those numbers).
    ``trajectory_momentum``: SGD momentum of the trajectory (default: the preset's plain SGD)."""
    p = preset(dataset)
    data = load_dataset(dataset, root)
    traj_dir = os.path.join(out, f"trajectory-{dataset}")
    traj = trajectory_for(dataset, data, traj_dir, progress=progress, momentum=trajectory_momentum)
    candidates = candidate_grid(**select) if select else None
    make_model = make_model_factory(dataset, data)
    settings = _settings(p)
    teacher = traj.build_model()
    teacher.load_state_dict(dict(traj.final()))
    teacher.eval()
    C = data.num_classes
    names = (["Random (hard)", "Random + SL", "EAD (chosen on validation)"] if candidates else
             ["Random (hard)", "Random + SL", "EAD init (SL)"] + [f"EAD ({o})" for o in objectives])
    rows = {name: TableRow(name, {}) for name in names}
    for ipc in ipcs:
        def subset(k, soft, ipc=ipc):
            idx = balanced_subset(data.train_y, ipc, seed=seed + 1000 + k, num_classes=C)
            x = data.train_x[idx]
            if soft:
                with torch.no_grad():
                    return x, teacher(x).softmax(-1)
            return x, F.one_hot(data.train_y[idx], C).to(x.dtype)

        rows["Random (hard)"].results[ipc] = evaluate_set(make_model, None, None, data, settings, models, seed,
                                                          subsets=lambda k: subset(k, False))
        rows["Random + SL"].results[ipc] = evaluate_set(make_model, None, None, data, settings, models, seed,
                                                        subsets=lambda k: subset(k, True))
        if candidates:
            sel = ead_select(dataset, ipc, candidates, out=out, models=models, seed=seed, root=root,
                             progress=progress, resume=resume, data=data, trajectory=traj_dir,
                             trajectory_momentum=trajectory_momentum, **overrides)
            row = rows["EAD (chosen on validation)"]
            row.results[ipc] = sel.results[(sel.chosen, "test")]
            row.selection[ipc] = {"chosen": dict(sel.chosen),
                                  "val": [{"candidate": dict(c), "mean": v,
                                           "accuracies": sel.results[(c, "val")].accuracies}
                                          for c, v in sel.val_scores.items()],
                                  "test": {"mean": sel.test_score, "accuracies": row.results[ipc].accuracies}}
            continue
        for o in objectives:
            run = os.path.join(out, f"ead-{dataset}-ipc{ipc}-{o}")
            done = os.path.exists(os.path.join(run, "distilled.safetensors"))
            if done and resume:
                tensors, _ = load_distilled(run)
                images, labels = tensors["images"], tensors["soft_labels"]
                init_x, init_y = tensors["init_images"], tensors["init_labels"]
            else:
                _, res, _ = distill(dataset, ipc, out=run, trajectory=traj_dir, root=root, resume=resume,
                                    progress=progress, objective=o, seed=seed, data=data,
                                    trajectory_momentum=trajectory_momentum, **overrides)
                images, labels, init_x, init_y = res.images, res.soft_labels, res.init_images, res.init_labels
            if "EAD init (SL)" not in rows or ipc not in rows["EAD init (SL)"].results:
                rows["EAD init (SL)"].results[ipc] = evaluate_set(make_model, init_x, init_y.softmax(-1), data,
                                                                  settings, models, seed)
            rows[f"EAD ({o})"].results[ipc] = evaluate_set(make_model, images, labels.softmax(-1), data, settings,
                                                           models, seed)
    return list(rows.values())


def format_table(rows: list[TableRow], ipcs, title: str = "") -> str:
    head = f"| set | " + " | ".join(f"IPC {i}" for i in ipcs) + " |"
    lines = ([title] if title else []) + [head, "|" + "---|" * (len(ipcs) + 1)]
    for row in rows:
        cells = [f"{row.results[i].mean:.2f} ± {row.results[i].std:.2f}" if i in row.results else "—" for i in ipcs]
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
