"""The CUDA kernels are plain CUDA on raw pointers: compile-check them with the local nvcc.

(They run only in a CUDA build, ``DDFAST_CUDA=1``, on a machine with a GPU; here they are compiled.)
"""

import os
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


EMU_FLAGS = ["g++", "-O2", "-std=c++17", "-Wall", "-Wno-unknown-pragmas", f"-I{ROOT / 'tests'}"]


@pytest.fixture(scope="module")
def cuda_emulator(tmp_path_factory):
    """The CUDA kernels compiled as host C++ (DDFAST_HOST_EMULATION) under tests/cuda_host_emulation_runtime.h:
    256 cooperative threads per block, shuffles and barriers as on the device."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("cuda_emu") / "ridge_solve_emu"
    src = ROOT / "tests" / "cuda_host_emulation.cpp"
    cu = ROOT / "csrc" / "cuda" / "ridge_solve.cu"
    proc = subprocess.run(EMU_FLAGS + [f'-DRIDGE_SOLVE_CU="{cu}"', str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def _run_ridge(exe, tmp_path, B, N, d, C, primal, prec="f64", flags=(1, 1, 1, 1), order="forward", seed=0, mu=None):
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed + B * 1000 + N * 10 + C)
    Z = torch.randn(B, N, d, dtype=torch.float64, generator=g)
    Y = torch.randn(B, N, C, dtype=torch.float64, generator=g)
    mu = torch.rand(B, dtype=torch.float64, generator=g) + 0.1 if mu is None else mu
    G = torch.randn(B, d, C, dtype=torch.float64, generator=g)
    for name, t in (("Z", Z), ("Y", Y), ("mu", mu), ("G", G)):
        t.numpy().tofile(tmp_path / name)
    env = dict(os.environ, DDFAST_EMU_ORDER=order)
    subprocess.run([str(exe), str(tmp_path), str(B), str(N), str(d), str(C), str(int(primal)), prec,
                    *map(str, flags)], check=True, env=env)
    out = {k: torch.from_numpy(np.fromfile(tmp_path / k, dtype=np.float64))
           for k in ("W", "L", "aux", "dZ", "dY", "dmu")}
    out["info"] = np.fromfile(tmp_path / "info", dtype=np.int32)
    return (Z, Y, mu, G), out


def _ridge_reference(Z, Y, mu, G):
    import torch

    from ddfast.reference.ridge_solve import ridge_weights_ref

    B = Z.shape[0]
    Zr, Yr, mur = (t.clone().requires_grad_() for t in (Z, Y, mu))
    W = torch.stack([ridge_weights_ref(Zr[b], Yr[b], mur[b]) for b in range(B)])
    dZ, dY, dmu = torch.autograd.grad(W, [Zr, Yr, mur], G)
    return {"W": W.detach(), "dZ": dZ, "dY": dY, "dmu": dmu}


# (B, N, d, C, primal): n = 1 and C = 1; odd sizes; n a multiple of 32 (padded factor stride n|1 = n+1);
# n = 128 (the limit, 4 rows per lane in the solves); C above one column tile (32) and C = 512 (16 tiles,
# the KRR-ST label width, whose whole right-hand side no longer has to fit in shared memory); d above
# one 32-wide chunk in the dual form and N above one chunk in the primal form.
RIDGE_CASES = [
    (1, 1, 3, 1, False),
    (2, 1, 1, 1, True),
    (3, 5, 7, 2, False),
    (2, 20, 6, 3, True),
    (2, 64, 100, 10, False),
    (2, 33, 40, 10, True),
    (1, 32, 70, 33, False),
    (1, 96, 32, 5, True),
    (1, 128, 150, 40, False),
    (1, 40, 128, 3, True),
    (1, 9, 20, 512, False),
    (1, 70, 11, 512, True),
]


@pytest.mark.parametrize("B, N, d, C, primal", RIDGE_CASES)
def test_cuda_kernel_math_under_host_emulation(cuda_emulator, tmp_path, B, N, d, C, primal):
    import torch

    (Z, Y, mu, G), out = _run_ridge(cuda_emulator, tmp_path, B, N, d, C, primal)
    assert (out["info"] == 0).all()
    ref = _ridge_reference(Z, Y, mu, G)
    for name, r in ref.items():
        torch.testing.assert_close(out[name], r.reshape(-1), atol=1e-9, rtol=1e-8, msg=name)
    n = d if primal else N
    A = Z.transpose(1, 2) @ Z if primal else Z @ Z.transpose(1, 2)
    L = out["L"].reshape(B, n, n)
    assert torch.equal(L, L.tril()), "upper triangle of L must be zero"
    torch.testing.assert_close(L @ L.transpose(1, 2), A + mu[:, None, None] * torch.eye(n, dtype=A.dtype),
                               atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("B, N, d, C, primal", [(2, 33, 40, 45, False), (2, 20, 36, 40, True)])
def test_cuda_kernel_has_no_order_dependence_under_host_emulation(cuda_emulator, tmp_path, B, N, d, C, primal):
    """Threads of each phase run in reverse order: a missing barrier changes the result."""
    import torch

    (Z, Y, mu, G), out = _run_ridge(cuda_emulator, tmp_path, B, N, d, C, primal, order="reverse")
    ref = _ridge_reference(Z, Y, mu, G)
    for name, r in ref.items():
        torch.testing.assert_close(out[name], r.reshape(-1), atol=1e-9, rtol=1e-8, msg=name)


@pytest.mark.parametrize("primal", [False, True])
@pytest.mark.parametrize("flags", [(0, 1, 1, 1), (1, 0, 1, 0), (0, 0, 0, 1), (1, 1, 0, 0)])
def test_cuda_kernel_computes_only_what_is_asked_under_host_emulation(cuda_emulator, tmp_path, primal, flags):
    """W = null: W is not written (dual; primal W is aux and also skipped); dZ / dY / dmu null: not written."""
    import torch

    B, N, d, C = 2, 12, 9, 35
    (Z, Y, mu, G), out = _run_ridge(cuda_emulator, tmp_path, B, N, d, C, primal, flags=flags)
    ref = _ridge_reference(Z, Y, mu, G)
    for name, asked in zip(("W", "dZ", "dY", "dmu"), flags):
        if asked:
            torch.testing.assert_close(out[name], ref[name].reshape(-1), atol=1e-9, rtol=1e-8, msg=name)
        else:
            assert out[name].isnan().all(), f"{name} was written though not asked"
    n = d if primal else N
    aux_ref = torch.linalg.solve(Z.transpose(1, 2) @ Z + mu[:, None, None] * torch.eye(d, dtype=Z.dtype),
                                 Z.transpose(1, 2) @ Y) if primal else \
        torch.linalg.solve(Z @ Z.transpose(1, 2) + mu[:, None, None] * torch.eye(N, dtype=Z.dtype), Y)
    torch.testing.assert_close(out["aux"].reshape(B, n, C), aux_ref, atol=1e-9, rtol=1e-8)


def test_cuda_kernel_float32_krr_st_label_width_under_host_emulation(cuda_emulator, tmp_path):
    """float32 at C = 512 (the KRR-ST label width) against the float64 reference on the rounded inputs:
    the right-hand sides go through 16 column tiles."""
    import torch

    (Z, Y, mu, G), out = _run_ridge(cuda_emulator, tmp_path, 1, 24, 40, 512, False, prec="f32")
    ref = _ridge_reference(*(t.float().double() for t in (Z, Y, mu, G)))
    for name, r in ref.items():
        scale = r.abs().max().item()
        torch.testing.assert_close(out[name], r.reshape(-1), atol=2e-5 * scale, rtol=1e-4, msg=name)


def test_smem_bytes_do_not_grow_with_C_and_fit_hopper():
    """ridge_solve_smem_bytes: n·(n|1) + 2·n·33 + 2·32·33 + 8 values, whatever C; the KRR-ST shape
    (m = 100, C = 512) that needed 244,800 B in float32 now fits the 232,448 B opt-in, as does n = 128 in float64."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    return_code = _smem_probe()
    assert return_code == {(100, 512, 4): 4 * (100 * 101 + 2 * 100 * 33 + 2 * 32 * 33 + 8),
                           (100, 1, 4): 4 * (100 * 101 + 2 * 100 * 33 + 2 * 32 * 33 + 8),
                           (128, 512, 8): 8 * (128 * 129 + 2 * 128 * 33 + 2 * 32 * 33 + 8),
                           (31, 7, 8): 8 * (31 * 31 + 2 * 31 * 33 + 2 * 32 * 33 + 8)}
    assert max(return_code.values()) <= 232_448


