"""pytest-benchmark: one distiller meta-step end to end, in four modes (ddfast.benchmarks.e2e).

    python -m pytest bench/bench_e2e.py --benchmark-only --benchmark-group-by=group
    ddfast bench e2e        # the same cells as one table with speed-ups over reference-fp32

Workloads: LD-RR and LD second-order (LeNet, MNIST, N=100, N_i=50, N_o=1024), KRR-ST (ConvNet-D3
128-256-512-BN, 3×32×32, m=100/b=256 and m=1000/b=1024), EAD (t_m=5). Modes: reference-fp32,
fused-fp32, fused-bf16, fused-bf16-compile (compilation happens in the warm-up).
"""

import platform

import pytest
import torch

from ddfast.benchmarks.e2e import MODES, WORKLOADS, make_step, peak_memory_bytes, supported

PARAMS = [pytest.param(w, m, id=f"{w}-{m}") for w in WORKLOADS for m in MODES if supported(w, m)]


@pytest.mark.parametrize("workload, mode", PARAMS)
def test_e2e_meta_step(benchmark, workload, mode):
    step = make_step(workload, mode)
    for _ in range(step.warmup):
        step.fn()
    benchmark.group = f"e2e {workload}"
    benchmark.extra_info.update(
        device=platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        description=step.description,
        peak_memory_mb=peak_memory_bytes(step.fn) / 2**20,
    )
    rounds = 3 if workload.startswith("krr-st-m1000") else 10
    benchmark.pedantic(step.fn, rounds=rounds, iterations=1)
