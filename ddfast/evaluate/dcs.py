"""DCS: does a distillation objective rank data subsets the way their accuracy does? (soft-labels-hard-truths
main paper §4, supp. §7).

A distillation loss L is evaluated on many real subsets S_j — coresets from several selection methods at
several IPCs, plus *adversarial degenerate subsets* that repeat elements (supp. §7.2: repetition means
redundancy, which a good objective should penalise in favour of diversity and coverage) — next to the
accuracy A_j of a model trained on each subset. Larger subsets have both lower loss and higher accuracy
for reasons that say nothing about the objective, so the Spearman correlation is taken *after removing
the effect of subset size* (supp. §7.2):

    r_v = rank(v) − [1, rank(size)] β_v,   β_v = argmin_β ‖rank(v) − [1, rank(size)] β‖²,   v ∈ {L, A}
    ρ   = ⟨r_L, r_A⟩ / (‖r_L‖ ‖r_A‖)           (partial Spearman ρ(L, A | size))
    DCS = −ρ

Sign convention: a useful objective has *lower* loss on subsets with *higher* accuracy, i.e. ρ < 0, so
DCS = −ρ is near +1 for a well aligned objective, near 0 for an uninformative one and negative for a
misleading one. :class:`DCSResult` keeps both ``rho`` (the partial ρ of loss with *accuracy*) and ``dcs``.
The paper's plots report the correlation of the loss with generalisation *error* (supp. Fig. 3(a): "the
correlation of DM loss objective with ID generalization error", ρ = 0.41), i.e. ρ(L, 100 − A | size) =
−ρ(L, A | size) = ``dcs``: compare the paper's ρ values with ``dcs``, not with ``rho``. Ranks average over ties. Only the part of the size effect that is linear in rank(size) is
removed; a subset size that is constant across all subsets reduces ρ to the ordinary Spearman ρ.

Pipeline: :func:`build_subsets` (selectors × IPCs × seeds, plus :func:`duplicate_subset` variants) →
:func:`dcs` (calls the loss and accuracy functions on every subset) → :func:`plot_dcs` / :func:`format_dcs`.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "rankdata",
    "spearman",
    "partial_spearman",
    "duplicate_subset",
    "build_subsets",
    "DCSRow",
    "DCSResult",
    "dcs",
    "plot_dcs",
    "format_dcs",
]

MIN_POINTS = 4  # below this a partial correlation (two regressions + a correlation) is meaningless


# --------------------------------------------------------------------------------------------- ranks


def _vector(v, name: str, n: int | None = None) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double().numpy()
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a 1-D sequence of numbers, got {type(v).__name__}") from None
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name}: expected {n} values (one per subset), got {len(a)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: expected finite values, got {int((~np.isfinite(a)).sum())} non-finite")
    return a


def rankdata(x) -> np.ndarray:
    """1-based ranks with ties given the average of the ranks they span (the "average" method).

    Args: x: ``[n]`` numbers (list, ndarray or tensor), finite.
    Returns: float64 ndarray ``[n]``; e.g. ``rankdata([3, 1, 4, 1]) = [3, 1.5, 4, 1.5]``.
    Equivalent: ``scipy.stats.rankdata(x, method="average")``.
    """
    a = _vector(x, "x")
    n = len(a)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    counts = np.diff(np.r_[starts, n])
    avg = starts + (counts + 1) / 2.0  # positions starts+1 .. starts+counts, averaged
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def _correlate(a: np.ndarray, b: np.ndarray, names: tuple[str, str], what: str) -> float:
    """Pearson correlation of two already-centred residual vectors; nan (with a warning) if one is zero."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    scale = math.sqrt(len(a)) * len(a)  # ranks are O(n): residual norms are O(n^1.5) unless degenerate
    for v, nv, name in ((a, na, names[0]), (b, nb, names[1])):
        if nv <= 1e-10 * scale:
            warnings.warn(f"{name}: no variation left {what}; the correlation is undefined (nan)",
                          RuntimeWarning, stacklevel=3)
            return float("nan")
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def spearman(x, y) -> float:
    """Spearman ρ: Pearson correlation of :func:`rankdata` of ``x`` and of ``y`` (no size adjustment).

    Returns nan with a RuntimeWarning when either input is constant. Raises ValueError for fewer than
    2 points, mismatched lengths or non-finite values.
    """
    x = _vector(x, "x")
    y = _vector(y, "y", len(x))
    if len(x) < 2:
        raise ValueError(f"x, y: expected at least 2 points, got {len(x)}")
    rx, ry = rankdata(x), rankdata(y)
    return _correlate(rx - rx.mean(), ry - ry.mean(), ("x", "y"), "(constant input)")


