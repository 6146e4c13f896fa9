"""Layer capture: forward hooks that record each layer call's input and a gradient tap on its output.

:func:`capture_layers` records every call of the captured modules; a :class:`LayerRecord` turns the
saved input and the output gradient into the rows A / G of its layer kind
(:mod:`ddfast.per_example.registry`), and :func:`layer_weight_matrix` lays out parameter-shaped tensors
as V ``[O, K(+1)]`` matching A's columns, for :func:`ddfast.ops.ghost_products.ghost_bilinear`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ddfast.per_example.norm import uses_batch_stats
from ddfast.per_example.registry import kind_of

__all__ = ["LayerRecord", "LayerCapture", "capture_layers", "layer_weight_matrix", "weight_matrix"]


class LayerRecord:
    """One call of a captured module during a forward.

    Attributes:
        name: the module's name in the model (``""`` for the model itself).
        module: the module.  kind: ``"linear" | "conv2d" | "norm" | "generic"``.
        input: the module's (first) input, detached.  batch_size: N (dim 0 of the input).
        output: the tensor to differentiate: ∂loss/∂``output`` is ∂loss/∂(the module's output), shape of
            the output. It is a zero-valued gradient tap (a broadcast view) that the hook adds to the
            output, so it stays the right gradient target even when later modules work in place, and it
            holds no activation memory.
        has_bias: the layer has a bias (A gets a ones column).
    """

    __slots__ = ("name", "module", "kind", "layer", "input", "output", "batch_size", "has_bias", "_extra")

    def __init__(self, name, module, layer, inp, output, extra=None):
        self.name, self.module, self.layer, self.input, self.output = name, module, layer, inp, output
        self.kind = layer.name
        self.batch_size = inp.shape[0] if isinstance(inp, torch.Tensor) and inp.dim() else 0
        self.has_bias = getattr(module, "bias", None) is not None
        self._extra = extra or {}

    @property
    def A(self) -> torch.Tensor:
        """Layer inputs as rows ``[N, P, K(+1)]`` (Linear/Conv2d only), built on each access from the
        saved input: Linear ``P = ∏`` of the middle dims, ``K = in_features``; Conv2d ``P = H_out·W_out``,
        ``K = C_in·kh·kw`` in the order of ``weight.reshape(O, -1)``; a ones column last with a bias."""
        return self.layer.rows(self)

    def G(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. :attr:`output` as rows ``[N, P, O]`` matching :attr:`A`."""
        return self.layer.output_rows(self, grad)

    def __repr__(self):
        return f"LayerRecord(name={self.name!r}, kind={self.kind!r}, N={self.batch_size}, output={tuple(self.output.shape)})"


class LayerCapture:
    """The records of one forward under :func:`capture_layers` (in call order)."""

    def __init__(self):
        self.records: list[LayerRecord] = []
        self.active = True

    @property
    def ghost_records(self) -> list[LayerRecord]:
        """Records of Linear / Conv2d (groups=1) calls: the ones with :attr:`LayerRecord.A`."""
        return [r for r in self.records if r.layer.ghost]

    def output_grads(self, loss: torch.Tensor, records=None, retain_graph: bool = False) -> list[torch.Tensor]:
        """∂loss/∂output for each record (zeros where the loss does not depend on it); no weight
        gradients are formed."""
        records = self.records if records is None else records
        gs = torch.autograd.grad(loss, [r.output for r in records], retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(r.output) if g is None else g for r, g in zip(records, gs)]


def _capturable(module: nn.Module, include: str) -> bool:
    if include == "ghost":
        return kind_of(module).ghost
    return any(p.requires_grad for p in module.parameters(recurse=False))


@contextlib.contextmanager
def capture_layers(model: nn.Module, include: str = "ghost", *, per_example: bool = False) -> Iterator[LayerCapture]:
    """Record layer inputs and gradient taps on layer outputs during a forward.

    Usage::

        with capture_layers(model) as cap:
            loss = F.cross_entropy(model(x), y, reduction="sum")
        grads = cap.output_grads(loss)                      # one backward, no weight gradients
        for rec, g in zip(cap.records, grads):
            A, G = rec.A, rec.G(g)                          # [N, P, K(+1)], [N, P, O]
            V = layer_weight_matrix(rec.module, (v_weight, v_bias))
            dots = ghost_bilinear(A, G, V)                  # ⟨v, ∇ℓ_n⟩ for this layer

    Args:
        model: the network; forward hooks go on its submodules (and on it) for the ``with`` block.
        include: ``"ghost"``: ``nn.Linear`` and ``nn.Conv2d`` with ``groups=1`` (any stride, padding,
            dilation, padding mode); ``"all"``: every module that directly holds a parameter with
            ``requires_grad``.
        per_example: raise ``ValueError`` when a BatchNorm uses batch statistics (training mode, or no
            running statistics): they couple the examples, so per-example gradients are not defined.
    Yields: a :class:`LayerCapture`; a module called k times gives k records. Grad mode must be on.
    """
    if include not in ("ghost", "all"):
        raise ValueError(f"include: expected 'ghost' or 'all', got {include!r}")
    cap = LayerCapture()
    names = {}
    for n, m in model.named_modules():
        names.setdefault(m, n)

    def hook(module, args, kwargs, output):
        if not cap.active:
            return None
        name = names.get(module, "?")
        if per_example and uses_batch_stats(module):
            raise ValueError(
                f"model: BatchNorm {name!r} normalises with batch statistics (training mode or "
                "track_running_stats=False), which couples the examples: per-example gradients are not "
                "defined. Call model.eval() (running statistics) or use a per-example norm (GroupNorm/"
                "LayerNorm/instance norm)."
            )
        if module not in capturable:  # a parameter-free BatchNorm, hooked for the check above
            return None
        if not torch.is_grad_enabled():
            raise RuntimeError("capture_layers: grad mode is off (torch.no_grad); the gradient taps need it")
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise ValueError(f"model: module {name!r} returns {type(output).__name__}, expected a float tensor")
        layer = kind_of(module)
        inp = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(inp, torch.Tensor):
            raise ValueError(f"model: module {name!r} was called without a tensor input")
        extra = dict(layer.capture_extra(module))
        if not layer.ghost or not all(
            p.requires_grad for p in (module.weight, module.bias) if p is not None
        ):  # the torch.func fallback re-runs the module on one example at a time
            extra["args"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            extra["kwargs"] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            extra["params"] = {k: p.detach() for k, p in module.named_parameters(recurse=False)}
            extra["buffers"] = {k: b.detach() for k, b in module.named_buffers(recurse=False)}
        tap = torch.zeros((), dtype=output.dtype, device=output.device).expand(output.shape).requires_grad_()
        cap.records.append(LayerRecord(name, module, layer, inp.detach(), tap, extra))
        return output + tap

    # decided before the forward: under functional_call a module's parameters are replaced by the caller's
    capturable = {m for m in names if _capturable(m, include)}
    hooked = [m for m in names if m in capturable or (per_example and isinstance(m, _BatchNorm))]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in hooked]
    try:
        yield cap
    finally:
        cap.active = False
        for h in handles:
            h.remove()


def weight_matrix(module: nn.Module, weight, bias) -> torch.Tensor:
    O = module.weight.shape[0]
    K = module.weight[0].numel()
    ref = module.weight
    w = weight if weight is not None else None
    if w is not None and w.numel() != O * K:
        raise ValueError(f"weight: expected {tuple(module.weight.shape)} (the layer's weight), got {tuple(w.shape)}")
    cols = [(w.reshape(O, K) if w is not None else ref.new_zeros(O, K)).detach()]
    if module.bias is not None:
        if bias is not None and bias.numel() != O:
            raise ValueError(f"bias: expected [{O}] (the layer's bias), got {tuple(bias.shape)}")
        b = bias.reshape(O, 1).detach() if bias is not None else cols[0].new_zeros(O, 1)
        cols.append(b.to(cols[0].dtype))
    return torch.cat(cols, 1) if len(cols) > 1 else cols[0]


def layer_weight_matrix(module: nn.Module, tensors, prefix: str = "") -> torch.Tensor:
    """Lay out parameter-shaped tensors of a Linear / Conv2d as V ``[O, K(+1)]`` matching A's columns.

    Args:
        module: an ``nn.Linear`` or ``nn.Conv2d`` (groups=1).
        tensors: a pair ``(weight, bias)`` (bias may be None), or a mapping holding ``prefix + "weight"``
            and ``prefix + "bias"`` (e.g. per-parameter gradient vectors by name with
            ``prefix="features.0."``). A missing entry counts as zero.
    Returns: ``[weight.reshape(O, -1) | bias]`` (the bias column only when the layer has a bias), so
    that ``ghost_bilinear(rec.A, rec.G(g), V)`` is ⟨(weight, bias), ∇ℓ_n⟩ for the layer.
    """
    if not kind_of(module).ghost:
        raise ValueError(f"module: expected nn.Linear or nn.Conv2d (groups=1), got {type(module).__name__}")
    if isinstance(tensors, Mapping):
        weight, bias = tensors.get(prefix + "weight"), tensors.get(prefix + "bias")
    elif isinstance(tensors, (tuple, list)) and len(tensors) == 2:
        weight, bias = tensors
    else:
        raise TypeError("tensors: expected a (weight, bias) pair or a mapping of parameter names to tensors")
    return weight_matrix(module, weight, bias)
