"""Model-level per-example quantities without per-example gradients: norms, pairwise inner products,
and ⟨v, ∇θ L⟩ (:func:`per_example_grad_norms`, :func:`per_example_grad_inner`, :func:`grad_dot`).

One forward under :func:`ddfast.per_example.capture.capture_layers` and one backward to the gradient taps;
each captured layer contributes through its registered kind (:mod:`ddfast.per_example.registry`): ghost
kinds (Linear, Conv2d) through the ghost-product kernels of :mod:`ddfast.ops.ghost_products`, dense kinds
(norm layers, the torch.func fallback) through their per-example gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from ddfast.per_example.capture import capture_layers, weight_matrix
from ddfast.per_example.registry import kind_of
from ddfast.reference.ghost_products import per_example_losses

__all__ = ["per_example_grad_norms", "per_example_grad_inner", "grad_dot"]

_FLOATS = (torch.float32, torch.float64)


def _param_keys(model: nn.Module) -> dict:
    """{module: tuple of (local name, canonical full name)} for its directly held trainable parameters.

    Parameters shared between modules (tied weights) get one canonical name; two modules with the same
    key are grouped (their rows concatenate along P), a partial overlap is an error.
    """
    canonical = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), full)
    keys, owner = {}, {}
    for mname, m in model.named_modules():
        local = [(n, canonical[id(p)]) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        if not local:
            continue
        keys[m] = tuple(local)
        names = tuple(c for _, c in local)
        for _, c in local:
            if c in owner and owner[c] != names:
                raise ValueError(
                    f"model: parameter {c!r} is shared by modules with different parameter sets; per-example "
                    "gradients of such ties are not supported"
                )
            owner[c] = names
        if kind_of(m).name == "generic" and any(True for _ in m.children()):
            raise ValueError(
                f"model: module {mname or type(m).__name__!r} holds parameters {[n for n, _ in local]} and has "
                "submodules; per-example gradients are computed for parameters of leaf modules (Linear, Conv2d, "
                "norms, or any leaf module through torch.func)"
            )
    return keys


def _state(model, params):
    """Parameter values (detached, no grad: the taps carry the backward) and buffers for functional_call."""
    params = dict(params) if params is not None else {}
    state = {k: params.get(k, p).detach() for k, p in model.named_parameters()}
    for k, b in model.named_buffers():
        state[k] = params.get(k, b)
    return state


def _validate_batch(model, x, y, xn="x", yn="y"):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"{xn}: expected a batch tensor [N, ...], got {type(x).__name__}")
    N = x.shape[0]
    if N == 0:
        raise ValueError(f"{xn}: the batch is empty (N = 0)")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{yn}: expected a tensor, got {type(y).__name__}")
    if y.dtype in (torch.int64, torch.int32):
        if tuple(y.shape) != (N,):
            raise ValueError(f"{yn}: expected class indices of shape [{N}] (one per row of {xn}), got {tuple(y.shape)}")
    elif y.dtype in _FLOATS:
        if y.dim() != 2 or y.shape[0] != N:
            raise ValueError(f"{yn}: expected soft labels of shape [{N}, C], got {tuple(y.shape)}")
    else:
        raise TypeError(f"{yn}: expected int64 class indices [N] or float soft labels [N, C], got {y.dtype}")


class _Group:
    """The per-example gradient of one parameter set over the calls of its module(s): Linear / Conv2d
    rows, built only when a product asks for them (one layer's A alive at a time), or dense per-example
    gradients ``[N, D]`` (norm layers, torch.func fallback)."""

    def __init__(self, N: int):
        self.N = N
        self.rows: list = []  # (record, output gradient, drop the bias column)
        self.dense_parts: list = []

    @property
    def kind(self) -> str:
        return "dense" if self.dense_parts else "ghost"

    def AG(self):
        """(A, G) with the rows of every call concatenated along P (W_n sums over calls)."""
        As, Gs = [], []
        for rec, g, drop_bias in self.rows:
            A = rec.A
            As.append(A[..., :-1] if drop_bias else A)
            Gs.append(rec.G(g))
        if len(As) == 1:
            return As[0], Gs[0]
        return torch.cat(As, 1), torch.cat(Gs, 1)

    def dense(self) -> torch.Tensor:
        total = None
        for d in self.dense_parts:
            total = d if total is None else total + d
        if self.rows:
            A, G = self.AG()
            d = torch.einsum("npo,npk->nok", G, A).reshape(self.N, -1)
            total = d if total is None else total + d
        return total


def _per_example_pass(model, x, y, loss, params):
    """One forward + one backward to the taps; returns ({parameter key: _Group}, output dtype)."""
    keys = _param_keys(model)
    state = _state(model, params)
    with torch.enable_grad(), capture_layers(model, "all", per_example=True) as cap:
        out = functional_call(model, state, (x,))
        losses = per_example_losses(out, y, loss)
    cap.active = False
    if not cap.records:
        return {}, out.dtype
    with torch.enable_grad():
        grads = cap.output_grads(losses.sum())
    N = x.shape[0]
    groups: dict = {}
    for rec, g in zip(cap.records, grads):
        if rec.batch_size != N:
            raise ValueError(
                f"model: module {rec.name!r} saw a batch of {rec.batch_size} rows, expected {N} (the examples must "
                "be dim 0 of every layer input)"
            )
        key = tuple(c for _, c in keys[rec.module])
        local = dict(keys[rec.module])
        grp = groups.setdefault(key, _Group(N))
        if rec.layer.ghost and "weight" in local:
            # a frozen bias: its ones column belongs to no trainable parameter
            grp.rows.append((rec, g, rec.has_bias and "bias" not in local))
            continue
        per = rec.layer.grads(rec, g, local)
        grp.dense_parts.append(torch.cat([per[n].reshape(N, -1) for n, _ in keys[rec.module] if n in per], 1))
    return groups, out.dtype


def _chunks(x, y, chunk):
    N = x.shape[0]
    step = N if not chunk or chunk >= N else int(chunk)
    for s in range(0, N, step):
        yield x[s : s + step], y[s : s + step]


def per_example_grad_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | Callable = "ce",
    *,
    squared: bool = True,
    params: Mapping[str, torch.Tensor] | None = None,
    algorithm: str = "auto",
    chunk: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-example gradient norms ‖∇θ ℓ(f(x_n), y_n)‖ over all trainable parameters of ``model``.

    The loss convention is the sum of per-example losses, L = Σ_n ℓ_n, so the gradient taken per
    example is that of ℓ_n itself (no 1/N). Linear / Conv2d parameters go through :func:`ghost_norms`
    (no per-example gradient is formed); GroupNorm / LayerNorm / eval-mode BatchNorm affine parameters
    through exact per-example formulas (dγ_n = Σ g ⊙ x̂, dβ_n = Σ g); any other leaf module holding
    parameters through ``torch.func`` (vmap over its VJP; it must treat examples independently).

    Args:
        model: the network (not modified; its parameters may be replaced by ``params``).
        x: inputs ``[N, ...]``; y: class indices ``[N]`` or soft labels ``[N, C]``.
        loss: ``"ce"`` (cross-entropy; soft CE −Σ y log softmax for soft labels) or a callable
            ``loss(logits, y) -> [N]`` of per-example losses.
        squared: return ‖·‖² (default) or ‖·‖.
        params: parameter (and buffer) values by name to use instead of the model's own.
        algorithm: ``"auto" | "ghost" | "materialize"`` for every Linear / Conv2d layer.
        chunk: examples per forward/backward (bounds activation memory); None: the whole batch.
        backend: ghost-product kernels, as :func:`ghost_bilinear` (``"reference"``: plain torch).
    Returns: ``[N]``.
    Raises: ValueError for a BatchNorm using batch statistics (training mode), malformed inputs,
        or parameters held by a non-leaf module.
    Equivalent PyTorch: ``ddfast.reference.ghost_products.per_example_grad_norms_ref`` (a batch-of-1 loop).
    """
    from ddfast.ops.ghost_products import ghost_norms

    _validate_batch(model, x, y)
    ghost_norms_args = dict(algorithm=algorithm, backend=backend)
    parts = []
    for xc, yc in _chunks(x, y, chunk):
        groups, dtype = _per_example_pass(model, xc, yc, loss, params)
        total = torch.zeros(xc.shape[0], dtype=dtype, device=xc.device)
        with torch.no_grad():
            for grp in groups.values():
                if grp.kind == "ghost":
                    total += ghost_norms(*grp.AG(), **ghost_norms_args)
                else:
                    total += grp.dense().pow(2).sum(1)
        parts.append(total)
    total = torch.cat(parts) if len(parts) > 1 else parts[0]
    return total if squared else total.sqrt()


def per_example_grad_inner(
    model: nn.Module,
    x1: torch.Tensor,
    y1: torch.Tensor,
    x2: torch.Tensor | None = None,
    y2: torch.Tensor | None = None,
    loss: str | Callable = "ce",
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    algorithm: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Pairwise inner products ⟨∇θ ℓ(x1_n, y1_n), ∇θ ℓ(x2_m, y2_m)⟩ of per-example gradients.

    Arguments and conventions as :func:`per_example_grad_norms`; ``x2, y2`` default to ``x1, y1``
    (the Gram matrix of per-example gradients; its diagonal is the squared norms). Linear / Conv2d
    layers go through :func:`ghost_inner`.
    Returns: ``[N1, N2]``.
    Equivalent PyTorch: ``ddfast.reference.ghost_products.per_example_grad_inner_ref``.
    """
    from ddfast.ops.ghost_products import ghost_inner

    _validate_batch(model, x1, y1, "x1", "y1")
    if (x2 is None) != (y2 is None):
        raise ValueError("x2, y2: give both or neither")
    if x2 is not None:
        _validate_batch(model, x2, y2, "x2", "y2")
    g1, dtype = _per_example_pass(model, x1, y1, loss, params)
    g2 = g1 if x2 is None else _per_example_pass(model, x2, y2, loss, params)[0]
    N2 = x1.shape[0] if x2 is None else x2.shape[0]
    out = torch.zeros(x1.shape[0], N2, dtype=dtype, device=x1.device)
    with torch.no_grad():
        for key, a in g1.items():
            b = g2.get(key)
            if b is None:
                continue
            if a.kind == "ghost" and b.kind == "ghost":
                A1, G1 = a.AG()
                A2, G2 = (A1, G1) if b is a else b.AG()  # the same tensors: kernels reuse W blocks
                out += ghost_inner(A1, G1, A2, G2, algorithm=algorithm, backend=backend)
                del A1, G1, A2, G2
            else:
                da = a.dense()
                db = da if b is a else b.dense()
                out += da @ db.transpose(0, 1)
    return out


def grad_dot(
    model: nn.Module,
    params: Mapping[str, torch.Tensor] | None,
    v: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str | Callable = "ce",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """⟨v, ∇θ L⟩ for L = ``loss(f(x), y)`` without forming the weight gradients of Linear / Conv2d layers.

    Linear / Conv2d (groups=1) parameters: Σ_n :func:`ghost_bilinear` of the layer's rows with
    ``V = layer_weight_matrix(v)`` (exact for any scalar loss, also with train-mode BatchNorm); all other
    trainable parameters: their gradient from the same backward, dotted with v.

    Args:
        model: the network.  params: parameter (and buffer) values by name, or None for the model's own.
        v: a tensor per trainable parameter name, parameter-shaped (missing names count as zero).
        x: inputs ``[N, ...]``; y: labels for ``loss``.
        loss: ``"ce"`` (summed cross-entropy, as :func:`per_example_grad_norms`) or a callable
            ``loss(logits, y)`` returning a scalar (used as is, e.g. a batch mean) or per-example
            losses ``[N]`` (summed).
        backend: ghost-product kernels, as :func:`ghost_bilinear`.
    Returns: a 0-dim tensor (detached).
    Equivalent PyTorch: ``ddfast.reference.ghost_products.grad_dot_ref``.
    """
    from ddfast.ops.ghost_products import ghost_bilinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch tensor [N, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(v, Mapping):
        raise TypeError(f"v: expected a mapping of parameter names to tensors, got {type(v).__name__}")
    keys = _param_keys(model)
    state = _state(model, params)
    ghost_mods = {m for m in keys if kind_of(m).ghost}
    ghost_names = {c for m in ghost_mods for _, c in keys[m]}
    other = [k for k, p in model.named_parameters() if p.requires_grad and k not in ghost_names]
    leaves = {k: state[k].clone().requires_grad_(True) for k in other}
    with torch.enable_grad():
        with capture_layers(model, "ghost") as cap:
            out = functional_call(model, {**state, **leaves}, (x,))
        L = per_example_losses(out, y, loss).sum() if isinstance(loss, str) else loss(out, y)
        if not isinstance(L, torch.Tensor):
            raise ValueError(f"loss: expected a tensor, got {type(L).__name__}")
        L = L.sum()
        recs = [r for r in cap.records if r.module in ghost_mods]
        targets = [r.output for r in recs] + [leaves[k] for k in other]
        gs = torch.autograd.grad(L, targets, allow_unused=True) if targets else []
    total = torch.zeros((), dtype=out.dtype, device=out.device)
    with torch.no_grad():
        for r, g in zip(recs, gs[: len(recs)]):
            if g is None:
                continue
            local = dict(keys[r.module])
            w, b = v.get(local.get("weight", "")), v.get(local.get("bias", ""))
            if w is None and b is None:
                continue
            V = weight_matrix(r.module, w, b if "bias" in local else None).to(dtype=g.dtype, device=g.device)
            total += ghost_bilinear(r.A, r.G(g), V, backend=backend).sum()
        for k, g in zip(other, gs[len(recs) :]):
            if g is not None and k in v:
                total += (g * v[k].to(g)).sum()
    return total
