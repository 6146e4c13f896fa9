"""Ghost products: per-example gradient norms, inner products and bilinear forms without per-example gradients.

For an ``nn.Linear`` or ``nn.Conv2d`` layer, example n contributes rows ``A[n, p, :]`` (the layer input;
for a convolution the unfolded patch of output position p; a ones column last when the layer has a
bias) and receives output gradients ``G[n, p, :]``. Its gradient w.r.t. the weight matrix
``[weight.reshape(O, -1) | bias]`` is

    W_n = Σ_p G[n, p, :] A[n, p, :]ᵀ ∈ R^{O×K}

and three products of it are computed without forming all W_n:

* :func:`ghost_bilinear` — ``⟨V, W_n⟩ = Σ_p G[n,p]ᵀ V A[n,p]``, ``[N]`` (its sum is ⟨V, ∇_W Σ_n ℓ_n⟩);
* :func:`ghost_norms`    — ``‖W_n‖_F²``, ``[N]``;
* :func:`ghost_inner`    — ``⟨W1_n, W2_m⟩``, ``[N1, N2]``.

``ghost_norms`` / ``ghost_inner`` run one of two algorithms: *ghost*, the Gram identity
``‖W_n‖² = Σ_{p,q} (G_n G_nᵀ)_{pq} (A_n A_nᵀ)_{pq}`` (cost ∝ P²(O+K)), or *materialize*, W_n formed a
tile / a block of examples at a time (cost ∝ P·O·K); ``algorithm="auto"`` takes the one with fewer
multiply-adds (:func:`ghost_is_cheaper`).

The model-level helpers are what callers use: :func:`capture_layers` records A and a gradient tap on
each layer's output during a forward; one ``torch.autograd.grad`` w.r.t. the taps gives every G (no
weight-gradient GEMM is run); :func:`per_example_grad_norms`, :func:`per_example_grad_inner` and
:func:`grad_dot` assemble the per-parameter products, with exact per-example formulas for the affine
parameters of GroupNorm / LayerNorm / eval-mode BatchNorm and ``torch.func.vmap`` for any other leaf
module that holds parameters.

Used by coreset scores (GraNd: E‖∇ℓ_n‖) and the checkpoint-gradient op (``real_mode="ghost"``).
Seed: ghost clipping (Goodfellow 2015; Li et al. 2022; opacus ``GradSampleModuleFastGradientClipping``).
Equivalent PyTorch: :mod:`ddfast.reference.ghost_products`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ddfast import dispatch as _backends
from ddfast.ops._autograd import batch_first as _batch_first
from ddfast.ops._autograd import compile_apply, select_backend
from ddfast.reference.ghost_products import (
    ghost_bilinear_ref,
    ghost_inner_ref,
    ghost_norms_ref,
    per_example_losses,
)

__all__ = [
    "ALGORITHMS",
    "GhostBilinearFunction",
    "GhostInnerFunction",
    "GhostNormsFunction",
    "LayerCapture",
    "LayerRecord",
    "capture_layers",
    "ghost_bilinear",
    "ghost_inner",
    "ghost_is_cheaper",
    "ghost_norms",
    "grad_dot",
    "layer_weight_matrix",
    "per_example_grad_inner",
    "per_example_grad_norms",
]

ALGORITHMS = ("auto", "ghost", "materialize")
_FLOATS = (torch.float32, torch.float64)

# --------------------------------------------------------------------------- backends


def _triton():
    from ddfast.kernels import ghost_products

    return ghost_products


_COMPILED = dict(
    bilinear=lambda A, G, V: torch.ops.ddfast.ghost_bilinear_fwd(A, G, V),
    norms=lambda A, G, ghost: torch.ops.ddfast.ghost_norms_fwd(A, G, ghost),
    inner=lambda A1, G1, A2, G2, ghost: torch.ops.ddfast.ghost_inner_fwd(A1, G1, A2, G2, ghost),
)


def _describe(A, *args, **_):
    return {"device": A.device, "dtype": A.dtype}


GHOST_PRODUCTS = _backends.register_op(
    "ghost_products",
    [
        _backends.Impl("cuda", _backends.Kernels("cuda", **_COMPILED), dtypes=_FLOATS),
        _backends.Impl("triton", _backends.Kernels(
            "triton",
            bilinear=lambda A, G, V: _triton().ghost_bilinear_fwd(A, G, V),
            norms=lambda A, G, ghost: _triton().ghost_norms_fwd(A, G, ghost),
            inner=lambda A1, G1, A2, G2, ghost: _triton().ghost_inner_fwd(A1, G1, A2, G2, ghost)), dtypes=_FLOATS),
        _backends.Impl("cpu", _backends.Kernels("cpu", **_COMPILED), dtypes=_FLOATS),
        # Plain torch (the reference formulas), differentiable by autograd itself.
        _backends.Impl("reference", _backends.Kernels(
            "reference",
            bilinear=lambda A, G, V: ghost_bilinear_ref(A, G, V),
            norms=lambda A, G, ghost: ghost_norms_ref(A, G),
            inner=lambda A1, G1, A2, G2, ghost: ghost_inner_ref(A1, G1, A2, G2))),
    ],
    describe={"ghost_bilinear": _describe, "ghost_norms": _describe, "ghost_inner": _describe},
)
_KERNELS = {name: impl.kernels for name, impl in GHOST_PRODUCTS.impls.items()}


def _select(backend, device, dtype, op):
    return _backends.select_for(GHOST_PRODUCTS, backend, {"device": device, "dtype": dtype})


# --------------------------------------------------------------------------- algorithm choice


def ghost_is_cheaper(P: int, O: int, K: int, N1: int | None = None, P2: int | None = None, N2: int | None = None) -> bool:
    """Whether the ghost (Gram) algorithm needs fewer multiply-adds than materializing W_n.

    Norms (``N1`` None): ghost ``P(P+1)/2 · (O+K)`` (the Grams are symmetric) vs materialize
    ``P·O·K`` per example, i.e. ghost iff ``(P+1)(O+K) ≤ 2·O·K``. (opacus' rule ``2P² ≤ O·K`` compares
    memory; here both paths work in bounded tiles, so the flop count decides.)
    Inner products of ``N1`` examples with ``P`` rows against ``N2`` with ``P2`` rows: ghost
    ``N1·N2·P·P2·(O+K)`` vs materialize ``(N1·P + N2·P2 + N1·N2)·O·K``.
    """
    if N1 is None:
        return (P + 1) * (O + K) <= 2 * O * K
    P2 = P if P2 is None else P2
    N2 = N1 if N2 is None else N2
    return N1 * N2 * P * P2 * (O + K) <= (N1 * P + N2 * P2 + N1 * N2) * O * K


def _ghost_flag(algorithm, *args) -> bool:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "auto":
        return ghost_is_cheaper(*args)
    return algorithm == "ghost"


# --------------------------------------------------------------------------- validation


def _check_rows(name: str, t, last: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of shape [N, P, {last}], got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a tensor of shape [N, P, {last}], got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected float32 or float64, got {t.dtype}")


def _check_pair(A, G, an="A", gn="G"):
    _check_rows(an, A, "K")
    _check_rows(gn, G, "O")
    if G.shape[:2] != A.shape[:2]:
        raise ValueError(
            f"{gn}: expected output gradients of shape [N, P, O] with N, P = {A.shape[0]}, {A.shape[1]} "
            f"(from {an}), got {tuple(G.shape)}"
        )
    if G.dtype != A.dtype:
        raise TypeError(f"{gn}: expected dtype {A.dtype} (the dtype of {an}), got {G.dtype}")
    if G.device != A.device:
        raise ValueError(f"{gn}: expected device {A.device} (the device of {an}), got {G.device}")


# --------------------------------------------------------------------------- autograd Functions
#
# Forwards run the selected kernel; backwards are plain torch (bmm / einsum) on every backend, so they
# are differentiable again: double backward is exact. Forward mode (jvp) reuses the multilinear
# kernels (bilinear, inner) or plain torch (norms); vmap folds the vmapped dimension into the batch
# dimension N (a per-batch V, or both sides of ``ghost_inner`` batched, loop over the vmapped batch).


class GhostBilinearFunction(torch.autograd.Function):
    """out[n] = Σ_p G[n,p]ᵀ V A[n,p].  Backward (plain torch), with c = ∂L/∂out:

    ∂A[n,p] = c_n Vᵀ G[n,p],   ∂G[n,p] = c_n V A[n,p],   ∂V = Σ_{n,p} c_n G[n,p] A[n,p]ᵀ.

    Forward mode: out is trilinear in (A, G, V), so out_t = B(A_t, G, V) + B(A, G_t, V) + B(A, G, V_t).
    """

    @staticmethod
    def forward(A, G, V, kernels):
        return kernels.bilinear(A, G, V)

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, G, V, kernels = inputs
        ctx.save_for_backward(A, G, V)
        ctx.save_for_forward(A, G, V)
        ctx.kernels = kernels

    @staticmethod
    def backward(ctx, c):
        A, G, V = ctx.saved_tensors
        cw = c[:, None, None]
        dA = cw * (G @ V) if ctx.needs_input_grad[0] else None
        dG = cw * (A @ V.transpose(0, 1)) if ctx.needs_input_grad[1] else None
        dV = None
        if ctx.needs_input_grad[2]:
            O, K = V.shape
            dV = (G * cw).reshape(-1, O).transpose(0, 1) @ A.reshape(-1, K)
        return dA, dG, dV, None

    @staticmethod
    def jvp(ctx, At, Gt, Vt, _kernels_t):
        A, G, V = ctx.saved_tensors
        terms = [GhostBilinearFunction.apply(a, g, v, ctx.kernels)
                 for a, g, v in ((At, G, V), (A, Gt, V), (A, G, Vt)) if a is not None and g is not None and v is not None]
        return _sum_terms(terms, A.shape[0], A)

    @staticmethod
    def vmap(info, in_dims, A, G, V, kernels):
        B = info.batch_size
        A_, G_ = _batch_first(A, in_dims[0], B), _batch_first(G, in_dims[1], B)
        if in_dims[2] is None:
            out = GhostBilinearFunction.apply(A_.flatten(0, 1), G_.flatten(0, 1), V, kernels)
            return out.unflatten(0, (B, -1)), 0
        V_ = V.movedim(in_dims[2], 0)
        return torch.stack([GhostBilinearFunction.apply(A_[b], G_[b], V_[b], kernels) for b in range(B)]), 0


class GhostNormsFunction(torch.autograd.Function):
    """out[n] = ‖W_n‖_F².  Backward (plain torch), c = ∂L/∂out, by the forward's algorithm:

    ghost:        ∂A_n = 2c_n (G_n G_nᵀ) A_n,   ∂G_n = 2c_n (A_n A_nᵀ) G_n     (N·P² memory)
    materialize:  ∂A_n = 2c_n G_n W_n,          ∂G_n = 2c_n A_n W_nᵀ            (N·O·K memory)

    Forward mode (plain torch): out_t = 2⟨W_n, G_tᵀA_n + G_nᵀA_t⟩ = 2Σ (G_t G_nᵀ)⊙(A_nA_nᵀ) + 2Σ (G_nG_nᵀ)⊙(A_t A_nᵀ).
    """

    @staticmethod
    def forward(A, G, ghost, kernels):
        return kernels.norms(A, G, ghost)

    @staticmethod
    def setup_context(ctx, inputs, output):
        A, G, ghost, kernels = inputs
        ctx.save_for_backward(A, G)
        ctx.save_for_forward(A, G)
        ctx.ghost, ctx.kernels = ghost, kernels

    @staticmethod
    def backward(ctx, c):
        A, G = ctx.saved_tensors
        need_a, need_g = ctx.needs_input_grad[:2]
        cw = 2 * c[:, None, None]
        dA = dG = None
        if ctx.ghost:
            if need_a:
                dA = cw * ((G @ G.transpose(1, 2)) @ A)
            if need_g:
                dG = cw * ((A @ A.transpose(1, 2)) @ G)
        else:
            W = G.transpose(1, 2) @ A  # [N, O, K]
            if need_a:
                dA = cw * (G @ W)
            if need_g:
                dG = cw * (A @ W.transpose(1, 2))
        return dA, dG, None, None

    @staticmethod
    def jvp(ctx, At, Gt, _ghost_t, _kernels_t):
        A, G = ctx.saved_tensors
        terms = []
        if ctx.ghost:
            if Gt is not None:
                terms.append(2 * ((Gt @ G.transpose(1, 2)) * (A @ A.transpose(1, 2))).sum((1, 2)))
            if At is not None:
                terms.append(2 * ((G @ G.transpose(1, 2)) * (At @ A.transpose(1, 2))).sum((1, 2)))
        else:
            W = G.transpose(1, 2) @ A
            if Gt is not None:
                terms.append(2 * (W * (Gt.transpose(1, 2) @ A)).sum((1, 2)))
            if At is not None:
                terms.append(2 * (W * (G.transpose(1, 2) @ At)).sum((1, 2)))
        return _sum_terms(terms, A.shape[0], A)

    @staticmethod
    def vmap(info, in_dims, A, G, ghost, kernels):
        B = info.batch_size
        A_, G_ = _batch_first(A, in_dims[0], B), _batch_first(G, in_dims[1], B)
        out = GhostNormsFunction.apply(A_.flatten(0, 1), G_.flatten(0, 1), ghost, kernels)
        return out.unflatten(0, (B, -1)), 0


class GhostInnerFunction(torch.autograd.Function):
    """out[n, m] = ⟨W1_n, W2_m⟩.  Backward (plain torch, W materialized), c = ∂L/∂out:

    D1_n = Σ_m c_nm W2_m,  ∂A1_n = G1_n D1_n,  ∂G1_n = A1_n D1_nᵀ   (and symmetrically for batch 2).

    Forward mode: out is multilinear in (A1, G1, A2, G2): the sum of four kernel calls with one tangent each.
    """

    @staticmethod
    def forward(A1, G1, A2, G2, ghost, kernels):
        return kernels.inner(A1, G1, A2, G2, ghost)

    @staticmethod
    def setup_context(ctx, inputs, output):
        A1, G1, A2, G2, ghost, kernels = inputs
        ctx.save_for_backward(A1, G1, A2, G2)
        ctx.save_for_forward(A1, G1, A2, G2)
        ctx.ghost, ctx.kernels = ghost, kernels

    @staticmethod
    def backward(ctx, c):
        A1, G1, A2, G2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        O, K = G1.shape[2], A1.shape[2]
        grads = [None] * 4
        if need[0] or need[1]:
            W2 = (G2.transpose(1, 2) @ A2).reshape(G2.shape[0], O * K)
            D1 = (c @ W2).reshape(-1, O, K)
            grads[0] = G1 @ D1 if need[0] else None
            grads[1] = A1 @ D1.transpose(1, 2) if need[1] else None
        if need[2] or need[3]:
            W1 = (G1.transpose(1, 2) @ A1).reshape(G1.shape[0], O * K)
            D2 = (c.transpose(0, 1) @ W1).reshape(-1, O, K)
            grads[2] = G2 @ D2 if need[2] else None
            grads[3] = A2 @ D2.transpose(1, 2) if need[3] else None
        return (*grads, None, None)

    @staticmethod
    def jvp(ctx, A1t, G1t, A2t, G2t, _ghost_t, _kernels_t):
        primal = ctx.saved_tensors
        terms = []
        for i, t in enumerate((A1t, G1t, A2t, G2t)):
            if t is not None:
                args = list(primal)
                args[i] = t
                terms.append(GhostInnerFunction.apply(*args, ctx.ghost, ctx.kernels))
        N1, N2 = primal[0].shape[0], primal[2].shape[0]
        return terms[0] if len(terms) == 1 else (sum(terms[1:], terms[0]) if terms else primal[0].new_zeros(N1, N2))

    @staticmethod
    def vmap(info, in_dims, A1, G1, A2, G2, ghost, kernels):
        B = info.batch_size
        left, right = in_dims[0] is not None or in_dims[1] is not None, in_dims[2] is not None or in_dims[3] is not None
        if left and not right:
            A1_, G1_ = _batch_first(A1, in_dims[0], B), _batch_first(G1, in_dims[1], B)
            out = GhostInnerFunction.apply(A1_.flatten(0, 1), G1_.flatten(0, 1), A2, G2, ghost, kernels)
            return out.unflatten(0, (B, -1)), 0
        if right and not left:
            A2_, G2_ = _batch_first(A2, in_dims[2], B), _batch_first(G2, in_dims[3], B)
            out = GhostInnerFunction.apply(A1, G1, A2_.flatten(0, 1), G2_.flatten(0, 1), ghost, kernels)
            return out.unflatten(1, (B, -1)), 1
        xs = [_batch_first(t, d, B) for t, d in zip((A1, G1, A2, G2), in_dims[:4])]
        return torch.stack([GhostInnerFunction.apply(*(x[b] for x in xs), ghost, kernels) for b in range(B)]), 0


# The Functions' apply for eager mode and torch.compile (ddfast.ops._autograd.compile_apply).
_apply_bilinear = compile_apply(GhostBilinearFunction)
_apply_norms = compile_apply(GhostNormsFunction)
_apply_inner = compile_apply(GhostInnerFunction)


def _backend_name(backend, device, dtype, op):
    """The selected backend; under torch.compile a constant of the graph (``select_backend``)."""
    return select_backend(GHOST_PRODUCTS, backend, {"device": device, "dtype": dtype})


def _sum_terms(terms, n, like):
    if not terms:
        return like.new_zeros(n)
    return terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])


# --------------------------------------------------------------------------- layer-level API


def ghost_bilinear(A: torch.Tensor, G: torch.Tensor, V: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Per-example bilinear form ⟨V, W_n⟩ of the per-example weight gradients.

    Args:
        A: layer inputs ``[N, P, K]``; G: output gradients ``[N, P, O]``; V: ``[O, K]`` (e.g. a direction
            in weight space laid out as :func:`layer_weight_matrix`); one float dtype, one device,
            any strides.
        backend: ``"auto" | "fused" | "cpu" | "triton" | "cuda" | "reference"``.
    Returns:
        ``out[n] = Σ_p G[n,p]ᵀ V A[n,p]``, ``[N]``; ``out.sum()`` is ⟨V, Σ_n W_n⟩. Differentiable w.r.t.
        A, G and V (the backward is plain torch on every backend).
    Cost: N·P·O·K multiply-adds, no N·O·K intermediate.
    Equivalent PyTorch: ``ddfast.reference.ghost_products.ghost_bilinear_ref``.
    """
    _check_pair(A, G)
    if not isinstance(V, torch.Tensor) or V.shape != (G.shape[2], A.shape[2]):
        got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
        raise ValueError(f"V: expected shape [O, K] = [{G.shape[2]}, {A.shape[2]}] (O from G, K from A), got {got}")
    if V.dtype != A.dtype:
        raise TypeError(f"V: expected dtype {A.dtype} (the dtype of A), got {V.dtype}")
    if V.device != A.device:
        raise ValueError(f"V: expected device {A.device} (the device of A), got {V.device}")
    name = _backend_name(backend, A.device, A.dtype, "ghost_bilinear")
    if name == "reference":
        return ghost_bilinear_ref(A, G, V)
    return _apply_bilinear(A, G, V, _KERNELS[name])


