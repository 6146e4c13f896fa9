"""Per-layer-kind rules of the per-example machinery, registered by module type (opacus ``grad_sample`` style).

A :class:`LayerKind` says how one kind of module contributes per-example gradients:

* *ghost* kinds (``nn.Linear``, ``nn.Conv2d`` with groups = 1) expose their inputs as rows A ``[N, P, K(+1)]``
  and their output gradients as rows G ``[N, P, O]`` (``rows`` / ``output_rows``), so that the ghost kernels
  (:mod:`ddfast.ops.ghost_products`) form norms and inner products without per-example gradients;
* *dense* kinds (norm layers, and the torch.func fallback for any other leaf module) return the
  per-example gradients of their parameters ``{local name: [N, ...]}`` (``grads``).

``@register(nn.SomeModule)`` on a :class:`LayerKind` subclass adds a kind; :func:`kind_of` looks a module
up along its class's MRO (so subclasses inherit their base's rule), asks ``accepts(module)``, and falls
back to the generic (torch.func) kind.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LayerKind", "register", "kind_of", "registered"]

_REGISTRY: dict[type, "LayerKind"] = {}
_FALLBACK: list = []


class LayerKind:
    """How one kind of module yields per-example gradients (see the module docstring)."""

    name = "generic"
    ghost = False  # rows A / G for the ghost kernels (else dense per-example gradients)

    def accepts(self, module: nn.Module) -> bool:
        return True

    def rows(self, record) -> torch.Tensor:
        raise ValueError(f"A: defined for Linear / Conv2d records, not {self.name!r} ({record.name!r})")

    def output_rows(self, record, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"G: defined for Linear / Conv2d records, not {self.name!r} ({record.name!r})")

    def capture_extra(self, module: nn.Module) -> dict:
        """What the forward hook saves beyond the input (e.g. a BatchNorm's running statistics)."""
        return {}

    def grads(self, record, grad: torch.Tensor, local: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


def register(*module_types: type, fallback: bool = False):
    """Class decorator: register an instance of the :class:`LayerKind` subclass for ``module_types``
    (``fallback=True``: the kind of every module no registered type accepts)."""

    def deco(cls):
        kind = cls()
        for t in module_types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(f"register: expected nn.Module subclasses, got {t!r}")
            _REGISTRY[t] = kind
        if fallback:
            _FALLBACK[:] = [kind]
        return cls

    return deco


def kind_of(module: nn.Module) -> LayerKind:
    """The registered kind of ``module`` (nearest registered class in its MRO that accepts it), else the fallback."""
    for t in type(module).__mro__:
        kind = _REGISTRY.get(t)
        if kind is not None and kind.accepts(module):
            return kind
    if not _FALLBACK:  # the layer modules register themselves on import
        import ddfast.per_example  # noqa: F401
    return _FALLBACK[0]


def registered() -> dict:
    """``{module type: kind name}`` of every registration."""
    return {t: k.name for t, k in _REGISTRY.items()}
