"""Backend registry and dispatch: every backend declared once, as data; every op lists its backends.

Backends, in the order ``backend="auto"`` tries them:

* ``cuda``      – CUDA C++ kernels, ``torch.ops.ddfast.*`` from ``ddfast._C`` (CUDA builds, CUDA tensors).
* ``triton``    – Triton kernels in ``ddfast.kernels`` as ``torch.ops.ddfast.triton_*`` operators (a GPU, or
                  CPU tensors under ``TRITON_INTERPRET=1`` when forced; ``auto`` never picks the interpreter).
* ``cpu``       – CPU C++ kernels, ``torch.ops.ddfast.*`` from ``ddfast._C``.
* ``reference`` – eager PyTorch (``ddfast.reference``), always usable.

An op registers an :class:`OpSpec`: per backend an :class:`Impl` (the supported devices and dtypes, size
limits — including resource limits a kernel would fail on at launch, such as shared memory — and the
kernel methods its autograd Functions call). One :func:`not_supported_reasons` applies the declaration
to a description of the inputs (``device``, ``dtype`` and whatever the limits read). ``backend="auto"``
takes the first backend with no reason, ``"fused"`` the same without the reference, ``DDFAST_BACKEND=name``
overrides ``auto``; when no backend fits, one error lists every backend and its reasons.

:func:`explain` (``ddfast.ops.explain``) says which backend ``auto`` takes for given inputs and why the
others do not; ``DDFAST_LOG_DISPATCH=1`` logs every new choice to stderr (logger ``ddfast.dispatch``).
:func:`backend_status` and :func:`registered_ops` feed ``python -m ddfast.info``, the benchmarks and tests.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from ddfast.errors import BackendUnavailableError

__all__ = [
    "BACKENDS",
    "FUSED_BACKENDS",
    "Impl",
    "Kernels",
    "OpSpec",
    "backend_choices",
    "backend_names",
    "backend_status",
    "backends",
    "explain",
    "extension",
    "get_op",
    "not_supported_reasons",
    "register_op",
    "registered_ops",
    "select_for",
    "shared_memory_optin",
]

BACKENDS = ("cuda", "triton", "cpu", "reference")
FUSED_BACKENDS = ("cuda", "triton", "cpu")

BUILD_HINT = (
    "build it with `pip install --no-build-isolation --no-deps -e .` (or `python setup.py build_ext --inplace`) "
    "in the ddfast source tree"
)

log = logging.getLogger("ddfast.dispatch")


# --------------------------------------------------------------------------- compiled extension


def _torch_release(version: str) -> str:
    """``"2.11.0+cu130"`` → ``"2.11.0"`` (the ABI-relevant part of a torch version)."""
    return version.split("+", 1)[0]


def built_torch_version() -> str | None:
    """The torch version ``ddfast._C`` was built against (recorded by setup.py), or None if unknown."""
    try:
        from ddfast import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "TORCH_VERSION", None)


def _version_mismatch() -> str:
    import torch

    built = built_torch_version()
    if built is None or _torch_release(built) == _torch_release(torch.__version__):
        return ""
    return (
        f"ddfast._C was built against torch {built} but torch {torch.__version__} is imported; the compiled "
        f"kernels must be rebuilt for this torch: `pip install --no-build-isolation --no-deps -e .` (or "
        f"`python setup.py build_ext --inplace`) in the ddfast source tree"
    )


@functools.lru_cache(maxsize=None)
def _load_extension():
    """``(module, "")`` or ``(None, why)``; importing ``ddfast._C`` registers ``torch.ops.ddfast``."""
    why = _version_mismatch()
    if why:
        return None, why
    try:
        ext = importlib.import_module("ddfast._C")
    except ImportError as exc:  # pragma: no cover - depends on the install
        return None, f"compiled extension ddfast._C not importable ({exc}); {BUILD_HINT}"
    if getattr(ext, "with_cuda", False) and not hasattr(ext, "label_metagrad_fwd_cuda"):
        _add_stream_int_aliases(ext)
    return ext, ""


def _add_stream_int_aliases(ext) -> None:
    """The label meta-gradient CUDA entry points as they were before the operators (stream as an int,
    ignored: the operators launch on the current stream). Prefer torch.ops.ddfast.label_metagrad_*."""
    import torch

    ext.label_metagrad_fwd_cuda = lambda Z, Y, scale, stream=None: torch.ops.ddfast.label_metagrad_fwd(Z, Y, scale)
    ext.label_metagrad_bwd_cuda = (
        lambda H, GW, gb=None, Vb=None, Z=None, scale=1.0, stream=None: torch.ops.ddfast.label_metagrad_bwd(
            H, GW, gb, Vb, Z, scale)
    )


def extension():
    """The compiled ``ddfast._C`` module (its import registers ``torch.ops.ddfast``); raises with build
    instructions when it is missing or was built for another torch."""
    ext, why = _load_extension()
    if ext is None:
        raise BackendUnavailableError(why)
    return ext


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_status() -> tuple[bool, str]:
    try:
        from ddfast.kernels import _triton
    except Exception as exc:  # pragma: no cover
        return False, f"ddfast.kernels not importable: {exc}"
    if not _triton.TRITON_AVAILABLE:
        return False, _triton.TRITON_UNAVAILABLE_REASON
    return True, ""


@functools.lru_cache(maxsize=None)
def _shared_memory_optin(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def shared_memory_optin(device) -> int:
    """Bytes of shared memory one block may opt into on ``device`` (queried once per device, only
    when asked: never at import)."""
    import torch

    device = torch.device(device)
    return _shared_memory_optin(device.index if device.index is not None else torch.cuda.current_device())


# --------------------------------------------------------------------------- backends (declared once)


def _availability(name: str) -> list[str]:
    """Why backend ``name`` cannot run anything in this process ([] = built and usable)."""
    import torch

    if name == "reference":
        return []
    if name == "triton":
        ok, why = _triton_status()
        return [] if ok else [why]
    ext, why = _load_extension()
    if ext is None:
        return [why]
    if name == "cuda":
        if not getattr(ext, "with_cuda", False):
            return ["ddfast._C was built without CUDA (rebuild with DDFAST_CUDA=1 on a CUDA torch)"]
        if not torch.cuda.is_available():
            return ["built with CUDA, but no CUDA device is visible"]
    return []


def backends() -> dict[str, dict[str, object]]:
    """Which backends are built / usable here, and why not the others: ``{name: {"available", "reason"}}``."""
    import torch

    out: dict[str, dict[str, object]] = {}
    for name in BACKENDS:
        why = _availability(name)
        ok = not why
        reason = "; ".join(why)
        if name == "triton" and ok and not torch.cuda.is_available():
            if interpreter_enabled():
                reason = "no GPU: runs on CPU tensors under TRITON_INTERPRET=1 (slow; for testing only)"
            else:
                ok, reason = False, "no GPU, and TRITON_INTERPRET=1 is not set"
        out[name] = {"available": ok, "reason": reason}
    return out


#: Devices each backend runs on; the Triton interpreter adds CPU tensors when TRITON_INTERPRET=1.
_DEVICES = {"cuda": ("cuda",), "triton": ("cuda",), "cpu": ("cpu",), "reference": None}


def _devices(name: str):
    if name == "triton" and interpreter_enabled():
        return ("cuda", "cpu")
    return _DEVICES[name]


# --------------------------------------------------------------------------- op declarations


class Kernels:
    """The kernel methods an op's autograd Functions call (``fwd``, ``bwd``, ...), for one backend."""

    def __init__(self, name: str, **methods: Callable):
        self.name = name
        for key, fn in methods.items():
            setattr(self, key, fn)

    def __repr__(self) -> str:
        return f"Kernels({self.name!r})"


