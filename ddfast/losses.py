"""The losses the ops, distillers and evaluation regimes share.

* :func:`soft_cross_entropy` — CE against soft targets (LD's inner loss, label training);
* :func:`outer_loss` — mean CE on real examples with hard or soft targets (LD's L_out, eq. 1);
* :func:`kd_kl_loss` — temperature-scaled KL distillation loss (soft-labels supplement Table 1: SL, SL+KD).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_cross_entropy", "outer_loss", "kd_kl_loss", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE(softmax(z), t) = −Σ_c t_c log softmax(z)_c per row; ``t`` may be soft (not renormalised).

    Shape: ``logits``, ``target`` [N, C] → scalar (``"mean"``, ``"sum"``) or [N] (``"none"``).
    Equivalent PyTorch: ``F.cross_entropy(logits, target, reduction=...)`` with probability targets.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    per = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


def outer_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on real examples; ``y`` holds class indices ``[N]`` or soft targets ``[N, C]``."""
    if y.dtype in (torch.int64, torch.int32, torch.long):
        return F.cross_entropy(logits, y.long())
    return soft_cross_entropy(logits, y)


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 20.0) -> torch.Tensor:
    """Temperature-scaled distillation loss ``T² · (1/B) Σ_b KL(softmax(t_b/T) ‖ softmax(s_b/T))``.

    Shape: ``student_logits``, ``teacher_logits`` [B, C] → scalar. The T² factor keeps the gradient scale
    independent of T (Hinton et al.); seed Table 1 uses T = 20 for SL and SL+KD.

    Equivalent PyTorch: ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
    reduction="batchmean") * T * T``.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"teacher_logits: expected the student's shape [B, C] {list(student_logits.shape)}, "
                         f"got {list(teacher_logits.shape)}")
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.to(student_logits) / T, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * (T * T)