def partial_spearman(loss, acc, size) -> float:
    """Partial Spearman ρ(loss, acc | size): the raw (un-negated) rank correlation after removing subset size.

    Ranks (ties averaged) of the three inputs; rank(loss) and rank(acc) are each regressed on
    ``[1, rank(size)]`` by least squares and the residuals are correlated (Pearson):

        ρ = ⟨r_loss, r_acc⟩ / (‖r_loss‖ ‖r_acc‖),   r_v = rank(v) − [1, rank(size)] β_v

    With one control this equals (ρ_la − ρ_ls ρ_as) / √((1 − ρ_ls²)(1 − ρ_as²)) on Spearman coefficients.
    DCS is ``−ρ`` (:func:`dcs`): a good objective, lower loss ↔ higher accuracy, has ρ near −1.
    Constant ``size`` (all subsets equally large) gives the ordinary Spearman ρ.

    Args:
        loss, acc, size: ``[n]`` numbers, one per subset, finite, n ≥ 4 (supp. §7.2).
    Returns:
        ρ in [−1, 1], or nan with a RuntimeWarning when loss or accuracy has no variation left after
        removing size (constant, or a perfectly linear function of rank(size)).
    Raises:
        ValueError: fewer than 4 points, lengths that differ, non-finite values.
    """
    loss = _vector(loss, "loss")
    n = len(loss)
    acc = _vector(acc, "acc", n)
    size = _vector(size, "size", n)
    if n < MIN_POINTS:
        raise ValueError(f"loss, acc, size: expected at least {MIN_POINTS} subsets for a partial correlation, got {n}")
    Z = np.column_stack([np.ones(n), rankdata(size)])
    res = []
    for v in (loss, acc):
        r = rankdata(v)
        beta, *_ = np.linalg.lstsq(Z, r, rcond=None)  # minimum-norm solution when size is constant
        res.append(r - Z @ beta)
    return _correlate(res[0], res[1], ("loss", "acc"), "after removing the effect of subset size")


# ------------------------------------------------------------------------------------------- subsets


def _indices(indices, name: str = "indices") -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer indices, got {indices.dtype}")
        indices = indices.detach().cpu().numpy()
    a = np.asarray(indices)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"{name}: expected integer indices [n], got shape {a.shape} dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name}: expected indices >= 0, got {int(a.min())}")
    return a.astype(np.int64)


