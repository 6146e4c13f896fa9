"""pytest-benchmark: fused ReLU + 2×2 max-pool vs F.max_pool2d(F.relu(x), 2) and torch.compile of it.

LeNet's pools ([1024, 6, 28, 28], [1024, 16, 10, 10]) and ConvNet-D3's ([256, 128, 32, 32], [256, 128, 16, 16]),
NCHW and NHWC, float32 and bfloat16, modes fwd and fwd+bwd; GB/s from the bytes the op must move.

    python -m pytest bench/bench_relu_max_pool2d.py --benchmark-only --benchmark-group-by=group
    python -m ddfast.benchmarks --ops relu_max_pool2d      # the same cells as CSV / JSON rows and a markdown table

Cases and providers come from ddfast.benchmarks.harness (reference, compiled, triton, cuda, cpu, auto);
DDFAST_BENCH_DEVICE / DDFAST_BENCH_QUICK / DDFAST_BENCH_PROVIDERS select device, subset and providers.
"""

import pytest

from ddfast.benchmarks.harness import bench_params, run_pytest_benchmark


@pytest.mark.parametrize("case, provider, mode", bench_params("relu_max_pool2d"))
def test_relu_max_pool2d(benchmark, case, provider, mode):
    run_pytest_benchmark(benchmark, case, provider, mode)
