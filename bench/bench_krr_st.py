"""pytest-benchmark: one KRR-ST meta-step, fused kernel-ridge op vs the method's own solve path.

    python -m pytest bench/bench_krr_st.py --benchmark-only --benchmark-group-by=group
    ddfast bench krr-st        # the same cases as one table with ratios and the time split

ConvNet-D3 (128-256-512, BN, 3×32×32), m = 100 / 1000 synthetic, b = 256 real, d_y = 512
(krr-st-selfsup §4.1). Parts: the solve alone, the ConvNet passes alone, the whole step.
"""

import platform

import pytest
import torch

from ddfast.benchmarks.krr_st import CASES, PARTS, make_fn, peak_memory_bytes

PARAMS = [
    pytest.param(case, provider, part, id=f"{case.name}-{part}-{provider}")
    for case in CASES
    for part in PARTS
    for provider in (("reference",) if part == "features" else ("reference", "cpu"))
]


@pytest.mark.parametrize("case, provider, part", PARAMS)
def test_krr_st_meta_step(benchmark, case, provider, part):
    fn = make_fn(case, provider, part)
    fn()  # warm-up
    benchmark.group = f"krr_st {case.name} {part}"
    benchmark.extra_info.update(
        device=platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        peak_memory_mb=peak_memory_bytes(fn) / 2**20,
    )
    benchmark(fn)
