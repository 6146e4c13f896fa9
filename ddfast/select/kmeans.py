"""Random and K-means subsets of a source data set (krr-st-selfsup §4.1 baselines "Random", "K-means").

K-means: cluster the examples' features into ``m`` clusters, then keep for every centroid the real
example nearest to it. Centroids are taken in order; a centroid whose nearest example is already kept
takes its nearest unused one, so the ``m`` indices are distinct.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["kmeans_select", "random_select", "MINIBATCH_THRESHOLD"]

MINIBATCH_THRESHOLD = 20_000  # above this many examples, MiniBatchKMeans replaces KMeans
_CANDIDATES = 64  # nearest examples kept per centroid before falling back to a full ranking
_CHUNK = 256  # centroids per distance block


def _check(n: int, m: int) -> None:
    if not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m: expected a positive number of examples to select, got {m!r}")
    if m > n:
        raise ValueError(f"m: cannot select {m} examples from n={n}; expected 1 <= m <= n")


def random_select(n: int, m: int, seed: int = 0) -> torch.Tensor:
    """``m`` distinct indices drawn uniformly from ``range(n)`` (LongTensor[m]), deterministic given ``seed``."""
    _check(n, m)
    return torch.from_numpy(np.random.default_rng(seed).permutation(n)[:m].astype(np.int64))


def _ranked_nearest(features: np.ndarray, centroids: np.ndarray, k: int) -> np.ndarray:
    """For each centroid the indices of its ``k`` nearest examples, nearest first (ties: lower index)."""
    sq = np.einsum("nd,nd->n", features, features)
    out = np.empty((len(centroids), k), dtype=np.int64)
    for s in range(0, len(centroids), _CHUNK):
        c = centroids[s : s + _CHUNK]
        d = sq[None, :] - 2.0 * c @ features.T  # ‖c‖² is constant per row
        if k < d.shape[1]:
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
            keys = np.take_along_axis(d, part, axis=1)
            order = np.lexsort((part, keys), axis=1)
            out[s : s + len(c)] = np.take_along_axis(part, order, axis=1)
        else:
            out[s : s + len(c)] = np.argsort(d, axis=1, kind="stable")
    return out


def kmeans_select(features: torch.Tensor, m: int, seed: int = 0) -> torch.Tensor:
    """Indices of the real examples nearest to ``m`` k-means centroids (LongTensor[m], distinct).

    Args:
        features: ``[n, d]`` (or ``[n, ...]``, flattened) — e.g. pixels or embeddings.
        m: number of clusters and of selected examples, ``1 <= m <= n``.
        seed: k-means++ initialisation seed (``KMeans(n_init=1)``, or ``MiniBatchKMeans`` when
            ``n > MINIBATCH_THRESHOLD``); the result is deterministic given the seed.

    Returns:
        ``idx[j]`` is the example nearest to centroid j, or the nearest not yet taken by centroids
        ``0 .. j-1``.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features: expected a tensor [n, d], got {got}")
    x = features.detach().reshape(features.shape[0], -1).to("cpu", torch.float64).numpy()
    n = x.shape[0]
    _check(n, m)
    if not np.isfinite(x).all():
        raise ValueError("features: expected finite values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate points: fewer distinct clusters than m
        if n > MINIBATCH_THRESHOLD:
            km = MiniBatchKMeans(n_clusters=m, init="k-means++", n_init=1, random_state=seed,
                                 batch_size=max(1024, 3 * m))
        else:
            km = KMeans(n_clusters=m, init="k-means++", n_init=1, random_state=seed)
        centroids = km.fit(x).cluster_centers_
    ranked = _ranked_nearest(x, centroids, min(n, _CANDIDATES))
    used = np.zeros(n, dtype=bool)
    chosen = np.empty(m, dtype=np.int64)
    for j in range(m):
        free = ranked[j][~used[ranked[j]]]
        if len(free):
            i = int(free[0])
        else:  # all nearby candidates taken: rank every example for this centroid
            d = np.einsum("nd,nd->n", x - centroids[j], x - centroids[j])
            d[used] = np.inf
            i = int(np.argmin(d))
        used[i] = True
        chosen[j] = i
    return torch.from_numpy(chosen)
