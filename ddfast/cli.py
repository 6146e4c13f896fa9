"""Command line: ``ddfast info`` and ``ddfast bench ridge``."""

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddfast", description="ddfast: fused kernels for dataset distillation")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are built and usable here")
    bench = sub.add_parser("bench", help="benchmarks (ratios against the eager reference)")
    bench_sub = bench.add_subparsers(dest="op", required=True)
    ridge = bench_sub.add_parser("ridge", help="ridge / kernel-ridge solve")
    ridge.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per cell")
    ridge.add_argument("--quick", action="store_true", help="skip the N=1000 cases")
    args = parser.parse_args(argv)
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
