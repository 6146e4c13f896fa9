"""EAD runs: trajectory + distiller + artifacts, and the evaluation table against real-subset baselines.

A run directory holds ``distilled.safetensors`` (images, soft labels, their initial values and the
indices of the real images that initialised them), ``meta.json`` (data set, trajectory, configuration,
loss history, time), ``images.png`` (initial vs distilled images with their soft labels) and, while
running, ``checkpoint.safetensors`` (atomic; ``resume=True`` continues bit-identically).

Table rows (effect-alignment §5, CPU scale), each the test accuracy of fresh models trained on the set:
``Random (hard)`` — ipc random real images per class with one-hot labels; ``Random + SL`` — the same
kind of subset with the final checkpoint's soft labels (a new subset per evaluation model); ``EAD init``
— the subset EAD starts from with its soft labels; ``EAD`` — the distilled set.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddfast.artifacts import _atomic_write, write_json_atomic
from ddfast.data import load_dataset
from ddfast.data.datasets import balanced_subset
from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
from ddfast.evaluate.train import EvalResult, TrainSettings, accuracy, train_on_labels
from ddfast.runs import dataset_identity, dataset_spec, file_identity, maybe_run_folder, verify_run

__all__ = ["PRESETS", "preset", "trajectory_for", "distill", "load_distilled", "evaluate_set", "ead_table",
           "format_table", "TableRow"]

# CPU-scale settings per data set: the trajectory (SGD on the full training split), the distiller and
# the evaluation models (Adam on the distilled set).
PRESETS = {
    "digits": dict(image_size=None, arch="convnet", model_options={"widths": (32, 64), "norm": "instance"},
                   traj=dict(epochs=20, every=5, lr=0.05, momentum=0.9, batch_size=128),
                   ead=dict(iterations=200, t_m=5, probe_batch=256, real_batch=256, lr_images=1e-2, lr_labels=1e-2),
                   eval=dict(steps=300, batch_size=100, lr=1e-3)),
    "mnist": dict(image_size=None, arch="convnet", model_options={"widths": (32, 32, 32), "norm": "instance"},
                  traj=dict(epochs=2, every=20, lr=0.05, momentum=0.9, batch_size=256),
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


def trajectory_for(dataset: str, data, out: str, *, progress: bool = False, seed: int = 0, process_group=None,
                   **overrides):
    """The trajectory of ``dataset`` under ``out`` (trained, or resumed when a partial one is there); with a
    ``process_group`` every rank calls this and the training is DistributedDataParallel."""
    from ddfast.distributed import DistContext
    from ddfast.trajectory import Trajectory, train_trajectory

    p = preset(dataset)
    index = os.path.join(out, "trajectory.json")
    exists = DistContext(process_group).broadcast_object(os.path.exists(index))  # rank 0's view, before writes
    if exists:
        traj = Trajectory.open(out)
        if getattr(traj, "complete", True):
            traj.check_data(data.train_x, data.train_y)
            return traj
    kw = {**p["traj"], **{k: v for k, v in overrides.items() if v is not None}}
    return train_trajectory(data, p["arch"], out, model_options=dict(p["model_options"]), seed=seed,
                            resume=exists, progress=progress, process_group=process_group, **kw)


def distill(dataset: str, ipc: int, *, out: str, trajectory: str | None = None, root: str | None = None,
            resume: bool = False, overwrite: bool = False, progress: bool = False, checkpoint_every: int = 25, process_group=None,
            **overrides):
    """Distil ``dataset`` at ``ipc`` images per class with EAD into the run directory ``out``.

    ``trajectory`` is a trajectory directory (trained here with the preset when missing; default
    ``<out>/../trajectory-<dataset>``). ``overrides`` set :class:`EADConfig` fields.
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
        data = load_dataset(dataset, root)
        traj_dir = trajectory or os.path.join(os.path.dirname(os.path.abspath(out)), f"trajectory-{dataset}")
        # Every rank trains a missing trajectory with DistributedDataParallel (rank 0 writes it).
        traj = trajectory_for(dataset, data, traj_dir, progress=progress and ctx.is_main, process_group=process_group)
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
                 subsets=None) -> EvalResult:
    """Train ``models`` fresh models on (images, targets) — ``targets`` are probability rows — and
    score them on the test split. With ``subsets`` (a callable k → (images, targets)) each model gets
    its own set (the random-subset baselines)."""
    out = EvalResult()
    for k in range(models):
        x, t = subsets(k) if subsets is not None else (images, targets)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            model = make_model()
        train_on_labels(model, x, t, settings, torch.Generator().manual_seed(seed + k))
        out.accuracies.append(accuracy(model, data.test_x, data.test_y))
    return out


@dataclass
class TableRow:
    name: str
    results: dict  # ipc -> EvalResult


def ead_table(dataset: str = "digits", ipcs=(1, 10), *, out: str, models: int = 5, seed: int = 0,
              objectives=("normalised", "printed"), progress: bool = False, root: str | None = None,
              resume: bool = True, **overrides) -> list[TableRow]:
    """Distil at each ipc (each objective) and evaluate against the real-subset baselines."""
    p = preset(dataset)
    data = load_dataset(dataset, root)
    traj_dir = os.path.join(out, f"trajectory-{dataset}")
    traj = trajectory_for(dataset, data, traj_dir, progress=progress)
    make_model = make_model_factory(dataset, data)
    settings = _settings(p)
    teacher = traj.build_model()
    teacher.load_state_dict(dict(traj.final()))
    teacher.eval()
    C = data.num_classes
    rows = {name: TableRow(name, {}) for name in ["Random (hard)", "Random + SL", "EAD init (SL)"] +
            [f"EAD ({o})" for o in objectives]}
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
        for o in objectives:
            run = os.path.join(out, f"ead-{dataset}-ipc{ipc}-{o}")
            done = os.path.exists(os.path.join(run, "distilled.safetensors"))
            if done and resume:
                tensors, _ = load_distilled(run)
                images, labels = tensors["images"], tensors["soft_labels"]
                init_x, init_y = tensors["init_images"], tensors["init_labels"]
            else:
                _, res, _ = distill(dataset, ipc, out=run, trajectory=traj_dir, root=root, resume=resume,
                                    progress=progress, objective=o, seed=seed, **overrides)
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
