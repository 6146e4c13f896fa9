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
import os
from collections.abc import Callable, Iterator, Mapping
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ddfast import dispatch as _backends
from ddfast.ops._autograd import batch_first as _batch_first
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


class _RefKernels:
    """Plain torch (the reference formulas); differentiable by autograd itself."""

    name = "reference"

    @staticmethod
    def bilinear(A, G, V):
        return ghost_bilinear_ref(A, G, V)

    @staticmethod
    def norms(A, G, ghost):
        return ghost_norms_ref(A, G)

    @staticmethod
    def inner(A1, G1, A2, G2, ghost):
        return ghost_inner_ref(A1, G1, A2, G2)


class _CpuKernels:
    name = "cpu"

    @staticmethod
    def not_supported_reasons(device, dtype):
        ext, why = _backends._load_extension()
        reasons = [why] if ext is None else []
        if ext is not None and not hasattr(ext, "ghost_norms_fwd"):
            reasons.append("ddfast._C predates ghost_products; rebuild it")
        if device.type != "cpu":
            reasons.append(f"inputs are on {device}, the C++ CPU kernel takes CPU tensors")
        if dtype not in _FLOATS:
            reasons.append(f"dtype {dtype} not supported (float32/float64 only)")
        return reasons

    @staticmethod
    def bilinear(A, G, V):
        return _backends.extension().ghost_bilinear_fwd(A, G, V)

    @staticmethod
    def norms(A, G, ghost):
        return _backends.extension().ghost_norms_fwd(A, G, ghost)

    @staticmethod
    def inner(A1, G1, A2, G2, ghost):
        return _backends.extension().ghost_inner_fwd(A1, G1, A2, G2, ghost)


class _TritonKernels:
    name = "triton"

    @staticmethod
    def _module():
        from ddfast.kernels import ghost_products as mod

        return mod

    @classmethod
    def not_supported_reasons(cls, device, dtype):
        ok, why = _backends._triton_status()
        if not ok:
            return [why]
        try:
            mod = cls._module()
        except ImportError as exc:  # pragma: no cover - partial installs
            return [f"ddfast.kernels.ghost_products not importable: {exc}"]
        return list(mod.not_supported_reasons(torch.empty((1, 1, 1), dtype=dtype, device=device)))

    @classmethod
    def bilinear(cls, A, G, V):
        return cls._module().ghost_bilinear_fwd(A, G, V)

    @classmethod
    def norms(cls, A, G, ghost):
        return cls._module().ghost_norms_fwd(A, G, ghost)

    @classmethod
    def inner(cls, A1, G1, A2, G2, ghost):
        return cls._module().ghost_inner_fwd(A1, G1, A2, G2, ghost)


class _CudaKernels:
    name = "cuda"

    @staticmethod
    def not_supported_reasons(device, dtype):
        ext, why = _backends._load_extension()
        if ext is None:
            return [why]
        reasons = []
        if not getattr(ext, "with_cuda", False):
            reasons.append("ddfast._C was built without CUDA (DDFAST_CUDA=1)")
        elif not hasattr(ext, "ghost_norms_fwd_cuda"):
            reasons.append("ddfast._C predates ghost_products; rebuild it")
        if device.type != "cuda":
            reasons.append("inputs are not CUDA tensors")
        if dtype not in _FLOATS:
            reasons.append(f"dtype {dtype} not supported (float32/float64 only)")
        return reasons

    @staticmethod
    def _stream(t):
        return torch.cuda.current_stream(t.device).cuda_stream

    @classmethod
    def bilinear(cls, A, G, V):
        return _backends.extension().ghost_bilinear_fwd_cuda(A, G, V, cls._stream(A))

    @classmethod
    def norms(cls, A, G, ghost):
        return _backends.extension().ghost_norms_fwd_cuda(A, G, ghost, cls._stream(A))

    @classmethod
    def inner(cls, A1, G1, A2, G2, ghost):
        return _backends.extension().ghost_inner_fwd_cuda(A1, G1, A2, G2, ghost, cls._stream(A1))


_KERNELS = {"cpu": _CpuKernels, "triton": _TritonKernels, "cuda": _CudaKernels, "reference": _RefKernels}
_SELECT_CACHE: dict = {}


