"""Balanced k-means: k clusters of exactly equal size, for Denton et al.'s clustering rewrites.

Denton et al. (2014, section 3.3) cluster filters into groups of *equal* size because the
rewritten layer is a grouped convolution: every group must hold the same number of channels
(ONNX ``group`` splits channels evenly), and equal work per group is also what makes the
rewrite fast. Ordinary k-means gives unequal clusters, so the assignment step is replaced by
a constrained one.

Problem. Given points ``x_1..x_n`` (rows of ``X``, ``n = k*m``), find labels ``l_i`` with
exactly ``m = n/k`` points per label and centres ``c_1..c_k`` minimising the inertia
``sum_i d(x_i, c_{l_i})``.

Assignment step (centres fixed). Replicate every centre ``m`` times; the balanced
assignment is then a perfect matching of the ``n`` points to the ``n`` centre slots, solved
exactly as a linear assignment problem on the ``n x n`` cost matrix
``cost[i, j] = d(x_i, c_{j // m})`` (``scipy.optimize.linear_sum_assignment``, Hungarian /
Jonker-Volgenant, ``O(n^3)``). This is the optimal balanced assignment, so, as in Lloyd's
algorithm, neither step can increase the inertia and the iteration terminates.

Update step (labels fixed), per metric:

* ``"euclidean"``: ``d(x, c) = ||x - c||^2``; the minimiser is the mean of the members.
* ``"subspace"``: ``d(u, c) = 1 - (u . c)^2`` for unit ``u`` and unit ``c`` (the squared sine
  of the angle between the *lines* spanned by ``u`` and ``c``). It is invariant to the sign
  of ``u``, which matters because singular vectors (Denton's colour vectors) have arbitrary
  sign. ``sum_i (1 - (u_i . c)^2) = m - c^T (sum_i u_i u_i^T) c`` is minimised over unit
  ``c`` by the leading eigenvector of the scatter matrix ``sum_i u_i u_i^T`` (the mean
  would be wrong: ``u`` and ``-u`` would cancel). Rows are normalised to unit length first;
  a zero row has distance 1 to every centre. Centre signs are fixed (largest-magnitude
  component positive) so results are reproducible.

Seeding is k-means++ (D^2 sampling with the metric's own distance); ``n_init`` restarts are
run and the lowest inertia is kept. Finally clusters are renumbered by their smallest member
index, so the labelling is canonical (it does not depend on which restart won or on the
order in which centres were seeded). Everything random comes from
``numpy.random.default_rng(seed)``, so a fixed seed gives identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["Clustering", "balanced_kmeans", "fix_sign"]

_METRICS = ("euclidean", "subspace")


@dataclass(frozen=True, eq=False)
class Clustering:
    """Result of :func:`balanced_kmeans`.

    Attributes:
        labels: ``(n,)`` int array, cluster of each point; every cluster holds ``n/k`` points.
            Clusters are numbered by their smallest member index (cluster 0 contains point 0).
        centers: ``(k, d)`` float array. Euclidean: member means. Subspace: unit vectors,
            sign-fixed (largest-magnitude component positive).
        inertia: sum over points of the distance to their centre (squared Euclidean
            distance, or ``1 - (u . c)^2`` for the subspace metric).
        n_iter: iterations used by the winning restart.
    """

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int

    @property
    def sizes(self) -> np.ndarray:
        """Members per cluster (all equal by construction)."""
        return np.bincount(self.labels, minlength=self.centers.shape[0])


def fix_sign(v: np.ndarray) -> np.ndarray:
    """Flip each row so its largest-magnitude component is positive.

    Singular vectors and eigenvectors are defined up to sign; pinning the sign makes every
    downstream array (and hence every exported weight) reproducible. Works on a vector or
    on the rows of a matrix; all-zero rows are left as they are.
    """
    v = np.asarray(v, dtype=np.float64)
    two_d = v.ndim == 2
    m = v if two_d else v[None, :]
    idx = np.argmax(np.abs(m), axis=1)
    s = np.sign(m[np.arange(m.shape[0]), idx])
    s[s == 0] = 1.0
    out = m * s[:, None]
    return out if two_d else out[0]


def _distances(X: np.ndarray, C: np.ndarray, metric: str) -> np.ndarray:
    """``(n, k)`` matrix of ``d(x_i, c_j)``; clipped at 0 against rounding."""
    if metric == "euclidean":
        d = (X * X).sum(1)[:, None] - 2.0 * X @ C.T + (C * C).sum(1)[None, :]
    else:
        d = 1.0 - (X @ C.T) ** 2
    return np.maximum(d, 0.0)


def _seed_centers(X: np.ndarray, k: int, metric: str, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre is a point drawn with probability ~ its distance.

    Uses the metric's own distance, which for both metrics already behaves like a squared
    distance (``1 - (u.c)^2`` is the squared sine of the angle), i.e. classic D^2 sampling.
    """
    n = X.shape[0]
    first = int(rng.integers(n))
    centers = [X[first]]
    dmin = _distances(X, X[first][None, :], metric)[:, 0]
    for _ in range(1, k):
        total = float(dmin.sum())
        if total > 0.0:
            idx = int(rng.choice(n, p=dmin / total))
        else:  # all points coincide with chosen centres: any point will do
            idx = int(rng.integers(n))
        centers.append(X[idx])
        dmin = np.minimum(dmin, _distances(X, X[idx][None, :], metric)[:, 0])
    C = np.array(centers, dtype=np.float64)
    return fix_sign(C) if metric == "subspace" else C


