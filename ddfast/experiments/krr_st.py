"""KRR-ST runs: source data + target model + distiller + artifacts, transfer and data-free KD tables.

A run directory holds ``distilled.safetensors`` (X_s, Y_s, the rows of X_t that initialised X_s),
``meta.json`` (data set, target model, hyper-parameters, loss history, time), ``images.png`` (initial vs
distilled images), ``pca.png`` (g_φ(X_t), g_φ(X_s), Y_s; krr-st-selfsup Fig. 2) and, while running,
``checkpoint.safetensors`` (atomic; ``resume=True`` continues bit-identically).

Transfer rows (krr-st-selfsup §4.1 baselines, on the same budget m): ``w/o pre`` (fine-tune from random
init), ``Random`` (m random source images pre-trained with their labels and cross-entropy, as the
method's evaluation does for labelled baselines), ``K-means`` (for each of m k-means centroids in g_φ's
feature space the nearest real image, with its label), ``Random+g_φ`` (m random images regressed on
g_φ — KRR-ST's initialisation, i.e. the same set without distillation) and ``KRR-ST``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file

from ddfast.artifacts import _atomic_write, write_json_atomic
from ddfast.data import load_dataset
from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller
from ddfast.evaluate.train import mean_std
from ddfast.runs import dataset_identity, dataset_spec, file_identity, maybe_run_folder, verify_run
from ddfast.ssl.barlow_twins import encode

__all__ = ["PRESETS", "ROW_KEYS", "preset", "load_source", "distill", "load_distilled", "PretrainSet", "settings_for_run", "transfer_rows",
           "transfer", "kd_table"]

# CPU-scale defaults per source data set (the paper's settings are KRRSTConfig's defaults, §4.1). With
# 1000 meta-steps instead of the paper's 160,000 the AdamW learning rate is 10⁻² instead of 10⁻³.
# The 28×28 presets run the ConvNet passes in bf16, NHWC, with BatchNorm folded in the outer loss: 1.7×
# faster per step with the same transfer accuracy (README, "End-to-end speed"); --precision fp32 turns it off.
_FAST_PASSES = dict(precision="bf16", channels_last=True, fold_bn=True)
PRESETS = {
    "mnist": dict(image_size=28, targets=("mnist", "fashion-mnist", "digits"), m=100, steps=1000, batch_size=256,
                  pool_steps=200, widths=(32, 64, 128), lr=1e-2, **_FAST_PASSES),
    "fashion-mnist": dict(image_size=28, targets=("fashion-mnist", "mnist", "digits"), m=100, steps=1000,
                          batch_size=256, pool_steps=200, widths=(32, 64, 128), lr=1e-2, **_FAST_PASSES),
    "digits": dict(image_size=16, targets=("digits",), m=50, steps=300, batch_size=256, pool_steps=100,
                   widths=(16, 32)),
}


# What a finished KRR-ST run folder holds and the value checks each file must pass (recorded in the manifest).
ARTIFACTS = {
    "distilled.safetensors": {"tensors": {"images": ["finite"], "targets": ["finite"],
                                          "init_indices": ["integer", "nonnegative"]}},
    "meta.json": {"values": {"status": ["done"], "method": ["krr-st"], "dataset": "present", "target": "present",
                             "image_size": "nonnegative", "config.seed": "present"}},
}
COMMAND = "ddfast distill krr-st"


def preset(dataset: str) -> dict:
    return dict(PRESETS.get(dataset, PRESETS["mnist"]))


def load_source(dataset: str, image_size: int | None = None, root: str | None = None):
    """The source data set at the run's resolution (its labels are used only by labelled baselines)."""
    return load_dataset(dataset, root, image_size=image_size or preset(dataset)["image_size"])


def _load_target_model(target_dir: str):
    from ddfast.ssl.barlow_twins import load_target

    return load_target(target_dir)


