"""Class-balanced coresets of the real training set: Random, K-Centers, EL2N / EL2N-SL, GraNd, Forgetting,
score windows (EL2N-Best) and CAD-Prune (soft-labels-hard-truths supp. §1.3, §4, §8.5).

Every selector returns int64 indices into the training set, exactly ``ipc`` per class for the classes
``0 .. num_classes-1`` (default ``num_classes = max(y) + 1``), grouped class by class (class 0 first)
and sorted ascending within a class, so the result depends only on the inputs and ``seed``.
``ipc < 1`` or ``ipc`` larger than a class raises a ValueError naming ``ipc``, the class and its size.

Scores (larger = harder), all ``[N]`` float32:

* EL2N (Paul et al.):      E_θ ‖softmax(f_θ(x)) − onehot(y)‖₂
* EL2N-SL (supp. §4):      (1/T) E_θ ‖softmax(f_θ(x)/T) − q‖₂, q a soft target (a teacher's softmax(z/T))
* GraNd (Paul et al.):     E_θ ‖∇θ ℓ_CE(f_θ(x), y)‖₂, by ghost products (no per-example gradient is formed)
* Forgetting (Toneva et al.): correct → incorrect transitions along a training run's checkpoints

E_θ is the mean over the given models (e.g. several seeds at an early checkpoint). Networks are
evaluated in eval mode (BatchNorm uses running statistics); their training flags are restored.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddfast.data.datasets import balanced_subset
from ddfast.ops.ghost_products import per_example_grad_norms

__all__ = [
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
    "CAD_PRUNE_STARTS",
    "CAD_PRUNE_VARIANTS",
    "compute_aligned_epochs",
]

CAD_PRUNE_STARTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # window starts tried by cad_prune


# --------------------------------------------------------------------------------------------- helpers


def _labels(y, n: int | None = None, name: str = "y") -> np.ndarray:
    if isinstance(y, torch.Tensor):
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer class labels, got {y.dtype}")
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: expected integer class labels [N], got shape {y.shape} dtype {y.dtype}")
    if n is not None and len(y) != n:
        raise ValueError(f"{name}: expected {n} labels (one per example), got {len(y)}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{name}: expected labels >= 0, got {int(y.min())}")
    return y.astype(np.int64)


def _class_members(y: np.ndarray, ipc, num_classes: int | None) -> list[np.ndarray]:
    """Indices of each class ``0 .. num_classes-1`` (ascending), after checking ``ipc`` against every class."""
    if not isinstance(ipc, (int, np.integer)) or isinstance(ipc, bool):
        raise TypeError(f"ipc: expected an int, got {type(ipc).__name__}")
    if ipc < 1:
        raise ValueError(f"ipc: expected >= 1 examples per class, got {ipc}")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if len(y) else 0
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    if len(y) and y.max() >= num_classes:
        raise ValueError(f"y: label {int(y.max())} out of range for num_classes={num_classes}")
    members = [np.flatnonzero(y == c) for c in range(num_classes)]
    for c, idx in enumerate(members):
        if len(idx) < ipc:
            raise ValueError(f"ipc={ipc}: class {c} has only {len(idx)} examples")
    return members


def _finish(parts: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([np.sort(p) for p in parts]).astype(np.int64))


def _as_models(models_or_states, model: nn.Module | None) -> list[nn.Module]:
    """A list of networks from one network, several, or state dicts loaded into copies of ``model``."""
    if isinstance(models_or_states, (nn.Module, Mapping)):
        models_or_states = [models_or_states]
    out = []
    for i, m in enumerate(models_or_states):
        if isinstance(m, nn.Module):
            out.append(m)
        elif isinstance(m, Mapping):
            if model is None:
                raise ValueError(f"model: state dict {i} needs a network to load into; pass model=<nn.Module>")
            net = copy.deepcopy(model)
            net.load_state_dict(m)
            out.append(net)
        else:
            raise TypeError(f"models_or_states[{i}]: expected an nn.Module or a state dict, got {type(m).__name__}")
    if not out:
        raise ValueError("models_or_states: expected at least one network")
    return out


class _eval_mode:
    """Put a network in eval mode for the block, then restore every submodule's training flag."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with _eval_mode(model), torch.no_grad():
        return torch.cat([model(x[s : s + batch_size]) for s in range(0, x.shape[0], batch_size)])


