"""pytest-benchmark: one distiller meta-step end to end (ddfast.benchmarks.harness, op ``e2e``).

    python -m pytest bench/bench_e2e.py --benchmark-only --benchmark-group-by=group
    python -m ddfast.benchmarks --ops e2e      # the same cells as CSV / JSON rows and a markdown table
    ddfast bench e2e                           # on MNIST, the four modes as one table

Workloads: LD-RR and LD second-order (LeNet, 1×28×28, N=100, N_i=50, N_o=1024), KRR-ST (ConvNet-D3
128-256-512-BN, 3×32×32, m=100/b=256 and m=1000/b=1024), EAD (t_m=5), on random tensors of those shapes.
Providers: reference (reference-fp32), auto (fused-fp32 / fused-bf16 by dtype), compiled (fused-bf16-compile;
compilation in the warm-up).
"""

import pytest

from ddfast.benchmarks.harness import bench_params, run_pytest_benchmark


@pytest.mark.parametrize("case, provider, mode", bench_params("e2e"))
def test_e2e_meta_step(benchmark, case, provider, mode):
    run_pytest_benchmark(benchmark, case, provider, mode)
