"""pytest-benchmark: fused label meta-gradient (L_out and dL_out/dy) vs the create_graph reference.

LeNet on 1×28×28 (N = 10 / 50 / 100, M = 1024) and ConvNet 128-128-128 on 3×32×32 (N = 10 / 100, M = 256).

    python -m pytest bench/bench_label_metagrad.py --benchmark-only --benchmark-group-by=group
    python -m ddfast.benchmarks --ops label_metagrad      # the same cells as CSV / JSON rows and a markdown table

Cases and providers come from ddfast.benchmarks.harness (reference, compiled, triton, cuda, cpu, auto);
DDFAST_BENCH_DEVICE / DDFAST_BENCH_QUICK / DDFAST_BENCH_PROVIDERS select device, subset and providers.
"""

import pytest

from ddfast.benchmarks.harness import bench_params, run_pytest_benchmark


@pytest.mark.parametrize("case, provider, mode", bench_params("label_metagrad"))
def test_label_metagrad(benchmark, case, provider, mode):
    run_pytest_benchmark(benchmark, case, provider, mode)
