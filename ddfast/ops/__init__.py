"""Public fused ops; each has an eager reference in :mod:`ddfast.reference` and a ``backend=`` switch.

Every op declares its backends in :mod:`ddfast.dispatch`; :func:`explain` says which one
``backend="auto"`` takes for given arguments and why not the others.
"""

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
from ddfast.ops.label_metagrad import (
    LabelMetagrad,
    label_meta_loss,
    label_metagrad,
    ridge_label_metagrad,
    ridge_logits,
    split_model,
)
from ddfast.ops.relu_max_pool2d import ReluMaxPool2d, relu_max_pool2d
from ddfast.ops.ridge_solve import krr_predict, krr_predict_from_gram, ridge_from_gram, ridge_weights
from ddfast.dispatch import explain  # noqa: E402  (after the ops: they register themselves)

__all__ = [
    "ridge_weights",
    "krr_predict",
    "ridge_from_gram",
    "krr_predict_from_gram",
    "label_metagrad",
    "label_meta_loss",
    "LabelMetagrad",
    "ridge_label_metagrad",
    "ridge_logits",
    "split_model",
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
    "explain",
]
