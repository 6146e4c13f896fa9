"""Choosing real examples as a source subset: the Random and K-means baselines (krr-st-selfsup §4.1) and
class-balanced coresets — Random, K-Centers, EL2N / EL2N-SL, GraNd, Forgetting, score windows and
CAD-Prune (soft-labels-hard-truths supp. §1.3, §4, §8.5)."""

from ddfast.select.coresets import (
    cad_prune,
    compute_aligned_epochs,
    count_forgetting,
    el2n_from_logits,
    el2n_scores,
    el2n_sl_from_logits,
    el2n_sl_scores,
    examples_seen,
    forgetting_scores,
    forgetting_scores_from_trajectory,
    grand_scores,
    k_centers,
    model_features,
    random_coreset,
    select_by_score,
)
from ddfast.select.kmeans import kmeans_select, random_select

__all__ = [
    "kmeans_select",
    "random_select",
    "random_coreset",
    "k_centers",
    "model_features",
    "el2n_from_logits",
    "el2n_sl_from_logits",
    "el2n_scores",
    "el2n_sl_scores",
    "grand_scores",
    "count_forgetting",
    "forgetting_scores",
    "forgetting_scores_from_trajectory",
    "select_by_score",
    "examples_seen",
    "cad_prune",
    "compute_aligned_epochs",
]
