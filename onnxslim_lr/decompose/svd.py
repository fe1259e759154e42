"""Matrix low-rank factorisations of conv and fully connected weights.

Channel SVD (Denton et al. 2014, sec. 3.2 on the folded ``W_F``; Zhang et al. 2016).
``W: F x C x kh x kw`` is reshaped to ``W2 = W.reshape(F, C*kh*kw)`` (columns in
``(c, i, j)`` order). Truncated SVD ``W2 ~ U_K S_K V_K^T`` gives two convs:
``first = S^1/2 V^T`` reshaped ``K x C x kh x kw`` (kh x kw conv C->K) and
``second = U S^1/2`` reshaped ``F x K x 1 x 1`` (1x1 conv K->F).

Data-aware channel SVD. With ``Sigma`` the second moment of the layer's input patches
(``C*kh*kw`` square, PSD), the output error over the data is
``E ||(W2 - W2_hat) x||^2 = ||(W2 - W2_hat) Sigma^1/2||_F^2``. Over rank-K ``W2_hat`` it is
minimised by ``W2_hat = U_K U_K^T W2`` where ``U_K`` are the top-K left singular vectors
of ``M = W2 Sigma^1/2`` (the best rank-K approximation of ``M`` is ``U_K U_K^T M``, and it
is reached by this ``W2_hat`` even when ``Sigma`` is singular). ``U_K`` and the singular
values come from the ``F x F`` Gram ``M M^T = W2 Sigma W2^T`` (:func:`left_singular_by_gram`),
so ``Sigma^1/2`` is never formed. ``first = U_K^T W2``,
``second = U_K``, followed by a diagonal rescale that balances the two factors.

Spatial SVD (Jaderberg et al. 2014, scheme 2). ``A[(c, i), (j, f)] = W[f, c, i, j]``, a
``(C*kh) x (kw*F)`` matrix; ``A ~ U_K S_K V_K^T`` gives
``W[f, c, i, j] = sum_k vertical[k, c, i, 0] * horizontal[f, k, 0, j]`` with
``vertical = (U S^1/2)^T`` (kh x 1 conv C->K) and ``horizontal = S^1/2 V^T`` rearranged
(1 x kw conv K->F). Exact at ``K = min(C*kh, F*kw)``.

Spatial SVD in the data metric (``sigma`` given, ``C*kh*kw`` square). The vertical stage is
chosen in the metric of ``Sigma_ci``, the ``(c, i)`` block of ``Sigma`` averaged over the
column tap ``j`` (a Kronecker approximation ``Sigma ~ Sigma_ci (x) I_kw``): the error
``||Sigma_ci^1/2 (A - A_hat)||_F`` over rank-K ``A_hat`` is minimised by ``A_hat = A Q Q^T``
with ``Q`` the top-K right singular vectors of ``Sigma_ci^1/2 A``, so ``vertical = (A Q)^T``.
The horizontal stage is then refitted exactly in the full metric: with ``z = P p`` the
``K*kw`` input of the horizontal stage (``P`` from :func:`reconstruct.spatial_pre`),
``H = W2 Sigma P^T (P Sigma P^T)^-1`` (least squares, a tiny ridge for singular ``Sigma``).
The fit is never worse than the data-metric error of the plain ``A Q Q^T`` truncation, and
``rel_error`` is the data-metric error of the returned factors. The vertical filters are
nested in ``K`` (the first ``K`` right singular vectors), so ``Sigma P^T``'s products
``P Sigma P^T`` and ``W2 Sigma P^T`` for rank ``K`` are leading blocks of those for any larger
rank: a ladder forms them once, at its largest rank, in float32 when ``n >=``
:data:`~.reconstruct.GRAM_F32_MIN_COLS` (``Sigma`` is a sum of float32 products already),
and only the solve and the error readout per rank, in float64.

Fully connected SVD (Denton sec. 4.3). ``y = x @ B`` with ``B: K x F``; ``B ~ L R`` with
``L = U S^1/2 (K x r)``, ``R = S^1/2 V^T (r x F)``. With ``Sigma = E[x^T x]`` (``K x K``) the
error ``||Sigma^1/2 (B - B_hat)||_F`` is minimised by ``B_hat = B Q_r Q_r^T``, ``Q_r`` the top
right singular vectors of ``Sigma^1/2 B``.

Large FC weights (VGG-19's ``25088 x 4096``). A full SVD of such a matrix, or the square
root of its ``25088^2`` input covariance, costs minutes and gigabytes, while everything
needed lives in the small ``F x F`` Gram: the right singular vectors and values of
``Sigma^1/2 B`` are the eigenpairs of ``G = B^T Sigma B`` (``B^T B`` without data), and
``left = B Q_r`` then follows by one product. Above ``GRAM_ROUTE_ELEMENTS`` entries the
Gram is accumulated over row chunks (float32 products for float32 weights, summed in
float64), so no float64 copy of the weight is made; eigenvalues below the kept rank lose
accuracy (condition number squared), which only blurs directions that are truncated anyway.

``rel_error`` is ``||E|| / ||W||`` in the metric used (Frobenius, or the data metric when
``sigma`` is given), computed in float64 from the singular values of the matrix that was
truncated (exact by Eckart-Young); it does not include the float32 cast of the factors.
Factors are returned as float32, the dtype of ONNX weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from numpy.typing import NDArray

from .reconstruct import balance

__all__ = [
    "ChannelSVD",
    "SpatialSVD",
    "FCSVD",
    "psd_sqrt",
    "left_singular_by_gram",
    "channel_svd",
    "spatial_svd",
    "spatial_svd_fitter",
    "fc_svd",
    "fc_svd_fitter",
    "channel_spectrum",
    "spatial_spectrum",
    "fc_spectrum",
]

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]


@dataclass(frozen=True)
class ChannelSVD:
    """Factors of a channel SVD: ``first`` (K, C, kh, kw) then ``second`` (F, K, 1, 1)."""

    first: F32
    second: F32
    singular_values: F64
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])


@dataclass(frozen=True)
class SpatialSVD:
    """Factors of a spatial SVD: ``vertical`` (K, C, kh, 1) then ``horizontal`` (F, K, 1, kw)."""

    vertical: F32
    horizontal: F32
    singular_values: F64
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.vertical.shape[0])


@dataclass(frozen=True)
class FCSVD:
    """Factors of ``y = x @ B ~ (x @ left) @ right``: ``left`` (K, r), ``right`` (r, F)."""

    left: F32
    right: F32
    singular_values: F64
    rel_error: float

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


def _check_rank(rank: int, full: int, what: str) -> int:
    r = int(rank)
    if r != rank or not (1 <= r <= full):
        raise ValueError(f"{what}: rank must be an integer in [1, {full}], got {rank}")
    return r


def _tail_rel_error(s: F64, k: int) -> float:
    """``sqrt(sum_{i>=k} s_i^2 / sum_i s_i^2)``: Eckart-Young error of the rank-k truncation.

    Summing the tail directly (rather than ``total - head``) avoids cancellation, so an exact
    factorisation reports exactly 0. A zero matrix has nothing to lose: 0.
    """
    total = float(np.sum(s * s))
    if total <= 0.0:
        return 0.0
    return float(np.sqrt(np.sum(s[k:] ** 2) / total))


def psd_sqrt(sigma: NDArray[np.floating], n: int | None = None) -> F64:
    """Symmetric square root of a PSD matrix via ``eigh``, clipping tiny/negative eigenvalues.

    Covariances estimated from finite calibration data are PSD only up to rounding; tiny
    negative eigenvalues (and those below ``n * eps * max_eig``) are set to zero so that the
    square root is real and the rank of ``Sigma`` is respected.
    """
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"sigma must be square, got shape {s.shape}")
    if n is not None and s.shape[0] != n:
        raise ValueError(f"sigma must be {n} x {n}, got {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("sigma contains non-finite values")
    s = 0.5 * (s + s.T)
    evals, evecs = np.linalg.eigh(s)
    top = float(evals.max(initial=0.0))
    thresh = s.shape[0] * np.finfo(np.float64).eps * top
    evals = np.where(evals > thresh, evals, 0.0)
    return (evecs * np.sqrt(evals)) @ evecs.T


#: balancing rank components: one implementation, in reconstruct.py (the reduced-rank fits use it too)
_balance = balance


@dataclass(frozen=True)
class ChannelBasis:
    """What every rank of one layer's channel SVD shares: the (whitened) SVD, computed once.

    A ladder of ranks (the planner's rungs, the budget's sensitivity) truncates the same
    decomposition at different K; recomputing the decomposition per rung made the
    data-metric ladder of one 256-channel 3x3 layer cost minutes.
    """

    w2: F64  # F x n weight
    u: F64  # F x m left singular vectors (of W, or of W Sigma^1/2 in the data metric)
    s: F64  # singular values, descending
    vt: F64 | None  # m x n right singular vectors (Frobenius metric only)


def _check_response(response: NDArray[np.floating], F: int) -> F64:
    g = np.asarray(response, dtype=np.float64)
    if g.shape != (F, F) or not np.all(np.isfinite(g)):
        raise ValueError(f"response moment must be a finite ({F}, {F}) matrix, got {g.shape}")
    return g


def channel_basis(w: NDArray[np.floating], sigma: NDArray[np.floating] | None = None, *,
                  response: NDArray[np.floating] | None = None) -> ChannelBasis:
    """The SVD :func:`channel_svd` truncates, for all ranks at once.

    ``response``: ``W2 Sigma W2^T`` measured directly (the layer's output second moment
    without its bias), which gives the data-metric basis without the ``n x n`` ``Sigma``.
    """
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (F, C, kh, kw), got shape {w64.shape}")
    F = w64.shape[0]
    n = int(np.prod(w64.shape[1:]))
    w2 = w64.reshape(F, n)
    if response is not None:
        u, s = left_singular_by_gram(_check_response(response, F))
        return ChannelBasis(w2, u[:, :min(F, n)], s[:min(F, n)], None)
    if sigma is None:
        u, s, vt = np.linalg.svd(w2, full_matrices=False)
        return ChannelBasis(w2, u, s, vt)
    sig = np.asarray(sigma, dtype=np.float64)
    if sig.shape != (n, n):
        raise ValueError(f"sigma must be {n} x {n}, got {sig.shape}")
    if not np.all(np.isfinite(sig)):
        raise ValueError("sigma contains non-finite values")
    u, s = left_singular_by_gram(w2 @ (0.5 * (sig + sig.T)) @ w2.T)
    return ChannelBasis(w2, u[:, :min(F, n)], s[:min(F, n)], None)


def left_singular_by_gram(g: NDArray[np.floating]) -> tuple[F64, F64]:
    """Left singular vectors and values of ``M`` from its ``F x F`` Gram ``G = M M^T``.

    Why: in the data metric ``M = W2 Sigma^1/2`` is ``F x n`` with ``n = C kh kw`` up to
    4608 (VGG-19), and forming ``Sigma^1/2`` is an ``n x n`` eigh (about a minute there)
    while ``G = W2 Sigma W2^T`` needs one product and an ``F x F`` eigh. The eigenvectors of
    ``G`` are the left singular vectors of ``M`` and its eigenvalues their squares; small
    eigenvalues lose precision (condition squared), which only blurs directions a
    truncation drops. Eigenvalues below rounding are clipped to zero.
    """
    g64 = np.asarray(g, dtype=np.float64)
    ev, vec = np.linalg.eigh(0.5 * (g64 + g64.T))
    order = np.argsort(ev)[::-1]
    ev, vec = ev[order], vec[:, order]
    top = float(ev[0]) if ev.size else 0.0
    ev = np.where(ev > g64.shape[0] * np.finfo(np.float64).eps * top, ev, 0.0)
    return vec, np.sqrt(ev)


def channel_svd(w: NDArray[np.floating], rank: int,
                sigma: NDArray[np.floating] | None = None, *, basis: ChannelBasis | None = None) -> ChannelSVD:
    """Rank-K channel SVD of a conv weight, optionally in the data metric of ``sigma``.

    The data metric matters because the Frobenius norm weights every input direction
    equally, while real activations are strongly correlated: truncating where the data has
    little energy costs little accuracy (Denton eq. 3, Zhang et al. 2016). ``basis`` (from
    :func:`channel_basis` with the same ``w`` and ``sigma``) skips the decomposition.
    """
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (F, C, kh, kw), got shape {w64.shape}")
    F, C, kh, kw = w64.shape
    n = C * kh * kw
    k = _check_rank(rank, min(F, n), "channel_svd")
    b = basis if basis is not None else channel_basis(w64, sigma)
    w2, u, s = b.w2, b.u, b.s
    if b.vt is not None:
        sq = np.sqrt(s[:k])
        first = sq[:, None] * b.vt[:k]
        second = u[:, :k] * sq[None, :]
    else:
        uk = u[:, :k]
        first, second = _balance(uk.T @ w2, uk)
    return ChannelSVD(
        first=first.reshape(k, C, kh, kw).astype(np.float32),
        second=second.reshape(F, k, 1, 1).astype(np.float32),
        singular_values=s,
        rel_error=_tail_rel_error(s, k),
    )


def spatial_svd(w: NDArray[np.floating], rank: int,
                sigma: NDArray[np.floating] | None = None) -> SpatialSVD:
    """Rank-K vertical/horizontal separation of a conv weight (Jaderberg scheme 2).

    The permutation puts ``(c, i)`` on the rows and ``(j, f)`` on the columns, so the left
    factor is a ``kh x 1`` filter bank over the inputs and the right one a ``1 x kw`` filter
    bank producing the outputs; its full rank ``min(C*kh, F*kw)`` is usually far above
    the channel-SVD one, which is why it is exact only at much larger K.
    """
    return spatial_svd_fitter(w, sigma)(rank)


def spatial_svd_fitter(w: NDArray[np.floating],
                       sigma: NDArray[np.floating] | None = None) -> Callable[[int], SpatialSVD]:
    """:func:`spatial_svd` of one weight at any rank, the rank-independent work done once.

    Why: a ladder fits the same layer at five ranks; in the data metric each fit used to redo
    the whitened SVD and ``tr(W Sigma W^T)`` (a 512x512x3x3 layer: a 1536 x 1536 SVD and
    11 GFLOP) and to check its error with two ``F x n x n`` products (22 GFLOP).
    """
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (F, C, kh, kw), got shape {w64.shape}")
    F, C, kh, kw = w64.shape
    full = min(C * kh, F * kw)
    a = w64.transpose(1, 2, 3, 0).reshape(C * kh, kw * F)  # rows (c, i), cols (j, f)
    sig: F64 | None = None
    if sigma is not None:
        sig = np.asarray(sigma, dtype=np.float64)
        n = C * kh * kw
        if sig.shape != (n, n) or not np.all(np.isfinite(sig)):
            raise ValueError(f"sigma must be a finite ({n}, {n}) matrix, got {sig.shape}")
        sig = 0.5 * (sig + sig.T)

    @lru_cache(maxsize=1)
    def plain_svd() -> tuple[F64, F64, F64]:
        return np.linalg.svd(a, full_matrices=False)

    @lru_cache(maxsize=1)
    def whitened() -> tuple[F64, F64, float]:
        """The SVD of ``Sigma_ci^1/2 a`` (singular values, ``vt``) and ``tr(W Sigma W^T)``."""
        assert sig is not None
        s_ci = np.einsum("ajbj->ab", sig.reshape(C * kh, kw, C * kh, kw)) / kw
        w2 = w64.reshape(F, -1)
        _, sv, vt = np.linalg.svd(psd_sqrt(s_ci) @ a, full_matrices=False)
        return sv, vt, float(np.sum((w2 @ sig) * w2))

    products: list[tuple[int, F64, F64]] = []  # (K, P Sigma P^T, W2 Sigma P^T) at the largest K so far

    def products_at(k: int, v: F64) -> tuple[F64, F64]:
        """``(P Sigma P^T, W2 Sigma P^T)`` for the first ``k`` vertical filters (nested blocks)."""
        assert sig is not None
        if not products or products[0][0] < k:
            products[:] = [(k, *_spatial_products(w64, sig, v))]
        big, r0, c_yz = products[0]
        r0 = r0.reshape(big, kw, big, kw)[:k, :, :k, :].reshape(k * kw, k * kw)
        return r0, c_yz.reshape(F, big, kw)[:, :k, :].reshape(F, k * kw)

    def fit(rank: int) -> SpatialSVD:
        k = _check_rank(rank, full, "spatial_svd")
        if sig is not None:
            sv, vt, total = whitened()
            return _spatial_svd_data(w64, a, k, sv, vt, total, products_at)
        u, s, vt = plain_svd()
        sq = np.sqrt(s[:k])
        vertical = (u[:, :k] * sq[None, :]).T.reshape(k, C, kh, 1)
        horizontal = (sq[:, None] * vt[:k]).reshape(k, kw, F).transpose(2, 0, 1).reshape(F, k, 1, kw)
        return SpatialSVD(
            vertical=np.ascontiguousarray(vertical, dtype=np.float32),
            horizontal=np.ascontiguousarray(horizontal, dtype=np.float32),
            singular_values=s,
            rel_error=_tail_rel_error(s, k),
        )

    return fit


def _spatial_products(w64: F64, sigma: F64, v: F64) -> tuple[F64, F64]:
    """``(P Sigma P^T, W2 Sigma P^T)`` for vertical filters ``v`` (``K x C*kh``), ``(K, j)``-ordered.

    The products with ``Sigma`` in float32 when it is wide (module docstring), returned float64.
    """
    from .reconstruct import GRAM_F32_MIN_COLS

    F, C, kh, kw = w64.shape
    k = v.shape[0]
    dt = np.float32 if sigma.shape[0] >= GRAM_F32_MIN_COLS else np.float64
    s6 = np.asarray(sigma, dtype=dt).reshape(C * kh, kw, C * kh, kw)
    vd = np.asarray(v, dtype=dt)
    # z[k, j] = sum_a v[k, a] p[a, j]; Sigma P^T and P Sigma P^T from the 4-way view of Sigma.
    sp = np.tensordot(s6, vd, axes=(2, 1))  # (a, j, j', k) = sum_b Sigma[a j, b j'] v[k, b]
    sp = sp.transpose(0, 1, 3, 2).reshape(C * kh * kw, k * kw)  # n x (k, j')
    r0 = np.tensordot(vd, sp.reshape(C * kh, kw, k * kw), axes=(1, 0)).reshape(k * kw, k * kw)
    c_yz = np.asarray(w64.reshape(F, -1), dtype=dt) @ sp
    r0 = np.asarray(r0, dtype=np.float64)
    return 0.5 * (r0 + r0.T), np.asarray(c_yz, dtype=np.float64)


def _spatial_svd_data(w64: F64, a: F64, k: int, s: F64, vt: F64, total: float,
                      products_at: Callable[[int, F64], tuple[F64, F64]]) -> SpatialSVD:
    """Data-metric spatial SVD (module docstring), from the whitened SVD ``(s, vt)`` of ``a``.

    ``products_at(k, v)``: ``(P Sigma P^T, W2 Sigma P^T)`` for the first ``k`` rows of ``v``.
    """
    from .reconstruct import _solve_right

    F, C, kh, kw = w64.shape
    q = vt[:k].T  # (kw*F) x K
    v = (a @ q).T  # K x (C*kh): vertical filters
    r0, c_yz = products_at(k, v)
    lam = 1e-12 * max(float(np.trace(r0)) / max(r0.shape[0], 1), np.finfo(np.float64).tiny)
    # Cholesky solve of the ridged PSD system (falls back to least squares when singular):
    # lstsq's SVD of a (k kw)^2 matrix was most of a wide layer's fit (2880^2 at k = 960)
    h = _solve_right(r0 + lam * np.eye(r0.shape[0]), c_yz)  # F x (k, j)
    # W_hat = H P, so tr(D Sigma D^T) = tr(W Sigma W^T) - 2 tr(H C_yz^T) + tr(H R0 H^T)
    num = total - 2.0 * float(np.sum(h * c_yz)) + float(np.sum((h @ r0) * h))
    rel = float(np.sqrt(max(num, 0.0) / total)) if total > 0 else 0.0
    h3 = h.reshape(F, k, kw)
    # balance per component: vertical row k against horizontal slice h[:, k, :]
    nv = np.linalg.norm(v, axis=1)
    nh = np.linalg.norm(h3, axis=(0, 2))
    ok = (nv > 0) & (nh > 0)
    sc = np.ones(k)
    sc[ok] = np.sqrt(nv[ok] / nh[ok])
    v = v / sc[:, None]
    h3 = h3 * sc[None, :, None]
    return SpatialSVD(
        vertical=np.ascontiguousarray(v.reshape(k, C, kh, 1), dtype=np.float32),
        horizontal=np.ascontiguousarray(h3.reshape(F, k, 1, kw), dtype=np.float32),
        singular_values=s,
        rel_error=rel,
    )


#: weights with more entries than this use the Gram route (see the module docstring)
GRAM_ROUTE_ELEMENTS = 1 << 24
_CHUNK_ROWS = 2048


def _chunked_gram(b: NDArray[np.floating]) -> F64:
    """``B^T B`` (float64) summed over row chunks; float32 products for float32 input.

    Avoids a float64 copy of a large weight and halves the GEMM time for float32 weights;
    each chunk sums at most ``_CHUNK_ROWS`` float32 products before the float64 sum.
    """
    work = b if b.dtype in (np.float32, np.float64) else np.asarray(b, dtype=np.float64)
    g = np.zeros((work.shape[1], work.shape[1]))
    for i in range(0, work.shape[0], _CHUNK_ROWS):
        c = work[i:i + _CHUNK_ROWS]
        g += c.T @ c
    return g


def _fc_gram(b: NDArray[np.floating], sigma: NDArray[np.floating] | None) -> F64:
    """``G = B^T Sigma B`` (``B^T B`` without ``sigma``), ``F x F``."""
    if sigma is None:
        return _chunked_gram(b)
    s = np.asarray(sigma, dtype=np.float64)
    if s.shape != (b.shape[0], b.shape[0]) or not np.all(np.isfinite(s)):
        raise ValueError(f"sigma must be a finite ({b.shape[0]}, {b.shape[0]}) matrix, got {s.shape}")
    b64 = np.asarray(b, dtype=np.float64)
    g = b64.T @ (0.5 * (s + s.T)) @ b64
    return 0.5 * (g + g.T)


def _fc_gram_basis(b: NDArray[np.floating], sigma: NDArray[np.floating] | None,
                   gram: F64 | None = None) -> tuple[F64, F64]:
    """Singular values and right singular vectors (descending) from the ``F x F`` Gram's eigh."""
    ev, vec = np.linalg.eigh(_fc_gram(b, sigma) if gram is None else 0.5 * (gram + gram.T))
    ev, vec = ev[::-1], vec[:, ::-1]
    return np.sqrt(np.clip(ev, 0.0, None)), vec


