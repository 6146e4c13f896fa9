"""Any other leaf module holding parameters: per-example gradients by torch.func (vmap over a VJP of the
module applied to one example); the module must treat the examples of a batch independently."""

from __future__ import annotations

import torch
from torch.func import functional_call

from ddfast.per_example.registry import LayerKind, register


@register(fallback=True)
class GenericKind(LayerKind):
    name = "generic"

    def grads(self, record, grad: torch.Tensor, local: dict) -> dict:
        m, N = record.module, record.batch_size
        args, kwargs = record._extra["args"], record._extra["kwargs"]
        params = {k: v for k, v in record._extra["params"].items() if k in local}
        frozen = {k: v for k, v in record._extra["params"].items() if k not in local}
        buffers = record._extra["buffers"]
        batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == N for a in args]
        tensors = [a for a, b in zip(args, batched) if b]

        def one(gn, *xs):
            it = iter(xs)
            full = tuple(next(it).unsqueeze(0) if b else a for a, b in zip(args, batched))

            def f(p):
                return functional_call(m, {**p, **frozen, **buffers}, full, kwargs)

            _, vjp_fn = torch.func.vjp(f, params)
            return vjp_fn(gn.unsqueeze(0))[0]

        return dict(torch.func.vmap(one)(grad, *tensors))

