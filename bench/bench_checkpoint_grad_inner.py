"""pytest-benchmark: one EAD loss + gradient w.r.t. S, fused op vs the double-backward reference.

ConvNet 32-32-32 (instance norm) on 1×28×28, IPC 10 / 50, |P| = |D| = 256, t_m = 1 / 5 / 10.

    python -m pytest bench/bench_checkpoint_grad_inner.py --benchmark-only --benchmark-group-by=group
    python -m ddfast.benchmarks --ops checkpoint_grad_inner      # the same cells as CSV / JSON rows and a markdown table

Cases and providers come from ddfast.benchmarks.harness (reference, compiled, triton, cuda, cpu, auto);
DDFAST_BENCH_DEVICE / DDFAST_BENCH_QUICK / DDFAST_BENCH_PROVIDERS select device, subset and providers.
"""

import pytest

from ddfast.benchmarks.harness import bench_params, run_pytest_benchmark


@pytest.mark.parametrize("case, provider, mode", bench_params("checkpoint_grad_inner"))
def test_checkpoint_grad_inner(benchmark, case, provider, mode):
    run_pytest_benchmark(benchmark, case, provider, mode)