def _smem_probe():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "probe.cpp"
        src.write_text(f'#include "{ROOT / "csrc" / "cuda" / "ridge_solve.h"}"\n#include <cstdio>\n'
                       "int main() { const long long c[4][3] = {{100, 512, 4}, {100, 1, 4}, {128, 512, 8}, {31, 7, 8}};\n"
                       "  for (auto& r : c) std::printf(\"%lld %lld %lld %zu\\n\", r[0], r[1], r[2],\n"
                       "    ddfast::cuda::ridge_solve_smem_bytes(r[0], r[1], r[2]));\n  return 0; }\n")
        exe = pathlib.Path(tmp) / "probe"
        subprocess.run(["g++", "-std=c++17", str(src), "-o", str(exe)], check=True)
        lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    return {tuple(int(v) for v in ln.split()[:3]): int(ln.split()[3]) for ln in lines if ln.strip()}


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


@pytest.fixture(scope="module")
def emulation_selftest(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    exe = tmp_path_factory.mktemp("cuda_emu") / "selftest"
    proc = subprocess.run(EMU_FLAGS + [str(ROOT / "tests" / "cuda_host_emulation_selftest.cpp"), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def _selftest(exe, case, order="forward"):
    return subprocess.run([str(exe), case], capture_output=True, text=True, env=dict(os.environ, DDFAST_EMU_ORDER=order))


def test_host_emulation_runs_barriers_and_shuffles_as_the_device(emulation_selftest):
    for order in ("forward", "reverse"):
        for case, want in (("sum_ok", "32640"), ("shfl_ok", "496")):
            proc = _selftest(emulation_selftest, case, order)
            assert proc.returncode == 0 and proc.stdout.strip() == want, (case, order, proc.stdout, proc.stderr)


def test_host_emulation_exposes_a_missing_barrier(emulation_selftest):
    """Without the barrier the block sum depends on the order the threads run in: one order is wrong."""
    results = {_selftest(emulation_selftest, "sum_racy", order).stdout.strip() for order in ("forward", "reverse")}
    assert results != {"32640"}


@pytest.mark.parametrize("case, message", [("divergent", "deadlock"), ("shfl_exited", "exited lanes"),
                                           ("smem_over", "beyond the declared dynamic shared memory")])
def test_host_emulation_rejects_undefined_behaviour(emulation_selftest, case, message):
    proc = _selftest(emulation_selftest, case)
    assert proc.returncode == 3 and message in proc.stderr, (proc.returncode, proc.stderr)
