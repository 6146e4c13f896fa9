"""Triton, if importable: ``triton``, ``tl`` (None otherwise), ``TRITON_AVAILABLE`` and the reason it is not.

No GPU is queried here; kernels are only decorated when Triton imports.
"""

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
    TRITON_UNAVAILABLE_REASON = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_AVAILABLE = False
    TRITON_UNAVAILABLE_REASON = f"triton is not importable ({type(exc).__name__}: {exc})"


def triton_op(name: str):
    """Register a launcher as the operator ``torch.ops.ddfast.<name>`` (``torch.library.triton_op``), so
    torch.compile traces into its kernels; without Triton the plain function is kept (it raises why)."""

    def deco(fn):
        if not TRITON_AVAILABLE:
            return fn
        import torch

        return torch.library.triton_op(f"ddfast::{name}", mutates_args=())(fn)

    return deco


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def wrap(kernel, probe=None):
    """``torch.library.wrap_triton(kernel)``: the launch as torch.compile sees it. A kernel built for the
    CPU interpreter is not launched when ``probe`` is a fake / meta tensor (shapes only)."""
    if not TRITON_AVAILABLE:
        return kernel
    import torch

    if probe is not None and not isinstance(kernel, triton.runtime.JITFunction) and shapes_only(probe):
        return _NoLaunch()
    return torch.library.wrap_triton(kernel)


def shapes_only(t) -> bool:
    """True for fake / meta tensors (torch.compile tracing, fake-tensor checks): the launcher computes the
    outputs' shapes and skips the launch. Compiled kernels get this from wrap_triton; kernels built for the
    CPU interpreter would otherwise run on tensors without data."""
    import torch

    return t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t)
