"""The CUDA kernels are plain CUDA on raw pointers: compile-check them with the local nvcc.

(They run only in a CUDA build, ``DDFAST_CUDA=1``, on a machine with a GPU; here they are compiled.)
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_every_op_has_a_cuda_source():
    assert [p.stem for p in CUDA_SOURCES] == ["ghost_products", "label_metagrad", "relu_max_pool2d", "ridge_solve"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA sources cannot be compile-checked here")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch, tmp_path):
    out = tmp_path / (source.stem + ".o")
    proc = subprocess.run(
        [NVCC, "-c", f"-arch={arch}", "-std=c++17", "-O2", str(source), "-o", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("header", sorted((ROOT / "csrc" / "cuda").glob("*.h")), ids=lambda p: p.name)
def test_cuda_header_is_plain_cxx(header, tmp_path):
    """The binding (compiled by the host compiler) includes the launcher headers without CUDA headers."""
    src = tmp_path / "use_header.cpp"
    src.write_text(f'#include "{header}"\nint main() {{ return 0; }}\n')
    proc = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    """The CUDA kernels compiled as host C++ (DDFAST_HOST_EMULATION): one thread per block."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("cuda_emu") / "ridge_solve_emu"
    src = ROOT / "tests" / "cuda_host_emulation.cpp"
    cu = ROOT / "csrc" / "cuda" / "ridge_solve.cu"
    proc = subprocess.run(
        ["g++", "-O2", "-std=c++17", f'-DRIDGE_SOLVE_CU="{cu}"', str(src), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.mark.parametrize(
    "B, N, d, C, primal",
    [(1, 1, 3, 1, False), (3, 5, 7, 2, False), (2, 20, 6, 3, True), (2, 64, 100, 10, False), (2, 33, 40, 10, True)],
)
def test_cuda_kernel_math_under_host_emulation(cuda_emulator, tmp_path, B, N, d, C, primal):
    import numpy as np
    import torch

    from ddfast.reference.ridge_solve import ridge_weights_ref

    g = torch.Generator().manual_seed(B * 1000 + N)
    Z = torch.randn(B, N, d, dtype=torch.float64, generator=g)
    Y = torch.randn(B, N, C, dtype=torch.float64, generator=g)
    mu = torch.rand(B, dtype=torch.float64, generator=g) + 0.1
    G = torch.randn(B, d, C, dtype=torch.float64, generator=g)
    for name, t in (("Z", Z), ("Y", Y), ("mu", mu), ("G", G)):
        t.numpy().tofile(tmp_path / name)
    subprocess.run([str(cuda_emulator), str(tmp_path), str(B), str(N), str(d), str(C), str(int(primal))], check=True)
    out = {k: torch.from_numpy(np.fromfile(tmp_path / k, dtype=np.float64)) for k in ("W", "dZ", "dY", "dmu")}
    assert (np.fromfile(tmp_path / "info", dtype=np.int32) == 0).all()

    Zr, Yr, mur = (t.clone().requires_grad_() for t in (Z, Y, mu))
    W = torch.stack([ridge_weights_ref(Zr[b], Yr[b], mur[b]) for b in range(B)])
    dZ, dY, dmu = torch.autograd.grad(W, [Zr, Yr, mur], G)
    for name, ref in (("W", W.detach()), ("dZ", dZ), ("dY", dY), ("dmu", dmu)):
        torch.testing.assert_close(out[name], ref.reshape(-1), atol=1e-9, rtol=1e-8, msg=name)


def test_cuda_kernel_reports_non_pd_under_host_emulation(cuda_emulator, tmp_path):
    import numpy as np
    import torch

    Z = torch.randn(2, 4, 6, dtype=torch.float64)
    Z[1] = torch.eye(6, dtype=torch.float64)[[0, 1, 0, 2]]  # duplicate row, μ = 0: 3rd leading minor singular
    for name, t in (("Z", Z), ("Y", torch.randn(2, 4, 2, dtype=torch.float64)),
                    ("mu", torch.tensor([0.5, 0.0], dtype=torch.float64)), ("G", torch.randn(2, 6, 2, dtype=torch.float64))):
        t.numpy().tofile(tmp_path / name)
    subprocess.run([str(cuda_emulator), str(tmp_path), "2", "4", "6", "2", "0"], check=True)
    info = np.fromfile(tmp_path / "info", dtype=np.int32)
    assert info[0] == 0 and info[1] == 3
