"""label_metagrad's CUDA kernels run as host C++ (DDFAST_HOST_EMULATION, tests/cuda_host_emulation_runtime.h:
cooperative threads, warps of 32, the launchers' grids).

tests/test_cuda_compile.py compile-checks csrc/cuda/label_metagrad.cu with nvcc (every ``.cu``); here
the same kernel source is compiled with g++ against tests/cuda_host_emulation_label_metagrad.cpp and
its numbers are checked against the eager reference (ddfast.reference.label_metagrad).
"""

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from ddfast.reference.label_metagrad import head_residual_ref, soft_cross_entropy

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (atol relative to max |ref|, rtol): float64 is the same arithmetic as the reference up to summation
# order; float32 kernels accumulate d-long dot products and C-long softmax sums in float32.
TOL = {"f64": (1e-13, 1e-12), "f32": (2e-6, 1e-5)}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("cuda_emu") / "label_metagrad_emu"
    src = ROOT / "tests" / "cuda_host_emulation_label_metagrad.cpp"
    cu = ROOT / "csrc" / "cuda" / "label_metagrad.cu"
    proc = subprocess.run(
        ["g++", "-O2", "-std=c++17", "-Wall", "-Wno-unknown-pragmas", f"-I{ROOT / 'tests'}",
         f'-DLABEL_METAGRAD_CU="{cu}"', str(src), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return exe


def _reference(H, GW, gb, Vb, Z, Y, scale):
    Zr = Z.clone().requires_grad_()
    loss = soft_cross_entropy(Zr, Y, "none")
    (R,) = torch.autograd.grad(scale * loss.sum(), Zr)
    return {"R": R, "loss": loss.detach(), "out": head_residual_ref(H, GW, gb, Vb, Z, scale)}


# N = 1; LeNet's head (d = 84 > one 64-wide chunk of H, C = 10); C = 26 and C = 70 (three 32-class tiles
# of GW, the last partial); N = 50 and N = 37 (several 16-row blocks, the last partial); d = 1; d = 0
# (v = gb + Vb); d = 130 (three chunks).
@pytest.mark.parametrize("prec", ["f64", "f32"])
@pytest.mark.parametrize(
    "N, d, C, bias, order",
    [(1, 5, 1, False, "forward"), (10, 84, 10, True, "reverse"), (7, 33, 26, True, "forward"),
     (50, 1, 1, True, "reverse"), (9, 17, 10, False, "forward"), (5, 0, 3, True, "forward"),
     (37, 130, 70, True, "reverse"), (16, 64, 32, False, "forward")],
)
def test_label_metagrad_kernels_under_host_emulation(emulator, tmp_path, prec, N, d, C, bias, order):
    g = torch.Generator().manual_seed(N * 100 + d + C)
    t = dict(
        Z=3 * torch.randn(N, C, dtype=torch.float64, generator=g),
        Y=torch.rand(N, C, dtype=torch.float64, generator=g),
        H=torch.randn(N, d, dtype=torch.float64, generator=g),
        GW=torch.randn(C, d, dtype=torch.float64, generator=g),
        gb=torch.randn(C, dtype=torch.float64, generator=g),
        Vb=torch.randn(N, C, dtype=torch.float64, generator=g),
    )
    for name, v in t.items():
        v.numpy().tofile(tmp_path / name)
    scale = 1.0 / N
    subprocess.run([str(emulator), str(tmp_path), str(N), str(d), str(C), str(int(bias)), str(int(bias)), repr(scale),
                    prec], check=True, env=dict(os.environ, DDFAST_EMU_ORDER=order))
    if prec == "f32":  # the reference on the float32-rounded inputs, in float64
        t = {k: v.float().double() for k, v in t.items()}
    gb, Vb = (t["gb"], t["Vb"]) if bias else (None, None)
    ref = _reference(t["H"], t["GW"], gb, Vb, t["Z"], t["Y"], scale)
    atol, rtol = TOL[prec]
    for name, r in ref.items():
        got = torch.from_numpy(np.fromfile(tmp_path / name, dtype=np.float64)).reshape(r.shape)
        torch.testing.assert_close(got, r, atol=atol * max(r.abs().max().item(), 1e-30), rtol=rtol, msg=name)
