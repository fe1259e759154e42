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

Data metric (``sigma`` given, the ``C*kh*kw`` second moment of the input patches). The
error that matters is ``E||(W2 - W2_hat) p||^2 = tr(D Sigma D^T)`` (``W2`` the ``F x C*kh*kw``
reshape, ``D = W2 - W2_hat``). For a fixed input projection ``P`` (``R_C x C``, the first
1x1 stage) the last two stages act on ``z = (P (x) I_{kh*kw}) p`` and together form a
rank-``R_F`` map ``M`` of ``z``; the best ``M`` in the data metric is a reduced-rank
regression with ``R = P_k Sigma P_k^T`` and ``C_yz = W2 Sigma P_k^T`` (see
:mod:`.reconstruct`), solved exactly: core = its first factor, output projection = its
second. For a fixed output subspace ``U_F`` the input projection is chosen in the metric of
the channel second moment ``Sigma_c`` (``Sigma`` averaged over kernel taps, i.e. the
Kronecker approximation ``Sigma ~ Sigma_c (x) I``): with ``S = Sigma_c^1/2`` the best
rank-``R_C`` input subspace of ``S`` applied to the mode-C unfolding of ``U_F^T W`` is its
top-``R_C`` left singular subspace ``V``, reached by ``P = V^T S^+`` (``S^+`` the
pseudo-inverse: channels the data never excites are dropped). Alternating the two is the
data-metric HOOI; the exact data error is evaluated after each step (from the ``m x m``
statistics of the step: ``tr(D Sigma D^T) = tr(W Sigma W^T) - 2 tr(M C_yz^T) + tr(M R M^T)``
for ``W_hat = M P_k``) and the best iterate is
kept (the ``P`` step is only optimal under the Kronecker approximation, so monotonicity is
not guaranteed). ``rel_error`` is then in the data metric.

Cost. A ladder fits one layer at several rank pairs, so what does not depend on the ranks
is done once per layer (:class:`_DataSetup`): ``tr(W Sigma W^T)``, the channel whitening,
and the first input projection. That projection's subspace is the top-``R_C`` eigenvectors
of one ``C x C`` matrix, orthonormalised by a QR whose first ``R_C`` columns depend only on
the first ``R_C`` inputs, so one eigh and one QR serve every rank. Each iterate's three
products with ``Sigma`` (``n^2 R_C + m n R_C + F n m`` multiply-adds, ``m = R_C kh kw``) run
in float32 when ``n >=`` :data:`~.reconstruct.GRAM_F32_MIN_COLS` (``Sigma`` is a sum of
float32 products already, :func:`~.reconstruct.gram`), the solve and the error readout in
float64. HOOI stops once an iterate gains less than :data:`REL_TOL` of the error: on the
seeded VGG-19 layers the whole data-metric HOOI gained 0.6 % of the error (0.1377 ->
0.1368 at rank 64 of a 512x512x3x3 layer) for twice the cost of the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from numpy.typing import NDArray

__all__ = ["Tucker2", "tucker2", "tucker2_fitter"]

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]

#: data-metric HOOI stops once an iterate improves the error by less than this share of it
REL_TOL = 1e-2


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


def _proj_cols(a: NDArray[np.floating], p: NDArray[np.floating], C: int, kk: int) -> NDArray[np.floating]:
    """``a @ (P (x) I_kk)^T`` without forming the Kronecker product: ``(X, C*kk) -> (X, R*kk)``.

    In the dtype of ``a`` (``p`` is cast to it).
    """
    x = a.shape[0]
    out = np.tensordot(a.reshape(x, C, kk), np.asarray(p, dtype=a.dtype), axes=(1, 1))  # X x kk x R
    return out.transpose(0, 2, 1).reshape(x, -1)


