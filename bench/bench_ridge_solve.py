"""pytest-benchmark: fused ridge solve vs the eager reference (and the peers' formulations).

    python -m pytest bench/bench_ridge_solve.py --benchmark-only --benchmark-group-by=group
    ddfast bench ridge            # the same cases as one table of ratios

Each benchmark records FLOPs, GFLOP/s, peak CPU memory and torch/device info in ``extra_info``.
The Triton interpreter is excluded from timing (it is a correctness tool on CPU).
"""

import platform

import pytest
import torch

from ddfast.benchmarks.ridge_solve import CASES, make_fn, peak_memory_bytes, providers_for

PARAMS = [
    pytest.param(case, provider, mode, id=f"{case.name}-{mode}-{provider}")
    for case in CASES
    for mode in ("fwd", "fwd+bwd")
    for provider in providers_for(case)
]


@pytest.mark.parametrize("case, provider, mode", PARAMS)
def test_ridge_solve(benchmark, case, provider, mode):
    fn = make_fn(case, provider, mode)
    fn()  # warm-up (extension load, allocator)
    benchmark.group = f"ridge_solve {case.name} {mode}"
    flops = case.flops(mode)
    benchmark.extra_info.update(
        device=platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        flops=flops,
        peak_memory_mb=peak_memory_bytes(fn) / 2**20,
    )
    benchmark(fn)
    benchmark.extra_info["gflops"] = flops / benchmark.stats.stats.median / 1e9