def _check_target_fits(target, ds, target_dir):
    c, h = ds.train_x.shape[1], ds.train_x.shape[-1]
    tc, th = getattr(target, "in_channels", c), getattr(target, "image_size", h)
    if (tc, th) != (c, h):
        raise ValueError(f"target: the model in {target_dir} takes {tc}×{th}×{th} images, the source data set "
                         f"{ds.name} is {c}×{h}×{h}; train the target at this resolution (ddfast ssl --image-size {h})")


def distill(dataset: str, target_dir: str, *, out: str | None = None, root: str | None = None,
            image_size: int | None = None, resume: bool = False, overwrite: bool = False, progress: bool = False,
            checkpoint_every: int = 100, process_group=None, **overrides):
    """Distil ``dataset`` with the target model saved in ``target_dir`` (Algorithm 1).

    ``overrides`` set :class:`KRRSTConfig` fields (m, steps, batch_size, lr, pool_steps, widths, init,
    backend, seed, ...); the rest come from :data:`PRESETS`. Returns ``(distiller, result, source)``.
    ``out`` follows :class:`ddfast.runs.RunFolder` (locked; ``overwrite`` replaces a finished run; ``resume``
    refuses another configuration, data set or target model; only ``steps`` may grow).
    ``process_group``: distil on the ranks of a ``torch.distributed`` group (every rank calls this with
    the same arguments; rank 0 writes the run directory).
    """
    from ddfast.distributed import DistContext

    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected a positive int, got {checkpoint_every!r}")
    main = DistContext(process_group).is_main
    with maybe_run_folder(out, "krr-st", enabled=main, command=COMMAND, owned=("pca.png", "images.png")) as run:
        p = preset(dataset)
        image_size = image_size or p["image_size"]
        fields_ = KRRSTConfig.__dataclass_fields__
        cfg_kwargs = {k: v for k, v in p.items() if k in fields_}
        cfg_kwargs.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(cfg_kwargs) - set(fields_)
        if unknown:
            raise ValueError(f"overrides: unknown KRRSTConfig fields {sorted(unknown)}")
        config = KRRSTConfig(**cfg_kwargs)
        target = _load_target_model(target_dir)
        ds = load_source(dataset, image_size, root)
        _check_target_fits(target, ds, target_dir)
        train_targets = encode(target, ds.train_x)
        # the target model too: real_augment (the official step) evaluates g_φ on each augmented real batch
        krr = KRRSTDistiller(ds.train_x, target if config.real_augment else None, config=config,
                             train_targets=train_targets, process_group=process_group)
        if run is not None:
            from ddfast.ssl.barlow_twins import TARGET_FILE

            spec, abs_root = dataset_spec(dataset, root)
            inputs = {"data": dataset_identity(ds, dataset, root),
                      "target": file_identity(os.path.join(target_dir, TARGET_FILE))}
            resume = run.begin({"method": "krr-st", "dataset": spec, "root": abs_root, "image_size": image_size,
                                "krr_st": _config_json(krr)}, inputs=inputs, resume=resume, overwrite=overwrite,
                               growable=("krr_st.steps",))
            _write_meta(out, krr, dataset, target_dir, image_size, status="running", root=root, data=inputs["data"])
        result = krr.fit(out_dir=out, resume=resume, progress=progress, checkpoint_every=checkpoint_every)
        if run is not None:
            save_distilled(out, result, dataset, target_dir, image_size)
            _write_meta(out, krr, dataset, target_dir, image_size, status="done", result=result, root=root,
                        data=inputs["data"])
            _plots(out, ds, result, train_targets, target)
            run.finish(ARTIFACTS)
    return krr, result, ds


def _config_json(krr) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(krr.config).items()}