def duplicate_subset(indices, seed: int = 0, y=None) -> torch.Tensor:
    """An adversarial degenerate subset of the same size: half of the elements, each repeated twice (supp. §7.2).

    From each group of m elements, ⌈m/2⌉ are drawn without replacement (``seed``) and repeated, truncated
    to m (for odd m the last drawn element appears once). The size is unchanged, so after the size
    adjustment of :func:`partial_spearman` only the loss of diversity distinguishes it from the original.
    Without ``y`` the group is the whole subset; with the labels ``y`` of the pool each class is
    halved on its own, keeping the class balance (a class with one element is kept as is).

    Args:
        indices: ``[n]`` integer indices into the pool (n ≥ 2). y: optional pool labels ``[N]``.
    Returns: LongTensor ``[n]``, groups in class order (or one group), ascending within a group, so
        copies are adjacent.
    Raises: ValueError when nothing can be duplicated (n < 2, or every class holds one element).
    """
    idx = _indices(indices)
    if len(idx) < 2:
        raise ValueError(f"indices: expected at least 2 elements to duplicate half of them, got {len(idx)}")
    if y is None:
        groups = [idx]
    else:
        labels = _indices(y, "y")
        if idx.max() >= len(labels):
            raise ValueError(f"indices: index {int(idx.max())} out of range for y of length {len(labels)}")
        lab = labels[idx]
        groups = [idx[lab == c] for c in np.unique(lab)]
        if all(len(g) < 2 for g in groups):
            raise ValueError("indices: every class has a single element; nothing to duplicate (need ipc >= 2)")
    rng = np.random.default_rng(seed)
    parts = []
    for g in groups:
        m = len(g)
        kept = rng.choice(g, size=(m + 1) // 2, replace=False)
        parts.append(np.sort(np.concatenate([kept, kept])[:m]))
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def build_subsets(y, ipcs: Sequence[int], selectors: Mapping[str, Callable[[int, int], object]],
                  seeds: Sequence[int] = (0,), duplicates: bool = True) -> list[dict]:
    """The DCS pool of subsets: every selector at every IPC and seed, plus duplicated variants (supp. §7.2).

    ``selectors[name](ipc, seed)`` returns indices into the pool whose labels are ``y`` — e.g.
    ``lambda ipc, seed: random_coreset(y, ipc, seed)``, ``k_centers(x, y, ipc, seed)`` or a
    deterministic ``select_by_score(scores, y, ipc)`` (:mod:`ddfast.select.coresets`). A selector that
    returns the same indices for two seeds contributes that subset once (a repeated data point would
    only add ties). With ``duplicates=True`` each subset with ipc ≥ 2 also gets a
    :func:`duplicate_subset` variant (class-wise, same seed), named ``<name>-dup``.

    Args:
        y: pool labels ``[N]``. ipcs: positive ints. seeds: seeds passed to every selector.
    Returns:
        list of dicts ``{"name", "method", "ipc", "seed", "indices" (LongTensor), "duplicate" (bool)}``,
        ordered by IPC, then selector, then seed (each original followed by its duplicate) — the input
        of :func:`dcs` (with ``x=``, ``y=`` the pool).
    """
    labels = _indices(y, "y")
    ipcs = list(ipcs)
    if not ipcs or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ipcs):
        raise ValueError(f"ipcs: expected a non-empty sequence of positive ints, got {ipcs!r}")
    if not selectors:
        raise ValueError("selectors: expected at least one {name: callable(ipc, seed) -> indices}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    out = []
    for ipc in ipcs:
        for method, select in selectors.items():
            if not callable(select):
                raise TypeError(f"selectors[{method!r}]: expected a callable(ipc, seed) -> indices")
            seen = set()
            for seed in seeds:
                idx = _indices(select(int(ipc), int(seed)), f"selectors[{method!r}](ipc={ipc}, seed={seed})")
                if idx.size == 0 or idx.max() >= len(labels):
                    raise ValueError(f"selectors[{method!r}](ipc={ipc}, seed={seed}): expected indices in "
                                     f"[0, {len(labels)}), got {idx.size} indices up to "
                                     f"{int(idx.max()) if idx.size else None}")
                key = idx.tobytes()
                if key in seen:
                    continue
                seen.add(key)
                name = f"{method}-ipc{ipc}" + (f"-s{seed}" if len(seeds) > 1 else "")
                out.append({"name": name, "method": method, "ipc": int(ipc), "seed": int(seed),
                            "indices": torch.from_numpy(idx), "duplicate": False})
                if duplicates and ipc >= 2:
                    out.append({"name": f"{name}-dup", "method": method, "ipc": int(ipc), "seed": int(seed),
                                "indices": duplicate_subset(idx, seed=seed, y=labels), "duplicate": True})
    return out


# ----------------------------------------------------------------------------------------------- DCS


@dataclass(frozen=True)
class DCSRow:
    """One subset: its loss under the objective and the accuracy it yields; ``size`` = number of examples."""

    name: str
    ipc: int | None
    size: int
    loss: float
    accuracy: float
    duplicate: bool = False
    method: str | None = None


@dataclass
class DCSResult:
    """Per-subset rows and the score.

    ``rho``: partial Spearman ρ(loss, accuracy | size) (:func:`partial_spearman`); ``dcs = −rho`` (near +1:
    lower loss ↔ higher accuracy); ``rho_unadjusted``: plain Spearman ρ(loss, accuracy), which the size
    effect inflates; ``n``: number of subsets.
    """

    rows: list[DCSRow]
    rho: float
    dcs: float
    n: int
    rho_unadjusted: float = float("nan")

    @property
    def loss(self) -> np.ndarray:
        return np.array([r.loss for r in self.rows])

    @property
    def accuracy(self) -> np.ndarray:
        return np.array([r.accuracy for r in self.rows])

    @property
    def size(self) -> np.ndarray:
        return np.array([r.size for r in self.rows])


def _materialise(i: int, s, x, y):
    if not isinstance(s, Mapping):
        raise TypeError(f"subsets[{i}]: expected a dict with 'name' and 'indices' or 'images'/'labels', "
                        f"got {type(s).__name__}")
    name = str(s.get("name", f"subset{i}"))
    has_idx, has_xy = "indices" in s, ("images" in s or "labels" in s)
    if has_idx == has_xy:
        raise ValueError(f"subsets[{i}] ({name!r}): expected exactly one of 'indices' or 'images' + 'labels'")
    if has_idx:
        if x is None or y is None:
            raise ValueError(f"subsets[{i}] ({name!r}): 'indices' need the pool; pass dcs(..., x=images, y=labels)")
        idx = _indices(s["indices"], f"subsets[{i}]['indices']")
        if idx.size == 0 or idx.max() >= len(x):
            raise ValueError(f"subsets[{i}]['indices'] ({name!r}): expected indices in [0, {len(x)}), "
                             f"got {idx.size} indices")
        t = torch.from_numpy(idx).to(x.device if isinstance(x, torch.Tensor) else "cpu")
        images, labels = x[t], y[t.to(y.device) if isinstance(y, torch.Tensor) else idx]
    else:
        if "images" not in s or "labels" not in s:
            raise ValueError(f"subsets[{i}] ({name!r}): expected both 'images' and 'labels'")
        images, labels = s["images"], s["labels"]
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"subsets[{i}] ({name!r}): expected as many labels as images (> 0), got "
                             f"{len(images)} images and {len(labels)} labels")
    ipc = s.get("ipc")
    return name, (None if ipc is None else int(ipc)), images, labels, bool(s.get("duplicate", False)), s.get("method")