Limit = Callable[[Mapping[str, Any]], "str | None"]


@dataclass(frozen=True)
class Impl:
    """One backend of one op: what it supports and its kernel methods.

    ``dtypes``: supported dtypes (None: any). ``limits``: callables ``(inputs) -> reason or None``, for
    size limits and launch-resource limits. ``kernels``: the :class:`Kernels` the op's Functions call.
    """

    backend: str
    kernels: Kernels | None = None
    dtypes: tuple | None = None
    limits: tuple = ()


@dataclass
class OpSpec:
    """An op's backends in the order ``auto`` tries them, and how to describe its public inputs."""

    name: str
    impls: dict = field(default_factory=dict)
    describe: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)

    def kernels(self, backend: str) -> Kernels | None:
        return self.impls[backend].kernels


_OPS: dict[str, OpSpec] = {}
_ALIASES: dict[str, str] = {}


def register_op(name: str, impls: Sequence[Impl], *, describe=None) -> OpSpec:
    """Declare op ``name`` with its backends (a reference :class:`Impl` is added when missing).
    ``describe``: ``{public function name: (*args, **kw) -> dict}`` mapping a public function's arguments
    to the inputs the limits read (used by :func:`explain`); each name becomes an alias of the op."""
    describe = dict(describe or {})
    spec = OpSpec(name, {impl.backend: impl for impl in impls}, describe)
    unknown = set(spec.impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"register_op({name!r}): unknown backends {sorted(unknown)}; expected {BACKENDS}")
    spec.impls.setdefault("reference", Impl("reference"))
    _OPS[name] = spec
    for alias in describe:
        _ALIASES[alias] = name
    return spec


