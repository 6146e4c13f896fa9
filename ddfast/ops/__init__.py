"""Public fused ops; each has an eager reference in :mod:`ddfast.reference` and a ``backend=`` switch."""

from ddfast.ops.ridge_solve import krr_predict, ridge_weights

__all__ = ["ridge_weights", "krr_predict"]