def _select(backend, device, dtype, op):
    key = (backend, os.environ.get("DDFAST_BACKEND"), device, dtype)
    name = _SELECT_CACHE.get(key)
    if name is None:
        candidates = {
            n: (lambda k=k: k.not_supported_reasons(device, dtype)) for n, k in _KERNELS.items() if n != "reference"
        }
        candidates["reference"] = lambda: []
        name = _backends.select(backend, candidates, op, on_gpu=device.type == "cuda")
        _SELECT_CACHE[key] = name
    return name


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
    name = _select(backend, A.device, A.dtype, "ghost_bilinear")
    if name == "reference":
        return ghost_bilinear_ref(A, G, V)
    return GhostBilinearFunction.apply(A, G, V, _KERNELS[name])


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
    name = _select(backend, A.device, A.dtype, "ghost_norms")
    if name == "reference":
        return ghost_norms_ref(A, G)
    return GhostNormsFunction.apply(A, G, ghost, _KERNELS[name])


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
    name = _select(backend, A1.device, A1.dtype, "ghost_inner")
    if name == "reference":
        return ghost_inner_ref(A1, G1, A2, G2)
    return GhostInnerFunction.apply(A1, G1, A2, G2, ghost, _KERNELS[name])


# --------------------------------------------------------------------------- layer capture


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm, _BatchNorm)):
        return "norm"
    return "generic"


