"""Command line: ``ddfast info``, ``ddfast distill ld|krr-st|ead``, ``ddfast evaluate``, ``ddfast ld-table``,
``ddfast krr-st-table``, ``ddfast ead-table``, ``ddfast trajectory``, ``ddfast ssl``, ``ddfast bench``."""

from __future__ import annotations

import argparse
import os
import sys


def _bench_ridge(args) -> int:
    import torch
    from torch.utils import benchmark

    from ddfast.benchmarks.ridge_solve import CASES, make_fn, peak_memory_bytes, providers_for

    cases = [c for c in CASES if not args.quick or c.N < 1000]
    print(f"ridge solve, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'case':<20}{'mode':<9}{'provider':<11}{'median ms':>10}{'GFLOP/s':>9}{'peak MiB':>10}{'ref/prov':>9}"
    print(header)
    print("-" * len(header))
    for case in cases:
        for mode in ("fwd", "fwd+bwd"):
            times = {}
            for provider in providers_for(case):
                fn = make_fn(case, provider, mode)
                fn()
                timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                t = timer.blocked_autorange(min_run_time=args.min_time).median
                times[provider] = t
                mem = peak_memory_bytes(fn) / 2**20
                gflops = case.flops(mode) / t / 1e9 if provider != "peer" else float("nan")
                ratio = times["reference"] / t
                print(f"{case.name:<20}{mode:<9}{provider:<11}{t * 1e3:>10.3f}{gflops:>9.1f}{mem:>10.1f}{ratio:>9.2f}")
    return 0


def _bench_label_metagrad(args) -> int:
    import torch
    from torch.utils import benchmark

    from ddfast.benchmarks.label_metagrad import CASES, MODES, make_fn, peak_memory_bytes

    print(f"label meta-gradient, LeNet 28×28, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'case':<20}{'mode':<14}{'provider':<11}{'median ms':>10}{'peak MiB':>10}{'ref/prov':>9}{'mem ratio':>10}"
    print(header)
    print("-" * len(header))
    for case in CASES:
        for mode in MODES:
            times, mems = {}, {}
            for provider in ("reference", "cpu"):
                fn = make_fn(case, provider, mode)
                fn()
                timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                times[provider] = timer.blocked_autorange(min_run_time=args.min_time).median
                mems[provider] = peak_memory_bytes(fn) / 2**20
                print(f"{case.name:<20}{mode:<14}{provider:<11}{times[provider] * 1e3:>10.2f}{mems[provider]:>10.1f}"
                      f"{times['reference'] / times[provider]:>9.2f}{mems[provider] / mems['reference']:>10.2f}")
    return 0


def _bench_krr_st(args) -> int:
    import torch
    from torch.utils import benchmark

    from ddfast.benchmarks.krr_st import CASES, make_fn, peak_memory_bytes

    print(f"KRR-ST meta-step, ConvNet-D3 3×32×32, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'case':<22}{'part':<10}{'provider':<11}{'median ms':>10}{'peak MiB':>10}{'ref/prov':>9}"
    print(header)
    print("-" * len(header))
    for case in CASES:
        times = {}
        for part, providers in (("features", ("reference",)), ("solve", ("reference", "cpu")), ("step", ("reference", "cpu"))):
            for provider in providers:
                fn = make_fn(case, provider, part)
                fn()
                timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                t = times[part, provider] = timer.blocked_autorange(min_run_time=args.min_time).median
                mem = peak_memory_bytes(fn) / 2**20
                print(f"{case.name:<22}{part:<10}{provider:<11}{t * 1e3:>10.1f}{mem:>10.1f}"
                      f"{times[part, 'reference'] / t:>9.2f}")
        for provider in ("reference", "cpu"):
            share = times["solve", provider] / times["step", provider]
            print(f"{case.name:<22}solve share of the step ({provider}): {100 * share:.1f}%")
    return 0


def _distill_ld(args) -> int:
    from ddfast.experiments.ld import distill

    overrides = dict(model=args.model, epochs=args.epochs, outer_batch=args.outer_batch, inner_batch=args.inner_batch,
                     val_every=args.val_every, image_size=args.image_size, **_pass_overrides(args))
    for n in args.base_examples:
        out = args.out if len(args.base_examples) == 1 else f"{args.out}-{n}"
        ld, result, _ = distill(args.dataset, n, args.variant, out=out, resume=args.resume, source=args.source,
                                root=args.root, source_root=args.source_root, backend=args.backend, seed=args.seed,
                                progress=not args.no_progress, process_group=getattr(args, "process_group", None),
                                **overrides)
        print(f"{out}: {n} base examples, {args.variant}: best val accuracy {result.val_accuracy:.2f}%, "
              f"T = {result.steps_to_overfit} steps, {result.iterations} iterations, {result.resets} resets, "
              f"{result.seconds:.0f} s")
        if args.evaluate:
            from ddfast.experiments.ld import evaluate_run

            res = evaluate_run(out, models=args.evaluate, seed=args.seed, backend=args.backend)
            print(f"{out}: test accuracy {res} over {args.evaluate} fresh models")
    return 0


def _distill_krr_st(args) -> int:
    from ddfast.experiments.krr_st import distill

    overrides = dict(m=args.m, steps=args.steps, batch_size=args.batch_size, lr=args.lr, pool_size=args.pool_size,
                     pool_steps=args.pool_steps, widths=tuple(args.widths) if args.widths else None, init=args.init,
                     backend=args.backend, seed=args.seed, solve_dtype=args.solve_dtype, fold_bn=args.fold_bn,
                     **_pass_overrides(args))
    krr, result, _ = distill(args.dataset, args.target, out=args.out, root=args.root, image_size=args.image_size,
                             resume=args.resume, progress=not args.no_progress,
                             checkpoint_every=args.checkpoint_every, process_group=getattr(args, "process_group", None),
                             **overrides)
    losses = [h["loss"] for h in result.history]
    k = max(1, min(50, len(losses) // 10))
    print(f"{args.out}: KRR-ST m={krr.config.m}, {result.steps} steps, outer loss {sum(losses[:k]) / k:.4g} → "
          f"{sum(losses[-k:]) / k:.4g} (mean of {k}), {krr.pool.resets} pool resets, {result.seconds:.0f} s")
    print(f"{args.out}: distilled.safetensors, images.png, pca.png, meta.json")
    return 0


def _krr_st_table(args) -> int:
    from ddfast.evaluate.transfer import TransferSettings, format_transfer_table
    from ddfast.experiments.krr_st import kd_table, transfer

    if args.kd_only and not args.kd:
        raise SystemExit("krr-st-table: --kd-only needs --kd TARGET")
    settings = TransferSettings()
    for name in ("arch", "protocol", "pretrain_epochs", "finetune_steps", "target_train_size", "linear_steps",
                 "kd_epochs", "teacher_steps"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.widths:
        settings.widths = tuple(args.widths)
    results = {}
    if not args.kd_only:
        results = transfer(args.run, args.targets, runs=args.runs, settings=settings, progress=not args.no_progress)
        print()
        print(f"{args.run}: transfer test accuracy (%), {settings.protocol}, {settings.arch}, mean ± std over {args.runs} runs")
        print(format_transfer_table(results))
    if args.kd:
        kd = kd_table(args.run, args.kd, runs=args.runs, settings=settings, progress=not args.no_progress)
        print()
        print(f"{args.run}: target data-free KD on {args.kd} (%), mean ± std over {args.runs} runs")
        print(format_transfer_table(kd))
    if args.json:
        from ddfast.artifacts import write_json_atomic

        write_json_atomic(args.json, {"transfer": results, "arch": settings.arch, "protocol": settings.protocol, **({"kd": kd} if args.kd else {})})
    return 0


def _evaluate(args) -> int:
    from ddfast.experiments.ld import evaluate_run

    for run in args.runs:
        res = evaluate_run(run, models=args.models, seed=args.seed, backend=args.backend)
        print(f"{run}: test accuracy {res} over {args.models} fresh models")
    return 0


def _ld_table(args) -> int:
    from ddfast.experiments.ld import format_table, ld_table

    overrides = dict(model=args.model, epochs=args.epochs, outer_batch=args.outer_batch, val_every=args.val_every)
    rows = ld_table(args.dataset, args.base_examples, models=args.models, seed=args.seed, backend=args.backend,
                    out=args.out, root=args.root, progress=not args.no_progress, **overrides)
    print()
    print(f"{args.dataset}: test accuracy (%), mean ± std over {args.models} fresh models")
    print(format_table(rows, args.base_examples))
    return 0


def _ssl(args) -> int:
    from ddfast.data import load_dataset
    from ddfast.ssl import train_barlow_twins
    from ddfast.ssl.barlow_twins import TARGET_FILE

    data = load_dataset(args.dataset, args.root, image_size=args.image_size)
    presets = {k: getattr(args, k) for k in ("epochs", "lr", "weight_decay", "projector") if getattr(args, k) is not None}
    target = train_barlow_twins(
        data, arch=args.arch, widths=args.widths, width=args.width, batch_size=args.batch_size,
        lambda_offdiag=args.lambda_offdiag, seed=args.seed, out=args.out, resume=not args.no_resume,
        progress=not args.no_progress, max_train=args.max_train, **presets,
    )
    meta = target.meta
    print(f"{args.out}: Barlow Twins {meta['arch']} on {meta['dataset']} ({meta['train_examples']} images), "
          f"{meta['epochs']} epochs, final loss {meta['final_loss']:.2f}, {target.out_dim}-d representation")
    print(f"target model: {os.path.join(args.out, TARGET_FILE)}")
    return 0


def _trajectory(args) -> int:
    from ddfast.data import load_dataset
    from ddfast.models.convnet import convnet_depth
    from ddfast.trajectory import train_trajectory

    data = load_dataset(args.dataset, args.root)
    options = {}
    if args.width is not None:
        if args.arch == "convnet":
            options["widths"] = [args.width] * convnet_depth(data.image_size)
        elif args.arch in ("resnet18", "resnet10", "vgg11"):
            options["width"] = args.width
        elif args.arch == "mlp":
            options["hidden"] = [args.width, args.width]
        else:
            raise SystemExit(f"trajectory: --width does not apply to --arch {args.arch}")
    if args.norm is not None:
        if args.arch not in ("convnet", "vgg11"):
            raise SystemExit(f"trajectory: --norm applies to convnet and vgg11, not --arch {args.arch}")
        options["norm"] = args.norm
    traj = train_trajectory(data, args.arch, args.out, epochs=args.epochs, every=args.every, lr=args.lr,
                            momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                            milestones=args.milestones, gamma=args.gamma, batch_size=args.batch_size, seed=args.seed,
                            model_options=options, resume=args.resume, progress=not args.no_progress,
                            process_group=getattr(args, "process_group", None))
    loss, acc = traj.index.get("final_train_loss"), traj.test_accuracy
    print(f"{args.out}: {len(traj)} checkpoints of {traj.arch} on {traj.index['dataset']} over {traj.steps[-1]} SGD steps, "
          f"final train loss {'n/a' if loss is None else f'{loss:.4f}'}, "
          f"test accuracy {'n/a' if acc is None else f'{acc:.2f}%'}")
    print(f"{args.out}: trajectory.json + ckpt-*.safetensors")
    return 0


def _distill_ead(args) -> int:
    from ddfast.experiments.ead import distill

    overrides = dict(iterations=args.iterations, t_m=args.t_m, syn_batch=args.syn_batch, probe_batch=args.probe_batch,
                     real_batch=args.real_batch, lr_images=args.lr_images, lr_labels=args.lr_labels,
                     objective=args.objective, time_weights=args.time_weights, backend=args.backend, seed=args.seed,
                     **_pass_overrides(args))
    if args.fixed_labels:
        overrides["learn_labels"] = False
    ead, result, data = distill(args.dataset, args.ipc, out=args.out, trajectory=args.trajectory, root=args.root,
                                resume=args.resume, progress=not args.no_progress,
                                checkpoint_every=args.checkpoint_every,
                                process_group=getattr(args, "process_group", None), **overrides)
    losses = [h["loss"] for h in result.history]
    k = max(1, min(25, len(losses) // 10))
    print(f"{args.out}: EAD ipc={ead.config.ipc} ({result.images.shape[0]} images), objective {ead.config.objective} "
          f"(c = {ead.coefficient:.4g}), {result.iterations} iterations, |R̂| {sum(losses[:k]) / k:.4g} → "
          f"{sum(losses[-k:]) / k:.4g} (mean of {k}), {result.seconds:.0f} s")
    if args.evaluate:
        from ddfast.experiments.ead import evaluate_set, make_model_factory, preset
        from ddfast.evaluate.train import TrainSettings

        settings = TrainSettings(**preset(args.dataset)["eval"])
        make = make_model_factory(args.dataset, data)
        before = evaluate_set(make, result.init_images, result.init_labels.softmax(-1), data, settings, args.evaluate)
        after = evaluate_set(make, result.images, result.soft_labels.softmax(-1), data, settings, args.evaluate)
        print(f"{args.out}: test accuracy of {args.evaluate} fresh models: init {before}  →  EAD {after}")
    print(f"{args.out}: distilled.safetensors, images.png, images_before.png, meta.json")
    return 0


def _ead_table(args) -> int:
    import json

    from ddfast.experiments.ead import ead_table, format_table

    overrides = dict(iterations=args.iterations, t_m=args.t_m, backend=args.backend)
    rows = ead_table(args.dataset, tuple(args.ipc), out=args.out, models=args.models, seed=args.seed,
                     objectives=tuple(args.objectives), progress=not args.no_progress, root=args.root, **overrides)
    print(format_table(rows, args.ipc, title=f"EAD on {args.dataset}: test accuracy (%) of {args.models} fresh models"))
    path = os.path.join(args.out, f"ead-table-{args.dataset}.json")
    with open(path, "w") as f:
        json.dump({r.name: {str(i): r.results[i].accuracies for i in r.results} for r in rows}, f, indent=2)
    print(f"results: {path}")
    return 0


def _bench_e2e(args) -> int:
    import json

    import torch

    from ddfast.benchmarks.e2e import format_table, run_table

    print(f"threads={torch.get_num_threads()} torch={torch.__version__}; median seconds per meta-step, "
          "speed-up over reference-fp32 in the same run")
    rows = run_table(args.workloads, args.modes, reps=args.reps, memory=not args.no_memory)
    table = format_table(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _e2e_parity(args) -> int:
    from ddfast.experiments.e2e_parity import format_parity, parity

    rows = parity(args.studies, args.modes, out=args.out, target_dir=args.target, seed=args.seed,
                  ld_epochs={"digits": args.ld_epochs_digits, "mnist": args.ld_epochs_mnist}, krr_steps=args.krr_steps)
    print(format_parity(rows))
    return 0


def _bench_checkpoint_grad_inner(args) -> int:
    import torch
    from torch.utils import benchmark

    from ddfast.benchmarks.checkpoint_grad_inner import CASES, PROVIDERS, make_fn, peak_memory_bytes

    print(f"checkpoint-gradient inner products (EAD loss + S-gradient), ConvNet, |P| = |D_t| = 256, float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'case':<22}{'provider':<11}{'median ms':>10}{'peak MiB':>10}{'ref/prov':>9}{'mem ratio':>10}"
    print(header)
    print("-" * len(header))
    cases = [c for c in CASES if not args.quick or c.t_m != 10]
    for case in cases:
        times, mems = {}, {}
        for provider in PROVIDERS:
            fn = make_fn(case, provider)
            fn()
            timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            times[provider] = timer.blocked_autorange(min_run_time=args.min_time).median
            mems[provider] = peak_memory_bytes(fn) / 2**20
            print(f"{case.name:<22}{provider:<11}{times[provider] * 1e3:>10.1f}{mems[provider]:>10.1f}"
                  f"{times['reference'] / times[provider]:>9.2f}{mems[provider] / mems['reference']:>10.2f}")
    return 0


def _bench_relu_max_pool2d(args) -> int:
    import torch
    from torch.utils import benchmark

    from ddfast.benchmarks.relu_max_pool2d import CASES, MODEL_CASES, MODES, PROVIDERS, make_fn, peak_memory_bytes

    print(f"relu_max_pool2d vs F.max_pool2d(F.relu(x), 2), {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'case':<30}{'mode':<9}{'provider':<11}{'median ms':>10}{'peak MiB':>10}{'ref/prov':>9}{'mem ratio':>10}"
    print(header)
    print("-" * len(header))
    for case in CASES + ([] if args.quick else MODEL_CASES):
        for mode in MODES:
            times, mems = {}, {}
            for provider in PROVIDERS:
                fn = make_fn(case, provider, mode)
                fn()
                timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                times[provider] = timer.blocked_autorange(min_run_time=args.min_time).median
                mems[provider] = peak_memory_bytes(fn) / 2**20
                print(f"{case.name:<30}{mode:<9}{provider:<11}{times[provider] * 1e3:>10.3f}{mems[provider]:>10.1f}"
                      f"{times['reference'] / times[provider]:>9.2f}{mems[provider] / max(mems['reference'], 1e-9):>10.2f}")
    return 0


def _softlabel_table(args) -> int:
    from ddfast.experiments.softlabel import format_softlabel_table, softlabel_table

    table, teacher_acc = softlabel_table(args.dataset, tuple(args.ipc), sets=tuple(args.sets), models=args.models,
                                         seed=args.seed, out=args.out, budget=args.budget,
                                         progress=not args.no_progress, root=args.root)
    print(f"{args.dataset}: test accuracy (%) of {args.models} fresh ConvNets per cell; teacher {teacher_acc:.2f}%")
    print(format_softlabel_table(table, args.ipc))
    return 0


def _dcs(args) -> int:
    from ddfast.evaluate.dcs import format_dcs
    from ddfast.experiments.dcs import dcs_study

    for loss in args.loss:
        result = dcs_study(args.dataset, loss, tuple(args.ipc), seeds=tuple(args.seeds), models=args.models,
                           budget=args.budget, repeats=args.repeats, out=args.out, root=args.root,
                           progress=not args.no_progress)
        print(f"{loss.upper()} on {args.dataset}: {result.n} subsets")
        print(format_dcs(result))
        print(f"scatter plot: {os.path.join(args.out, f'dcs-{args.dataset}-{loss}.png')}")
    return 0


def _distributed_run(handler, args) -> int:
    """``distill ... --distributed`` under torchrun: ``handler`` on every rank with the default process
    group (gloo on CPU, NCCL with CUDA); only rank 0 prints, writes the run directory and evaluates."""
    import contextlib

    import torch.distributed as dist

    from ddfast.distributed import init_from_env

    args.process_group = init_from_env()
    main_rank = dist.get_rank() == 0
    if not main_rank:
        args.evaluate, args.no_progress = 0, True
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if main_rank else devnull):
            return handler(args)
    finally:
        dist.destroy_process_group()


def _add_pass_options(p):
    """--precision / --channels-last / --compile of the network passes (ddfast.network_passes)."""
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="network passes in float32 or under bf16 autocast (data, labels, solves stay float32); "
                        "default: the data set's preset")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="conv nets and images in NHWC (default: the preset)")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the network; the first steps compile (default: off)")


def _pass_overrides(args) -> dict:
    return dict(precision=args.precision, channels_last=args.channels_last, compile=args.compile)


def _add_distill_options(p, *, single=True):
    p.add_argument("--dataset", default="digits", help="target data set (digits, mnist, fashion-mnist, kmnist, emnist-letters, cifar10, cifar100, npz:PATH)")
    p.add_argument("--root", default=None, help="folder with the data set's files")
    p.add_argument("--base-examples", type=int, nargs="+", default=[10] if single else [10, 100])
    p.add_argument("--model", default=None, help="lenet | alexnet | resnet18 | mlp (default: per data set)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the real training set")
    p.add_argument("--outer-batch", type=int, default=None, help="N_o, real examples per meta-iteration")
    p.add_argument("--val-every", type=int, default=None, help="epochs between label validations")
    p.add_argument("--backend", default="auto", help="auto | fused | cpu | triton | cuda | reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddfast", description="ddfast: fused kernels for dataset distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are built and usable here")
    bench = sub.add_parser("bench", help="benchmarks (ratios against the eager reference)")
    bench_sub = bench.add_subparsers(dest="op", required=True)
    ridge = bench_sub.add_parser("ridge", help="ridge / kernel-ridge solve")
    ridge.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per cell")
    ridge.add_argument("--quick", action="store_true", help="skip the N=1000 cases")
    distill_p = sub.add_parser("distill", help="distil a data set")
    distill_sub = distill_p.add_subparsers(dest="method", required=True)
    ld = distill_sub.add_parser("ld", help="label distillation (LD / LD-RR)")
    _add_distill_options(ld)
    ld.add_argument("--variant", default="second_order", choices=["second_order", "rr"])
    ld.add_argument("--source", default=None, help="cross-dataset: data set the base examples come from")
    ld.add_argument("--source-root", default=None)
    ld.add_argument("--inner-batch", type=int, default=None, help="N_i, base examples per meta-iteration")
    ld.add_argument("--image-size", type=int, default=None)
    ld.add_argument("--out", required=True, help="run directory (artifacts, checkpoint)")
    ld.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    ld.add_argument("--evaluate", type=int, default=0, metavar="K", help="then test K fresh models")
    _add_pass_options(ld)
    ld.add_argument("--distributed", action="store_true", help="one rank of `torchrun --nproc-per-node R`")
    krr = distill_sub.add_parser("krr-st", help="KRR-ST self-supervised distillation (krr-st-selfsup Algorithm 1)")
    krr.add_argument("--dataset", default="mnist", help="unlabeled source data set (mnist, fashion-mnist, digits, cifar100, ...)")
    krr.add_argument("--root", default=None, help="folder with the data set's files")
    krr.add_argument("--target", required=True, help="folder of the target model g_φ made by `ddfast ssl`")
    krr.add_argument("--out", required=True, help="run directory (artifacts, checkpoint)")
    krr.add_argument("--m", type=int, default=None, help="synthetic examples")
    krr.add_argument("--steps", type=int, default=None, help="meta-steps")
    krr.add_argument("--batch-size", type=int, default=None, help="b, real images per meta-step")
    krr.add_argument("--lr", type=float, default=None, help="AdamW learning rate (decayed linearly)")
    krr.add_argument("--pool-size", type=int, default=None, help="l, models in the pool")
    krr.add_argument("--pool-steps", type=int, default=None, help="T, steps before a pool model is re-initialised")
    krr.add_argument("--widths", type=int, nargs="+", default=None, help="ConvNet channels per block")
    krr.add_argument("--init", default=None, choices=["target", "gaussian"], help="Y_s init (gaussian: 'w/o init')")
    krr.add_argument("--image-size", type=int, default=None)
    krr.add_argument("--solve-dtype", default=None, choices=["float32", "float64"])
    krr.add_argument("--checkpoint-every", type=int, default=100)
    krr.add_argument("--backend", default="auto", help="auto | fused | cpu | triton | cuda | reference")
    krr.add_argument("--seed", type=int, default=0)
    krr.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    krr.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_pass_options(krr)
    krr.add_argument("--fold-bn", default=None, action=argparse.BooleanOptionalAction,
                     help="fold eval-mode BatchNorm into the convolutions of the outer loss (default: the preset)")
    krr.add_argument("--distributed", action="store_true", help="one rank of `torchrun --nproc-per-node R`")
    kt = sub.add_parser("krr-st-table", help="KRR-ST transfer (and data-free KD) table against w/o pre, Random, K-means")
    kt.add_argument("run", help="a KRR-ST run directory")
    kt.add_argument("--targets", nargs="+", default=None, help="labelled target data sets (default: per source)")
    kt.add_argument("--runs", type=int, default=3, help="pre-train + fine-tune runs per cell")
    kt.add_argument("--arch", default=None, help="network pre-trained and fine-tuned (convnet, resnet10, alexnet, ...)")
    kt.add_argument("--widths", type=int, nargs="+", default=None, help="ConvNet channels per block")
    kt.add_argument("--protocol", default=None, choices=["finetune", "linear"],
                    help="finetune (paper tables) or linear (frozen trunk + linear head, the method's meta-test)")
    kt.add_argument("--linear-steps", type=int, default=None, help="steps of the linear head (protocol linear)")
    kt.add_argument("--pretrain-epochs", type=int, default=None)
    kt.add_argument("--finetune-steps", type=int, default=None)
    kt.add_argument("--target-train-size", type=int, default=None, help="labelled target examples used for fine-tuning")
    kt.add_argument("--kd", default=None, metavar="TARGET", help="also the data-free KD table on this target")
    kt.add_argument("--kd-epochs", type=int, default=None, help="student epochs on the surrogate images")
    kt.add_argument("--teacher-steps", type=int, default=None, help="training steps of the KD teacher")
    kt.add_argument("--kd-only", action="store_true", help="only the data-free KD table (needs --kd)")
    kt.add_argument("--json", default=None, help="write the results here")
    kt.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser("evaluate", help="train fresh models on distilled runs and report test accuracy")
    ev.add_argument("runs", nargs="+")
    ev.add_argument("--models", type=int, default=20)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--backend", default="auto")
    table = sub.add_parser("ld-table", help="LD / LD-RR vs the true-label and label-smoothing baselines")
    _add_distill_options(table, single=False)
    table.add_argument("--models", type=int, default=10, help="fresh models per cell")
    table.add_argument("--out", default="runs", help="folder for the runs and the table JSON")
    lmg = bench_sub.add_parser("label-metagrad", help="label meta-gradient and LD meta-iterations")
    lmg.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per cell")
    ssl = sub.add_parser("ssl", help="train the self-supervised (Barlow Twins) target model of KRR-ST")
    ssl.add_argument("--dataset", default="mnist", help="unlabeled source data set (its training split)")
    ssl.add_argument("--root", default=None, help="folder with the data set's files")
    ssl.add_argument("--image-size", type=int, default=None)
    ssl.add_argument("--arch", default="convnet", choices=["convnet", "resnet18"])
    ssl.add_argument("--widths", type=int, nargs="+", default=None, help="ConvNet block widths (default 32 64 128)")
    ssl.add_argument("--width", type=int, default=64, help="ResNet-18 first-stage width (64: paper, 512-d)")
    ssl.add_argument("--epochs", type=int, default=None, help="passes over the training images (default: CPU preset)")
    ssl.add_argument("--batch-size", type=int, default=256)
    ssl.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate")
    ssl.add_argument("--weight-decay", type=float, default=None)
    ssl.add_argument("--projector", type=int, nargs="+", default=None,
                     help="projector widths (default 512 512 512; paper: 8192 8192 8192)")
    ssl.add_argument("--lambda-offdiag", type=float, default=5.1e-3)
    ssl.add_argument("--max-train", type=int, default=None, help="train on a random subset of this many images")
    ssl.add_argument("--seed", type=int, default=0)
    ssl.add_argument("--out", required=True, help="folder for the checkpoint and target.safetensors")
    ssl.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    ssl.add_argument("--no-progress", action="store_true", help="no progress bar")
    kb = bench_sub.add_parser("krr-st", help="one KRR-ST meta-step: solve vs ConvNet passes")
    kb.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per cell")
    tr = sub.add_parser("trajectory", help="train on the real set with SGD and store the trajectory {(θ_t, η_t)}")
    tr.add_argument("--dataset", default="digits", help="data set whose training split is trained on")
    tr.add_argument("--root", default=None, help="folder with the data set's files")
    tr.add_argument("--arch", default="convnet", help="convnet | mlp | lenet | alexnet | resnet18 | resnet10 | vgg11")
    tr.add_argument("--width", type=int, default=None,
                    help="convnet: channels of every block; resnet/vgg: first-stage width; mlp: both hidden layers")
    tr.add_argument("--norm", default=None, choices=["batch", "instance", "none"], help="convnet / vgg11 normalisation")
    tr.add_argument("--epochs", type=int, required=True, help="passes over the training set")
    tr.add_argument("--every", type=int, required=True, metavar="K", help="SGD steps between checkpoints")
    tr.add_argument("--lr", type=float, default=0.01, help="SGD learning rate η")
    tr.add_argument("--momentum", type=float, default=0.0)
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine"])
    tr.add_argument("--milestones", type=int, nargs="+", default=None, help="step schedule: epochs where η *= gamma")
    tr.add_argument("--gamma", type=float, default=0.1, help="step schedule: decay factor")
    tr.add_argument("--batch-size", type=int, default=256)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="trajectory folder (checkpoints, trajectory.json)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--distributed", action="store_true",
                    help="one rank of `torchrun --nproc-per-node R` (DistributedDataParallel)")
    ead = distill_sub.add_parser("ead", help="effect alignment (effect-alignment Algorithm 1) on a stored trajectory")
    ead.add_argument("--dataset", default="digits", help="real data set (its training split is D)")
    ead.add_argument("--root", default=None, help="folder with the data set's files")
    ead.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    ead.add_argument("--trajectory", default=None,
                     help="trajectory folder (`ddfast trajectory`); trained with the preset when missing "
                          "(default: OUT/../trajectory-DATASET)")
    ead.add_argument("--out", required=True, help="run directory (artifacts, checkpoint)")
    ead.add_argument("--iterations", type=int, default=None)
    ead.add_argument("--t-m", dest="t_m", type=int, default=None, help="checkpoints sampled per iteration")
    ead.add_argument("--syn-batch", type=int, default=None, help="|S_t| (default: all of S)")
    ead.add_argument("--probe-batch", type=int, default=None, help="|D_p|")
    ead.add_argument("--real-batch", type=int, default=None, help="|D_t|")
    ead.add_argument("--lr-images", type=float, default=None)
    ead.add_argument("--lr-labels", type=float, default=None)
    ead.add_argument("--fixed-labels", action="store_true", help="keep the soft labels at their initial values")
    ead.add_argument("--objective", default=None, choices=["normalised", "printed"],
                     help="normalised: α = 0 (default); printed: eq. 7's 1 − α = (2|S| − |D|)/|S|")
    ead.add_argument("--time-weights", default=None, choices=["lr", "uniform"], help="P(t) ∝ η_t or uniform")
    ead.add_argument("--checkpoint-every", type=int, default=25)
    ead.add_argument("--evaluate", type=int, default=0, metavar="K", help="then test K fresh models (init vs EAD)")
    ead.add_argument("--backend", default="auto", help="auto | fused | cpu | triton | cuda | reference")
    ead.add_argument("--seed", type=int, default=0)
    ead.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    ead.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_pass_options(ead)
    ead.add_argument("--distributed", action="store_true", help="one rank of `torchrun --nproc-per-node R`")
    et = sub.add_parser("ead-table", help="EAD vs random real subsets (hard / soft labels) at several IPC")
    et.add_argument("--dataset", default="digits")
    et.add_argument("--root", default=None)
    et.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    et.add_argument("--objectives", nargs="+", default=["normalised", "printed"], choices=["normalised", "printed"])
    et.add_argument("--models", type=int, default=5, help="fresh models per cell")
    et.add_argument("--iterations", type=int, default=None)
    et.add_argument("--t-m", dest="t_m", type=int, default=None)
    et.add_argument("--backend", default="auto")
    et.add_argument("--seed", type=int, default=0)
    et.add_argument("--out", default="runs", help="folder for the trajectory, the runs and the table JSON")
    et.add_argument("--no-progress", action="store_true")
    sl = sub.add_parser("softlabel-table", help="coresets vs distilled sets (DM, DC, TM) under hard and soft labels")
    sl.add_argument("--dataset", default="digits")
    sl.add_argument("--root", default=None)
    sl.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
    sl.add_argument("--sets", nargs="+", default=["random", "kcenters", "dm", "dc", "tm"],
                    choices=["random", "kcenters", "dm", "dc", "tm"])
    sl.add_argument("--models", type=int, default=5)
    sl.add_argument("--budget", type=int, default=None, help="training epochs per model (default 300)")
    sl.add_argument("--seed", type=int, default=0)
    sl.add_argument("--out", default="runs/softlabel")
    sl.add_argument("--no-progress", action="store_true")
    dp = sub.add_parser("dcs", help="distillation correlation score of DM / TM losses over coreset subsets")
    dp.add_argument("--dataset", default="digits")
    dp.add_argument("--root", default=None)
    dp.add_argument("--loss", nargs="+", default=["dm", "tm"], choices=["dm", "tm"])
    dp.add_argument("--ipc", type=int, nargs="+", default=[5, 10, 20])
    dp.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    dp.add_argument("--models", type=int, default=2, help="HL models per subset")
    dp.add_argument("--budget", type=int, default=100, help="HL training epochs per model")
    dp.add_argument("--repeats", type=int, default=3, help="random networks (DM) / start checkpoints (TM) per loss")
    dp.add_argument("--out", default="runs/dcs")
    dp.add_argument("--no-progress", action="store_true")
    cgi = bench_sub.add_parser("checkpoint-grad-inner", help="EAD loss + S-gradient: fused vs double backward")
    cgi.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per cell")
    cgi.add_argument("--quick", action="store_true", help="skip t_m = 10")
    rmp = bench_sub.add_parser("relu-max-pool2d", help="fused ReLU + 2×2 max-pool vs the PyTorch composition")
    rmp.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per cell")
    rmp.add_argument("--quick", action="store_true", help="skip the LeNet forward + backward")
    from ddfast.benchmarks.e2e import MODES as E2E_MODES, WORKLOADS as E2E_WORKLOADS

    e2e = bench_sub.add_parser("e2e", help="distiller meta-steps (LD, KRR-ST, EAD) in fp32/bf16/compile modes")
    e2e.add_argument("--workloads", nargs="+", default=list(E2E_WORKLOADS), choices=E2E_WORKLOADS)
    e2e.add_argument("--modes", nargs="+", default=list(E2E_MODES), choices=E2E_MODES)
    e2e.add_argument("--reps", type=int, default=10, help="timed steps per cell (a third for m=1000)")
    e2e.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    e2e.add_argument("--json", default=None, help="also write the rows to this JSON file")
    from ddfast.experiments.e2e_parity import STUDIES as PARITY_STUDIES

    par = sub.add_parser("e2e-parity", help="accuracy of short distillations in each network-pass mode")
    par.add_argument("--out", required=True, help="folder for the runs and parity.json (re-running resumes)")
    par.add_argument("--studies", nargs="+", default=list(PARITY_STUDIES), choices=PARITY_STUDIES)
    par.add_argument("--modes", nargs="+", default=list(E2E_MODES), choices=E2E_MODES)
    par.add_argument("--target", default=None, help="KRR-ST target model folder (ddfast ssl)")
    par.add_argument("--ld-epochs-digits", type=int, default=300)
    par.add_argument("--ld-epochs-mnist", type=int, default=5)
    par.add_argument("--krr-steps", type=int, default=300)
    par.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "distill" and args.distributed:
        handler = {"ld": _distill_ld, "krr-st": _distill_krr_st, "ead": _distill_ead}[args.method]
        return _distributed_run(handler, args)
    if args.command == "trajectory" and args.distributed:
        return _distributed_run(_trajectory, args)
    if args.command == "bench" and args.op == "krr-st":
        return _bench_krr_st(args)
    if args.command == "bench" and args.op == "label-metagrad":
        return _bench_label_metagrad(args)
    if args.command == "distill" and args.method == "ead":
        return _distill_ead(args)
    if args.command == "dcs":
        return _dcs(args)
    if args.command == "softlabel-table":
        return _softlabel_table(args)
    if args.command == "ead-table":
        return _ead_table(args)
    if args.command == "e2e-parity":
        return _e2e_parity(args)
    if args.command == "bench" and args.op == "e2e":
        return _bench_e2e(args)
    if args.command == "bench" and args.op == "checkpoint-grad-inner":
        return _bench_checkpoint_grad_inner(args)
    if args.command == "bench" and args.op == "relu-max-pool2d":
        return _bench_relu_max_pool2d(args)
    if args.command == "distill" and args.method == "krr-st":
        return _distill_krr_st(args)
    if args.command == "ssl":
        return _ssl(args)
    if args.command == "trajectory":
        return _trajectory(args)
    if args.command == "distill":
        return _distill_ld(args)
    if args.command == "krr-st-table":
        return _krr_st_table(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command == "ld-table":
        return _ld_table(args)
    if args.command == "info":
        from ddfast.info import main as info_main

        info_main()
        return 0
    if args.command == "bench" and args.op == "ridge":
        return _bench_ridge(args)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