def get_op(name: str) -> OpSpec:
    _import_ops()
    name = _ALIASES.get(name, name)
    if name not in _OPS:
        raise ValueError(f"op: expected one of {sorted(set(_OPS) | set(_ALIASES))}, got {name!r}")
    return _OPS[name]


def _import_ops() -> None:
    import ddfast.ops  # noqa: F401  (each ops module registers its op)


def registered_ops() -> dict[str, tuple[str, ...]]:
    """``{op: backends it declares, in auto order}`` for every registered op."""
    _import_ops()
    return {name: tuple(b for b in BACKENDS if b in spec.impls) for name, spec in _OPS.items()}


def backend_names() -> tuple[str, ...]:
    """The backends the registered ops declare, in ``auto`` order (``reference`` always among them): the
    ``backend=`` names besides ``"auto"`` and ``"fused"``, and what the command line offers."""
    declared = {b for backends in registered_ops().values() for b in backends}
    return tuple(b for b in BACKENDS if b in declared or b == "reference")


def backend_choices() -> tuple[str, ...]:
    """Every value ``backend=`` takes: ``"auto"``, ``"fused"`` and :func:`backend_names`."""
    return ("auto", "fused") + backend_names()


def not_supported_reasons(op: str | OpSpec, backend: str, inputs: Mapping[str, Any]) -> list[str]:
    """Why ``backend`` cannot run ``op`` on inputs described by ``inputs`` (``device``, ``dtype`` and
    what the op's limits read); [] = it can."""
    spec = op if isinstance(op, OpSpec) else get_op(op)
    impl = spec.impls.get(backend)
    if impl is None:
        return [f"{spec.name} has no {backend} implementation"]
    reasons = list(_availability(backend))
    device, dtype = inputs.get("device"), inputs.get("dtype")
    devices = _devices(backend)
    dev_type = getattr(device, "type", device)
    if devices is not None and dev_type is not None and dev_type not in devices:
        where = " or ".join(devices)
        hint = " (CPU tensors need TRITON_INTERPRET=1)" if backend == "triton" and dev_type == "cpu" else ""
        reasons.append(f"inputs are on {dev_type}; the {backend} kernels take {where} tensors{hint}")
    if impl.dtypes is not None and dtype is not None and dtype not in impl.dtypes:
        names = "/".join(str(t).replace("torch.", "") for t in impl.dtypes)
        reasons.append(f"dtype {dtype} not supported ({names} only)")
    if not reasons:  # limits may query the device: only for inputs the backend can take at all
        for limit in impl.limits:
            why = limit(inputs)
            if why:
                reasons.append(why)
    return reasons


def _report(spec: OpSpec, inputs: Mapping[str, Any], order: Sequence[str], on_gpu: bool) -> dict[str, list[str]]:
    report = {}
    for name in order:
        if name not in spec.impls:
            continue
        reasons = not_supported_reasons(spec, name, inputs)
        if name == "triton" and not reasons and not on_gpu:
            reasons = ["auto does not pick the Triton interpreter for CPU tensors"]
        report[name] = reasons
    return report


def select_for(op: str | OpSpec, backend: str, inputs: Mapping[str, Any]) -> str:
    """The backend that runs ``op`` on ``inputs`` for the requested ``backend`` ("auto", "fused" or a
    name); memoized on the inputs' description."""
    spec = op if isinstance(op, OpSpec) else get_op(op)
    forced = os.environ.get("DDFAST_BACKEND", "").strip()
    key = (backend, forced, tuple(sorted(inputs.items(), key=lambda kv: kv[0])))
    name = spec.cache.get(key)
    if name is None:
        name = _choose(spec, backend, forced, inputs)
        if len(spec.cache) > 4096:
            spec.cache.clear()
        spec.cache[key] = name
    return name


