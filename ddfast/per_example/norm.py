"""Norm layers (GroupNorm, LayerNorm, eval-mode BatchNorm): exact per-example affine gradients
dγ_n = Σ_{non-channel} g ⊙ x̂, dβ_n = Σ_{non-channel} g, x̂ recomputed from the saved input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ddfast.per_example.registry import LayerKind, register


def uses_batch_stats(module: nn.Module) -> bool:
    """A BatchNorm that normalises with batch statistics (couples the examples)."""
    return isinstance(module, _BatchNorm) and (
        module.training or not module.track_running_stats or module.running_mean is None
    )


@register(nn.GroupNorm, nn.LayerNorm, _BatchNorm)
class NormKind(LayerKind):
    name = "norm"

    def capture_extra(self, module: nn.Module) -> dict:
        if isinstance(module, _BatchNorm):
            return {"stats": (module.running_mean.detach(), module.running_var.detach())}
        return {}

    def grads(self, record, grad: torch.Tensor, local: dict) -> dict:
        m, x, g = record.module, record.input, grad
        if isinstance(m, nn.GroupNorm):
            xh = F.group_norm(x, m.num_groups, None, None, m.eps)
            dims = tuple(range(2, x.dim()))
        elif isinstance(m, nn.LayerNorm):
            xh = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
            dims = tuple(range(1, x.dim() - len(m.normalized_shape)))
        else:  # BatchNorm with running statistics
            mean, var = record._extra["stats"]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            xh = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + m.eps)
            dims = tuple(range(2, x.dim()))
        out = {}
        if "weight" in local:
            gx = g * xh
            out["weight"] = gx.sum(dims) if dims else gx
        if "bias" in local:
            out["bias"] = g.sum(dims) if dims else g
        return out
