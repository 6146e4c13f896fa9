"""pytest-benchmark configuration: the Triton interpreter only when no CUDA device is visible (the harness
never times it), set before any ``@triton.jit`` decorator runs. ``DDFAST_BENCH_DEVICE``,
``DDFAST_BENCH_QUICK`` and ``DDFAST_BENCH_PROVIDERS`` select device, subset and providers
(``ddfast.benchmarks.harness.bench_params``)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
