"""ghost_products' CUDA kernels run as host C++ (DDFAST_HOST_EMULATION, tests/cuda_host_emulation_runtime.h:
cooperative threads, warps of 32, the launchers' grids).

tests/test_cuda_compile.py compile-checks every ``csrc/cuda/*.cu`` with nvcc; here
csrc/cuda/ghost_products.cu is compiled with g++ against tests/cuda_host_emulation_ghost_products.cpp
and its numbers are checked against the eager reference (ddfast.reference.ghost_products).
"""

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from ddfast.reference.ghost_products import (
    ghost_bilinear_ref,
    ghost_inner_ref,
    ghost_norms_ref,
    per_example_weight_grads_ref,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")

# (atol relative to max |ref|, rtol): float64 is the reference arithmetic up to summation order;
# float32 accumulates P·max(O, K)-long sums (and squares of them) in float32.
TOL = {"f64": (1e-13, 1e-12), "f32": (5e-6, 1e-5)}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("cuda_emu") / "ghost_products_emu"
    src = ROOT / "tests" / "cuda_host_emulation_ghost_products.cpp"
    cu = ROOT / "csrc" / "cuda" / "ghost_products.cu"
    proc = subprocess.run(
        ["g++", "-O2", "-std=c++17", "-Wall", "-Wno-unknown-pragmas", f"-I{ROOT / 'tests'}",
         f'-DGHOST_PRODUCTS_CU="{cu}"', str(src), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return exe


# Shapes: degenerate; nn.Linear rows (P = 1); conv-like P1 != P2; K = 1; O = 1; P1 = 0; and the tiled
# paths: P = 40 and 33 (two 32-row tiles of the P × P Grams, diagonal and off-diagonal, the last partial),
# K = 70 and O = 45 (several 32-wide chunks and tiles of W). "reverse" runs the threads of each phase
# in reverse order (a missing barrier changes the result).
@pytest.mark.parametrize("prec", ["f64", "f32"])
@pytest.mark.parametrize(
    "N1, P1, N2, P2, K, O, order",
    [
        (1, 1, 1, 1, 1, 1, "forward"),
        (6, 1, 5, 1, 13, 4, "reverse"),
        (4, 9, 3, 7, 10, 8, "forward"),
        (5, 3, 2, 3, 1, 6, "forward"),
        (3, 4, 4, 2, 7, 1, "reverse"),
        (2, 0, 3, 2, 5, 4, "forward"),
        (3, 40, 2, 33, 70, 45, "forward"),
        (2, 37, 2, 35, 33, 34, "reverse"),
    ],
)
def test_ghost_products_kernels_under_host_emulation(emulator, tmp_path, prec, N1, P1, N2, P2, K, O, order):
    g = torch.Generator().manual_seed(N1 * 1000 + P1 * 100 + K * 10 + O)
    t = dict(
        A1=torch.randn(N1, P1, K, dtype=torch.float64, generator=g),
        G1=torch.randn(N1, P1, O, dtype=torch.float64, generator=g),
        A2=torch.randn(N2, P2, K, dtype=torch.float64, generator=g),
        G2=torch.randn(N2, P2, O, dtype=torch.float64, generator=g),
        V=torch.randn(O, K, dtype=torch.float64, generator=g),
    )
    for name, v in t.items():
        v.numpy().tofile(tmp_path / name)
    subprocess.run([str(emulator), str(tmp_path), str(N1), str(P1), str(N2), str(P2), str(K), str(O), prec],
                   check=True, env=dict(os.environ, DDFAST_EMU_ORDER=order))
    if prec == "f32":  # the reference on the float32-rounded inputs, in float64
        t = {k: v.float().double() for k, v in t.items()}
    ref = {
        "bilinear": ghost_bilinear_ref(t["A1"], t["G1"], t["V"]),
        "norms_ghost": ghost_norms_ref(t["A1"], t["G1"]),
        "norms_mat": ghost_norms_ref(t["A1"], t["G1"]),
        "inner": ghost_inner_ref(t["A1"], t["G1"], t["A2"], t["G2"]),
        "W": per_example_weight_grads_ref(t["A1"], t["G1"]),
    }
    atol, rtol = TOL[prec]
    for name, r in ref.items():
        got = torch.from_numpy(np.fromfile(tmp_path / name, dtype=np.float64)).reshape(r.shape)
        torch.testing.assert_close(got, r, atol=atol * max(r.abs().max().item() if r.numel() else 0.0, 1e-30),
                                   rtol=rtol, msg=name)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources cannot be compile-checked here")
def test_ghost_products_cu_compiles_sm90(tmp_path):
    """Also covered by tests/test_cuda_compile.py (every .cu, two archs); kept here so this op's file
    checks its own source."""
    out = tmp_path / "ghost_products.o"
    proc = subprocess.run(
        [NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O2", str(ROOT / "csrc" / "cuda" / "ghost_products.cu"), "-o", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