def _fc_from_basis(b: NDArray[np.floating], r: int, s: F64, vec: F64,
                   bq_cache: list[NDArray[np.floating]] | None = None) -> FCSVD:
    """:func:`fc_svd` at rank ``r`` from the Gram route's basis (module docstring).

    ``bq_cache``: ``B @ vec`` columns computed so far for this basis (a fitter's); the
    leading ``r`` columns of ``B Q`` are ``B Q_r``, so a ladder pays ``K F r_max`` once
    instead of ``K F r`` per rung (VGG-19's first FC: 790 GFLOP for five rungs).
    """
    q = vec[:, :r]  # F x r, orthonormal

    def product(cols: F64) -> NDArray[np.floating]:
        # float32 weights: the product in float32 (and cached so: half the memory of fc6's 25088 x r)
        return b @ cols.astype(b.dtype) if b.dtype == np.float32 else np.asarray(b, dtype=np.float64) @ cols

    if bq_cache is None:
        bq = np.asarray(product(q), dtype=np.float64)
    else:
        have = bq_cache[0].shape[1] if bq_cache else 0
        if have < r:
            more = product(vec[:, have:r])
            bq_cache[:] = [np.concatenate([bq_cache[0], more], axis=1) if bq_cache else more]
        bq = np.asarray(bq_cache[0][:, :r], dtype=np.float64)
    right, left = _balance(q.T, bq)
    return _fc_result(left, right, s, r)