def _choose(spec: OpSpec, backend: str, forced: str, inputs: Mapping[str, Any]) -> str:
    device = inputs.get("device")
    on_gpu = getattr(device, "type", device) == "cuda"
    if backend == "auto" and forced:
        backend = forced
    if backend not in ("auto", "fused"):
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {('auto', 'fused') + BACKENDS}, got {backend!r}")
        reasons = not_supported_reasons(spec, backend, inputs)
        if reasons:
            raise BackendUnavailableError(
                f"{spec.name}: backend {backend!r} cannot run these inputs: " + "; ".join(reasons)
            )
        _log_choice(spec, backend, f"backend={backend!r} asked for", inputs, {})
        return backend
    order = FUSED_BACKENDS if backend == "fused" else BACKENDS
    report = _report(spec, inputs, order, on_gpu)
    for name, reasons in report.items():
        if not reasons:
            _log_choice(spec, name, backend, inputs, report)
            return name
    lines = "\n".join(f"  {n}: " + "; ".join(r) for n, r in report.items())
    raise BackendUnavailableError(f"{spec.name}: no {backend} backend can run these inputs:\n{lines}")


def _format(spec_name, chosen, how, inputs, report) -> str:
    desc = ", ".join(f"{k}={v}" for k, v in inputs.items())
    lines = [f"{spec_name}({desc}): {how} -> {chosen}"]
    for name, reasons in report.items():
        if name != chosen:
            lines.append(f"  {name}: " + ("; ".join(reasons) if reasons else "fits (later in the order)"))
    return "\n".join(lines)


def _log_choice(spec, chosen, how, inputs, report) -> None:
    if os.environ.get("DDFAST_LOG_DISPATCH", "") not in ("", "0"):
        print("ddfast dispatch: " + _format(spec.name, chosen, how, inputs, report), file=sys.stderr)
    elif log.isEnabledFor(logging.DEBUG):
        log.debug(_format(spec.name, chosen, how, inputs, report))


# --------------------------------------------------------------------------- introspection


def explain(op: str, *args, **kwargs) -> str:
    """Which backend ``backend="auto"`` takes for ``op`` on these arguments, and every other backend's
    reasons. ``op``: a registered op or public function name (``"ridge_weights"``, ``"relu_max_pool2d"``,
    ...); the arguments are those of the public function (a ``backend=`` keyword is honoured)."""
    spec = get_op(op)
    describe = spec.describe.get(op) or (next(iter(spec.describe.values())) if len(spec.describe) == 1 else None)
    if describe is None:
        raise ValueError(f"explain: {op!r}: expected one of the public functions {sorted(spec.describe)}")
    backend = kwargs.pop("backend", "auto")
    inputs = dict(describe(*args, **kwargs))
    note = inputs.pop("note", None)  # a path the op takes instead of the chosen backend's kernels
    device = inputs.get("device")
    report = _report(spec, inputs, BACKENDS, getattr(device, "type", device) == "cuda")
    try:
        chosen = _choose(spec, backend, os.environ.get("DDFAST_BACKEND", "").strip(), inputs)
    except BackendUnavailableError as exc:
        chosen = f"none ({exc})"
    text = _format(spec.name if op == spec.name else f"{op} [{spec.name}]", chosen, backend, inputs, report)
    if note and backend == "auto" and chosen == "cpu":
        text += f"\n  note: {note}"
    return text


def backend_status(device="cpu", dtype=None) -> dict[str, dict[str, list[str]]]:
    """``{op: {backend: reasons it cannot run inputs on device/dtype}}`` for every registered op (size
    limits not applied): what ``info``, benchmarks and tests use to list the usable backends per op."""
    import torch

    dtype = dtype or torch.float32
    inputs = {"device": torch.device(device), "dtype": dtype}
    out = {}
    for name in registered_ops():
        spec = _OPS[name]
        out[name] = {}
        for backend in BACKENDS:
            if backend not in spec.impls:
                continue
            reasons = list(_availability(backend))
            dev_type = inputs["device"].type
            devices = _devices(backend)
            if devices is not None and dev_type not in devices:
                reasons.append(f"inputs are on {dev_type}; the {backend} kernels take {' or '.join(devices)} tensors")
            impl = spec.impls[backend]
            if impl.dtypes is not None and dtype not in impl.dtypes:
                reasons.append(f"dtype {dtype} not supported")
            out[name][backend] = reasons
    return out
