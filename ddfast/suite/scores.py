"""Fair scores beside raw accuracy (the spirit of DD-Ranking and of the soft-labels study: separate what the
data contributes from what soft labels, a teacher and augmentation contribute). Formulas in ``docs/suite.md``.

Notation: A_r^a(S) is the mean test accuracy (%) of the students trained on set S under regime r
(``hl``, ``sl``, ``sl+kd``, ``finetune``, ``linear``) with augmentation a (``default`` or ``none``);
R is a class-balanced random real subset of the same size, same seed and same evaluation settings.
Every score is in accuracy points (%); positive = better than the reference.
"""

from __future__ import annotations

import math

__all__ = ["mean_std", "gain_over_random", "gain_std", "soft_label_gain", "kd_gain", "augmentation_gain",
           "augmentation_robustness", "worst_gain"]


def mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation (as ``ddfast.evaluate.train.mean_std``); NaN for no values."""
    v = [float(x) for x in values]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def gain_over_random(acc_set: float, acc_random: float) -> float:
    """G_r^a(S) = A_r^a(S) − A_r^a(R): the points the set adds over random real images of the same size,
    under the same regime and augmentation."""
    return acc_set - acc_random


def gain_std(std_set: float, n_set: int, std_random: float, n_random: int) -> float:
    """Standard error of G: sqrt(s_S² / n_S + s_R² / n_R) (independent student seeds)."""
    if n_set < 1 or n_random < 1:
        return math.nan
    return math.sqrt(std_set ** 2 / n_set + std_random ** 2 / n_random)


def soft_label_gain(acc_sl: float, acc_hl: float) -> float:
    """L(S) = A_sl(S) − A_hl(S): what soft labels (the method's own, else the teacher's) add to the same images."""
    return acc_sl - acc_hl


def kd_gain(acc_slkd: float, acc_sl: float) -> float:
    """K(S) = A_{sl+kd}(S) − A_sl(S): what a teacher relabelling every augmented view adds beyond fixed soft labels."""
    return acc_slkd - acc_sl


def augmentation_gain(acc_aug: float, acc_noaug: float) -> float:
    """Δ_r(S) = A_r^default(S) − A_r^none(S): how much of the accuracy under regime r comes from augmentation."""
    return acc_aug - acc_noaug


def augmentation_robustness(gain_aug: float, gain_noaug: float) -> float:
    """ρ_r(S) = min(G_r^default(S), G_r^none(S)): the gain over random that survives switching augmentation
    on or off (a set that only wins with one augmentation setting is credited with the smaller gain)."""
    return min(gain_aug, gain_noaug)


def worst_gain(gains) -> float:
    """W(S) = min over the evaluated regimes r of G_r^default(S): the gain over random the set keeps whatever
    label regime it is used in (NaN when no regime has a baseline)."""
    g = [x for x in gains if x is not None and not math.isnan(x)]
    return min(g) if g else math.nan