def _fc_result(left: NDArray[np.floating], right: NDArray[np.floating], s: F64, r: int) -> FCSVD:
    """The factors as float32 ONNX weights, with the spectrum and the rank-``r`` tail error."""
    return FCSVD(
        left=np.ascontiguousarray(left, dtype=np.float32),
        right=np.ascontiguousarray(right, dtype=np.float32),
        singular_values=s,
        rel_error=_tail_rel_error(s, r),
    )


def fc_svd(b: NDArray[np.floating], rank: int,
           sigma: NDArray[np.floating] | None = None, *, response: NDArray[np.floating] | None = None) -> FCSVD:
    """Rank-r factorisation of a fully connected weight ``B: K x F`` (``y = x @ B``).

    With ``sigma`` (``K x K`` second moment of ``x``) the truncation is done where the
    inputs actually carry energy; ``B_hat = B Q_r Q_r^T`` stays optimal when ``sigma`` is
    singular because only ``Sigma^1/2 B_hat`` enters the error. ``response``: the Gram
    ``B^T Sigma B`` measured directly (the layer's output second moment without its bias),
    so the ``K x K`` ``Sigma`` (25088 square for VGG-19's first FC) is never needed.
    """
    return fc_svd_fitter(b, sigma, response=response)(rank)


def fc_svd_fitter(b: NDArray[np.floating], sigma: NDArray[np.floating] | None = None, *,
                  response: NDArray[np.floating] | None = None) -> Callable[[int], FCSVD]:
    """:func:`fc_svd` of one weight at any rank, the decomposition done once.

    Why: a ladder fits the same layer at five ranks, and each fit redid the decomposition;
    for VGG-19's first FC (25088 x 4096) that is a 4096 x 4096 ``eigh``, 25 s on one core,
    so the layer's ladder took 140 s.
    """
    b_in = np.asarray(b)
    if b_in.ndim != 2:
        raise ValueError(f"FC weight must be 2-D (K, F), got shape {b_in.shape}")
    K, F = b_in.shape
    resp = _check_response(response, F) if response is not None else None
    gram_route = resp is not None or (b_in.size > GRAM_ROUTE_ELEMENTS and K >= F)
    cache: list[tuple[F64, F64, F64 | None]] = []
    bq_cache: list[NDArray[np.floating]] = []

    def basis() -> tuple[F64, F64, F64 | None]:
        """(singular values, right basis F x min, left factor source or None)."""
        if not cache:
            if gram_route:
                sv, vec = _fc_gram_basis(b_in, None if resp is not None else sigma, resp)
                cache.append((sv, vec, None))
            else:
                b64 = np.asarray(b_in, dtype=np.float64)
                if sigma is None:
                    u, sv, vt = np.linalg.svd(b64, full_matrices=False)
                    cache.append((sv, vt, u))
                else:
                    _, sv, vt = np.linalg.svd(psd_sqrt(sigma, K) @ b64, full_matrices=False)
                    cache.append((sv, vt.T, None))
        return cache[0]

    def fit(rank: int) -> FCSVD:
        r = _check_rank(rank, min(K, F), "fc_svd")
        sv, vec, u = basis()
        if gram_route:
            return _fc_from_basis(b_in, r, sv, vec, bq_cache)
        b64 = np.asarray(b_in, dtype=np.float64)
        if u is not None:  # plain SVD: vec holds vt
            sq = np.sqrt(sv[:r])
            left = u[:, :r] * sq[None, :]
            right = sq[:, None] * vec[:r]
        else:
            q = vec[:, :r]  # F x r, orthonormal columns
            # B_hat = (B q) @ q^T; _balance(rows, cols) balances the product cols @ rows.
            right, left = _balance(q.T, b64 @ q)
        return _fc_result(left, right, sv, r)

    return fit


