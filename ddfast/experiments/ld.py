"""Label-distillation runs: data + base examples + distiller + artifacts, baselines and result tables.

A run directory holds ``manifest.json`` (the whole configuration, the data identity, versions, and the
sha256 and value checks of each artifact: :mod:`ddfast.runs`), ``distilled.safetensors`` (base images,
their indices, soft labels, calibration, T), ``meta.json`` (data set with absolute paths and its hash,
seed, hyper-parameters, version, validation history), ``labels.png`` and, while running,
``checkpoint.safetensors`` (atomic; ``resume=True`` continues bit-identically). A finished run is
replaced only with ``overwrite=True``; ``resume=True`` refuses a different configuration or data set.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ddfast.artifacts import write_json_atomic
from ddfast.data import balanced_subset, load_dataset, random_subset
from ddfast.distill.ld import LDConfig, LabelDistiller, default_inner_batch
from ddfast.evaluate import EvalResult, TrainSettings, choose_steps, evaluate_labels, steps_grid
from ddfast.models import build_model
from ddfast.models.ridge_head import RidgeClassifier
from ddfast.runs import dataset_identity, dataset_spec, maybe_run_folder, sha256_tensors, verify_run

__all__ = ["ARTIFACTS", "PRESETS", "preset", "prepare", "distill", "save_distilled", "load_distilled", "evaluate_run", "baseline", "ld_table"]

# Per-data-set defaults (§4.1 for the 28×28 and CIFAR sets; digits: a quick CPU-scale setting).
PRESETS = {
    "digits": dict(model="mlp", image_size=8, epochs=1500, outer_batch=256, val_every=50, stats_gap=100),
    "mnist": dict(model="lenet", image_size=28, epochs=400, outer_batch=1024, val_every=5),
    "fashion-mnist": dict(model="lenet", image_size=28, epochs=400, outer_batch=1024, val_every=5),
    "kmnist": dict(model="lenet", image_size=28, epochs=400, outer_batch=1024, val_every=5),
    "emnist-letters": dict(model="lenet", image_size=28, epochs=400, outer_batch=1024, val_every=5),
    "cifar10": dict(model="alexnet", image_size=32, epochs=400, outer_batch=1024, val_every=5),
    "cifar100": dict(model="alexnet", image_size=32, epochs=800, outer_batch=1024, val_every=5),
}


# What a finished LD run folder holds and the value checks each file must pass (recorded in the manifest).
ARTIFACTS = {
    "distilled.safetensors": {"tensors": {
        "base_images": ["finite"], "base_indices": ["integer", "nonnegative"], "soft_labels": ["probability_rows"],
        "calibration": ["finite", "scalar"], "steps_to_overfit": ["integer", "nonnegative", "scalar"]}},
    "meta.json": {"values": {"status": ["done"], "config.variant": ["second_order", "rr"], "config.model": "present",
                             "dataset": "present", "image_size": "nonnegative", "inner_batch": "nonnegative",
                             "steps_to_overfit": "nonnegative"}},
}
COMMAND = "ddfast distill ld"


def preset(dataset: str) -> dict:
    return dict(PRESETS.get(dataset, PRESETS["mnist"]))


@dataclass
class Prepared:
    """Target data, base examples and the source they came from."""

    target: object  # ImageDataset
    base_images: torch.Tensor
    base_indices: torch.Tensor
    base_true_labels: torch.Tensor | None  # within-dataset only
    source: str


def prepare(dataset: str, base_examples: int, *, source: str | None = None, root: str | None = None,
            source_root: str | None = None, image_size: int | None = None, seed: int = 0) -> Prepared:
    """Load the target data set and pick the base examples (§4.1).

    Within-dataset (``source`` None or equal to ``dataset``): a balanced set, ``base_examples / C`` per
    class, from the training split. Cross-dataset: ``base_examples`` random training images of
    ``source`` (their own labels unused); the source images are resized to the target's size.
    """
    if base_examples < 1:
        raise ValueError(f"base_examples: expected ≥ 1, got {base_examples}")
    target = load_dataset(dataset, root, image_size=image_size)
    if source is None or source == dataset:
        C = target.num_classes
        if base_examples % C:
            raise ValueError(f"base_examples: within-dataset base sets are balanced; {base_examples} is not a multiple of C = {C}")
        idx = balanced_subset(target.train_y, base_examples // C, seed=seed, num_classes=C)
        return Prepared(target, target.train_x[idx].clone(), idx, target.train_y[idx].clone(), dataset)
    src = load_dataset(source, source_root, image_size=target.image_size)
    if src.channels != target.channels:
        raise ValueError(f"source: {source} has {src.channels} channels, the target {dataset} {target.channels}")
    idx = random_subset(src.train_x.shape[0], base_examples, seed=seed)
    return Prepared(target, src.train_x[idx].clone(), idx, None, source)


def distill(dataset: str, base_examples: int, variant: str = "second_order", *, out: str | None = None,
            resume: bool = False, overwrite: bool = False, source: str | None = None, root: str | None = None,
            source_root: str | None = None, backend: str = "auto", seed: int = 0, progress: bool = False,
            prepared: Prepared | None = None, process_group=None, checkpoint_every: int = 1, **overrides):
    """Distil labels; returns ``(distiller, result, prepared)`` and writes the run directory if ``out``.

    ``out`` follows :class:`ddfast.runs.RunFolder`: locked while running; a finished run is replaced only
    with ``overwrite``; ``resume`` continues the run in ``out`` after checking that the whole configuration
    and the data are the same (only ``epochs`` may grow), before anything is written.
    ``process_group``: distil on the ranks of a ``torch.distributed`` group (every rank calls this with
    the same arguments; rank 0 writes the run directory)."""
    from ddfast.distributed import DistContext

    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected a positive int, got {checkpoint_every!r}")
    main = DistContext(process_group).is_main
    with maybe_run_folder(out, "ld", enabled=main, command=COMMAND, owned=("labels.png",)) as run:
        opts = preset(dataset)
        opts.update({k: v for k, v in overrides.items() if v is not None})
        image_size = opts.pop("image_size", None)
        prepared = prepared or prepare(dataset, base_examples, source=source, root=root, source_root=source_root,
                                       image_size=image_size, seed=seed)
        cfg = LDConfig(variant=variant, seed=seed, backend=backend, **opts)
        t = prepared.target
        ld = LabelDistiller(prepared.base_images, (t.train_x, t.train_y), (t.val_x, t.val_y), t.num_classes, cfg,
                            process_group=process_group)
        ident = _identity(prepared, dataset, root, source_root)
        if run is not None:
            resume = run.begin(_run_config(ld, prepared, dataset, root, source_root, image_size), inputs=ident,
                               resume=resume, overwrite=overwrite, growable=("ld.epochs",))
            _write_meta(out, ld, prepared, dataset, root, source_root, image_size, ident, status="running")
        elif out and process_group is not None:
            resume = bool(resume)
        result = ld.fit(out_dir=out, resume=resume, progress=progress, checkpoint_every=checkpoint_every)
        if run is not None:
            save_distilled(out, ld, result, prepared)
            _write_meta(out, ld, prepared, dataset, root, source_root, image_size, ident, status="done", result=result)
            try:
                from ddfast.plots import plot_labels

                plot_labels(t.unnormalize(prepared.base_images), result.soft_labels, os.path.join(out, "labels.png"),
                            classes=t.classes, true_labels=prepared.base_true_labels)
            except ImportError:  # matplotlib is optional
                pass
            run.finish(ARTIFACTS)
    return ld, result, prepared


def _identity(prepared, dataset, root, source_root) -> dict:
    ident = {"data": dataset_identity(prepared.target, dataset, root),
             "base_examples_sha256": sha256_tensors(prepared.base_images, prepared.base_indices)}
    if prepared.source != dataset:
        ident["source"] = {"name": dataset_spec(prepared.source, source_root)[0],
                           "root": dataset_spec(prepared.source, source_root)[1]}
    return ident


def _run_config(ld, prepared, dataset, root, source_root, image_size) -> dict:
    spec, root = dataset_spec(dataset, root)
    return {"method": "ld", "dataset": spec, "root": root, "source": prepared.source,
            "source_root": dataset_spec(prepared.source, source_root)[1], "image_size": prepared.target.image_size,
            "base_examples": int(prepared.base_images.shape[0]), "inner_batch": ld.inner_batch,
            "stats_gap": ld.stats_gap, "ld": asdict(ld.config)}


def _write_meta(out, ld, prepared, dataset, root, source_root, image_size, ident, status, result=None):
    from ddfast import __version__

    spec, root = dataset_spec(dataset, root)
    meta = {
        "format": "ddfast.ld/1",
        "version": __version__,
        "status": status,
        "dataset": spec,
        "source": prepared.source,
        "root": root,
        "source_root": dataset_spec(prepared.source, source_root)[1],
        "data": ident["data"],
        "image_size": prepared.target.image_size,
        "num_classes": prepared.target.num_classes,
        "base_examples": int(prepared.base_images.shape[0]),
        "inner_batch": ld.inner_batch,
        "stats_gap": ld.stats_gap,
        "config": asdict(ld.config),
    }
    if result is not None:
        meta.update({
            "steps_to_overfit": result.steps_to_overfit,
            "val_accuracy": result.val_accuracy,
            "calibration": result.calibration,
            "steps_to_overfit_history": result.steps_to_overfit_history,
            "history": result.history,
            "iterations": result.iterations,
            "resets": result.resets,
            "seconds": result.seconds,
        })
    write_json_atomic(os.path.join(out, "meta.json"), meta)


def save_distilled(out: str, ld: LabelDistiller, result, prepared: Prepared) -> str:
    """``distilled.safetensors``: base_images, base_indices, soft_labels, calibration, steps_to_overfit."""
    path = os.path.join(out, "distilled.safetensors")
    tensors = {
        "base_images": prepared.base_images.contiguous(),
        "base_indices": prepared.base_indices.contiguous(),
        "soft_labels": result.soft_labels.detach().contiguous(),
        "calibration": torch.tensor(result.calibration),
        "steps_to_overfit": torch.tensor(result.steps_to_overfit),
    }
    meta = {"variant": ld.config.variant, "model": ld.config.model, "inner_batch": str(ld.inner_batch),
            "source": prepared.source}
    from ddfast.artifacts import _atomic_write

    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_distilled(run_dir: str) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a finished run directory, every artifact verified against the manifest
    (sha256 and value checks; :func:`ddfast.runs.verify_run`); safetensors + JSON only, no unpickling."""
    return verify_run(run_dir, "ld", defaults=ARTIFACTS, command=COMMAND)


