"""pytest-benchmark: fused ridge / kernel-ridge solve vs the eager reference and torch.compile of it.

LD / LD-RR heads (N = 10–100), few-shot heads (B = 64, N = 32–128), KRR-ST (m = 100 / 1000 / 5000,
d = 2048–8192, C = 512, b = 256 / 1024) and KRR users' widths (d = 512–8192, N = 10–500, 256 queries).

    python -m pytest bench/bench_ridge_solve.py --benchmark-only --benchmark-group-by=group
    python -m ddfast.benchmarks --ops ridge_solve      # the same cells as CSV / JSON rows and a markdown table

Cases and providers come from ddfast.benchmarks.harness (reference, compiled, triton, cuda, cpu, auto);
DDFAST_BENCH_DEVICE / DDFAST_BENCH_QUICK / DDFAST_BENCH_PROVIDERS select device, subset and providers.
"""

import pytest

from ddfast.benchmarks.harness import bench_params, run_pytest_benchmark


@pytest.mark.parametrize("case, provider, mode", bench_params("ridge_solve"))
def test_ridge_solve(benchmark, case, provider, mode):
    run_pytest_benchmark(benchmark, case, provider, mode)