def _check_x(x, n: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x: expected a tensor [N, ...], got {type(x).__name__}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"x: expected {n} examples (one per label), got {x.shape[0]}")
    return x


# ------------------------------------------------------------------------------------ diversity based


def random_coreset(y, ipc: int, seed: int = 0, num_classes: int | None = None) -> torch.Tensor:
    """``ipc`` examples per class drawn uniformly without replacement (deterministic given ``seed``).

    Args:
        y: labels ``[N]``. ipc: examples per class. num_classes: default ``max(y) + 1``.
    Returns: LongTensor ``[ipc · num_classes]``, class-major, ascending within a class.
    Raises: ValueError when ``ipc < 1`` or a class has fewer than ``ipc`` examples.
    """
    members = _class_members(_labels(y), ipc, num_classes)
    drawn = balanced_subset(y, ipc, seed=seed, num_classes=len(members)).numpy()
    return _finish(drawn.reshape(len(members), ipc))


def k_centers(features: torch.Tensor, y, ipc: int, seed: int = 0, num_classes: int | None = None,
              start: str = "random") -> torch.Tensor:
    """Greedy k-center (farthest-point) selection inside each class (supp. §1.3, "K-Centers").

    Per class, the first center is a random member (``start="random"``, drawn with ``seed``) or the
    member nearest the class mean (``start="mean"``, no randomness); then ``ipc − 1`` times the member
    with the largest Euclidean distance to its nearest chosen center is added (ties: lowest index).
    This is the 2-approximation of min_S max_n min_{s∈S} ‖φ(x_n) − φ(x_s)‖₂ within the class.

    Args:
        features: ``[N, d]`` (or ``[N, ...]``, flattened) — pixels or embeddings (:func:`model_features`).
        y: labels ``[N]``. ipc: centers per class. num_classes: default ``max(y) + 1``.
    Returns: LongTensor ``[ipc · num_classes]``, class-major, ascending within a class.
    """
    if start not in ("random", "mean"):
        raise ValueError(f"start: expected 'random' or 'mean', got {start!r}")
    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features: expected a tensor [N, d], got {got}")
    phi = features.detach().reshape(features.shape[0], -1).to("cpu", torch.float64)
    if not torch.isfinite(phi).all():
        raise ValueError("features: expected finite values")
    members = _class_members(_labels(y, phi.shape[0]), ipc, num_classes)
    rng = np.random.default_rng(seed)
    parts = []
    for idx in members:
        f = phi[torch.from_numpy(idx)]
        if start == "random":
            first = int(rng.integers(len(idx)))
        else:
            first = int(torch.argmin(((f - f.mean(0)) ** 2).sum(1)))
        chosen = [first]
        dmin = torch.linalg.vector_norm(f - f[first], dim=1)
        for _ in range(ipc - 1):
            nxt = int(torch.argmax(dmin))  # first maximum: lowest index on ties
            chosen.append(nxt)
            dmin = torch.minimum(dmin, torch.linalg.vector_norm(f - f[nxt], dim=1))
        parts.append(idx[chosen])
    return _finish(parts)