def _factory(model: str, channels: int, num_classes: int, image_size: int, rr: bool):
    def make():
        net = build_model(model, channels, num_classes, image_size)
        return RidgeClassifier.from_model(net) if rr else net

    return make


def load_run_data(run_dir: str, meta: dict, split: str = "test"):
    """The run's target data set (absolute path from ``meta.json``), checked against the recorded hash."""
    from ddfast.errors import ArtifactError, RunFolderError

    if "dataset" not in meta:
        raise ArtifactError(os.path.join(run_dir, "meta.json"), "written by LabelDistiller.fit() without a data set "
                            "name", "evaluate it in Python with LabelDistiller.evaluate(...), or distil with "
                            "`ddfast distill ld` / ddfast.experiments.ld.distill")
    target = load_dataset(meta["dataset"], meta.get("root"), image_size=meta["image_size"])
    recorded = (meta.get("data") or {}).get("sha256", {}).get(split)
    if recorded is not None:
        now = sha256_tensors(getattr(target, f"{split}_x"), getattr(target, f"{split}_y"))
        if now != recorded:
            raise RunFolderError(f"{run_dir}: the {split} split of {meta['dataset']!r} (root {meta.get('root')!r}) "
                                 "is not the data this run was distilled on (sha256 differs); restore that data set")
    return target