def _uses_batch_stats(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and (
        module.training or not module.track_running_stats or module.running_mean is None
    )


def _unfold_rows(m: nn.Conv2d, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Patches of a Conv2d input as ``[N, P, K(+1)]``, stored per example as ``[K(+1), P]`` (unit stride
    along P, the layout of ``F.unfold`` and of conv output gradients): one strided copy of the padded
    input, the ones row of the bias written in place (no unfold + transpose + concatenate passes)."""
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    elif any(m.padding):
        ph, pw = m.padding
        x = F.pad(x, (pw, pw, ph, ph))
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sN, sC, sH, sW = x.stride()
    patches = x.as_strided((N, C, kh, kw, Ho, Wo), (sN, sC, sH * dh, sW * dw, sH * sh, sW * sw))
    K = C * kh * kw
    A = x.new_empty(N, K + int(bias), Ho * Wo)
    A[:, :K].view(N, C, kh, kw, Ho, Wo).copy_(patches)
    if bias:
        A[:, K].fill_(1)
    return A.transpose(1, 2)


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

    __slots__ = ("name", "module", "kind", "input", "output", "batch_size", "has_bias", "_extra")

    def __init__(self, name, module, kind, inp, output, extra=None):
        self.name, self.module, self.kind, self.input, self.output = name, module, kind, inp, output
        self.batch_size = inp.shape[0] if isinstance(inp, torch.Tensor) and inp.dim() else 0
        self.has_bias = getattr(module, "bias", None) is not None
        self._extra = extra or {}

    @property
    def A(self) -> torch.Tensor:
        """Layer inputs as rows ``[N, P, K(+1)]`` (Linear/Conv2d only), built on each access from the
        saved input: Linear ``P = ∏`` of the middle dims, ``K = in_features``; Conv2d ``P = H_out·W_out``,
        ``K = C_in·kh·kw`` in the order of ``weight.reshape(O, -1)``; a ones column last with a bias."""
        m, x = self.module, self.input
        N = x.shape[0]
        if self.kind == "conv2d":
            return _unfold_rows(m, x, self.has_bias)
        if self.kind != "linear":
            raise ValueError(f"A: defined for Linear / Conv2d records, not {self.kind!r} ({self.name!r})")
        A = x.reshape(N, -1, m.in_features)
        if self.has_bias:
            A = torch.cat([A, A.new_ones(A.shape[0], A.shape[1], 1)], dim=2)
        return A

    def G(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. :attr:`output` as rows ``[N, P, O]`` matching :attr:`A`."""
        N = self.batch_size
        if self.kind == "linear":
            return grad.reshape(N, -1, self.module.out_features)
        if self.kind == "conv2d":
            return grad.reshape(N, grad.shape[1], -1).transpose(1, 2)
        raise ValueError(f"G: defined for Linear / Conv2d records, not {self.kind!r} ({self.name!r})")

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
        return [r for r in self.records if r.kind in ("linear", "conv2d")]

    def output_grads(self, loss: torch.Tensor, records=None, retain_graph: bool = False) -> list[torch.Tensor]:
        """∂loss/∂output for each record (zeros where the loss does not depend on it); no weight
        gradients are formed."""
        records = self.records if records is None else records
        gs = torch.autograd.grad(loss, [r.output for r in records], retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(r.output) if g is None else g for r, g in zip(records, gs)]


def _capturable(module: nn.Module, include: str) -> bool:
    if include == "ghost":
        return _kind(module) in ("linear", "conv2d")
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
        if per_example and _uses_batch_stats(module):
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
        kind = _kind(module)
        inp = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(inp, torch.Tensor):
            raise ValueError(f"model: module {name!r} was called without a tensor input")
        extra = {}
        if kind == "norm" and isinstance(module, _BatchNorm):
            extra["stats"] = (module.running_mean.detach(), module.running_var.detach())
        if kind not in ("linear", "conv2d") or not all(
            p.requires_grad for p in (module.weight, module.bias) if p is not None
        ):  # the torch.func fallback re-runs the module on one example at a time
            extra["args"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            extra["kwargs"] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            extra["params"] = {k: p.detach() for k, p in module.named_parameters(recurse=False)}
            extra["buffers"] = {k: b.detach() for k, b in module.named_buffers(recurse=False)}
        tap = torch.zeros((), dtype=output.dtype, device=output.device).expand(output.shape).requires_grad_()
        cap.records.append(LayerRecord(name, module, kind, inp.detach(), tap, extra))
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


def _weight_matrix(module: nn.Module, weight, bias) -> torch.Tensor:
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
    if _kind(module) not in ("linear", "conv2d"):
        raise ValueError(f"module: expected nn.Linear or nn.Conv2d (groups=1), got {type(module).__name__}")
    if isinstance(tensors, Mapping):
        weight, bias = tensors.get(prefix + "weight"), tensors.get(prefix + "bias")
    elif isinstance(tensors, (tuple, list)) and len(tensors) == 2:
        weight, bias = tensors
    else:
        raise TypeError("tensors: expected a (weight, bias) pair or a mapping of parameter names to tensors")
    return _weight_matrix(module, weight, bias)


# --------------------------------------------------------------------------- model level


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
        if _kind(m) == "generic" and any(True for _ in m.children()):
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


def _norm_grads(rec: LayerRecord, g: torch.Tensor, local: dict) -> dict:
    """Per-example gradients of a norm layer's affine parameters from its input and output gradient:
    dγ_n = Σ_{non-channel} g ⊙ x̂, dβ_n = Σ_{non-channel} g, x̂ recomputed from the saved input."""
    m, x = rec.module, rec.input
    if isinstance(m, nn.GroupNorm):
        xh = F.group_norm(x, m.num_groups, None, None, m.eps)
        dims = tuple(range(2, x.dim()))
    elif isinstance(m, nn.LayerNorm):
        xh = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        dims = tuple(range(1, x.dim() - len(m.normalized_shape)))
    else:  # BatchNorm with running statistics
        mean, var = rec._extra["stats"]
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


def _generic_grads(rec: LayerRecord, g: torch.Tensor, local: dict) -> dict:
    """Per-example gradients of a leaf module's parameters by torch.func (vmap over a VJP of the module
    applied to one example); the module must treat the examples of a batch independently."""
    m, N = rec.module, rec.batch_size
    args, kwargs = rec._extra["args"], rec._extra["kwargs"]
    params = {k: v for k, v in rec._extra["params"].items() if k in local}
    frozen = {k: v for k, v in rec._extra["params"].items() if k not in local}
    buffers = rec._extra["buffers"]
    batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == N for a in args]
    tensors = [a for a, b in zip(args, batched) if b]

    def one(gn, *xs):
        it = iter(xs)
        full = tuple(next(it).unsqueeze(0) if b else a for a, b in zip(args, batched))

        def f(p):
            return functional_call(m, {**p, **frozen, **buffers}, full, kwargs)

        _, vjp_fn = torch.func.vjp(f, params)
        return vjp_fn(gn.unsqueeze(0))[0]

    return dict(torch.func.vmap(one)(g, *tensors))


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
        if rec.kind in ("linear", "conv2d") and "weight" in local:
            # a frozen bias: its ones column belongs to no trainable parameter
            grp.rows.append((rec, g, rec.has_bias and "bias" not in local))
            continue
        per = _norm_grads(rec, g, local) if rec.kind == "norm" else _generic_grads(rec, g, local)
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected a non-empty batch tensor [N, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(v, Mapping):
        raise TypeError(f"v: expected a mapping of parameter names to tensors, got {type(v).__name__}")
    keys = _param_keys(model)
    state = _state(model, params)
    ghost_mods = {m for m in keys if _kind(m) in ("linear", "conv2d")}
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
            V = _weight_matrix(r.module, w, b if "bias" in local else None).to(dtype=g.dtype, device=g.device)
            total += ghost_bilinear(r.A, r.G(g), V, backend=backend).sum()
        for k, g in zip(other, gs[len(recs) :]):
            if g is not None and k in v:
                total += (g * v[k].to(g)).sum()
    return total
