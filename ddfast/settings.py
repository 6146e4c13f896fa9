"""Numerical knobs of ddfast.

Jitter policy for the ridge / kernel-ridge solves (``ddfast.ops.ridge_solve``):

* The regularised Gram ``A = K + μI`` is factored with a Cholesky decomposition. Batch
  members whose factorization fails (a pivot ``<= 0`` or non-finite, e.g. duplicate rows
  with a tiny λ in float32) are re-factored **alone** with extra diagonal jitter
  ``ε·10^k · mean(diag(A))`` for ``k = 0 … max_jitter_tries-1``, where ``ε`` is
  ``jitter_float32`` or ``jitter_float64`` by the solve dtype. Members that factor
  first time are untouched.
* The first time jitter is needed a :class:`ddfast.errors.NumericalWarning` is issued
  (once per process for each call site, Python's default warning filter).
* If a member still fails, :class:`ddfast.errors.NotPSDError` is raised: a solve never
  returns NaN silently.
* ``check_finite``: the op's (small) output is checked for NaN/Inf — one reduction and one host
  sync per call; NaN/Inf inputs always reach it. A non-finite result raises ``ValueError`` naming the
  non-finite input, or ``NotPSDError`` when every input is finite.

The gradient of a jittered member is the exact gradient of the jittered system.
"""

jitter_float32: float = 1e-6
jitter_float64: float = 1e-10
max_jitter_tries: int = 4
check_finite: bool = True


def jitter_for(dtype) -> float:
    """Base relative jitter ε for a solve in ``dtype``."""
    import torch

    return jitter_float64 if dtype == torch.float64 else jitter_float32
