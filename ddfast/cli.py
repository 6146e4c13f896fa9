"""Command line: ``ddfast info``, ``ddfast distill ld``, ``ddfast evaluate``, ``ddfast ld-table``, ``ddfast bench``."""

from __future__ import annotations

import argparse
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


def _distill_ld(args) -> int:
    from ddfast.experiments.ld import distill

    overrides = dict(model=args.model, epochs=args.epochs, outer_batch=args.outer_batch, inner_batch=args.inner_batch,
                     val_every=args.val_every, image_size=args.image_size)
    for n in args.base_examples:
        out = args.out if len(args.base_examples) == 1 else f"{args.out}-{n}"
        ld, result, _ = distill(args.dataset, n, args.variant, out=out, resume=args.resume, source=args.source,
                                root=args.root, source_root=args.source_root, backend=args.backend, seed=args.seed,
                                progress=not args.no_progress, **overrides)
        print(f"{out}: {n} base examples, {args.variant}: best val accuracy {result.val_accuracy:.2f}%, "
              f"T = {result.steps_to_overfit} steps, {result.iterations} iterations, {result.resets} resets, "
              f"{result.seconds:.0f} s")
        if args.evaluate:
            from ddfast.experiments.ld import evaluate_run

            res = evaluate_run(out, models=args.evaluate, seed=args.seed, backend=args.backend)
            print(f"{out}: test accuracy {res} over {args.evaluate} fresh models")
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
    args = parser.parse_args(argv)
    if args.command == "bench" and args.op == "label-metagrad":
        return _bench_label_metagrad(args)
    if args.command == "distill":
        return _distill_ld(args)
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
