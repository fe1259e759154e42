"""CP / outer-product decomposition of a conv weight (Denton et al. 2014 eqs. 6-7; Lebedev et al. 2015).

The weight ``W: F x C x kh x kw`` is viewed as the 3-way tensor
``W_S[c, s, f] = W[f, c, i, j]`` with ``s = i*kw + j`` (shape ``C x (kh*kw) x F``) and
approximated by K rank-1 terms

    W_S ~ sum_k alpha_k (x) beta_k (x) gamma_k,   alpha_k in R^C, beta_k in R^(kh*kw), gamma_k in R^F.

As a graph: 1x1 conv C->K (``first[k, c] = alpha_k[c]``), depthwise kh x kw conv with
group K (``depthwise[k, 0] = beta_k`` reshaped ``kh x kw``, the original spatial
attributes), 1x1 conv K->F (``last[f, k] = gamma_k[f]``, the bias).

Fitting. ``method="als"``: CP-ALS. Each factor in turn is the exact least-squares solution
with the other two fixed, e.g. ``A = T_(1) (G (.) B) [(B^T B) * (G^T G) + lambda I]^-1``
(``(.)`` Khatri-Rao, ``*`` Hadamard), with a tiny ridge ``lambda`` (relative to the Gram
diagonal) so that nearly collinear components do not blow up. Columns are normalised after
every update (weights kept separately), the factors are initialised from the leading
singular vectors of the three unfoldings (HOSVD), padded with seeded Gaussian columns
when K exceeds a mode's size, and the loop stops when a sweep improves the relative error by
less than ``tol`` times that error (by default 1e-8 for small kernels, 0.1 % for large ones,
where sweeps are expensive; large tensors also run the MTTKRP GEMMs in float32). ``method="greedy"``: Denton's procedure, K times: fit one rank-1 term to the
residual by rank-1 ALS (higher-order power iteration from the HOSVD vectors), subtract it.

Unlike the SVD-based rewrites, CP is not exact in general (the CP rank of a tensor is not
known and the best rank-K approximation may not exist), so ``rel_error`` is an honest
measurement, computed in float64 from the fitted factors. Each term's scale is split
evenly (cube root) across ``alpha``, ``beta`` and ``gamma`` so that no float32 factor holds
the whole dynamic range.

Data metric (``sigma`` given, the ``C*kh*kw`` second moment of the input patches, so the
error that matters is ``tr(D Sigma D^T)`` for ``D = W2 - W2_hat``). A CP-ALS weighted by the
full ``Sigma`` has no cheap update for ``alpha`` (a ``C*K`` square system), so the fit is
done in two exact steps instead ("whiten, fit, unwhiten, refit"): (1) the channel mode is
whitened by ``S = Sigma_c^1/2`` (``Sigma_c`` the channel second moment, ``Sigma`` averaged
over kernel taps; with the Kronecker approximation ``Sigma ~ Sigma_c (x) I`` the data error
is the Frobenius error of the whitened tensor ``W x_C S``), CP-ALS runs on the whitened
tensor and ``alpha = S^+ alpha'`` maps back (``S^+`` the pseudo-inverse: unexcited
channels get weight 0); (2) with ``alpha`` and ``beta`` fixed the output stage ``gamma`` is the
exact least-squares solution in the full metric, ``Gamma = W2 Sigma P^T (P Sigma P^T)^-1``
with ``P`` the ``K x C*kh*kw`` map of the first two stages (:func:`reconstruct.cp_pre`).
Step (2) can only lower the data error of step (1); ``rel_error`` is the data-metric error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

__all__ = ["CPConv", "cp_conv"]

log = logging.getLogger(__name__)

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]

_RIDGE = 1e-10  # relative to the mean diagonal of the normal equations
#: default stopping threshold: a sweep must improve the error by 0.1 % of itself. Measured on
#: ZFNet-512's 512x512x3x3 convs (seeded weights, rank 491): the error goes 0.803 -> 0.791 ->
#: 0.784 after 8, 16, 32 sweeps (1.1 s CPU each), so the remaining sweeps to the 200 cap buy
#: about 0.01 of relative error for over 3 minutes per layer
DEFAULT_TOL = 1e-3
#: kernels with ``size * rank`` up to this run to the tight tolerance instead: their sweeps cost
#: microseconds, and ALS on an exactly low-rank tensor can sit in a "swamp" (error flat at
#: 0.137 for 150 sweeps, then 4e-10) that the 0.1 % rule would stop in
_SMALL_WORK = 1_000_000
_GREEDY_TOL = 1e-8


@dataclass(frozen=True)
class CPConv:
    """Factors in ONNX layout: ``first`` (K, C, 1, 1), ``depthwise`` (K, 1, kh, kw), ``last`` (F, K, 1, 1)."""

    first: F32
    depthwise: F32
    last: F32
    rel_error: float
    n_iter_run: int

    @property
    def rank(self) -> int:
        return int(self.first.shape[0])


def _unfold(t: F64, mode: int) -> F64:
    return np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)


def _leading_vectors(mat: F64, r: int) -> F64:
    """Up to ``r`` leading left singular vectors of a wide matrix, via ``eigh`` of its Gram.

    Squaring the condition number is irrelevant for an initialisation, and the Gram route
    costs one GEMM plus a small eigensolve instead of an SVD of the wide unfolding.
    """
    evals, evecs = np.linalg.eigh(mat @ mat.T)
    order = np.argsort(evals)[::-1][: min(r, mat.shape[0])]
    return evecs[:, order]


def _hosvd_init(t: F64, rank: int, rng: np.random.Generator) -> list[F64]:
    """Leading left singular vectors of each unfolding, Gaussian-padded beyond the mode size.

    Padding is random (but seeded) rather than zero because a zero column makes the normal
    equations singular and would stay zero under ALS.
    """
    factors = []
    for mode in range(3):
        cols = _leading_vectors(_unfold(t, mode), rank)
        n = t.shape[mode]
        if cols.shape[1] < rank:
            extra = rng.standard_normal((n, rank - cols.shape[1]))
            extra /= np.linalg.norm(extra, axis=0, keepdims=True)
            cols = np.concatenate([cols, extra], axis=1)
        factors.append(cols)
    return factors


def _mttkrp(t: NDArray[np.floating], factors: list[F64], mode: int, tg: NDArray[np.floating] | None = None) -> F64:
    """``T_(mode) @ khatri_rao(other factors)`` via two BLAS contractions, never forming the KR product.

    ``tg`` is ``T x_3 g`` (C x S x K) when the caller has it: modes 0 and 1 of one ALS sweep
    share it (g changes only in mode 2), which saves a third of the sweep's GEMM work. The
    contractions run in ``t``'s dtype (float32 for large tensors, see :func:`_als`).
    """
    a, b, g = (f.astype(t.dtype, copy=False) for f in factors)
    if mode in (0, 1) and tg is None:
        tg = np.tensordot(t, g, axes=(2, 0))  # C x S x K
    if mode == 0:
        return np.einsum("csk,sk->ck", tg, b).astype(np.float64)
    if mode == 1:
        return np.einsum("csk,ck->sk", tg, a).astype(np.float64)
    c, s, f = t.shape
    ta = (a.T @ t.reshape(c, s * f)).reshape(-1, s, f)  # K x S x F, small: contract C first
    return np.einsum("ksf,sk->fk", ta, b).astype(np.float64)


def _solve_ridge(gram: F64, rhs: F64) -> F64:
    """``rhs @ (gram + lambda I)^-1`` with ``lambda`` a tiny fraction of the mean diagonal."""
    k = gram.shape[0]
    lam = _RIDGE * max(float(np.trace(gram)) / k, np.finfo(np.float64).tiny)
    reg = gram + lam * np.eye(k)
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(reg, check_finite=False), rhs.T,
                                      check_finite=False).T
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(reg, rhs.T, rcond=None)[0].T


#: ALS sweeps whose two big contractions exceed this many multiply-adds run them in float32
_F32_WORK = 50_000_000
#: ... until the error estimate falls below this: it comes from ``||T||^2 - 2<T, T_hat> + ||T_hat||^2``,
#: whose cancellation turns float32 rounding into an error floor of about 1e-4
_F64_BELOW = 1e-2


def _als(t: F64, rank: int, n_iter: int, tol: float, rng: np.random.Generator) -> tuple[list[F64], F64, int]:
    """CP-ALS; returns unit-column factors, the weights and the sweeps run.

    Stops when a sweep lowers the relative error by less than ``tol`` times the error itself
    (a relative test: on an exactly low-rank tensor the error falls geometrically to rounding
    level and the test only fires there; on a full-rank 512 x 9 x 512 kernel each sweep costs
    two GEMMs of 1.2 G multiply-adds and the error creeps down by 0.05 % per sweep for
    hundreds of sweeps, see BENCHMARKS.md "Planning time and memory").

    The MTTKRP contractions of large tensors run in float32 (twice the BLAS throughput; their
    rounding, ~1e-7 relative, is far below the fit error of any tensor that large that is not
    exactly low-rank, and the normal equations, the error and ``rel_error`` stay float64); a fit
    that gets near-exact switches back to float64 so that exact low rank is still recovered.
    """
    norm2 = float(np.sum(t * t))
    factors = _hosvd_init(t, rank, rng)
    work = t if t.size * rank <= _F32_WORK else t.astype(np.float32)
    weights = np.ones(rank)
    err = np.inf
    it = 0
    while it < n_iter:
        it += 1
        tg = np.tensordot(work, factors[2].astype(work.dtype, copy=False), axes=(2, 0))  # shared by modes 0 and 1
        for mode in range(3):
            others = [factors[m] for m in range(3) if m != mode]
            gram = (others[0].T @ others[0]) * (others[1].T @ others[1])
            m = _mttkrp(work, factors, mode, tg if mode < 2 else None)
            new = _solve_ridge(gram, m)
            norms = np.linalg.norm(new, axis=0)
            norms[norms == 0] = 1.0
            factors[mode] = new / norms
            weights = norms
        # ||T - T_hat||^2 = ||T||^2 - 2 <T, T_hat> + ||T_hat||^2, from the last update
        # (m is the mode-2 MTTKRP, new the unnormalised last factor): no reconstruction.
        a, b, _ = factors
        inner = float(np.sum(new * m))
        gram_all = (a.T @ a) * (b.T @ b) * (new.T @ new)
        resid2 = max(0.0, norm2 - 2.0 * inner + float(np.sum(gram_all)))
        new_err = np.sqrt(resid2 / norm2) if norm2 > 0 else 0.0
        if work.dtype == np.float32 and new_err < _F64_BELOW:
            work, err = t, new_err  # near-exact fit: float32 rounding would now hide the progress
            continue
        if err - new_err < tol * min(err, 1.0):
            err = new_err
            break
        err = new_err
    return factors, weights, it


def _greedy(t: F64, rank: int, n_iter: int, tol: float) -> tuple[list[F64], F64, int]:
    """Denton's greedy fit: K times, a rank-1 power iteration on the residual, then subtract."""
    resid = t.copy()
    C, S, F = t.shape
    cols: list[list[F64]] = [[], [], []]
    weights = np.zeros(rank)
    total_it = 0
    for k in range(rank):
        # Start from the dominant spatial profile b, then the best rank-1 (a, g) of the
        # C x F matrix resid x_2 b: cheaper than SVDs of the wide unfoldings, as good a start.
        b = _leading_vectors(_unfold(resid, 1), 1)[:, 0]
        u, _, vt = np.linalg.svd(np.tensordot(resid, b, axes=(1, 0)), full_matrices=False)
        a, g = u[:, 0].copy(), vt[0].copy()
        flat = resid.reshape(C, S * F)
        lam = float(a @ np.tensordot(resid, b, axes=(1, 0)) @ g)
        for _ in range(n_iter):
            total_it += 1
            a = np.tensordot(resid, b, axes=(1, 0)) @ g  # sum_{s,f} R[c,s,f] b[s] g[f]
            a /= np.linalg.norm(a) or 1.0
            ra = (a @ flat).reshape(S, F)  # R x_1 a
            b = ra @ g
            b /= np.linalg.norm(b) or 1.0
            g = b @ ra
            new_lam = float(np.linalg.norm(g))
            g /= new_lam or 1.0
            done = abs(new_lam - abs(lam)) <= tol * max(new_lam, np.finfo(np.float64).tiny)
            lam = new_lam
            if done:
                break
        resid -= lam * np.einsum("c,s,f->csf", a, b, g)
        for mode, v in enumerate((a, b, g)):
            cols[mode].append(v)
        weights[k] = lam
    factors = [np.stack(c, axis=1) for c in cols]
    return factors, weights, total_it