@dataclass(frozen=True)
class _DataSetup:
    """What the data-metric HOOI of one weight and one ``sigma`` needs at every rank pair.

    Shared across the rungs of a ladder (:func:`tucker2_fitter`): ``tr(W Sigma W^T)`` alone
    is an ``F x n x n`` product (11 GFLOP for a 512x512x3x3 layer).
    """

    w64: F64
    #: ``Sigma`` in the dtype of the products with it (float32 when wide, module docstring)
    sigma: NDArray[np.floating]
    s_half: F64
    s_pinv: F64
    total: float
    #: every rank's first input projection: its first ``R_C`` rows are the one for ``R_C``
    first_p: F64


def _data_setup(w64: F64, sigma: F64) -> _DataSetup:
    from .reconstruct import GRAM_F32_MIN_COLS, channel_second_moment, psd_pinv_sqrt

    F, C, kh, kw = w64.shape
    w2 = w64.reshape(F, -1)
    s_half, s_pinv = psd_pinv_sqrt(channel_second_moment(sigma, C, kh * kw))
    total = float(np.sum((w2 @ sigma) * w2))
    first_p = _input_projection(w64, s_half, s_pinv, C)
    wide = sigma.shape[0] >= GRAM_F32_MIN_COLS
    return _DataSetup(w64, sigma.astype(np.float32) if wide else sigma, s_half, s_pinv, total, first_p)


def _input_projection(wt: F64, s_half: F64, s_pinv: F64, r_c: int) -> F64:
    """The data-metric input projection of ``wt`` (module docstring), ``R_C x C``, orthonormal rows.

    Nested in ``r_c``: the rows for a smaller rank are the first rows of this one (leading
    eigenvectors, then a QR, whose first columns depend only on its first inputs).
    """
    C = wt.shape[1]
    unf = wt.transpose(1, 0, 2, 3).reshape(C, -1)  # mode-C unfolding
    v = _leading_left(s_half @ unf, r_c)
    p = v.T @ s_pinv  # R_C x C
    q, _ = np.linalg.qr(p.T)  # only the row space matters: orthonormal rows
    return q.T[:r_c] if q.shape[1] >= r_c else p


def _tucker2_data(d: _DataSetup, r_f: int, r_c: int, n_iter: int, tol: float
                  ) -> tuple[F64, F64, F64, float, int]:
    """Data-metric HOOI (module docstring): returns ``(P, core_rows, out_cols, rel_error, iters)``."""
    from .reconstruct import reduced_rank

    w64, sigma, s_half, s_pinv, total = d.w64, d.sigma, d.s_half, d.s_pinv, d.total
    F, C, kh, kw = w64.shape
    kk = kh * kw
    w2 = w64.reshape(F, -1)
    w2s = w2.astype(sigma.dtype, copy=False)

    def outer(p: F64) -> tuple[F64, F64, float]:
        # the three products with Sigma in its dtype (float32 when wide), the rest in float64
        a = _proj_cols(sigma, p, C, kk)  # Sigma P_k^T, n x m
        r0 = _proj_cols(np.ascontiguousarray(a.T), p, C, kk).astype(np.float64)  # P_k Sigma P_k^T
        r0 = 0.5 * (r0 + r0.T)
        c_yz = (w2s @ a).astype(np.float64)
        first, second = reduced_rank(r0, c_yz, r_f, ridge=1e-12)
        # W_hat = M P_k with M = second @ first, so tr(D Sigma D^T) for D = W - W_hat is
        # tr(W Sigma W^T) - 2 tr(M C_yz^T) + tr(M R0 M^T): read off the m x m statistics
        # already formed instead of two F x n x n products per iterate (22 GFLOP at n = 4608)
        m = second @ first
        num = total - 2.0 * float(np.sum(m * c_yz)) + float(np.sum((m @ r0) * m))
        return first, second, float(np.sqrt(max(num, 0.0) / total)) if total > 0 else 0.0

    p = d.first_p[:r_c]
    first, second, err = outer(p)
    best = (p, first, second, err)
    it = 0
    while it < n_iter:
        it += 1
        u_f, _ = np.linalg.qr(second)
        p = _input_projection(_project(w64, u_f[:, :r_f], None), s_half, s_pinv, r_c)
        first, second, new_err = outer(p)
        if new_err < best[3]:
            best = (p, first, second, new_err)
        # relative as well as absolute: on trained layers the first one or two iterates hold
        # all of HOOI's gain (the bundled VGG: 0.2648 -> 0.2637, then nothing), while on
        # unstructured weights (seeded VGG-19) it crept on for all 20 iterates, 1 s each
        if err - new_err < max(tol, REL_TOL * new_err):
            break
        err = new_err
    return best[0], best[1], best[2], best[3], it


