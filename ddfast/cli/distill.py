"""``ddfast distill ld | krr-st | ead`` and ``ddfast evaluate``."""

from __future__ import annotations

import argparse

from ddfast.cli._common import (BACKENDS, add_distributed, add_pass_options, add_progress, add_run_options,
                                model_names, nonneg_int, pass_overrides, positive_float, positive_int, unit_interval)

DATASET_HELP = "data set (digits, mnist, fashion-mnist, kmnist, emnist-letters, cifar10, cifar100, npz:PATH)"


def add_parsers(sub) -> None:
    p = sub.add_parser("distill", help="distil a data set into a run folder")
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    _add_ld(methods)
    _add_krr_st(methods)
    _add_ead(methods)
    ev = sub.add_parser("evaluate", help="train fresh models on finished LD runs and report test accuracy")
    ev.add_argument("runs", nargs="+", metavar="RUN", help="LD run folders (`ddfast distill ld --out RUN`)")
    ev.add_argument("--archs", nargs="+", default=None, choices=model_names(), metavar="ARCH",
                    help="architecture transfer (LD Tables 13-14): fresh networks of each ARCH trained on the run's "
                         "base examples and labels for its T steps, instead of the distillation network "
                         f"(one of {', '.join(model_names())}); written to eval-archs.json")
    ev.add_argument("--models", type=positive_int, default=20, help="fresh models trained per run")
    ev.add_argument("--seed", type=nonneg_int, default=0, help="seed of the first model (model k uses seed + k)")
    ev.add_argument("--backend", default="auto", choices=BACKENDS, help="op backend of the evaluation models")
    ev.set_defaults(handler=evaluate)


def add_ld_options(p, *, single: bool = True) -> None:
    """Options LD shares with ``ddfast ld-table``."""
    p.add_argument("--dataset", default="digits", help="target " + DATASET_HELP)
    p.add_argument("--root", default=None, help="folder with the data set's files")
    p.add_argument("--base-examples", type=positive_int, nargs="+", default=[10] if single else [10, 100],
                   metavar="N", help="base examples (a multiple of the class count within a data set); several "
                                     "values make one run each, in OUT-N")
    p.add_argument("--model", default=None, choices=model_names(),
                   help="network (default: per data set)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the real training set")
    p.add_argument("--outer-batch", type=positive_int, default=None, help="N_o, real examples per meta-iteration")
    p.add_argument("--val-every", type=positive_int, default=None, help="epochs between label validations")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="op backend")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the base examples, model and data order")
    add_progress(p)


def _add_ld(methods) -> None:
    ld = methods.add_parser("ld", help="label distillation (LD / LD-RR)")
    add_ld_options(ld)
    ld.add_argument("--variant", default="second_order", choices=["second_order", "rr"],
                    help="second-order meta-gradient (LD) or the ridge-regression head (LD-RR)")
    ld.add_argument("--source", default=None, help="cross-dataset: the data set the base examples come from")
    ld.add_argument("--source-root", default=None, help="folder with the source data set's files")
    ld.add_argument("--inner-batch", type=positive_int, default=None, help="N_i, base examples per meta-iteration")
    ld.add_argument("--image-size", type=positive_int, default=None, help="resize the images to this size")
    ld.add_argument("--out", required=True, help="run folder (artifacts, manifest, checkpoint)")
    add_run_options(ld)
    ld.add_argument("--checkpoint-every", type=positive_int, default=1, help="epochs between checkpoints")
    ld.add_argument("--evaluate", type=nonneg_int, default=0, metavar="K", help="then test K fresh models (0: no)")
    add_pass_options(ld)
    add_distributed(ld)
    ld.set_defaults(handler=distill_ld)


