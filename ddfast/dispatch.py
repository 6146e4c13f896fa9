"""Backend discovery and dispatch.

Backends, in the order ``backend="auto"`` tries them:

* ``cuda``      – CUDA C++ kernels in ``ddfast._C`` (CUDA builds only, CUDA tensors).
* ``triton``    – Triton kernels in ``ddfast.kernels`` (a GPU, or CPU tensors under ``TRITON_INTERPRET=1``
                  when forced; ``auto`` never picks the interpreter).
* ``cpu``       – CPU C++ kernels in ``ddfast._C``.
* ``reference`` – eager PyTorch (``ddfast.reference``), always usable.

``backend="fused"`` is ``auto`` without the reference. ``DDFAST_BACKEND=name`` overrides ``auto``.
Each op supplies, per backend, ``not_supported_reasons(...) -> list[str]``; when no backend fits, one
error lists every backend and its reasons.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Mapping, Sequence

from ddfast.errors import BackendUnavailableError

BACKENDS = ("cuda", "triton", "cpu", "reference")
FUSED_BACKENDS = ("cuda", "triton", "cpu")

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
    "in the ddfast source tree"
)


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        return importlib.import_module("ddfast._C"), ""
    except ImportError as exc:  # pragma: no cover - depends on the install
        return None, f"compiled extension ddfast._C not importable ({exc}); {BUILD_HINT}"


def extension():
    """The compiled ``ddfast._C`` module; raises with build instructions when missing."""
    ext, why = _load_extension()
    if ext is None:
        raise BackendUnavailableError(why)
    return ext


def _triton_status() -> tuple[bool, str]:
    try:
        from ddfast.kernels import ridge_solve as triton_ridge
    except Exception as exc:  # pragma: no cover
        return False, f"ddfast.kernels not importable: {exc}"
    if not triton_ridge.TRITON_AVAILABLE:
        return False, triton_ridge.TRITON_UNAVAILABLE_REASON
    return True, ""


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def backends() -> dict[str, dict[str, object]]:
    """Which backends are built / usable here, and why not the others.

    Returns ``{name: {"available": bool, "reason": str}}``.
    """
    import torch

    out: dict[str, dict[str, object]] = {}
    ext, why = _load_extension()
    cuda_ok = ext is not None and bool(getattr(ext, "with_cuda", False))
    if ext is None:
        cuda_why = why
    elif not cuda_ok:
        cuda_why = "ddfast._C was built without CUDA (rebuild with DDFAST_CUDA=1 on a CUDA torch)"
    elif not torch.cuda.is_available():
        cuda_ok, cuda_why = False, "built with CUDA, but no CUDA device is visible"
    else:
        cuda_why = ""
    out["cuda"] = {"available": cuda_ok, "reason": cuda_why}

    t_ok, t_why = _triton_status()
    if t_ok and not torch.cuda.is_available():
        if interpreter_enabled():
            t_why = "no GPU: runs on CPU tensors under TRITON_INTERPRET=1 (slow; for testing only)"
        else:
            t_ok, t_why = False, "no GPU, and TRITON_INTERPRET=1 is not set"
    out["triton"] = {"available": t_ok, "reason": t_why}
    out["cpu"] = {"available": ext is not None, "reason": why}
    out["reference"] = {"available": True, "reason": ""}
    return out


def select(
    backend: str,
    candidates: Mapping[str, Callable[[], Sequence[str]]],
    op: str,
    on_gpu: bool = False,
) -> str:
    """Pick a backend for one call.

    ``candidates`` maps each backend name to a zero-argument callable returning the reasons it cannot
    run these inputs (empty = it can). ``backend`` is a name, ``"auto"`` or ``"fused"``; ``on_gpu`` tells
    whether the inputs are CUDA tensors (``auto`` never picks the Triton interpreter for CPU tensors).
    """
    if backend in ("auto", "fused"):
        forced = os.environ.get("DDFAST_BACKEND", "").strip()
        if forced and backend == "auto":
            backend = forced
    if backend not in ("auto", "fused"):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {('auto', 'fused') + BACKENDS}, got {backend!r}")
        reasons = list(candidates[backend]())
        if reasons:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run these inputs: " + "; ".join(reasons))
        return backend
    order = FUSED_BACKENDS if backend == "fused" else BACKENDS
    report = []
    for name in order:
        reasons = list(candidates[name]())
        if name == "triton" and not reasons and not on_gpu:
            reasons = ["auto does not pick the Triton interpreter for CPU tensors"]
        if not reasons:
            return name
        report.append(f"  {name}: " + "; ".join(reasons))
    raise BackendUnavailableError(f"{op}: no {backend} backend can run these inputs:\n" + "\n".join(report))