def cp_conv(w: NDArray[np.floating], rank: int, method: str = "als", n_iter: int = 200,
            tol: float | None = None, seed: int = 0, sigma: NDArray[np.floating] | None = None) -> CPConv:
    """Rank-K CP decomposition of a conv weight into 1x1 -> depthwise -> 1x1 factors.

    ALS is the default because it refits all terms jointly and so fits better than the
    greedy sequence at the same rank (and therefore the same MACs); greedy is kept for
    fidelity to Denton et al. and as a robust fallback (it never diverges).

    ``tol``: ALS stops when a sweep improves the relative error by less than ``tol`` times
    that error (default :data:`DEFAULT_TOL` for large kernels, 1e-8 when ``C*kh*kw*F*K`` is at
    most :data:`_SMALL_WORK`); greedy's power iteration stops when a term's weight changes by
    less than ``tol`` relative (default 1e-8: its sweeps are rank-1 and cheap).
    """
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 4:
        raise ValueError(f"conv weight must be 4-D (F, C, kh, kw), got shape {w64.shape}")
    k = int(rank)
    if k != rank or k < 1:
        raise ValueError(f"cp_conv: rank must be an integer >= 1, got {rank}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")
    F, C, kh, kw = w64.shape
    t = w64.transpose(1, 2, 3, 0).reshape(C, kh * kw, F)
    if tol is None:
        small = t.size * k <= _SMALL_WORK
        tol = _GREEDY_TOL if method != "als" or small else DEFAULT_TOL
    if sigma is not None:
        return _cp_data(w64, t, k, method, n_iter, tol, seed, sigma)
    norm = float(np.linalg.norm(t))

    if norm == 0.0:
        factors = [np.zeros((C, k)), np.zeros((kh * kw, k)), np.zeros((F, k))]
        weights = np.zeros(k)
        it = 0
    elif method == "als":
        factors, weights, it = _als(t, k, n_iter, tol, np.random.default_rng(seed))
    elif method == "greedy":
        factors, weights, it = _greedy(t, k, n_iter, tol)
    else:
        raise ValueError(f"cp_conv: method must be 'als' or 'greedy', got {method!r}")

    # Split each term's scale evenly: column norms of the three factors times the weight.
    a, b, g = factors
    scale = np.cbrt(np.abs(weights))
    sign = np.where(weights < 0, -1.0, 1.0)
    a = a * (scale * sign)[None, :]
    b = b * scale[None, :]
    g = g * scale[None, :]

    t_hat = np.einsum("ck,sk,fk->csf", a, b, g, optimize=True)
    rel = float(np.linalg.norm(t - t_hat) / norm) if norm > 0 else 0.0
    log.debug("cp_conv %s rank %d: rel_error %.3g after %d iterations", method, k, rel, it)

    return CPConv(
        first=np.ascontiguousarray(a.T.reshape(k, C, 1, 1), dtype=np.float32),
        depthwise=np.ascontiguousarray(b.T.reshape(k, 1, kh, kw), dtype=np.float32),
        last=np.ascontiguousarray(g.reshape(F, k, 1, 1), dtype=np.float32),
        rel_error=rel,
        n_iter_run=it,
    )


