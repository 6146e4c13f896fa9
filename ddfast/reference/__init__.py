"""Eager PyTorch references: readable, float64-capable, the truth each kernel is tested against."""

from ddfast.reference.checkpoint_grad_inner import checkpoint_grad_inner_ref
from ddfast.reference.ghost_products import (
    ghost_bilinear_ref,
    ghost_inner_ref,
    ghost_norms_ref,
    grad_dot_ref,
    per_example_grad_inner_ref,
    per_example_grad_norms_ref,
    per_example_grads_ref,
    per_example_weight_grads_ref,
)
from ddfast.reference.label_metagrad import head_residual_ref, label_meta_loss_ref, label_metagrad_ref
from ddfast.reference.relu_max_pool2d import lenet_forward_ref, relu_max_pool2d_ref
from ddfast.reference.ridge_solve import krr_predict_from_gram_ref, krr_predict_ref, ridge_from_gram_ref, ridge_weights_ref

__all__ = [
    "ridge_weights_ref",
    "krr_predict_ref",
    "ridge_from_gram_ref",
    "krr_predict_from_gram_ref",
    "label_metagrad_ref",
    "label_meta_loss_ref",
    "head_residual_ref",
    "checkpoint_grad_inner_ref",
    "ghost_bilinear_ref",
    "ghost_norms_ref",
    "ghost_inner_ref",
    "per_example_weight_grads_ref",
    "per_example_grads_ref",
    "per_example_grad_norms_ref",
    "per_example_grad_inner_ref",
    "grad_dot_ref",
    "relu_max_pool2d_ref",
    "lenet_forward_ref",
]
