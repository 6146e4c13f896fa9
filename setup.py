"""Build script for the ``ddfast._C`` extension.

CPU kernels (csrc/cpu) are always built. CUDA kernels (csrc/cuda) are built only when
asked: ``DDFAST_CUDA=1``, or a CUDA-enabled torch together with ``TORCH_CUDA_ARCH_LIST``.
``MAX_JOBS`` bounds ninja's parallelism (read by torch.utils.cpp_extension).

Install with ``pip install --no-build-isolation .`` so the already-installed, pinned
torch is used for the build.
"""

import glob
import os

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


def _extension():
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
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
