"""pytest-benchmark: fused label meta-gradient (and whole LD / LD-RR meta-iterations) vs the eager reference.

    python -m pytest bench/bench_label_metagrad.py --benchmark-only --benchmark-group-by=group
    ddfast bench label-metagrad       # the same cases as one table of ratios

LeNet on 28×28, base batch 10 / 50, outer batch 1024 (label-distillation §4.1). Peak CPU memory and
torch/device info go to ``extra_info``.
"""

import platform

import pytest
import torch

from ddfast.benchmarks.label_metagrad import CASES, MODES, make_fn, peak_memory_bytes

PARAMS = [
    pytest.param(case, provider, mode, id=f"{case.name}-{mode}-{provider}")
    for case in CASES
    for mode in MODES
    for provider in ("reference", "cpu")
]


@pytest.mark.parametrize("case, provider, mode", PARAMS)
def test_label_metagrad(benchmark, case, provider, mode):
    fn = make_fn(case, provider, mode)
    fn()  # warm-up
    benchmark.group = f"label_metagrad {case.name} {mode}"
    benchmark.extra_info.update(
        device=platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        peak_memory_mb=peak_memory_bytes(fn) / 2**20,
    )
    benchmark(fn)
