"""Eager PyTorch references: readable, float64-capable, the truth each kernel is tested against."""

from ddfast.reference.checkpoint_grad_inner import checkpoint_grad_inner_ref
from ddfast.reference.relu_max_pool2d import relu_max_pool2d_ref
from ddfast.reference.ridge_solve import krr_predict_ref, ridge_weights_ref

__all__ = ["ridge_weights_ref", "krr_predict_ref", "checkpoint_grad_inner_ref", "relu_max_pool2d_ref"]