def _add_krr_st(methods) -> None:
    krr = methods.add_parser("krr-st", help="KRR-ST self-supervised distillation (krr-st-selfsup Algorithm 1)")
    krr.add_argument("--dataset", default="mnist", help="unlabeled source " + DATASET_HELP)
    krr.add_argument("--root", default=None, help="folder with the data set's files")
    krr.add_argument("--target", required=True, help="folder of the target model g_φ made by `ddfast ssl`")
    krr.add_argument("--out", required=True, help="run folder (artifacts, manifest, checkpoint)")
    add_run_options(krr)
    krr.add_argument("--m", type=positive_int, default=None, help="synthetic examples")
    krr.add_argument("--steps", type=positive_int, default=None, help="meta-steps")
    krr.add_argument("--batch-size", type=positive_int, default=None, help="b, real images per meta-step")
    krr.add_argument("--lr", type=positive_float, default=None, help="AdamW learning rate (decayed linearly)")
    krr.add_argument("--pool-size", type=positive_int, default=None, help="l, models in the pool")
    krr.add_argument("--pool-steps", type=positive_int, default=None,
                     help="T, steps before a pool model is re-initialised")
    krr.add_argument("--widths", type=positive_int, nargs="+", default=None, help="ConvNet channels per block")
    krr.add_argument("--init", default=None, choices=["target", "gaussian"], help="Y_s init (gaussian: 'w/o init')")
    krr.add_argument("--image-size", type=positive_int, default=None, help="resize the images to this size")
    krr.add_argument("--solve-dtype", default=None, choices=["float32", "float64"], help="dtype of the KRR solve")
    krr.add_argument("--real-augment", default=None, action=argparse.BooleanOptionalAction,
                     help="random crop (pad 4) + flip of the real batch before g_φ and f_ω, as the official code does "
                          "(default: off, the paper's Algorithm 1)")
    krr.add_argument("--pool-reset", default=None, choices=["paper", "official"],
                     help="paper: a pool model is re-initialised with t_i = 0 after T steps (default); official: "
                          "t_i stays at T, so the model is re-initialised on every visit (the official code)")
    krr.add_argument("--checkpoint-every", type=positive_int, default=100, help="meta-steps between checkpoints")
    krr.add_argument("--backend", default="auto", choices=BACKENDS, help="op backend")
    krr.add_argument("--seed", type=nonneg_int, default=0, help="seed of X_s, the pool and the batches")
    add_progress(krr)
    add_pass_options(krr)
    krr.add_argument("--fold-bn", default=None, action=argparse.BooleanOptionalAction,
                     help="fold eval-mode BatchNorm into the convolutions of the outer loss (default: the preset)")
    add_distributed(krr)
    krr.set_defaults(handler=distill_krr_st)


def _add_ead(methods) -> None:
    ead = methods.add_parser("ead", help="effect alignment (effect-alignment Algorithm 1) on a stored trajectory")
    ead.add_argument("--dataset", default="digits", help="real " + DATASET_HELP + " (its training split is D)")
    ead.add_argument("--root", default=None, help="folder with the data set's files")
    ead.add_argument("--ipc", type=positive_int, default=10, help="synthetic images per class")
    ead.add_argument("--trajectory", default=None,
                     help="trajectory folder (`ddfast trajectory`); trained with the preset when missing "
                          "(default: OUT/../trajectory-DATASET)")
    ead.add_argument("--out", required=True, help="run folder (artifacts, manifest, checkpoint)")
    add_run_options(ead)
    ead.add_argument("--iterations", type=positive_int, default=None, help="distillation iterations")
    ead.add_argument("--t-m", dest="t_m", type=positive_int, default=None, help="checkpoints sampled per iteration")
    ead.add_argument("--syn-batch", type=positive_int, default=None, help="|S_t| (default: all of S)")
    ead.add_argument("--probe-batch", type=positive_int, default=None, help="|D_p|")
    ead.add_argument("--real-batch", type=positive_int, default=None, help="|D_t|")
    ead.add_argument("--lr-images", type=positive_float, default=None, help="learning rate of the images")
    ead.add_argument("--lr-labels", type=positive_float, default=None, help="learning rate of the soft labels")
    ead.add_argument("--fixed-labels", action="store_true", help="keep the soft labels at their initial values")
    ead.add_argument("--trajectory-momentum", type=unit_interval, default=None,
                     help="SGD momentum of a trajectory trained here (default: 0, plain SGD as EAD's derivation "
                          "assumes; a momentum trajectory is accepted with a warning)")
    ead.add_argument("--objective", default=None, choices=["normalised", "printed"],
                     help="normalised: α = 0 (default); printed: eq. 7's 1 − α = (2|S| − |D|)/|S|")
    ead.add_argument("--time-weights", default=None, choices=["lr", "uniform"], help="P(t) ∝ η_t or uniform")
    ead.add_argument("--checkpoint-every", type=positive_int, default=25, help="iterations between checkpoints")
    ead.add_argument("--evaluate", type=nonneg_int, default=0, metavar="K",
                     help="then test K fresh models (init vs EAD; 0: no)")
    ead.add_argument("--backend", default="auto", choices=BACKENDS, help="op backend")
    ead.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initial subset and the sampling")
    add_progress(ead)
    add_pass_options(ead)
    add_distributed(ead)
    ead.set_defaults(handler=distill_ead)


