"""``nn.Linear``: rows A = the input ``[N, P, in_features(+1)]``, G = the output gradient ``[N, P, out]``."""

from __future__ import annotations

import torch
from torch import nn

from ddfast.per_example.registry import LayerKind, register


@register(nn.Linear)
class LinearKind(LayerKind):
    name = "linear"
    ghost = True

    def rows(self, record) -> torch.Tensor:
        m, x = record.module, record.input
        A = x.reshape(x.shape[0], -1, m.in_features)
        if record.has_bias:
            A = torch.cat([A, A.new_ones(A.shape[0], A.shape[1], 1)], dim=2)
        return A

    def output_rows(self, record, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(record.batch_size, -1, record.module.out_features)
