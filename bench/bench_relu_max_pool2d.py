"""pytest-benchmark: fused ReLU + 2×2 max-pool vs F.max_pool2d(F.relu(x), 2), and LeNet with each.

    python -m pytest bench/bench_relu_max_pool2d.py --benchmark-only --benchmark-group-by=group
    ddfast bench relu-max-pool2d       # the same cases as one table of ratios

LeNet's pools at batch 1024 ([1024, 6, 28, 28] and [1024, 16, 10, 10]), float32 / bfloat16, NCHW /
channels_last, modes fwd and fwd+bwd; a LeNet forward + backward at batch 1024. Peak CPU memory,
the bytes the fused op must move, the achieved GB/s and torch/device info go to ``extra_info``.
"""

import platform

import pytest
import torch

from ddfast.benchmarks.relu_max_pool2d import CASES, MODEL_CASES, MODES, PROVIDERS, make_fn, min_bytes, peak_memory_bytes

PARAMS = [
    pytest.param(case, provider, mode, id=f"{case.name}-{mode}-{provider}")
    for case in CASES + MODEL_CASES
    for mode in MODES
    for provider in PROVIDERS
]


@pytest.mark.parametrize("case, provider, mode", PARAMS)
def test_relu_max_pool2d(benchmark, case, provider, mode):
    fn = make_fn(case, provider, mode)
    fn()  # warm-up
    benchmark.group = f"relu_max_pool2d {case.name} {mode}"
    benchmark.extra_info.update(
        device=platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        peak_memory_mb=peak_memory_bytes(fn) / 2**20,
    )
    if not case.model:
        benchmark.extra_info["min_bytes"] = min_bytes(case, mode)
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if not case.model and stats is not None and stats.stats.median > 0:
        benchmark.extra_info["gb_per_s"] = min_bytes(case, mode) / stats.stats.median / 1e9