def _write_meta(out, krr, dataset, target_dir, image_size, status, result=None, root=None, data=None):
    from ddfast import __version__

    spec, root = dataset_spec(dataset, root)
    meta = {"method": "krr-st", "dataset": spec, "root": root, "data": data, "target": os.path.abspath(target_dir),
            "image_size": image_size, "status": status, "config": _config_json(krr), "out_dim": krr.out_dim,
            "version": __version__}
    if result is not None:
        losses = [h["loss"] for h in result.history]
        k = max(1, min(50, len(losses) // 10))
        meta.update(steps=result.steps, seconds=round(result.seconds, 2), pool_resets=krr.pool.resets,
                    loss_first=sum(losses[:k]) / k if losses else None,
                    loss_last=sum(losses[-k:]) / k if losses else None)
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "meta.json"), meta)


def save_distilled(out: str, result, dataset: str, target_dir: str, image_size: int) -> str:
    """``distilled.safetensors``: images (X_s), targets (Y_s), init_indices; metadata says where from."""
    path = os.path.join(out, "distilled.safetensors")
    tensors = {"images": result.images.contiguous(), "targets": result.targets.contiguous(),
               "init_indices": result.init_indices.contiguous()}
    meta = {"method": "krr-st", "dataset": dataset, "target": os.path.abspath(target_dir), "image_size": str(image_size)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_distilled(run_dir: str) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a KRR-ST run directory (safetensors + JSON, no unpickling)."""
    tensors, meta = verify_run(run_dir, "krr-st", defaults=ARTIFACTS, command=COMMAND)
    if meta.get("method") != "krr-st":
        raise ValueError(f"{run_dir}: not a KRR-ST run (method={meta.get('method')!r})")
    return tensors, meta


def _plots(out, ds, result, train_targets, target):
    from ddfast.plots import plot_distilled_images, plot_representation_pca

    before = ds.unnormalize(ds.train_x[result.init_indices])
    plot_distilled_images(before, ds.unnormalize(result.images), os.path.join(out, "images.png"),
                          title=f"KRR-ST on {ds.name}: {result.images.shape[0]} images, {result.steps} steps")
    plot_representation_pca(train_targets, encode(target, result.images), result.targets,
                            os.path.join(out, "pca.png"), title=f"KRR-ST on {ds.name}: target space (PCA)")


# ------------------------------------------------------------------------------------------ transfer


@dataclass
class PretrainSet:
    """A row of the transfer table: the pre-training images and ``seed -> pre-trained model | None``."""

    images: torch.Tensor | None
    pretrain: Callable[[int], object]

    def __call__(self, seed: int):
        return self.pretrain(seed)


def settings_for_run(settings, meta: dict):
    """Transfer settings for a run: a ConvNet without explicit widths gets the widths the run distilled
    with (the method pre-trains and fine-tunes the architecture it distilled with, §4.1)."""
    from ddfast.evaluate.transfer import TransferSettings

    settings = settings or TransferSettings()
    widths = meta.get("config", {}).get("widths")
    if settings.arch == "convnet" and settings.widths is None and widths:
        settings = settings.replace(widths=tuple(widths))
    return settings


ROW_KEYS = {"wo-pre": "w/o pre", "random": "Random", "kmeans": "K-means", "random-g": "Random+g_φ", "krr-st": "KRR-ST"}


def _check_rows(rows):
    if rows is None:
        return None
    rows = list(rows)
    bad = [r for r in rows if r not in ROW_KEYS]
    if bad or not rows:
        raise ValueError(f"rows: expected a non-empty subset of {sorted(ROW_KEYS)}, got {rows}")
    return [ROW_KEYS[r] for r in rows]


def transfer_rows(run_dir: str, *, settings=None, kmeans: bool = True, root: str | None = None, rows=None) -> dict:
    """The pre-training sets of the transfer table for one KRR-ST run (name → :class:`PretrainSet`).

    ``rows``: keys of :data:`ROW_KEYS` (``wo-pre``, ``random``, ``kmeans``, ``random-g``, ``krr-st``) to build
    only those rows (e.g. an ablation run needs only its own ``krr-st`` row); None builds all of them.
    """
    wanted = _check_rows(rows)
    from ddfast.evaluate.transfer import pretrain_classification, pretrain_regression
    from ddfast.select import kmeans_select, random_select

    tensors, meta = load_distilled(run_dir)
    settings = settings_for_run(settings, meta)
    x_s, y_s = tensors["images"], tensors["targets"]
    m = x_s.shape[0]
    ds = load_source(meta["dataset"], meta["image_size"], root or meta.get("root"))
    seed0 = int(meta["config"]["seed"])
    target = _load_target_model(meta["target"])

    def labelled(idx):
        x, y = ds.train_x[idx], ds.train_y[idx]
        return PretrainSet(x, lambda seed: pretrain_classification(x, y, ds.num_classes, settings, seed))

    def want(name):
        return wanted is None or name in wanted

    out = {}
    if want("w/o pre"):
        out["w/o pre"] = PretrainSet(None, lambda seed: None)
    if want("Random"):
        out["Random"] = labelled(random_select(ds.train_x.shape[0], m, seed0 + 1))
    if kmeans and want("K-means"):
        out["K-means"] = labelled(kmeans_select(encode(target, ds.train_x), m, seed0))
    if want("Random+g_φ"):
        x_init = ds.train_x[tensors["init_indices"]]
        y_init = encode(target, x_init)
        out["Random+g_φ"] = PretrainSet(x_init, lambda seed: pretrain_regression(x_init, y_init, settings, seed))
    if want("KRR-ST"):
        out["KRR-ST"] = PretrainSet(x_s, lambda seed: pretrain_regression(x_s, y_s, settings, seed))
    return out


def _targets(names, image_size, channels, roots=None):
    out = {}
    for name in names:
        ds = load_dataset(name, (roots or {}).get(name), image_size=image_size)
        if ds.channels != channels:
            raise ValueError(f"targets: {name} has {ds.channels} channels, the source {channels}")
        out[name] = ds
    return out


def transfer(run_dir: str, targets=None, *, runs: int = 3, settings=None, progress: bool = False,
             root: str | None = None, rows=None):
    """Transfer table (krr-st-selfsup Tables 1–3 at CPU scale): method → target → (mean, std) test accuracy."""
    from ddfast.evaluate.transfer import transfer_table

    _, meta = load_distilled(run_dir)
    settings = settings_for_run(settings, meta)
    names = targets or preset(meta["dataset"])["targets"]
    src = load_source(meta["dataset"], meta["image_size"], root)
    tds = _targets(names, meta["image_size"], src.channels)
    sets = transfer_rows(run_dir, settings=settings, root=root, rows=rows)
    return transfer_table(sets, tds, settings, runs=runs, progress=progress)


def kd_table(run_dir: str, target: str, *, runs: int = 3, settings=None, progress: bool = False,
             root: str | None = None) -> dict:
    """Target data-free KD (§4.2, eq. 6): a teacher trained on ``target``; each student is pre-trained on
    a surrogate set, then trained on that set's images only against the teacher. ``Gaussian`` starts
    from random init and feeds N(0, I) noise. Returns method → {target: (mean, std)}."""
    from ddfast.evaluate.transfer import kd_transfer, train_teacher

    _, meta = load_distilled(run_dir)
    settings = settings_for_run(settings, meta)
    src = load_source(meta["dataset"], meta["image_size"], root)
    tds = _targets([target], meta["image_size"], src.channels)[target]
    rows = transfer_rows(run_dir, settings=settings, root=root)
    names = ["Gaussian"] + [k for k in rows if k != "w/o pre"]
    accs: dict[str, list[float]] = {k: [] for k in names}
    iterator = range(runs)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"KD on {target}", unit="run")
    for run in iterator:
        teacher = train_teacher(tds, settings, seed=1000 + run)
        for name in names:
            row = rows["w/o pre"] if name == "Gaussian" else rows[name]
            x = rows["KRR-ST"].images if name == "Gaussian" else row.images
            accs[name].append(kd_transfer(row(run), x, teacher, tds, settings, seed=run, gaussian=name == "Gaussian"))
    return {k: {target: mean_std(v)} for k, v in accs.items()}