def ghost_norms(A: torch.Tensor, G: torch.Tensor, *, algorithm: str = "auto", backend: str = "auto") -> torch.Tensor:
    """Squared Frobenius norms ‖W_n‖² of the per-example weight gradients W_n = Σ_p G[n,p] A[n,p]ᵀ.

    Args:
        A: ``[N, P, K]``; G: ``[N, P, O]``; one float dtype and device, any strides.
        algorithm: ``"ghost"`` (Σ (G_nG_nᵀ) ⊙ (A_nA_nᵀ)), ``"materialize"`` (W_n in tiles, one example at
            a time) or ``"auto"`` (fewer multiply-adds, :func:`ghost_is_cheaper`).
        backend: as :func:`ghost_bilinear`.
    Returns: ``[N]``; differentiable w.r.t. A and G (plain-torch backward).
    Equivalent PyTorch: ``ddfast.reference.ghost_products.ghost_norms_ref``.
    """
    _check_pair(A, G)
    N, P, K = A.shape
    ghost = _ghost_flag(algorithm, P, G.shape[2], K)
    name = _backend_name(backend, A.device, A.dtype, "ghost_norms")
    if name == "reference":
        return ghost_norms_ref(A, G)
    return _apply_norms(A, G, ghost, _KERNELS[name])


