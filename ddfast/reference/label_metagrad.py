"""Eager reference for the per-example label meta-gradient (label-distillation §3, Appendix B).

Second-order LD takes one inner SGD step on base examples x̃ with soft labels ỹ and scores the
stepped model on real examples (x, y):

    θ' = θ − α ∇θ L_in(θ; x̃, ỹ),     L_in = (1/N) Σᵢ CE(softmax f_θ(x̃ᵢ), ỹᵢ)     (eq. 1)
    L_out(ỹ) = L(f_θ'(x), y)

The reference differentiates L_out w.r.t. ỹ by backpropagating through the inner step
(``create_graph=True``): the truth the fused path is tested against.

Its closed form (no double backward): with zᵢ = f_θ(x̃ᵢ), pᵢ = softmax(zᵢ), the inner gradient is
(1/N) Σᵢ Jᵢᵀ(pᵢ 1ᵀỹᵢ − ỹᵢ), linear in ỹ, so with g' = ∇θ' L_out and vᵢ = Jᵢ g' (a JVP at θ)

    ∂L_out/∂ỹᵢ = (α/N) (vᵢ − (pᵢ·vᵢ) 1)                                              (*)

``head_residual_ref`` is (*) for a final linear layer z = W h + b, where vᵢ = G_W hᵢ + g_b + v_bodyᵢ.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ddfast.losses import outer_loss, soft_cross_entropy  # re-exported: the losses live in ddfast.losses

__all__ = ["soft_cross_entropy", "outer_loss", "label_metagrad_ref", "label_meta_loss_ref", "head_residual_ref"]


def label_metagrad_ref(model, x_base, y_soft, x_real, y_real, inner_lr, reduction="mean", return_all=False):
    """Outer loss L_out(ỹ) and ∂L_out/∂ỹ by backpropagating through the inner step.

    Args:
        model: an ``nn.Module``; its parameters are θ (buffers are used as they are).
        x_base: base examples x̃, ``[N, ...]``.  y_soft: soft labels ỹ, ``[N, C]``.
        x_real: real examples x, ``[M, ...]``.  y_real: class indices ``[M]`` or soft ``[M, C]``.
        inner_lr: α.  reduction: ``"mean"`` (1/N) or ``"sum"`` over the inner batch.
    Returns:
        ``(loss, grad)``: scalar L_out and ∂L_out/∂ỹ ``[N, C]``; with ``return_all`` also the inner
        loss, the inner gradient ∇θ L_in (dict by parameter name) and the stepped model's number of
        correct predictions on the real batch.
    """
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    y = y_soft.detach().requires_grad_(True)
    names = list(params)
    with torch.enable_grad():
        inner = soft_cross_entropy(functional_call(model, params, (x_base,)), y, reduction)
        g_in = torch.autograd.grad(inner, [params[k] for k in names], create_graph=True)
        stepped = {k: params[k] - inner_lr * g for k, g in zip(names, g_in)}
        buffers = dict(model.named_buffers())
        logits = functional_call(model, {**stepped, **buffers}, (x_real,))
        loss = outer_loss(logits, y_real)
        (grad,) = torch.autograd.grad(loss, y)
    if not return_all:
        return loss.detach(), grad
    correct = _correct(logits.detach(), y_real)
    return loss.detach(), grad, inner.detach(), {k: g.detach() for k, g in zip(names, g_in)}, correct


def label_meta_loss_ref(model, x_base, y_soft, x_real, y_real, inner_lr, reduction="mean"):
    """L_out(ỹ) as a differentiable function of ``y_soft`` (any order, any ``torch.func`` transform).

    The inner gradient is ``torch.func.grad`` of L_in at θ (functional: no leaves, no ``.item()``, no
    data-dependent branch), so ``vmap`` over label sets, ``jacrev`` / ``jacfwd`` / ``hessian`` w.r.t.
    ``y_soft`` and ``create_graph=True`` double backward all go through. Its gradient is
    ``label_metagrad_ref(...)[1]``. The parameters θ are the model's, detached (constants).
    """
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def inner(theta):
        z = functional_call(model, {**theta, **buffers}, (x_base,))
        if z.shape[-1] != y_soft.shape[-1]:
            raise ValueError(f"y_soft: the model outputs {z.shape[-1]} classes, but the labels have "
                             f"C = {y_soft.shape[-1]} columns")
        return soft_cross_entropy(z, y_soft, reduction)

    g_in = torch.func.grad(inner)(params)
    stepped = {k: params[k] - inner_lr * g_in[k] for k in params}
    return outer_loss(functional_call(model, {**stepped, **buffers}, (x_real,)), y_real)


def _correct(logits, y):
    target = y if y.dtype in (torch.int64, torch.int32) else y.argmax(-1)
    return int((logits.argmax(-1) == target).sum())


def head_residual_ref(H, GW, gb, Vb, Z, scale):
    """(*) for a final linear layer: out = scale·(v − (p·v)1), v = H G_Wᵀ + g_b + V_body, p = softmax(Z).

    Shape: H ``[N, d]``, GW ``[C, d]``, gb ``[C]`` or None, Vb ``[N, C]`` or None, Z ``[N, C]``.
    """
    v = H @ GW.transpose(-1, -2)
    if gb is not None:
        v = v + gb
    if Vb is not None:
        v = v + Vb
    p = torch.softmax(Z, dim=-1)
    return scale * (v - (p * v).sum(-1, keepdim=True))
