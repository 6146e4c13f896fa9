"""Eager reference for checkpoint-gradient inner products (effect-alignment §3.2, eq. 5 and eq. 7).

For saved training checkpoints θ_t (t = t₁ … t_m), a probe batch P, a real batch D_t and a synthetic
set S (images s_i, soft labels ŷ_i):

    r_t = ⟨∇θ L(P, θ_t), ∇θ L(D_t, θ_t)⟩          s_t = ⟨∇θ L(P, θ_t), ∇θ L(S, θ_t)⟩

L is the mean cross-entropy; on S it is the soft cross-entropy against q_i = softmax(ŷ_i)
(``label_mode="logits"``, the soft labels are a teacher's logits, Algorithm 1) or against ŷ_i itself
(``label_mode="probs"``). The effect-alignment loss of eq. 7 is

    R̂(D, S) = | (1 − α) Σ_t r_t − Σ_t s_t |,        α = (|G| − |A|) / (|D| − |G| + |A|)   (eq. 4)

The reference takes ∇θ L(S, θ_t) with ``torch.func.grad`` (differentiable, like ``create_graph=True``)
and differentiates s_t w.r.t. S by a second backward (double backward); the graphs of every checkpoint
stay alive until the caller's backward, so its memory grows with t_m. The truth the fused path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = [
    "checkpoint_grad_inner_ref",
    "effect_alignment_loss",
    "replacement_alpha",
    "synthetic_targets",
    "synthetic_loss",
    "real_loss",
]


def real_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on a real batch; ``y`` holds class indices ``[N]`` or soft rows ``[N, C]``."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(logits, y.long())
    return -(y * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def synthetic_targets(soft_labels: torch.Tensor, label_mode: str = "logits") -> torch.Tensor:
    """q = softmax(ŷ) (``"logits"``) or ŷ itself (``"probs"``)."""
    if label_mode == "logits":
        return torch.softmax(soft_labels, dim=-1)
    if label_mode == "probs":
        return soft_labels
    raise ValueError(f"label_mode: expected 'logits' or 'probs', got {label_mode!r}")


def synthetic_loss(logits: torch.Tensor, soft_labels: torch.Tensor, label_mode: str = "logits") -> torch.Tensor:
    """L(S, θ) = (1/|S|) Σ_i −Σ_c q_ic log softmax(z_i)_c."""
    q = synthetic_targets(soft_labels, label_mode)
    return -(q * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def replacement_alpha(n_real: int, n_removed: int, n_added: int) -> float:
    """α = (|G| − |A|) / (|D| − |G| + |A|) of eq. 4."""
    denom = n_real - n_removed + n_added
    if denom <= 0:
        raise ValueError(f"replacement_alpha: |D| − |G| + |A| must be positive, got {n_real} − {n_removed} + {n_added}")
    return (n_removed - n_added) / denom


def effect_alignment_loss(inner_real: torch.Tensor, inner_syn: torch.Tensor, coefficient: float) -> torch.Tensor:
    """|coefficient · Σ_t r_t − Σ_t s_t| (eq. 7 with coefficient = 1 − α)."""
    return (coefficient * inner_real.sum() - inner_syn.sum()).abs()


def _split_state(model: nn.Module, state: Mapping[str, torch.Tensor]):
    names = [k for k, _ in model.named_parameters()]
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(f"checkpoints: state has no parameter {missing[0]!r} of the model (another architecture?)")
    params = {}
    for k, p in model.named_parameters():
        t = state[k]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"checkpoints: parameter {k!r} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)} "
                "(a checkpoint of another architecture?)"
            )
        params[k] = t.to(device=p.device, dtype=p.dtype)
    buffers = {k: state[k].to(b.device) if k in state else b for k, b in model.named_buffers()}
    return params, buffers


def checkpoint_grad_inner_ref(
    model: nn.Module,
    checkpoints: Iterable[Mapping[str, torch.Tensor]],
    probe: tuple[torch.Tensor, torch.Tensor],
    real: tuple[torch.Tensor, torch.Tensor] | None,
    images: torch.Tensor,
    soft_labels: torch.Tensor,
    label_mode: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-checkpoint ``(r, s)``, each ``[t_m]``; ``s`` carries the autograd graph to ``images`` and
    ``soft_labels`` (double backward), ``r`` is detached (zeros when ``real`` is None).

    Args:
        model: the network; its parameters are replaced by each checkpoint's (buffers too, when present).
        checkpoints: state dicts θ_t (parameters, optionally buffers).
        probe: (x_P, y_P).  real: (x_D, y_D) or None.
        images: synthetic images ``[|S|, ...]``.  soft_labels: ``[|S|, C]``.
    """
    x_p, y_p = probe
    r_all, s_all = [], []
    with torch.enable_grad():
        for state in checkpoints:
            params, buffers = _split_state(model, state)
            theta = {k: t.detach() for k, t in params.items()}

            def loss_at(th, x, y, syn=False):
                logits = functional_call(model, {**th, **buffers}, (x,))
                return synthetic_loss(logits, y, label_mode) if syn else real_loss(logits, y)

            # torch.func.grad (functional, no leaves): the gradients stay differentiable w.r.t. images and
            # soft labels under autograd and every torch.func transform.
            v = torch.func.grad(loss_at)(theta, x_p, y_p)
            if real is not None:
                g_d = torch.func.grad(loss_at)(theta, real[0], real[1])
                r_all.append(sum((v[k] * g_d[k]).sum() for k in theta).detach())
            else:
                r_all.append(x_p.new_zeros((), dtype=next(iter(theta.values())).dtype))
            g_s = torch.func.grad(loss_at)(theta, images, soft_labels, True)
            s_all.append(sum((v[k] * g_s[k]).sum() for k in theta))
    if not s_all:
        raise ValueError("checkpoints: expected at least one checkpoint, got none")
    return torch.stack(r_all), torch.stack(s_all)
