"""Choosing a setting on validation data and reporting test accuracy once.

Every experiment that picks something — an objective, a learning rate, t_m, a window of scores — scores
the candidates on the *validation* split, keeps the best, and only then scores the chosen candidate on
the test split, once. :func:`choose_on_validation` is that protocol; the test split is never seen by the
choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["Selection", "choose_on_validation", "SPLITS"]

SPLITS = ("val", "test")


@dataclass
class Selection:
    """The chosen candidate, every candidate's validation score, and the chosen one's test score."""

    chosen: object
    val_scores: dict = field(default_factory=dict)
    test_score: float = float("nan")

    @property
    def val_score(self) -> float:
        return self.val_scores[self.chosen]


def choose_on_validation(candidates: Iterable, score: Callable[[object, str], float], *,
                         higher_is_better: bool = True) -> Selection:
    """Score every candidate with ``score(candidate, "val")``, keep the best (ties: the first), then call
    ``score(chosen, "test")`` once.

    Args:
        candidates: hashable settings (names, tuples of hyper-parameters, ...).
        score: ``(candidate, split) -> float`` with ``split`` in ``("val", "test")``.
        higher_is_better: accuracy (True) or a loss / error (False).
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates: expected at least one candidate")
    val = {}
    for c in candidates:
        v = float(score(c, "val"))
        if v != v:
            raise ValueError(f"score: validation score of {c!r} is NaN")
        val[c] = v
    sign = 1.0 if higher_is_better else -1.0
    chosen = max(candidates, key=lambda c: (sign * val[c], -candidates.index(c)))
    return Selection(chosen=chosen, val_scores=val, test_score=float(score(chosen, "test")))