# ------------------------------------------------------------------------------------------ handlers


def distill_ld(args) -> int:
    from ddfast.experiments.ld import distill, evaluate_run

    overrides = dict(model=args.model, epochs=args.epochs, outer_batch=args.outer_batch, inner_batch=args.inner_batch,
                     val_every=args.val_every, image_size=args.image_size, **pass_overrides(args))
    for n in args.base_examples:
        out = args.out if len(args.base_examples) == 1 else f"{args.out}-{n}"
        ld, result, _ = distill(args.dataset, n, args.variant, out=out, resume=args.resume, overwrite=args.overwrite,
                                source=args.source, root=args.root, source_root=args.source_root,
                                backend=args.backend, seed=args.seed, progress=not args.no_progress,
                                process_group=getattr(args, "process_group", None),
                                checkpoint_every=args.checkpoint_every, **overrides)
        print(f"{out}: {n} base examples, {args.variant}: best val accuracy {result.val_accuracy:.2f}%, "
              f"T = {result.steps_to_overfit} steps, {result.iterations} iterations, {result.resets} resets, "
              f"{result.seconds:.0f} s")
        if args.evaluate:
            res = evaluate_run(out, models=args.evaluate, seed=args.seed, backend=args.backend)
            print(f"{out}: test accuracy {res} over {args.evaluate} fresh models")
    return 0