def ghost_inner(
    A1: torch.Tensor,
    G1: torch.Tensor,
    A2: torch.Tensor,
    G2: torch.Tensor,
    *,
    algorithm: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """Inner products ⟨W1_n, W2_m⟩ of per-example weight gradients of two batches through one layer.

    Args:
        A1 ``[N1, P1, K]``, G1 ``[N1, P1, O]``, A2 ``[N2, P2, K]``, G2 ``[N2, P2, O]``: one float dtype and
            device (P1 and P2 may differ, e.g. two image sizes).
        algorithm: ``"ghost"`` (Σ_{p,q} (G1_nG2_mᵀ) ⊙ (A1_nA2_mᵀ), GEMM tiles over rows),
            ``"materialize"`` (W in bounded blocks of examples, then one GEMM) or ``"auto"``.
        backend: as :func:`ghost_bilinear`.
    Returns: ``[N1, N2]``; differentiable w.r.t. all four inputs (plain-torch backward).
    Equivalent PyTorch: ``ddfast.reference.ghost_products.ghost_inner_ref``.
    """
    _check_pair(A1, G1, "A1", "G1")
    _check_pair(A2, G2, "A2", "G2")
    if A2.shape[2] != A1.shape[2]:
        raise ValueError(f"A2: expected [N2, P2, K] with K = {A1.shape[2]} (from A1), got {tuple(A2.shape)}")
    if G2.shape[2] != G1.shape[2]:
        raise ValueError(f"G2: expected [N2, P2, O] with O = {G1.shape[2]} (from G1), got {tuple(G2.shape)}")
    if A2.dtype != A1.dtype or A2.device != A1.device:
        raise TypeError(f"A2: expected dtype {A1.dtype} on {A1.device} (as A1), got {A2.dtype} on {A2.device}")
    N1, P1, K = A1.shape
    N2, P2 = A2.shape[:2]
    ghost = _ghost_flag(algorithm, P1, G1.shape[2], K, N1, P2, N2)
    name = _backend_name(backend, A1.device, A1.dtype, "ghost_inner")
    if name == "reference":
        return ghost_inner_ref(A1, G1, A2, G2)
    return _apply_inner(A1, G1, A2, G2, ghost, _KERNELS[name])


# --------------------------------------------------------------------------- model level
# Layer capture and the model-level per-example quantities live in ddfast.per_example (one module per
# layer kind, registered by module type); re-exported here for the callers of this module.

from ddfast.per_example import (  # noqa: E402
    LayerCapture,
    LayerRecord,
    capture_layers,
    grad_dot,
    layer_weight_matrix,
    per_example_grad_inner,
    per_example_grad_norms,
)
