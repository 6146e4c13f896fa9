"""relu_max_pool2d's CUDA kernels run as host C++ (DDFAST_HOST_EMULATION), and compile with nvcc.

tests/test_cuda_compile.py compile-checks every ``csrc/cuda/*.cu`` with nvcc; here
csrc/cuda/relu_max_pool2d.cu is compiled with g++ against tests/cuda_host_emulation_relu_max_pool2d.cpp
(a small grid, so the grid-stride loops wrap) and its outputs, codes and gradients are checked bit for
bit against the eager reference (ddfast.reference.relu_max_pool2d) in float32, float64 and bfloat16.
"""

import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddfast.reference.relu_max_pool2d import relu_max_pool2d_ref

from test_relu_max_pool2d import assert_identical

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
_BITS = {torch.float32: ("f32", torch.float32), torch.float64: ("f64", torch.float64), torch.bfloat16: ("bf16", torch.int16)}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("cuda_emu") / "relu_max_pool2d_emu"
    src = ROOT / "tests" / "cuda_host_emulation_relu_max_pool2d.cpp"
    cu = ROOT / "csrc" / "cuda" / "relu_max_pool2d.cu"
    proc = subprocess.run(
        ["g++", "-O2", "-std=c++17", "-Wall", f'-DRELU_MAX_POOL2D_CU="{cu}"', str(src), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return exe


def _write(t: torch.Tensor, path, channels_last):
    t = t.permute(0, 2, 3, 1) if channels_last else t
    t.contiguous().view(_BITS[t.dtype][1]).numpy().tofile(path)


def _read(path, dtype, shape, channels_last):
    N, C, H, W = shape
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8 if dtype == torch.uint8 else
                                       {torch.float32: np.float32, torch.float64: np.float64,
                                        torch.bfloat16: np.int16}[dtype]))
    t = raw.view(dtype) if dtype == torch.bfloat16 else raw
    return t.reshape(N, H, W, C).permute(0, 3, 1, 2) if channels_last else t.reshape(N, C, H, W)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "N, C, H, W, blocks, threads",
    [(1, 1, 2, 2, 1, 1), (2, 3, 5, 7, 2, 8), (3, 6, 28, 28, 3, 32), (2, 16, 10, 10, 4, 16), (1, 4, 9, 4, 1, 5)],
)
def test_relu_max_pool2d_kernels_under_host_emulation(emulator, tmp_path, dtype, channels_last, N, C, H, W, blocks,
                                                      threads):
    g = torch.Generator().manual_seed(N * 1000 + C * 100 + H)
    x = torch.randint(-3, 4, (N, C, H, W), generator=g).float()  # ties, zero windows
    x.view(-1)[torch.randperm(x.numel(), generator=g)[: x.numel() // 9]] = float("nan")
    x.view(-1)[::7] = -0.0
    x = x.to(dtype)
    grad_out = torch.randn(N, C, H // 2, W // 2, generator=g)
    grad_out.view(-1)[::4] = -0.0
    grad_out = grad_out.to(dtype)
    _write(x, tmp_path / "x", channels_last)
    _write(grad_out, tmp_path / "g", channels_last)
    subprocess.run([str(emulator), str(tmp_path), str(N), str(C), str(H), str(W), _BITS[dtype][0],
                    str(int(channels_last)), str(blocks), str(threads)], check=True)
    xr = x.clone().requires_grad_(True)
    ref = relu_max_pool2d_ref(xr)
    (gx_ref,) = torch.autograd.grad(ref, xr, grad_out)
    assert_identical(_read(tmp_path / "out", dtype, ref.shape, channels_last), ref.detach(), "out")
    assert_identical(_read(tmp_path / "gi", dtype, x.shape, channels_last), gx_ref, "grad_in")
    _, idx = F.max_pool2d_with_indices(F.relu(x.float()), 2)
    live = (ref > 0) | ref.isnan()
    pos = (idx // W % 2) * 2 + idx % W % 2
    code = _read(tmp_path / "code", torch.uint8, ref.shape, channels_last)
    assert torch.equal(code.long(), torch.where(live, pos, torch.full_like(pos, 4)))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources cannot be compile-checked here")
def test_relu_max_pool2d_cu_compiles_sm90(tmp_path):
    """Also covered by tests/test_cuda_compile.py (every .cu, two archs); kept here so this op's file
    checks its own source."""
    out = tmp_path / "relu_max_pool2d.o"
    proc = subprocess.run(
        [NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O2", str(ROOT / "csrc" / "cuda" / "relu_max_pool2d.cu"), "-o",
         str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
