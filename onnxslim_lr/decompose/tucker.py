"""Tucker-2 decomposition of a conv weight (Kim et al. 2016).

``W: F x C x kh x kw ~ G x_1 U_F x_2 U_C``, i.e.

    W[f, c, i, j] ~ sum_{a, b} U_F[f, a] * G[a, b, i, j] * U_C[c, b]

with orthonormal ``U_F: F x R_F``, ``U_C: C x R_C`` and core ``G: R_F x R_C x kh x kw``.
As a graph: 1x1 conv C->R_C (weight ``U_C^T``), kh x kw conv R_C->R_F (weight ``G``, the
original spatial attributes), 1x1 conv R_F->F (weight ``U_F``, the bias).

For fixed orthonormal factors the best core is the projection
``G = W x_1 U_F^T x_2 U_C^T`` and ``||W - W_hat||^2 = ||W||^2 - ||G||^2``, so fitting means
maximising ``||G||``. HOSVD initialises ``U_F`` / ``U_C`` with the leading left singular
vectors of the mode-F / mode-C unfoldings; HOOI then alternates: with ``U_C`` fixed,
``U_F`` = leading left singular vectors of the mode-F unfolding of ``W x_2 U_C^T`` (which
maximises ``||G||`` over ``U_F`` exactly), and symmetrically for ``U_C``. Each half-step
cannot increase the error, so the loop stops when an iteration improves the relative error
by less than ``tol``. At ``(R_F, R_C) = (F, C)`` the factors are square orthogonal and the
decomposition is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Tucker2", "tucker2"]

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]


@dataclass(frozen=True)
class Tucker2:
    """Factors in ONNX layout: ``first`` (R_C, C, 1, 1), ``core`` (R_F, R_C, kh, kw), ``last`` (F, R_F, 1, 1)."""

    first: F32
    core: F32
    last: F32
    rel_error: float
    n_iter_run: int

    @property
    def ranks(self) -> tuple[int, int]:
        """``(rank_out, rank_in)``."""
        return int(self.core.shape[0]), int(self.core.shape[1])


def _leading_left(mat: F64, r: int) -> F64:
    """First ``r`` left singular vectors of ``mat`` (``m x n``, ``m <= n`` here), orthonormal.

    Computed from the eigenvectors of the small ``m x m`` Gram matrix rather than an SVD of
    the wide unfolding: for a 512x512x3x3 layer that is a 512x512 eigh instead of a 512x4608
    SVD, per HOOI step. Squaring the condition number only blurs directions far below the
    ones kept. ``eigh`` always returns a full basis, so ``r`` above the rank is fine (the
    extra directions carry no energy).
    """
    gram = mat @ mat.T
    _, vecs = np.linalg.eigh(gram)
    return vecs[:, ::-1][:, :r]


def _project(w: F64, u_f: F64 | None, u_c: F64 | None) -> F64:
    """``w x_1 u_f^T x_2 u_c^T`` (a ``None`` factor leaves that mode alone)."""
    out = w
    if u_f is not None:
        out = np.tensordot(u_f.T, out, axes=(1, 0))
    if u_c is not None:
        out = np.tensordot(u_c.T, out, axes=(1, 1)).transpose(1, 0, 2, 3)
    return out


def tucker2(w: NDArray[np.floating], rank_out: int, rank_in: int, n_iter: int = 20,
            tol: float = 1e-7) -> Tucker2:
    """Tucker-2 (HOSVD init + HOOI) of a conv weight at ranks ``(rank_out, rank_in)``.

    HOSVD alone is quasi-optimal; HOOI usually gains a little more at the same cost in the
    graph, and costs only small SVDs here, so it is on by default (``n_iter=0`` gives HOSVD).
    """
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (F, C, kh, kw), got shape {w64.shape}")
    F, C, kh, kw = w64.shape
    r_f, r_c = int(rank_out), int(rank_in)
    if r_f != rank_out or not (1 <= r_f <= F):
        raise ValueError(f"tucker2: rank_out must be an integer in [1, {F}], got {rank_out}")
    if r_c != rank_in or not (1 <= r_c <= C):
        raise ValueError(f"tucker2: rank_in must be an integer in [1, {C}], got {rank_in}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")

    norm2 = float(np.sum(w64 * w64))

    def err_of(core: F64) -> float:
        if norm2 <= 0.0:
            return 0.0
        return float(np.sqrt(max(0.0, 1.0 - float(np.sum(core * core)) / norm2)))

    u_f = _leading_left(w64.reshape(F, -1), r_f)
    u_c = _leading_left(w64.transpose(1, 0, 2, 3).reshape(C, -1), r_c)
    core = _project(w64, u_f, u_c)
    err = err_of(core)

    it = 0
    while it < n_iter:
        it += 1
        y = _project(w64, None, u_c)  # F x R_C x kh x kw
        u_f = _leading_left(y.reshape(F, -1), r_f)
        z = _project(w64, u_f, None)  # R_F x C x kh x kw
        u_c = _leading_left(z.transpose(1, 0, 2, 3).reshape(C, -1), r_c)
        core = _project(w64, u_f, u_c)
        new_err = err_of(core)
        improved = err - new_err
        err = new_err
        if improved < tol:
            break

    # Report the error of the actual reconstruction (no cancellation in 1 - |G|^2/|W|^2).
    w_hat = np.tensordot(u_f, np.tensordot(u_c, core, axes=(1, 1)), axes=(1, 1))  # F x C x kh x kw
    rel = float(np.linalg.norm(w64 - w_hat) / np.sqrt(norm2)) if norm2 > 0 else 0.0

    return Tucker2(
        first=np.ascontiguousarray(u_c.T.reshape(r_c, C, 1, 1), dtype=np.float32),
        core=np.ascontiguousarray(core, dtype=np.float32),
        last=np.ascontiguousarray(u_f.reshape(F, r_f, 1, 1), dtype=np.float32),
        rel_error=rel,
        n_iter_run=it,
    )
