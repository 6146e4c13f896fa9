"""Build script for the ``ddfast._C`` extension.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda) are built only when
asked: ``DDFAST_CUDA=1``, or a CUDA-enabled torch together with ``TORCH_CUDA_ARCH_LIST``.
``MAX_JOBS`` bounds ninja's parallelism (read by torch.utils.cpp_extension).

Install with ``pip install --no-build-isolation .`` so the already-installed, pinned
torch is used for the build.
"""

import glob
import os
import platform

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("DDFAST_CUDA", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return torch.version.cuda is not None and bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def _cpu_arch_flags() -> list:
    """SIMD flags for the CPU kernels: AVX2+FMA on x86-64 (every GPU-cluster host has them);
    override with DDFAST_CPU_FLAGS (e.g. "-march=native", or "" for a baseline build)."""
    flags = os.environ.get("DDFAST_CPU_FLAGS")
    if flags is not None:
        return flags.split()
    return ["-mavx2", "-mfma"] if platform.machine() in ("x86_64", "AMD64") else []


def _extension():
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"] + _cpu_arch_flags()
    if _want_cuda():
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        return CUDAExtension(
            "ddfast._C",
            cpu_sources + cuda_sources,
            define_macros=[("DDFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "ddfast._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
