"""Training fresh models on distilled data and scoring them."""

from ddfast.evaluate.train import (
    EvalResult,
    TrainSettings,
    accuracy,
    choose_steps,
    evaluate_labels,
    mean_std,
    steps_grid,
    train_on_labels,
)

__all__ = ["EvalResult", "TrainSettings", "accuracy", "choose_steps", "evaluate_labels", "mean_std", "steps_grid", "train_on_labels"]
