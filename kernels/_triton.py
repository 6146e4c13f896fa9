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