# --------------------------------------------------------------------------- spectra only


def _gram_singular_values(m: F64) -> F64:
    """Singular values of ``m`` from the eigenvalues of its smaller Gram matrix (descending).

    Choosing a rank by energy needs only the spectrum; for a 9216x4096 FC weight this is a
    4096x4096 ``eigvalsh`` instead of a full SVD with both factor matrices.
    """
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    ev = np.linalg.eigvalsh(g)[::-1]
    return np.sqrt(np.clip(ev, 0.0, None))


def channel_spectrum(w: NDArray[np.floating], sigma: NDArray[np.floating] | None = None) -> F64:
    """Singular values :func:`channel_svd` truncates (in the data metric when ``sigma`` is given).

    In the data metric they are those of :func:`channel_basis`, the decomposition the rungs
    truncate; in the Frobenius metric the cheaper Gram route gives them without vectors.
    """
    if sigma is not None:
        return channel_basis(w, sigma).s
    w64 = np.asarray(w, dtype=np.float64)
    return _gram_singular_values(w64.reshape(w64.shape[0], -1))


def spatial_spectrum(w: NDArray[np.floating]) -> F64:
    """Singular values :func:`spatial_svd` truncates."""
    w64 = np.asarray(w, dtype=np.float64)
    F, C, kh, kw = w64.shape
    return _gram_singular_values(w64.transpose(1, 2, 3, 0).reshape(C * kh, kw * F))


def fc_spectrum(b: NDArray[np.floating], sigma: NDArray[np.floating] | None = None, *,
                response: NDArray[np.floating] | None = None) -> F64:
    """Singular values :func:`fc_svd` truncates (in the data metric when ``sigma`` or ``response`` is given)."""
    b_in = np.asarray(b)
    if response is not None:
        g = _check_response(response, b_in.shape[1])
        ev = np.linalg.eigvalsh(0.5 * (g + g.T))[::-1]
        return np.sqrt(np.clip(ev, 0.0, None))[:min(b_in.shape)]
    if b_in.size > GRAM_ROUTE_ELEMENTS and b_in.shape[0] >= b_in.shape[1]:
        ev = np.linalg.eigvalsh(_fc_gram(b_in, sigma))[::-1]
        return np.sqrt(np.clip(ev, 0.0, None))
    b64 = np.asarray(b_in, dtype=np.float64)
    if sigma is not None:
        b64 = psd_sqrt(sigma, b64.shape[0]) @ b64
    return _gram_singular_values(b64)