def distill_krr_st(args) -> int:
    from ddfast.experiments.krr_st import distill

    overrides = dict(m=args.m, steps=args.steps, batch_size=args.batch_size, lr=args.lr, pool_size=args.pool_size,
                     pool_steps=args.pool_steps, widths=tuple(args.widths) if args.widths else None, init=args.init,
                     backend=args.backend, seed=args.seed, solve_dtype=args.solve_dtype, fold_bn=args.fold_bn,
                     real_augment=args.real_augment, pool_reset=args.pool_reset, **pass_overrides(args))
    krr, result, _ = distill(args.dataset, args.target, out=args.out, root=args.root, image_size=args.image_size,
                             resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                             checkpoint_every=args.checkpoint_every, process_group=getattr(args, "process_group", None),
                             **overrides)
    losses = [h["loss"] for h in result.history]
    k = max(1, min(50, len(losses) // 10))
    print(f"{args.out}: KRR-ST m={krr.config.m}, {result.steps} steps, outer loss {sum(losses[:k]) / k:.4g} → "
          f"{sum(losses[-k:]) / k:.4g} (mean of {k}), {krr.pool.resets} pool resets, {result.seconds:.0f} s")
    print(f"{args.out}: distilled.safetensors, images.png, pca.png, meta.json, manifest.json")
    return 0


def distill_ead(args) -> int:
    from ddfast.experiments.ead import distill

    overrides = dict(iterations=args.iterations, t_m=args.t_m, syn_batch=args.syn_batch, probe_batch=args.probe_batch,
                     real_batch=args.real_batch, lr_images=args.lr_images, lr_labels=args.lr_labels,
                     objective=args.objective, time_weights=args.time_weights, backend=args.backend, seed=args.seed,
                     **pass_overrides(args))
    if args.fixed_labels:
        overrides["learn_labels"] = False
    ead, result, data = distill(args.dataset, args.ipc, out=args.out, trajectory=args.trajectory, root=args.root,
                                resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                                checkpoint_every=args.checkpoint_every, trajectory_momentum=args.trajectory_momentum,
                                process_group=getattr(args, "process_group", None), **overrides)
    losses = [h["loss"] for h in result.history]
    k = max(1, min(25, len(losses) // 10))
    print(f"{args.out}: EAD ipc={ead.config.ipc} ({result.images.shape[0]} images), objective {ead.config.objective} "
          f"(c = {ead.coefficient:.4g}), {result.iterations} iterations, |R̂| {sum(losses[:k]) / k:.4g} → "
          f"{sum(losses[-k:]) / k:.4g} (mean of {k}), {result.seconds:.0f} s")
    if args.evaluate:
        from ddfast.evaluate.train import TrainSettings
        from ddfast.experiments.ead import evaluate_set, make_model_factory, preset

        settings = TrainSettings(**preset(args.dataset)["eval"])
        make = make_model_factory(args.dataset, data)
        before = evaluate_set(make, result.init_images, result.init_labels.softmax(-1), data, settings, args.evaluate)
        after = evaluate_set(make, result.images, result.soft_labels.softmax(-1), data, settings, args.evaluate)
        print(f"{args.out}: test accuracy of {args.evaluate} fresh models: init {before}  →  EAD {after}")
    print(f"{args.out}: distilled.safetensors, images.png, images_before.png, meta.json, manifest.json")
    return 0


def evaluate(args) -> int:
    from ddfast.experiments.ld import evaluate_run

    if args.archs:
        for run in args.runs:
            for arch, res in evaluate_architectures_run(run, args.archs, models=args.models, seed=args.seed,
                                                        backend=args.backend).items():
                print(f"{run}: {arch}: test accuracy {res} over {args.models} fresh models")
        return 0
    for run in args.runs:
        res = evaluate_run(run, models=args.models, seed=args.seed, backend=args.backend)
        print(f"{run}: test accuracy {res} over {args.models} fresh models")
    return 0


def evaluate_architectures_run(run_dir: str, archs, models: int = 20, seed: int = 0, backend: str = "auto") -> dict:
    """Architecture transfer of a finished LD run (LD §4, Tables 13–14; the run-folder form of
    :meth:`ddfast.distill.ld.LabelDistiller.evaluate_architectures`): for each name in ``archs``, ``models`` fresh
    networks of that architecture (LD-RR: with the ridge head) trained on the run's base images and distilled
    labels for its T steps, scored on the test split. Writes ``eval-archs.json`` into the run folder and
    returns ``{arch: EvalResult}``."""
    import os

    from ddfast.artifacts import write_json_atomic
    from ddfast.evaluate import TrainSettings, evaluate_labels
    from ddfast.experiments.ld import _factory, load_distilled, load_run_data
    from ddfast.runs import RunFolder

    archs = list(archs)
    unknown = sorted(set(archs) - set(model_names()))
    if not archs or unknown:
        raise ValueError(f"archs: expected names among {model_names()}, got {archs!r}")
    tensors, meta = load_distilled(run_dir)
    target = load_run_data(run_dir, meta)
    cfg = meta["config"]
    settings = TrainSettings(steps=int(tensors["steps_to_overfit"]), batch_size=int(meta["inner_batch"]), lr=cfg["lr"],
                             pseudo_lr=cfg["pseudo_lr"], ridge_lambda=cfg["ridge_lambda"],
                             calibration_lr=cfg["calibration_lr"], backend=backend)
    makers = {arch: _factory(arch, target.channels, target.num_classes, target.image_size, cfg["variant"] == "rr")
              for arch in archs}
    for make in makers.values():
        make()  # an architecture that cannot take these images fails here, before any training
    out = {}
    for arch, make in makers.items():
        out[arch] = evaluate_labels(make, tensors["base_images"], tensors["soft_labels"], target.test_x, target.test_y,
                                    settings, models, seed)
    with RunFolder(run_dir, "ld"):  # no writer may be active while eval-archs.json is written
        write_json_atomic(os.path.join(run_dir, "eval-archs.json"), {
            "distilled_with": cfg["model"], "models": models, "seed": seed,
            "archs": {a: {"accuracies": r.accuracies, "mean": r.mean, "std": r.std} for a, r in out.items()}})
    return out
