"""Public fused ops; each has an eager reference in :mod:`ddfast.reference` and a ``backend=`` switch."""

from ddfast.ops.checkpoint_grad_inner import checkpoint_grad_inner, effect_alignment_loss
from ddfast.ops.ghost_products import (
    capture_layers,
    ghost_bilinear,
    ghost_inner,
    ghost_norms,
    grad_dot,
    layer_weight_matrix,
    per_example_grad_inner,
    per_example_grad_norms,
)
from ddfast.ops.relu_max_pool2d import ReluMaxPool2d, relu_max_pool2d
from ddfast.ops.ridge_solve import krr_predict, ridge_weights
from ddfast.ops.ridge_solve import krr_predict_from_gram, ridge_from_gram  # noqa: F401

__all__ = [
    "ridge_weights",
    "krr_predict",
    "checkpoint_grad_inner",
    "effect_alignment_loss",
    "capture_layers",
    "ghost_bilinear",
    "ghost_inner",
    "ghost_norms",
    "grad_dot",
    "layer_weight_matrix",
    "per_example_grad_inner",
    "per_example_grad_norms",
    "relu_max_pool2d",
    "ReluMaxPool2d",
]