def _assign(D: np.ndarray, m: int) -> np.ndarray:
    """Optimal assignment with exactly ``m`` points per cluster (replicated-centre matching)."""
    cost = np.repeat(D, m, axis=1)  # column j is centre j // m
    rows, cols = linear_sum_assignment(cost)
    labels = np.empty(D.shape[0], dtype=np.int64)
    labels[rows] = cols // m
    return labels


def _update(X: np.ndarray, labels: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Centre minimising the within-cluster distance for each cluster (see module docstring)."""
    C = np.empty((k, X.shape[1]), dtype=np.float64)
    for j in range(k):
        members = X[labels == j]
        if metric == "euclidean":
            C[j] = members.mean(axis=0)
        else:
            scatter = members.T @ members
            _, vecs = np.linalg.eigh(scatter)
            C[j] = vecs[:, -1]
    return fix_sign(C) if metric == "subspace" else C


def _canonical(labels: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by smallest member index so equal partitions get equal labels."""
    k = centers.shape[0]
    first = np.array([np.flatnonzero(labels == j)[0] for j in range(k)])
    order = np.argsort(first, kind="stable")  # new cluster i is old cluster order[i]
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[labels], centers[order]


def balanced_kmeans(X: np.ndarray, k: int, metric: str = "euclidean", n_init: int = 4,
                    max_iter: int = 50, seed: int = 0) -> Clustering:
    """Cluster the rows of ``X`` into ``k`` clusters of exactly ``n/k`` points each.

    Equal sizes are a hard constraint (the clusters become the groups of a grouped conv),
    so ``n`` must be divisible by ``k``; otherwise ``ValueError``. Cost is ``O(n^3)`` per
    iteration (linear assignment on ``n x n``), which is fine for channel counts (n up to
    a few thousand) and is why the iteration count is capped by ``max_iter``.

    Args:
        X: ``(n, d)`` points.
        k: number of clusters, ``1 <= k <= n`` and ``n % k == 0``.
        metric: ``"euclidean"`` (squared distance, mean centres) or ``"subspace"``
            (``1 - (u.c)^2`` on unit-normalised rows, sign-invariant, eigenvector centres).
        n_init: restarts with different k-means++ seeds; the lowest inertia wins.
        max_iter: cap on assignment/update rounds per restart.
        seed: seed of the only random generator used.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"balanced_kmeans expects a 2-D array of points, got shape {X.shape}")
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {_METRICS}")
    n = X.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"number of clusters k={k} must be in [1, n={n}]")
    if n % k:
        raise ValueError(f"balanced clusters need n divisible by k: n={n}, k={k} "
                         f"(n % k = {n % k})")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init={n_init} and max_iter={max_iter} must be >= 1")
    if not np.all(np.isfinite(X)):
        raise ValueError("balanced_kmeans got non-finite values")
    if metric == "subspace":
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        X = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0)
    m = n // k

    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray, int] | None = None
    n_runs = 1 if k in (1, n) else n_init  # the partition is forced: restarts are pointless
    for _ in range(n_runs):
        C = _seed_centers(X, k, metric, rng)
        labels = _assign(_distances(X, C, metric), m)
        it = 1
        for it in range(1, max_iter + 1):
            C = _update(X, labels, k, metric)
            new = _assign(_distances(X, C, metric), m)
            if np.array_equal(new, labels):
                break
            labels = new
        C = _update(X, labels, k, metric)
        inertia = float(_distances(X, C, metric)[np.arange(n), labels].sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, C, it)
    assert best is not None
    inertia, labels, C, it = best
    labels, C = _canonical(labels, C)
    return Clustering(labels=labels, centers=C, inertia=inertia, n_iter=it)