def dcs(subsets: Sequence[Mapping], loss_fn: Callable[[torch.Tensor, torch.Tensor], float],
        accuracy_fn: Callable[[torch.Tensor, torch.Tensor], float], *, x: torch.Tensor | None = None,
        y: torch.Tensor | None = None, progress: bool = False) -> DCSResult:
    """Score a distillation objective: DCS = −ρ(loss, accuracy | size) over a pool of subsets (supp. §7).

    Each subset is a dict with ``name``, ``ipc`` (optional), and either ``indices`` into the pool
    ``x``, ``y`` or ``images`` and ``labels`` (hard ``[n]`` or soft ``[n, C]``); optional ``duplicate``
    and ``method`` are carried to the rows (:func:`build_subsets` makes such dicts). For every subset
    ``loss_fn(images, labels)`` (the distillation objective, lower = better) and
    ``accuracy_fn(images, labels)`` (accuracy of a model trained on the subset; pass an accuracy, not an
    error, or the sign flips) are called once; size is the number of images.

    Args:
        subsets: at least 4 subset dicts. x, y: the pool, needed for ``indices`` subsets.
        progress: show a tqdm bar.
    Returns: :class:`DCSResult` with the rows, ``rho`` (partial Spearman), ``dcs = −rho``,
        ``rho_unadjusted`` and ``n``.
    Raises: ValueError for fewer than 4 subsets, malformed subsets or a non-finite loss / accuracy.
    """
    subsets = list(subsets)
    if len(subsets) < MIN_POINTS:
        raise ValueError(f"subsets: expected at least {MIN_POINTS} subsets, got {len(subsets)}")
    if not callable(loss_fn) or not callable(accuracy_fn):
        raise TypeError("loss_fn, accuracy_fn: expected callables (images, labels) -> float")
    if x is not None and y is not None and len(x) != len(y):
        raise ValueError(f"x, y: expected one label per image, got {len(x)} images and {len(y)} labels")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(subsets), desc="dcs", leave=False, file=sys.stderr)
    rows = []
    try:
        for i, s in enumerate(subsets):
            name, ipc, images, labels, dup, method = _materialise(i, s, x, y)
            if bar is not None:
                bar.set_postfix_str(name)
            loss, acc = float(loss_fn(images, labels)), float(accuracy_fn(images, labels))
            if not (math.isfinite(loss) and math.isfinite(acc)):
                raise ValueError(f"subsets[{i}] ({name!r}): loss_fn / accuracy_fn returned {loss} / {acc}; "
                                 "expected finite values")
            rows.append(DCSRow(name, ipc, int(len(images)), loss, acc, dup, method))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    loss, acc, size = (np.array([getattr(r, k) for r in rows], dtype=np.float64) for k in ("loss", "accuracy", "size"))
    rho = partial_spearman(loss, acc, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # already warned above if degenerate
        raw = spearman(loss, acc)
    return DCSResult(rows=rows, rho=rho, dcs=-rho, n=len(rows), rho_unadjusted=raw)


# ------------------------------------------------------------------------------------------- reports


def plot_dcs(result: DCSResult, path: str, title: str | None = None) -> str:
    """Save a scatter PNG: loss (x) against accuracy (y), colour = IPC, ✕ = duplicated subsets; ρ in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = result.rows
    ipcs = sorted({r.ipc for r in rows if r.ipc is not None})
    cmap = plt.get_cmap("viridis")
    colour = {k: cmap(i / max(len(ipcs) - 1, 1)) for i, k in enumerate(ipcs)}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for dup, marker in ((False, "o"), (True, "X")):
        sel = [r for r in rows if r.duplicate == dup]
        if sel:
            ax.scatter([r.loss for r in sel], [r.accuracy for r in sel], marker=marker, s=46 if dup else 36,
                       c=[colour.get(r.ipc, "grey") for r in sel], edgecolors="black", linewidths=0.4, alpha=0.85)
    handles = [Line2D([], [], marker="o", ls="", color=colour[k], label=f"IPC {k}") for k in ipcs]
    if any(r.duplicate for r in rows):
        handles.append(Line2D([], [], marker="X", ls="", color="grey", label="duplicated"))
    if handles:
        ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("distillation loss")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"DCS = {result.dcs:+.3f}   (ρ(loss, acc | size) = {result.rho:+.3f}, "
                          f"unadjusted {result.rho_unadjusted:+.3f}, n = {result.n})", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def format_dcs(result: DCSResult, digits: int = 4) -> str:
    """A markdown table of the subsets (name, IPC, size, duplicated, loss, accuracy) followed by the score line."""
    lines = ["| subset | IPC | size | dup | loss | accuracy |", "|---|---:|---:|:---:|---:|---:|"]
    for r in result.rows:
        lines.append(f"| {r.name} | {'-' if r.ipc is None else r.ipc} | {r.size} | {'✕' if r.duplicate else ''} "
                     f"| {r.loss:.{digits}g} | {r.accuracy:.{digits}g} |")
    lines.append("")
    lines.append(f"**DCS = {result.dcs:+.3f}** (partial Spearman ρ(loss, accuracy | size) = {result.rho:+.3f}; "
                 f"unadjusted ρ = {result.rho_unadjusted:+.3f}; n = {result.n})")
    return "\n".join(lines)
