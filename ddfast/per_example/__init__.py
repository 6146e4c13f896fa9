"""Per-example gradient quantities of a whole model, one module per layer kind.

* :mod:`.registry` — :class:`LayerKind`, ``@register(nn.Module type)`` and :func:`kind_of` (opacus
  ``grad_sample`` style: a new layer kind is a registered class, not a branch in a switch);
* :mod:`.linear`, :mod:`.conv`, :mod:`.norm`, :mod:`.generic` — the registered kinds (Linear and Conv2d
  rows for the ghost kernels; exact norm-layer formulas; the torch.func fallback);
* :mod:`.capture` — :func:`capture_layers`, :class:`LayerRecord`, :func:`layer_weight_matrix`;
* :mod:`.model` — :func:`per_example_grad_norms`, :func:`per_example_grad_inner`, :func:`grad_dot`.

The layer-level ops (``ghost_bilinear``, ``ghost_norms``, ``ghost_inner``) live in
:mod:`ddfast.ops.ghost_products`, which re-exports these names.
"""

from ddfast.per_example.registry import LayerKind, kind_of, register, registered
from ddfast.per_example import conv, generic, linear, norm  # noqa: F401,E402 (register the kinds)
from ddfast.per_example.capture import LayerCapture, LayerRecord, capture_layers, layer_weight_matrix
from ddfast.per_example.model import grad_dot, per_example_grad_inner, per_example_grad_norms

__all__ = ["LayerKind", "register", "kind_of", "registered", "LayerCapture", "LayerRecord", "capture_layers",
           "layer_weight_matrix", "per_example_grad_norms", "per_example_grad_inner", "grad_dot"]
