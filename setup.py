"""Build script for the ``ddfast._C`` extension.

CPU kernels (csrc/cpu) and the operator registrations (csrc/<op>_ops.cpp) are always built. CUDA
kernels (csrc/cuda) are built only when asked: ``DDFAST_CUDA=1``, or a CUDA-enabled torch together
with ``TORCH_CUDA_ARCH_LIST``. ``MAX_JOBS`` bounds ninja's parallelism (read by torch.utils.cpp_extension).

Build against the torch already installed: ``pip install --no-build-isolation --no-deps .`` (or
``python setup.py build_ext --inplace`` in the source tree). The extension records that torch's
version (``ddfast/_build_info.py``); imported under another torch, ddfast says to rebuild.

Version: ``ddfast/__init__.py``'s ``__version__`` with a local part naming the build:
``0.1.0+cu130torch2.11`` (CUDA 13.0, torch 2.11) or ``0.1.0+cputorch2.13`` (CPU only);
``DDFAST_PLAIN_VERSION=1`` drops the local part.
"""

import glob
import os
import platform
import re

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


def _version_macros() -> list:
    """The torch (and CUDA) version the extension is built against, compiled into ddfast._C.build_info()."""
    flags = [f'-DDDFAST_TORCH_VERSION="{torch.__version__}"']
    if _want_cuda() and torch.version.cuda:
        flags.append(f'-DDDFAST_CUDA_VERSION="{torch.version.cuda}"')
    return flags


def _extension():
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/*_ops.cpp")) + ["csrc/bindings.cpp"]
    cxx_flags = ["-O3", "-g0", "-std=c++20", "-fopenmp"] + _cpu_arch_flags() + _version_macros()
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


def _version() -> str:
    with open(os.path.join(HERE, "ddfast", "__init__.py"), encoding="utf-8") as f:
        base = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    if os.environ.get("DDFAST_PLAIN_VERSION", "") not in ("", "0"):
        return base
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    build = f"cu{torch.version.cuda.replace('.', '')}" if _want_cuda() and torch.version.cuda else "cpu"
    return f"{base}+{build}torch{torch_mm}"


def _build_info_text() -> str:
    cuda = torch.version.cuda if _want_cuda() and torch.version.cuda else ""
    return (
        '"""Written by setup.py when ddfast._C is built: the torch it was built against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\nCUDA_VERSION = {cuda!r}\n"
    )


class BuildExt(BuildExtension):
    """build_ext that also records the torch version in ddfast/_build_info.py (source tree and build dir)."""

    def run(self):
        super().run()
        text = _build_info_text()
        targets = [os.path.join(HERE, "ddfast", "_build_info.py")]
        if not self.inplace and self.build_lib:
            targets.append(os.path.join(self.build_lib, "ddfast", "_build_info.py"))
        for path in targets:
            if os.path.isdir(os.path.dirname(path)):
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)


setup(
    version=_version(),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