def model_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``model.features(x)`` flattened to ``[N, d]``, in eval mode and without gradients, ``batch_size`` at a time."""
    if not isinstance(getattr(model, "features", None), Callable):
        raise TypeError(f"model: {type(model).__name__} has no callable `.features` (x → embedding)")
    x = _check_x(x)
    with _eval_mode(model), torch.no_grad():
        return torch.cat([model.features(x[s : s + batch_size]).flatten(1) for s in range(0, x.shape[0], batch_size)])


# --------------------------------------------------------------------------------------- score based


def el2n_from_logits(logits: torch.Tensor, y) -> torch.Tensor:
    """‖softmax(z) − onehot(y)‖₂ per row of ``logits [N, C]`` → ``[N]``."""
    y = torch.as_tensor(_labels(y, logits.shape[0]), device=logits.device)
    return el2n_sl_from_logits(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype), T=1.0)


def el2n_sl_from_logits(logits: torch.Tensor, q: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """(1/T) ‖softmax(z/T) − q‖₂ per row (supp. §4, eq. EL2N-SL for one model) → ``[N]``.

    ``q``: soft targets ``[N, C]`` (rows on the simplex), or class indices ``[N]`` (one-hot).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits: expected [N, C], got {tuple(getattr(logits, 'shape', ()))}")
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ValueError(f"T: expected a finite temperature > 0, got {T!r}")
    if isinstance(q, torch.Tensor) and not q.is_floating_point():
        q = F.one_hot(q.to(torch.int64), logits.shape[1]).to(logits.dtype)
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != tuple(logits.shape):
        raise ValueError(f"q: expected soft targets of shape {tuple(logits.shape)}, got "
                         f"{tuple(getattr(q, 'shape', ()))}")
    p = torch.softmax(logits / T, dim=1)
    return torch.linalg.vector_norm(p - q.to(p), dim=1) / T


def el2n_scores(models_or_states, x: torch.Tensor, y, *, model: nn.Module | None = None,
                batch_size: int = 512) -> torch.Tensor:
    """EL2N: E_θ ‖softmax(f_θ(x_n)) − onehot(y_n)‖₂ → ``[N]`` (Paul et al.; supp. §1.3).

    Args:
        models_or_states: a network, a list of networks (e.g. several seeds at an early checkpoint),
            or state dicts loaded into copies of ``model``. The score is their mean.
        x: inputs ``[N, ...]``; y: labels ``[N]``.
    Equivalent PyTorch: the mean over models of :func:`el2n_from_logits` of ``model(x)``.
    """
    y = torch.from_numpy(_labels(y, _check_x(x).shape[0]))
    nets = _as_models(models_or_states, model)
    return torch.stack([el2n_from_logits(_logits(m, x, batch_size).float(), y.to(x.device)) for m in nets]).mean(0)


def el2n_sl_scores(models_or_states, x: torch.Tensor, q: torch.Tensor | None = None, *,
                   teacher_logits: torch.Tensor | None = None, T: float = 1.0, model: nn.Module | None = None,
                   batch_size: int = 512) -> torch.Tensor:
    """EL2N-SL(x) = (1/T) E_θ ‖p_T(x) − q(x)‖₂ with p_T = softmax(f_θ(x)/T) (supp. §4, Lemma 1) → ``[N]``.

    Up to the constant c of Assumption 1 this is the GraNd score of the temperature-T KL(q‖p) loss.
    Give the soft target either as ``q [N, C]`` or as ``teacher_logits [N, C]`` (then q = softmax(z/T)).
    With T = 1 and one-hot q it equals :func:`el2n_scores`.
    """
    if (q is None) == (teacher_logits is None):
        raise ValueError("q / teacher_logits: give exactly one soft target (q [N, C] or teacher_logits [N, C])")
    x = _check_x(x)
    if teacher_logits is not None:
        if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 2 \
                or teacher_logits.shape[0] != x.shape[0]:
            raise ValueError(f"teacher_logits: expected [{x.shape[0]}, C], got "
                             f"{tuple(getattr(teacher_logits, 'shape', ()))}")
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T: expected a finite temperature > 0, got {T!r}")
        q = torch.softmax(teacher_logits.float() / T, dim=1)
    nets = _as_models(models_or_states, model)
    return torch.stack([el2n_sl_from_logits(_logits(m, x, batch_size).float(), q, T) for m in nets]).mean(0)