def evaluate_run(run_dir: str, models: int = 20, seed: int = 0, backend: str = "auto") -> EvalResult:
    """Train ``models`` fresh models on a run's base images + labels for its T steps; test accuracy (§4.1).
    Writes ``eval.json`` into the run directory."""
    from ddfast.runs import RunFolder

    if isinstance(models, bool) or not isinstance(models, int) or models < 1:
        raise ValueError(f"models: expected a positive int, got {models!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    tensors, meta = load_distilled(run_dir)
    target = load_run_data(run_dir, meta)
    cfg = meta["config"]
    make = _factory(cfg["model"], target.channels, target.num_classes, target.image_size, cfg["variant"] == "rr")
    settings = TrainSettings(steps=int(tensors["steps_to_overfit"]), batch_size=int(meta["inner_batch"]), lr=cfg["lr"],
                             pseudo_lr=cfg["pseudo_lr"], ridge_lambda=cfg["ridge_lambda"],
                             calibration_lr=cfg["calibration_lr"], backend=backend)
    res = evaluate_labels(make, tensors["base_images"], tensors["soft_labels"], target.test_x, target.test_y,
                          settings, models, seed)
    with RunFolder(run_dir, "ld"):  # no writer may be active while eval.json is written
        write_json_atomic(os.path.join(run_dir, "eval.json"), {"models": models, "seed": seed,
                                                              "accuracies": res.accuracies, "mean": res.mean,
                                                              "std": res.std})
    return res


def baseline(prepared: Prepared, *, smoothing: float = 0.0, rr: bool = False, models: int = 20, seed: int = 0,
             model: str | None = None, backend: str = "auto", max_steps: int | None = None) -> tuple[EvalResult, int]:
    """True-label (optionally label-smoothed) baseline on the same base examples (§4.2).

    The number of training steps is chosen on validation over 10…1000 (…1700 above 100 base
    examples); returns ``(test result, steps)``.
    """
    if prepared.base_true_labels is None:
        raise ValueError("baseline: needs within-dataset base examples (their true labels)")
    t = prepared.target
    C = t.num_classes
    y = F.one_hot(prepared.base_true_labels, C).to(prepared.base_images.dtype)
    if smoothing:
        y = y * (1.0 - smoothing) + smoothing / C
    n = prepared.base_images.shape[0]
    make = _factory(model or preset(t.name)["model"], t.channels, C, t.image_size, rr)
    settings = TrainSettings(steps=1, batch_size=default_inner_batch(n), backend=backend)
    grid = steps_grid(max_steps or (1700 if n > 100 else 1000))
    steps, _ = choose_steps(make, prepared.base_images, y, t.val_x, t.val_y, settings, grid, seed=seed)
    settings.steps = steps
    return evaluate_labels(make, prepared.base_images, y, t.test_x, t.test_y, settings, models, seed), steps


@dataclass
class TableRow:
    method: str
    cells: dict = field(default_factory=dict)  # base examples -> (EvalResult, steps)


def ld_table(dataset: str = "digits", base_examples=(10, 100), *, models: int = 10, seed: int = 0,
             backend: str = "auto", out: str | None = None, root: str | None = None, progress: bool = True,
             print_fn=print, **overrides) -> list[TableRow]:
    """LD / LD-RR against the true-label and label-smoothing baselines (and their RR versions) (Table 1)."""
    rows = {name: TableRow(name) for name in ("LD", "LD RR", "Baseline", "Baseline LS", "Baseline RR", "Baseline RR LS")}
    for n in base_examples:
        prepared = None
        for variant, name in (("second_order", "LD"), ("rr", "LD RR")):
            run = os.path.join(out, f"{dataset}-{n}-{variant}") if out else None
            ld, result, prepared = distill(dataset, n, variant, out=run, root=root, backend=backend, seed=seed,
                                           progress=progress, prepared=prepared, resume=bool(run), **overrides)
            res = ld.evaluate(prepared.target.test_x, prepared.target.test_y, models=models, seed=seed)
            rows[name].cells[n] = (res, result.steps_to_overfit)
            print_fn(f"{name:<15} {n:>4} base examples: {res}  (T={result.steps_to_overfit}, "
                     f"{result.iterations} iterations, {result.resets} resets, {result.seconds:.0f} s)")
        model = overrides.get("model")
        for name, ls, rr in (("Baseline", 0.0, False), ("Baseline LS", 0.1, False),
                             ("Baseline RR", 0.0, True), ("Baseline RR LS", 0.1, True)):
            res, steps = baseline(prepared, smoothing=ls, rr=rr, models=models, seed=seed, model=model, backend=backend)
            rows[name].cells[n] = (res, steps)
            print_fn(f"{name:<15} {n:>4} base examples: {res}  (T={steps})")
    table = list(rows.values())
    if out:
        write_json_atomic(os.path.join(out, f"{dataset}-table.json"), {
            "dataset": dataset, "models": models, "seed": seed, "backend": backend,
            "rows": {r.method: {str(n): {"mean": e.mean, "std": e.std, "steps": s, "accuracies": e.accuracies}
                                for n, (e, s) in r.cells.items()} for r in table}})
    return table


def format_table(rows: list[TableRow], base_examples) -> str:
    head = f"{'method':<16}" + "".join(f"{str(n) + ' base examples':>22}" for n in base_examples)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:<16}" + "".join(f"{str(r.cells[n][0]) if n in r.cells else '-':>22}" for n in base_examples))
    return "\n".join(lines)
