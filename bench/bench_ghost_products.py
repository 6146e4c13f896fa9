"""pytest-benchmark: per-example gradient norms by ghost products vs torch.func vmap and a batch-of-1 loop,
and the ghost-product kernels alone (ddfast.benchmarks.harness cases and providers) vs the plain-torch reference.

    python -m pytest bench/bench_ghost_products.py --benchmark-only --benchmark-group-by=group

Model: ConvNet (widths 16-32-64 and 64-128-256) on 28×28 inputs, N = 256; providers cpu (fused C++
products), reference (same capture, plain-torch products), vmap, loop (small widths only). Layers: the row shapes of that ConvNet's layers.
Peak CPU memory, FLOPs of the products and torch/device info go to ``extra_info``.
"""

import platform

import pytest
import torch

from ddfast.benchmarks.ghost_products import MODEL_CASES, make_model_fn, model_providers, model_product_flops, peak_memory_bytes
from ddfast.benchmarks.harness import bench_params, run_pytest_benchmark

MODEL_PARAMS = [
    pytest.param(case, provider, id=f"{case.name}-{provider}") for case in MODEL_CASES for provider in model_providers(case)
]
LAYER_PARAMS = bench_params("ghost_products")  # the harness's layer cases and providers


def _info(benchmark, fn):
    benchmark.extra_info.update(
        device=platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        peak_memory_mb=peak_memory_bytes(fn) / 2**20,
    )


@pytest.mark.parametrize("case, provider", MODEL_PARAMS)
def test_per_example_grad_norms(benchmark, case, provider):
    fn = make_model_fn(case, provider)
    fn()  # warm-up
    benchmark.group = f"per_example_grad_norms {case.name}"
    _info(benchmark, fn)
    if provider in ("cpu", "reference"):
        benchmark.extra_info["product_flops"] = model_product_flops(case)
    benchmark(fn)


@pytest.mark.parametrize("case, provider, mode", LAYER_PARAMS)
def test_ghost_product_layer(benchmark, case, provider, mode):
    run_pytest_benchmark(benchmark, case, provider, mode)