def grand_scores(models_or_states, x: torch.Tensor, y, *, model: nn.Module | None = None,
                 chunk: int | None = 256) -> torch.Tensor:
    """GraNd: E_θ ‖∇θ ℓ_CE(f_θ(x_n), y_n)‖₂ over all trainable parameters → ``[N]`` (Paul et al.).

    Computed per network by :func:`ddfast.ops.ghost_products.per_example_grad_norms` (``squared=False``,
    eval mode; the per-example loss itself, no 1/N), without forming per-example gradients.
    Equivalent PyTorch: ``ddfast.reference.ghost_products.per_example_grad_norms_ref`` (batch-of-1 loop).
    """
    y = torch.from_numpy(_labels(y, _check_x(x).shape[0])).to(x.device)
    out = []
    for m in _as_models(models_or_states, model):
        with _eval_mode(m):
            out.append(per_example_grad_norms(m, x, y, "ce", squared=False, chunk=chunk).float())
    return torch.stack(out).mean(0)


def count_forgetting(correct) -> torch.Tensor:
    """Forgetting events per example from ``correct [T, N]`` (bool: example n right at evaluation t).

    An event is a transition correct at t → incorrect at t+1 (Toneva et al.). Examples never correct at
    any evaluation ("never learned") get ``max(count) + 1``, above every learned example.
    Returns: LongTensor ``[N]``.
    """
    c = torch.as_tensor(correct)
    if c.dim() != 2:
        raise ValueError(f"correct: expected [T, N] booleans, got shape {tuple(c.shape)}")
    c = c.bool().cpu()
    counts = (c[:-1] & ~c[1:]).sum(0).to(torch.int64)
    never = ~c.any(0)
    if never.any():
        counts[never] = int(counts.max()) + 1
    return counts


def forgetting_scores(predictions, y) -> torch.Tensor:
    """:func:`count_forgetting` of ``predictions [T, N] == y`` (predicted labels at T evaluations)."""
    p = torch.as_tensor(predictions)
    if p.dim() != 2:
        raise ValueError(f"predictions: expected [T, N] predicted labels, got shape {tuple(p.shape)}")
    y = torch.from_numpy(_labels(y, p.shape[1])).to(p.device)
    return count_forgetting(p == y)


def forgetting_scores_from_trajectory(traj, x: torch.Tensor, y, *, checkpoints: Iterable[int] | None = None,
                                      batch_size: int = 512) -> torch.Tensor:
    """Forgetting counts from a stored training run (:class:`ddfast.trajectory.Trajectory`) → ``[N]``.

    Each checkpoint is evaluated on every example (eval mode) and :func:`count_forgetting` counts the
    correct → incorrect transitions between consecutive checkpoints. Default ``checkpoints``: all with
    SGD step > 0 (the untrained initialisation is no "learned" state); resolution is the checkpoint
    spacing, coarser than Toneva et al.'s per-minibatch evaluation.
    """
    y = torch.from_numpy(_labels(y, _check_x(x).shape[0])).to(x.device)
    if checkpoints is None:
        checkpoints = [i for i, s in enumerate(traj.steps) if s > 0] or [len(traj) - 1]
    net = traj.build_model().to(x.device)
    rows = []
    for i in checkpoints:
        net.load_state_dict(traj.load(int(i), device=x.device))
        rows.append(_logits(net, x, batch_size).argmax(1) == y)
    if not rows:
        raise ValueError("checkpoints: expected at least one checkpoint index")
    return count_forgetting(torch.stack(rows))


def _ranked(scores: np.ndarray, idx: np.ndarray, descending: bool) -> np.ndarray:
    s = scores[idx]
    return idx[np.lexsort((idx, -s if descending else s))]  # ties: lower index first