def tucker2(w: NDArray[np.floating], rank_out: int, rank_in: int, n_iter: int = 20,
            tol: float = 1e-7, sigma: NDArray[np.floating] | None = None) -> Tucker2:
    """Tucker-2 (HOSVD init + HOOI) of a conv weight at ranks ``(rank_out, rank_in)``.

    HOSVD alone is quasi-optimal; HOOI usually gains a little more at the same cost in the
    graph, and costs only small SVDs here, so it is on by default (``n_iter=0`` gives HOSVD).
    With ``sigma`` (input patch second moment) the fit is in the data metric (module
    docstring): the factors no longer have orthonormal columns, the core is fitted exactly.
    """
    return tucker2_fitter(w, n_iter=n_iter, tol=tol, sigma=sigma)(rank_out, rank_in)


def tucker2_fitter(w: NDArray[np.floating], n_iter: int = 20, tol: float = 1e-7,
                   sigma: NDArray[np.floating] | None = None) -> Callable[[int, int], Tucker2]:
    """:func:`tucker2` of one weight at any rank pair, the rank-independent work done once.

    Why: a ladder fits the same layer at five rank pairs; in the data metric each fit used to
    redo ``tr(W Sigma W^T)`` and the channel whitening (a 512x512x3x3 layer: 11 GFLOP each).
    """
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (F, C, kh, kw), got shape {w64.shape}")
    F, C, kh, kw = w64.shape
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    s: F64 | None = None
    if sigma is not None:
        s = np.asarray(sigma, dtype=np.float64)
        if s.shape != (C * kh * kw, C * kh * kw) or not np.all(np.isfinite(s)):
            raise ValueError(f"sigma must be a finite ({C * kh * kw}, {C * kh * kw}) matrix, got {s.shape}")
        s = 0.5 * (s + s.T)

    @lru_cache(maxsize=1)
    def setup() -> _DataSetup:
        assert s is not None
        return _data_setup(w64, s)

    def fit(rank_out: int, rank_in: int) -> Tucker2:
        r_f, r_c = int(rank_out), int(rank_in)
        if r_f != rank_out or not (1 <= r_f <= F):
            raise ValueError(f"tucker2: rank_out must be an integer in [1, {F}], got {rank_out}")
        if r_c != rank_in or not (1 <= r_c <= C):
            raise ValueError(f"tucker2: rank_in must be an integer in [1, {C}], got {rank_in}")
        if s is not None:
            p, core_rows, out_cols, rel, it = _tucker2_data(setup(), r_f, r_c, n_iter, tol)
            return Tucker2(
                first=np.ascontiguousarray(p.reshape(r_c, C, 1, 1), dtype=np.float32),
                core=np.ascontiguousarray(core_rows.reshape(r_f, r_c, kh, kw), dtype=np.float32),
                last=np.ascontiguousarray(out_cols.reshape(F, r_f, 1, 1), dtype=np.float32),
                rel_error=rel,
                n_iter_run=it,
            )
        return _tucker2_frobenius(w64, r_f, r_c, n_iter, tol)

    return fit


def _tucker2_frobenius(w64: F64, r_f: int, r_c: int, n_iter: int, tol: float) -> Tucker2:
    """HOSVD + HOOI in the Frobenius metric (module docstring)."""
    F, C, kh, kw = w64.shape
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
