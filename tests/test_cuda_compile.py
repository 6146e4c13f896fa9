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
    assert [p.stem for p in CUDA_SOURCES] == ["ridge_solve"]


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