def select_by_score(scores, y, ipc: int, mode: str = "hard", start: float | None = None,
                    num_classes: int | None = None) -> torch.Tensor:
    """Per class, the ``ipc`` examples by score: highest (``"hard"``), lowest (``"easy"``) or a window.

    ``"window"`` (the sliding window of EL2N-Best / Paul et al.): rank the class hardest first and keep
    ranks ``[o, o + ipc)`` with ``o = min(round(start · n_c), n_c − ipc)``; ``start = 0`` equals ``"hard"``,
    ``start = 1`` equals ``"easy"``. Ties rank by lower index. Deterministic; no seed.

    Args:
        scores: ``[N]`` (larger = harder: EL2N, GraNd, forgetting). y: labels ``[N]``.
        start: fraction in [0, 1], required for ``"window"``.
    Returns: LongTensor ``[ipc · num_classes]``, class-major, ascending within a class.
    """
    s = torch.as_tensor(scores).detach().cpu().double().numpy()
    if s.ndim != 1:
        raise ValueError(f"scores: expected [N], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores: expected finite values")
    members = _class_members(_labels(y, len(s)), ipc, num_classes)
    if mode not in ("hard", "easy", "window"):
        raise ValueError(f"mode: expected 'hard', 'easy' or 'window', got {mode!r}")
    if mode == "window":
        if start is None or not (isinstance(start, (int, float)) and 0.0 <= start <= 1.0):
            raise ValueError(f"start: mode='window' needs a fraction in [0, 1], got {start!r}")
    elif start is not None:
        raise ValueError(f"start: only used with mode='window', got {start!r} with mode={mode!r}")
    parts = []
    for idx in members:
        order = _ranked(s, idx, descending=(mode != "easy"))
        o = min(int(round(start * len(idx))), len(idx) - ipc) if mode == "window" else 0
        parts.append(order[o : o + ipc])
    return _finish(parts)


# ------------------------------------------------------------------------------------------- CAD-Prune