def _cp_data(w64: F64, t: F64, k: int, method: str, n_iter: int, tol: float, seed: int,
             sigma: NDArray[np.floating]) -> CPConv:
    """Data-metric CP (module docstring): whitened ALS, unwhitened input factor, refitted output stage."""
    from .reconstruct import channel_second_moment, cp_pre, data_rel_error, psd_pinv_sqrt

    F, C, kh, kw = w64.shape
    n = C * kh * kw
    s = np.asarray(sigma, dtype=np.float64)
    if s.shape != (n, n) or not np.all(np.isfinite(s)):
        raise ValueError(f"sigma must be a finite ({n}, {n}) matrix, got {s.shape}")
    s = 0.5 * (s + s.T)
    s_half, s_pinv = psd_pinv_sqrt(channel_second_moment(s, C, kh * kw))
    tw = np.tensordot(s_half, t, axes=(1, 0))  # whitened channel mode
    white = cp_conv(tw.reshape(C, kh, kw, F).transpose(3, 0, 1, 2), k, method=method, n_iter=n_iter, tol=tol,
                    seed=seed)
    a = s_pinv @ white.first.reshape(k, C).astype(np.float64).T  # C x K
    b = white.depthwise.reshape(k, kh * kw).astype(np.float64).T  # S x K
    first = a.T.reshape(k, C, 1, 1)
    dw = b.T.reshape(k, 1, kh, kw)
    p = cp_pre(first, dw)  # K x n
    sp = s @ p.T
    r0 = p @ sp
    w2 = w64.reshape(F, -1)
    lam = 1e-12 * max(float(np.trace(r0)) / k, np.finfo(np.float64).tiny)
    g = np.linalg.lstsq(r0 + lam * np.eye(k), (w2 @ sp).T, rcond=None)[0].T  # F x K
    # split each term's scale evenly over alpha, beta, gamma, as in the Frobenius fit
    na, nb, ng = (np.linalg.norm(x, axis=0) for x in (a, b, g))
    ok = (na > 0) & (nb > 0) & (ng > 0)
    tot = np.where(ok, na * nb * ng, 1.0)
    cube = np.cbrt(tot)
    a = a * np.where(ok, cube / np.where(ok, na, 1.0), 1.0)
    b = b * np.where(ok, cube / np.where(ok, nb, 1.0), 1.0)
    g = g * np.where(ok, cube / np.where(ok, ng, 1.0), 1.0)
    w_hat = np.einsum("ck,sk,fk->fcs", a, b, g, optimize=True).reshape(F, -1)
    return CPConv(
        first=np.ascontiguousarray(a.T.reshape(k, C, 1, 1), dtype=np.float32),
        depthwise=np.ascontiguousarray(b.T.reshape(k, 1, kh, kw), dtype=np.float32),
        last=np.ascontiguousarray(g.reshape(F, k, 1, 1), dtype=np.float32),
        rel_error=data_rel_error(w2, w_hat, s),
        n_iter_run=white.n_iter_run,
    )
