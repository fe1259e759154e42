"""Rank selection for the low-rank family.

Two ways to pick a rank besides a speed target (see :mod:`onnxslim_lr.cost` for that one):

* energy: the smallest ``k`` with ``sum_{i<k} s_i^2 >= energy * sum_i s_i^2``. Because
  ``||A - A_k||_F^2 = sum_{i>=k} s_i^2`` (Eckart-Young), keeping energy ``e`` bounds the
  relative Frobenius error of a truncated SVD by ``sqrt(1 - e)``.
* ratio: a fraction of the method's full rank, rounded half up and clamped to
  ``[1, full_rank]``.

Full ranks (the rank at which each rewrite is exact, or an upper bound for CP):

* channel SVD of ``W: F x (C*kh*kw)``: ``min(F, C*kh*kw)``
* spatial SVD of the permuted ``(C*kh) x (kw*F)`` matrix: ``min(C*kh, F*kw)``
* Tucker-2: ``(F, C)`` (output rank, input rank)
* CP of ``W_S: C x (kh*kw) x F``: ``min(C*kh*kw, F*kh*kw, C*F)``, the bound obtained by
  writing each slice along one mode as a sum of rank-1 matrices; the exact CP rank is
  NP-hard to compute, so "ratio 1.0" means this bound, not exactness.
* fully connected ``B: K x F``: ``min(K, F)``
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "rank_for_energy",
    "rank_from_ratio",
    "svd_full_rank",
    "spatial_full_rank",
    "tucker2_full_ranks",
    "cp_full_rank",
    "fc_full_rank",
]


def rank_for_energy(singular_values: ArrayLike, energy: float) -> int:
    """Smallest ``k >= 1`` whose top-``k`` squared singular values hold ``energy`` of the total.

    The values are sorted (by magnitude, descending) first so that a caller passing them
    in another order still gets the "top k" meaning. An all-zero spectrum returns 1: there
    is nothing to keep, and a rank-0 factorisation is not a valid graph.
    """
    if not (0.0 < energy <= 1.0) or math.isnan(energy):
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s = np.abs(np.asarray(singular_values, dtype=np.float64).ravel())
    if s.size == 0:
        raise ValueError("singular_values is empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("singular_values contains non-finite values")
    cum = np.cumsum(np.sort(s)[::-1] ** 2)
    total = cum[-1]
    if total <= 0.0:
        return 1
    # cum[-1] == total exactly, so energy == 1 always finds an index (the start of the
    # trailing plateau, i.e. the numerical rank) and never runs off the end.
    k = int(np.searchsorted(cum, energy * total, side="left")) + 1
    return max(1, min(k, s.size))


def rank_from_ratio(full_rank: int, ratio: float) -> int:
    """``round(ratio * full_rank)`` (half up), clamped to ``[1, full_rank]``.

    Half-up rounding (rather than Python's banker's rounding) keeps the map monotone and
    predictable for users: ratio 0.5 of rank 5 is 3, not 2.
    """
    if full_rank < 1:
        raise ValueError(f"full_rank must be >= 1, got {full_rank}")
    if not math.isfinite(ratio) or ratio <= 0.0:
        raise ValueError(f"ratio must be a finite number > 0, got {ratio}")
    k = math.floor(ratio * full_rank + 0.5)
    return max(1, min(int(k), full_rank))


def svd_full_rank(F: int, C: int, kh: int, kw: int) -> int:
    """Rank of ``W`` reshaped ``F x (C*kh*kw)`` at most; channel SVD is exact there."""
    return min(F, C * kh * kw)


def spatial_full_rank(F: int, C: int, kh: int, kw: int) -> int:
    """Rank of the ``(C*kh) x (kw*F)`` permutation at most; spatial SVD is exact there."""
    return min(C * kh, F * kw)


def tucker2_full_ranks(F: int, C: int) -> tuple[int, int]:
    """``(r_out, r_in) = (F, C)``: Tucker-2 with square orthogonal factors is exact."""
    return F, C


def cp_full_rank(F: int, C: int, kh: int, kw: int) -> int:
    """Upper bound on the CP rank of the ``C x (kh*kw) x F`` tensor (the "ratio 1.0" rank)."""
    return min(C * kh * kw, F * kh * kw, C * F)


def fc_full_rank(K: int, F: int) -> int:
    """Rank of ``B: K x F`` at most; FC SVD is exact there."""
    return min(K, F)