def examples_seen(traj, i: int) -> int:
    """Training compute of checkpoint ``i``: examples processed by its SGD step t (epochs × full-set size).

    ``(t // steps_per_epoch) · n + min((t mod steps_per_epoch) · batch_size, n)``, exact with a smaller
    last batch per epoch.
    """
    ix = traj.index
    n, b, spe = int(ix["train_examples"]), int(ix["batch_size"]), int(ix["steps_per_epoch"])
    t = int(traj.steps[i])
    return (t // spe) * n + min((t % spe) * b, n)


CAD_PRUNE_VARIANTS = ("final", "early")


def compute_aligned_epochs(n_train: int, ipc: int, num_classes: int, budget_epochs: float) -> int:
    """Full-set epochs with the compute of the downstream budget: round(budget_epochs · ipc · C / n), ≥ 1.

    Train the full-set model of CAD-Prune's default variant for this many epochs (e.g.
    ``train_trajectory(data, arch, out, epochs=compute_aligned_epochs(...), every=..., schedule="cosine")``).
    """
    if n_train < 1:
        raise ValueError(f"n_train: expected a positive training-set size, got {n_train!r}")
    return max(1, int(round(float(budget_epochs) * ipc * num_classes / n_train)))


def cad_prune(traj, x: torch.Tensor, y, ipc: int, budget_epochs: float, *, variant: str = "final",
              evaluate_fn: Callable[[torch.Tensor], float] | None = None,
              starts: Sequence[float] = CAD_PRUNE_STARTS, num_classes: int | None = None,
              batch_size: int = 512) -> tuple[torch.Tensor, dict]:
    """CAD-Prune: EL2N of a compute-aligned full-set model, then a score window (supp. §8.5, Table 11).

    The downstream budget is B = ``budget_epochs · ipc · num_classes`` examples seen.

    1. The scoring model (``variant``):

       * ``"final"`` (default; the supplement's "compute-aware" variant, the better one in Table 11): the
         *final* checkpoint of ``traj``, a training run on the full set whose whole compute is aligned
         with B (:func:`compute_aligned_epochs`). A warning says when the run's compute is off by more
         than one epoch of the full set.
       * ``"early"`` ("early of full-training" in Table 11, reported worse): among the checkpoints of a
         longer run with SGD step > 0, the one whose :func:`examples_seen` is closest to B (ties: the
         earlier); if B exceeds the whole run, the last checkpoint is used and a warning says so.

    2. Score every example with EL2N (:func:`el2n_scores`) of that model.
    3. For each window start in ``starts`` take :func:`select_by_score` (``mode="window"``). With
       ``evaluate_fn`` the window with the highest ``evaluate_fn(indices)`` is kept (ties: the first);
       ``evaluate_fn`` must score on *validation* data (e.g. the accuracy on ``ImageDataset.val_x`` of a
       model trained on the window), never on the test split. Without it no training is done and a
       *heuristic* picks the window: the one whose mean score is closest to the median EL2N of the whole
       set (mid-difficulty examples; not an estimate of accuracy; ``report["criterion"] ==
       "median-heuristic"``). One model per window with ``evaluate_fn`` is EL2N-Best's cost.

    Args:
        traj: :class:`ddfast.trajectory.Trajectory` of training on the full set (``x``, ``y``).
        ipc: examples per class. budget_epochs: downstream epochs over the coreset.
        variant: ``"final"`` or ``"early"`` (above).
    Returns:
        ``(indices, report)``: LongTensor ``[ipc · num_classes]`` and a dict with ``variant``,
        ``checkpoint``, ``step``, ``examples_seen``, ``budget_examples``, ``start``, ``criterion``
        (``"evaluate_fn"`` or ``"median-heuristic"``) and ``window_values`` (start → criterion value).
    """
    if variant not in CAD_PRUNE_VARIANTS:
        raise ValueError(f"variant: expected one of {CAD_PRUNE_VARIANTS}, got {variant!r}")
    x = _check_x(x)
    yl = _labels(y, x.shape[0])
    members = _class_members(yl, ipc, num_classes)
    C = len(members)
    if not (isinstance(budget_epochs, (int, float)) and math.isfinite(budget_epochs) and budget_epochs > 0):
        raise ValueError(f"budget_epochs: expected a finite value > 0, got {budget_epochs!r}")
    starts = [float(s) for s in starts]
    if not starts or any(not 0.0 <= s <= 1.0 for s in starts):
        raise ValueError(f"starts: expected window start fractions in [0, 1], got {starts}")
    budget = float(budget_epochs) * ipc * C
    if variant == "final":
        best = len(traj) - 1
        seen = {best: examples_seen(traj, best)}
        n_full = int(traj.index["train_examples"])
        if abs(seen[best] - budget) > n_full:
            warnings.warn(f"traj: its final checkpoint has seen {seen[best]} examples, the budget is {budget:.0f} "
                          f"(more than one epoch of {n_full} apart); train the full-set model for "
                          f"compute_aligned_epochs(...) = {compute_aligned_epochs(n_full, ipc, C, budget_epochs)} "
                          "epochs", stacklevel=2)
    else:
        cands = [i for i, s in enumerate(traj.steps) if s > 0] or [len(traj) - 1]
        seen = {i: examples_seen(traj, i) for i in cands}
        best = min(cands, key=lambda i: (abs(seen[i] - budget), i))
        if budget > seen[cands[-1]]:
            warnings.warn(f"budget_epochs: the budget of {budget:.0f} examples exceeds the trajectory's "
                          f"{seen[cands[-1]]} (step {traj.steps[cands[-1]]}); scoring with its last checkpoint",
                          stacklevel=2)
    net = traj.build_model().to(x.device)
    net.load_state_dict(traj.load(best, device=x.device))
    scores = el2n_scores(net, x, yl, batch_size=batch_size)
    windows = {s: select_by_score(scores, yl, ipc, mode="window", start=s, num_classes=C) for s in starts}
    if evaluate_fn is not None:
        values = {s: float(evaluate_fn(idx)) for s, idx in windows.items()}
        chosen = max(starts, key=lambda s: (values[s], -starts.index(s)))
    else:
        med = float(scores.median())
        values = {s: abs(float(scores[idx].mean()) - med) for s, idx in windows.items()}
        chosen = min(starts, key=lambda s: (values[s], starts.index(s)))
    report = {"variant": variant, "checkpoint": best, "step": int(traj.steps[best]), "examples_seen": seen[best],
              "budget_examples": budget, "start": chosen,
              "criterion": "evaluate_fn" if evaluate_fn is not None else "median-heuristic", "window_values": values}
    return windows[chosen], report
