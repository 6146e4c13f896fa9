"""``ddfast bench ...``: the per-op benchmark tables (ratios against the eager reference, same run)."""

from __future__ import annotations

from ddfast.cli._common import positive_float, positive_int


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (ratios against the eager reference)")
    ops = bench.add_subparsers(dest="op", required=True, metavar="OP")
    ridge = ops.add_parser("ridge", help="ridge / kernel-ridge solve")
    ridge.add_argument("--min-time", type=positive_float, default=0.3, help="seconds of timing per cell")
    ridge.add_argument("--quick", action="store_true", help="skip the N=1000 cases")
    ridge.set_defaults(handler=_bench_ridge)
    lmg = ops.add_parser("label-metagrad", help="label meta-gradient and LD meta-iterations")
    lmg.add_argument("--min-time", type=positive_float, default=0.5, help="seconds of timing per cell")
    lmg.set_defaults(handler=_bench_label_metagrad)
    kb = ops.add_parser("krr-st", help="one KRR-ST meta-step: solve vs ConvNet passes")
    kb.add_argument("--min-time", type=positive_float, default=0.5, help="seconds of timing per cell")
    kb.set_defaults(handler=_bench_krr_st)
    cgi = ops.add_parser("checkpoint-grad-inner", help="EAD loss + S-gradient: fused vs double backward")
    cgi.add_argument("--min-time", type=positive_float, default=0.5, help="seconds of timing per cell")
    cgi.add_argument("--quick", action="store_true", help="skip t_m = 10")
    cgi.set_defaults(handler=_bench_checkpoint_grad_inner)
    rmp = ops.add_parser("relu-max-pool2d", help="fused ReLU + 2×2 max-pool vs the PyTorch composition")
    rmp.add_argument("--min-time", type=positive_float, default=0.3, help="seconds of timing per cell")
    rmp.add_argument("--quick", action="store_true", help="skip the LeNet forward + backward")
    rmp.set_defaults(handler=_bench_relu_max_pool2d)
    from ddfast.benchmarks.e2e import MODES as E2E_MODES, WORKLOADS as E2E_WORKLOADS

    e2e = ops.add_parser("e2e", help="distiller meta-steps (LD, KRR-ST, EAD) in fp32/bf16/compile modes")
    e2e.add_argument("--workloads", nargs="+", default=list(E2E_WORKLOADS), choices=E2E_WORKLOADS,
                     help="distiller workloads")
    e2e.add_argument("--modes", nargs="+", default=list(E2E_MODES), choices=E2E_MODES, help="network-pass modes")
    e2e.add_argument("--reps", type=positive_int, default=10, help="timed steps per cell (a third for m=1000)")
    e2e.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    e2e.add_argument("--json", default=None, help="also write the rows to this JSON file")
    e2e.set_defaults(handler=_bench_e2e)


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


def _bench_e2e(args) -> int:
    import torch

    from ddfast.benchmarks.e2e import format_table, run_table

    print(f"threads={torch.get_num_threads()} torch={torch.__version__}; median seconds per meta-step, "
          "speed-up over reference-fp32 in the same run")
    rows = run_table(args.workloads, args.modes, reps=args.reps, memory=not args.no_memory)
    table = format_table(rows)
    print(table)
    if args.json:
        from ddfast.artifacts import write_json_atomic

        write_json_atomic(args.json, rows)
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
