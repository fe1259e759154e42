r"""Asymmetric (sequential) reconstruction from calibration statistics (Zhang et al., TPAMI 2016).

Setting
-------
A linear layer (a conv seen on its input patches, or an FC) computes ``y = W x + b`` with
``W: F x n``. In a network whose earlier layers were already compressed, the layer no longer
sees the original input ``x`` but an approximation ``x^`` (the *compressed* network's input
to it). Asymmetric reconstruction fits the compressed layer so that, fed ``x^``, it
reproduces the *original* response:

    min_{M, b'}  E || W x + b - (M x^ + b') ||^2 + lambda ||M||_F^2,     rank(M) <= K.

Because each layer's target is the original network's response, errors of earlier layers
are corrected instead of compounding through depth. ``x = x^`` gives the independent fit
in the data metric (Denton eq. 3).

Statistics
----------
Everything is a function of the streamed moments kept in :class:`CrossMoments`:
``S_xx = E[x x^T]``, ``S_hh = E[x^ x^^T]``, ``S_xh = E[x x^^T]``, the means ``m_x``,
``m_h`` and the count. Memory is ``3 n^2`` floats whatever the amount of data.

Closed form (reduced-rank regression)
-------------------------------------
*With an intercept* (bias correction, ``intercept=True``), centre everything:
``C_hh = S_hh - m_h m_h^T``, ``C_xh = S_xh - m_x m_h^T``, target cross-covariance
``C_yh = W C_xh``. For a fixed ``M`` the best intercept is ``b' = W m_x + b - M m_h``,
which makes the mean response on the fit data exact. What is left is

    E||y_c - M x^_c||^2 + lambda ||M||^2 = ||(M - M*) R^1/2||_F^2 + const,
    R = C_hh + lambda I,   M* = C_yh R^-1                      (the ridge solution).

Over rank-K ``M`` this is minimised by ``M = U_K U_K^T M*`` where ``U_K`` are the top-K
left singular vectors of ``M* R^1/2`` (Eckart-Young in the metric ``R``; the classical
reduced-rank regression). The factors are ``first = U_K^T M*`` (K x n, the first stage:
the kh x kw conv, or the first FC) and ``second = U_K`` (F x K), balanced so that both
carry the same norm per component.

*Without an intercept* (``intercept=False``) the same formulas use the uncentred moments
and ``b' = b``.

The ridge ``lambda`` is ``ridge * tr(R_0) / n`` (relative to the mean eigenvalue). It
matters when the calibration set is small: ``S_hh`` then has many near-zero directions and
an unregularised ``M*`` follows noise in them. At ``K = min(F, n)``, ``lambda = 0`` and
``x^ = x`` with ``S_xx`` nonsingular, ``M = W``: full rank is exact.

Refitting the last stage of other forms
---------------------------------------
Tucker-2, spatial, CP, structured and perforated rewrites end in a linear stage whose input
``z`` is a fixed linear map ``z = P x^`` of the original layer's input patch (``P``:
``m x n``, built by :func:`tucker2_pre`, :func:`spatial_pre`, :func:`cp_pre`, or by the
caller for other forms: the earlier stages have no bias, and zero padding commutes with a
bias-free linear map, so every output position of the last stage sees ``P`` applied to the
patch of the original geometry). Then ``E[z z^T] = P S_hh P^T`` and ``E[y z^T] =
W S_xh P^T + b m_h^T P^T``, so the last stage ``L`` (``F x m``) is the ridge least squares
above with ``x^`` replaced by ``P x^`` and no rank constraint (:func:`refit_last_stage`), or
with a rank constraint when the last *two* stages are free (:func:`lowrank_regression` with
``pre=P``: Tucker-2's core and output projection form a rank-``R_F`` map of the projected
input). No activation is needed, only the moments of the original conv's patches. For a
structured conv (:mod:`.structured`) ``P = A^T`` (the sum-pool is the composition matrix
``A`` applied to the patch) and the last stage is ``beta``. For a perforated conv the output
at a skipped position is the one computed at its nearest kept position, so the moments are
accumulated from pairs ``(x at q, x^ at nn(q))`` over all output positions ``q``; the fits
then apply unchanged.

ReLU-aware refinement (Zhang et al., sec. 3.2)
----------------------------------------------
When a ReLU ``r`` follows, the loss that matters is ``E||r(y) - r(M x^ + b')||^2``. With
an auxiliary ``z`` it is relaxed to ``||r(y) - r(z)||^2 + mu ||z - M x^ - b'||^2`` and
solved by alternation on a bounded subsample of rows: (a) ``z`` fixed: ``M, b'`` by the
reduced-rank regression above on the rows; (b) ``M, b'`` fixed: each ``z`` entry in closed
form, the better of ``z = max(0, (r(y) + mu u)/(1 + mu))`` and ``z = min(0, u)`` where
``u = M x^ + b'``. ``mu`` grows geometrically so that ``z`` is pulled to ``M x^ + b'``. The
result is kept only when its post-ReLU error on the rows is below the linear fit's.

Held-out control
----------------
:func:`expected_error` evaluates any ``(M, b')`` on moments in closed form, so a caller can
fit on one part of the calibration data, evaluate on the other, and keep whichever
candidate (typically the reconstruction and the data-metric fit) has the lower held-out
error (:func:`pick_by_holdout`): a small calibration set then cannot end up worse, on the
held-out part, than the data metric alone. :class:`HeldOutErrors` gives the same errors
from the held-out rows themselves (the candidates' responses, no moments), which is what the
pipeline's reconstruction uses: it compares fixed candidates, so it needs no ``n x n`` sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from numpy.typing import NDArray

__all__ = [
    "CrossMoments",
    "LinearFit",
    "DEFAULT_RIDGE",
    "lowrank_regression",
    "refit_last_stage",
    "expected_error",
    "pick_by_holdout",
    "HeldOutErrors",
    "relu_refine",
    "tucker2_pre",
    "spatial_pre",
    "cp_pre",
    "balance",
    "gram",
    "reduced_rank",
    "psd_pinv_sqrt",
    "channel_second_moment",
]

F64 = NDArray[np.float64]

#: ridge relative to the mean eigenvalue of the input second moment (see module docstring)
DEFAULT_RIDGE = 1e-3


#: below this many columns Gram products stay in float64 (they are cheap there)
GRAM_F32_MIN_COLS = 256


def gram(a: NDArray[np.floating], b: NDArray[np.floating] | None = None) -> F64:
    """``a^T b`` (``a^T a`` when ``b`` is None) as float64, the product itself in float32 for wide rows.

    Why: accumulating the moments is the dominant cost of reconstruction and of the data
    metric (``N n^2`` multiply-adds per batch, ``n = C kh kw`` up to a few thousand). The
    activations are float32 already, so a float32 product loses nothing the data had; its
    rounding (relative ``~1e-7 sqrt(N)``) is far below the ridge (:data:`DEFAULT_RIDGE`)
    that regularises every solve, while the running sums stay float64. Narrow problems
    (``n <`` :data:`GRAM_F32_MIN_COLS`) are cheap and stay float64 throughout, so the
    exactness checks at full rank hold to float64 precision there.
    """
    dt = np.float32 if a.shape[1] >= GRAM_F32_MIN_COLS else np.float64
    a1 = np.asarray(a, dtype=dt)
    b1 = a1 if b is None else np.asarray(b, dtype=dt)
    return np.asarray(a1.T @ b1, dtype=np.float64)


@dataclass
class CrossMoments:
    """Streamed moments of a layer's original input ``x`` and compressed-network input ``x^``.

    Rows are samples (conv patches in ``(c, i, j)`` order, or FC input vectors). Only the
    ``n x n`` sums are kept, so memory does not depend on the amount of calibration data.
    ``update(x, None)`` records ``x^ = x`` (the independent / data-metric case) at the cost
    of one Gram matrix.

    ``target`` (the layer's ``F x n`` weight ``W``, optional): every fit here reads ``x``
    only through the target response ``y = W x``, i.e. through ``W S_xh`` (``F x n``) and
    ``W S_xx W^T`` (``F x F``). With a target those are accumulated instead of ``S_xx`` and
    ``S_xh`` (``n x n`` each), which cuts the cost of an update from three ``n x n`` Gram
    products to one plus ``O(F n)`` per row: for a 512-channel 3x3 layer (``n = 4608``,
    ``F = 512``) about 2.7x fewer multiply-adds. ``s_xx`` / ``s_xh`` are then not available;
    :meth:`w_s_xh` and :meth:`response_energy` serve both modes.
    """

    n: int
    count: int = 0
    sum_x: F64 = field(default=None)  # type: ignore[assignment]
    sum_h: F64 = field(default=None)  # type: ignore[assignment]
    sum_xx: F64 | None = field(default=None)
    sum_hh: F64 = field(default=None)  # type: ignore[assignment]
    sum_xh: F64 | None = field(default=None)
    same: bool = True  # x^ == x for every row seen so far
    target: F64 | None = None
    sum_yh: F64 | None = None  # sum of (W x) x^^T (target mode)
    sum_yy: F64 | None = None  # sum of (W x)(W x)^T (target mode)

    def __post_init__(self) -> None:
        n = self.n
        if self.target is not None:
            t = np.asarray(self.target, dtype=np.float64)
            if t.ndim != 2 or t.shape[1] != n:
                raise ValueError(f"target must be (F, {n}), got {t.shape}")
            self.target = t
        if self.sum_x is None:
            self.sum_x = np.zeros(n)
            self.sum_h = np.zeros(n)
            self.sum_hh = np.zeros((n, n))
            if self.target is None:
                self.sum_xx = np.zeros((n, n))
                self.sum_xh = np.zeros((n, n))
            else:
                f = self.target.shape[0]
                self.sum_yh = np.zeros((f, n))
                self.sum_yy = np.zeros((f, f))

    def update(self, x: NDArray[np.floating], xhat: NDArray[np.floating] | None = None) -> None:
        """Add rows ``x`` (``N x n``) and their compressed counterparts ``xhat`` (None: same)."""
        xa = np.asarray(x)
        if xa.ndim != 2 or xa.shape[1] != self.n:
            raise ValueError(f"rows must be (N, {self.n}), got {xa.shape}")
        ha = xa
        if xhat is not None:
            ha = np.asarray(xhat)
            if ha.shape != xa.shape:
                raise ValueError(f"xhat shape {ha.shape} differs from x shape {xa.shape}")
            self.same = self.same and bool(np.array_equal(ha, xa))
        ghh = gram(ha)
        self.sum_x += xa.sum(axis=0, dtype=np.float64)
        self.sum_h += ha.sum(axis=0, dtype=np.float64)
        self.sum_hh += ghh
        if self.target is None:
            assert self.sum_xx is not None and self.sum_xh is not None
            self.sum_xx += ghh if xhat is None else gram(xa)
            self.sum_xh += ghh if xhat is None else gram(xa, ha)
        else:
            assert self.sum_yh is not None and self.sum_yy is not None
            dt = np.float32 if self.n >= GRAM_F32_MIN_COLS else np.float64
            y = np.asarray(xa, dtype=dt) @ self.target.T.astype(dt)
            self.sum_yh += gram(y, ha)
            self.sum_yy += gram(y)
        self.count += xa.shape[0]

    @classmethod
    def from_second_moment(cls, sigma: NDArray[np.floating], mean: NDArray[np.floating] | None = None,
                           count: int = 1) -> "CrossMoments":
        """Moments of the independent case from an existing ``E[x x^T]`` (e.g. ``PatchStats``)."""
        s = np.asarray(sigma, dtype=np.float64)
        n = s.shape[0]
        m = np.zeros(n) if mean is None else np.asarray(mean, dtype=np.float64)
        return cls(n=n, count=count, sum_x=m * count, sum_h=m * count, sum_xx=s * count,
                   sum_hh=s * count, sum_xh=s * count)

    def _div(self, a: F64 | None) -> F64:
        if self.count <= 0:
            raise ValueError("no rows accumulated")
        if a is None:
            raise ValueError("this moment is not kept (moments accumulated for a target weight)")
        return a / self.count

    def _check_target(self, w: F64) -> None:
        assert self.target is not None
        if w.shape != self.target.shape or not np.array_equal(w, self.target):
            raise ValueError("these moments were accumulated for another target weight")

    @property
    def mean_x(self) -> F64:
        return self._div(self.sum_x)

    @property
    def mean_h(self) -> F64:
        return self._div(self.sum_h)

    @property
    def s_xx(self) -> F64:
        return self._div(self.sum_xx)

    @property
    def s_hh(self) -> F64:
        return self._div(self.sum_hh)

    @property
    def s_xh(self) -> F64:
        return self._div(self.sum_xh)

    def w_s_xh(self, w: F64) -> F64:
        """``W S_xh`` (``F x n``): the target's cross moment with the compressed input."""
        if self.target is None:
            return w @ self.s_xh
        self._check_target(w)
        return self._div(self.sum_yh)

    def response_energy(self, w: F64) -> float:
        """``tr(W S_xx W^T) = E||W x||^2``."""
        if self.target is None:
            return float(np.sum((w @ self.s_xx) * w))
        self._check_target(w)
        return float(np.trace(self._div(self.sum_yy)))


@dataclass(frozen=True)
class LinearFit:
    """``y ~ second @ (first @ x^) + bias``: ``first`` (K x m), ``second`` (F x K), ``bias`` (F,).

    For a full-rank refit (:func:`refit_last_stage`) ``first`` is None and ``second`` is the
    whole ``F x m`` last stage. ``rel_error`` is the expected error on the fit moments,
    relative to the response energy ``E||W x||^2``.
    """

    first: F64 | None
    second: F64
    bias: F64
    rel_error: float

    @property
    def matrix(self) -> F64:
        """The ``F x m`` map applied to the stage input (``second @ first``)."""
        return self.second if self.first is None else self.second @ self.first


def balance(first_rows: F64, second_cols: F64) -> tuple[F64, F64]:
    """Rescale rank components so that row k of ``first`` and column k of ``second`` have equal norms.

    The product ``second @ first`` is unchanged; neither float32 factor carries the whole
    dynamic range. For a plain SVD (``sigma = I``) this turns ``(S V^T, U)`` into
    ``(S^1/2 V^T, U S^1/2)``.
    """
    nf = np.linalg.norm(first_rows, axis=1)
    ns = np.linalg.norm(second_cols, axis=0)
    ok = (nf > 0) & (ns > 0)
    scale = np.ones_like(nf)
    scale[ok] = np.sqrt(nf[ok] / ns[ok])
    return first_rows / scale[:, None], second_cols * scale[None, :]


def _sym_sqrt(a: F64) -> F64:
    a = 0.5 * (a + a.T)
    ev, vec = np.linalg.eigh(a)
    ev = np.clip(ev, 0.0, None)
    return (vec * np.sqrt(ev)) @ vec.T


def _moments_in(w2: F64, bias: F64, mom: CrossMoments, pre: F64 | None, intercept: bool
                ) -> tuple[F64, F64, F64, F64]:
    """``(R0, C_yz, m_z, m_y)``: input second moment, target cross moment and means on ``z = P x^``.

    Centred when ``intercept`` is true, uncentred (target without the bias) otherwise.
    """
    s_hh, ws_xh, m_h, m_x = mom.s_hh, mom.w_s_xh(w2), mom.mean_h, mom.mean_x
    if pre is not None:
        s_hh = pre @ s_hh @ pre.T
        ws_xh = ws_xh @ pre.T
        m_h = pre @ m_h
    m_y = w2 @ m_x + bias
    if intercept:
        r0 = s_hh - np.outer(m_h, m_h)
        c_yz = ws_xh - np.outer(w2 @ m_x, m_h)
    else:
        r0 = s_hh
        c_yz = ws_xh
    return r0, c_yz, m_h, m_y


def _ridge(r0: F64, ridge: float) -> F64:
    m = r0.shape[0]
    lam = ridge * max(float(np.trace(r0)) / max(m, 1), 0.0)
    if lam <= 0.0:
        lam = ridge * 1e-12 if ridge > 0 else 0.0
    return r0 + lam * np.eye(m)


def _solve_right(r: F64, rhs: F64) -> F64:
    """``rhs @ r^-1`` for symmetric PSD ``r`` (least-squares when singular).

    Cholesky then two triangular solves (``np.linalg.solve`` on the factor would redo an LU
    of it each time: 8 of the 9 s a 4608-input refit took).
    """
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(r, lower=True, check_finite=False), rhs.T,
                                      check_finite=False).T
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(r, rhs.T, rcond=None)[0].T


def _check(w2: NDArray[np.floating], bias: NDArray[np.floating] | None, n: int) -> tuple[F64, F64]:
    w = np.asarray(w2, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"W must be 2-D (F, n), got {w.shape}")
    if w.shape[1] != n:
        raise ValueError(f"W has {w.shape[1]} inputs, moments have {n}")
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if b.shape[0] != w.shape[0]:
        raise ValueError(f"bias has {b.shape[0]} entries, W has {w.shape[0]} outputs")
    return w, b


def reduced_rank(r0: F64, c_yz: F64, rank: int, ridge: float) -> tuple[F64, F64]:
    """Rank-``rank`` minimiser of ``||(M - C_yz R^-1) R^1/2||_F``, ``R = r0 + lambda I``: ``(first, second)``.

    The core of every fit here (module docstring); ``first`` is ``K x m``, ``second``
    ``F x K``, balanced. Callers that can form ``R`` and ``C_yz`` cheaply (Kronecker
    structure, e.g. Tucker-2's input projection) use it directly.
    """
    r = _ridge(np.asarray(r0, dtype=np.float64), ridge)
    c = np.asarray(c_yz, dtype=np.float64)
    m_star = _solve_right(r, c)
    # left singular vectors of M* R^1/2 = eigenvectors of M* R M*^T = M* C_yz^T (F x F): no n x n eigh
    g = m_star @ c.T
    ev, vec = np.linalg.eigh(0.5 * (g + g.T))
    uk = vec[:, np.argsort(ev)[::-1][:int(rank)]]
    return balance(uk.T @ m_star, uk)


def psd_pinv_sqrt(a: NDArray[np.floating], rtol: float = 1e-10) -> tuple[F64, F64]:
    """``(A^1/2, (A^1/2)^+)`` of a PSD matrix; eigenvalues below ``rtol * max`` count as zero.

    Used to whiten one mode of a weight by its input covariance and to map the result back:
    directions the data never excites (dead ReLU channels) are dropped, not blown up.
    """
    s = np.asarray(a, dtype=np.float64)
    s = 0.5 * (s + s.T)
    ev, vec = np.linalg.eigh(s)
    top = float(ev.max(initial=0.0))
    keep = ev > rtol * top if top > 0 else np.zeros_like(ev, dtype=bool)
    sq = np.where(keep, np.sqrt(np.clip(ev, 0.0, None)), 0.0)
    inv = np.where(keep, 1.0 / np.where(keep, sq, 1.0), 0.0)
    return (vec * sq) @ vec.T, (vec * inv) @ vec.T


def channel_second_moment(sigma: NDArray[np.floating], C: int, taps: int) -> F64:
    """``C x C`` input-channel second moment from a ``(c, i, j)`` patch moment (mean over taps)."""
    s = np.asarray(sigma, dtype=np.float64)
    if s.shape != (C * taps, C * taps):
        raise ValueError(f"sigma must be ({C * taps}, {C * taps}), got {s.shape}")
    return s.reshape(C, taps, C, taps).trace(axis1=1, axis2=3) / taps


def data_rel_error(w2: F64, w2_hat: F64, sigma: F64) -> float:
    """``sqrt(tr(D Sigma D^T) / tr(W Sigma W^T))``, ``D = W - W_hat``: the data-metric relative error."""
    d = w2 - w2_hat
    num = float(np.sum((d @ sigma) * d))
    den = float(np.sum((w2 @ sigma) * w2))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def expected_error(w2: NDArray[np.floating], bias: NDArray[np.floating] | None, matrix: NDArray[np.floating],
                   new_bias: NDArray[np.floating] | None, mom: CrossMoments, pre: NDArray[np.floating] | None = None
                   ) -> float:
    """``E||W x + b - (M P x^ + b')||^2 / E||W x||^2`` in closed form from the moments.

    ``M`` is ``F x m`` (``m = n`` without ``pre``). Used to compare fits on held-out moments.
    """
    w, b = _check(w2, bias, mom.n)
    m = np.asarray(matrix, dtype=np.float64)
    if pre is not None:
        m = m @ np.asarray(pre, dtype=np.float64)
    b2 = b if new_bias is None else np.asarray(new_bias, dtype=np.float64).reshape(-1)
    db = b - b2
    tyy = mom.response_energy(w)
    err = (tyy - 2.0 * float(np.sum(mom.w_s_xh(w) * m)) + float(np.sum((m @ mom.s_hh) * m))
           + float(db @ db) + 2.0 * float(db @ (w @ mom.mean_x - m @ mom.mean_h)))
    return float(np.sqrt(max(err, 0.0) / tyy)) if tyy > 0 else float(np.sqrt(max(err, 0.0)))


def lowrank_regression(w2: NDArray[np.floating], bias: NDArray[np.floating] | None, rank: int,
                       mom: CrossMoments, *, pre: NDArray[np.floating] | None = None,
                       ridge: float = DEFAULT_RIDGE, intercept: bool = True) -> LinearFit:
    """Rank-``rank`` asymmetric reconstruction ``y ~ second @ first @ (P x^) + bias`` (module docstring).

    ``w2``: the original ``F x n`` weight (a conv reshaped ``F x C*kh*kw``; an FC as
    ``F x K``, i.e. ``B^T``); ``bias``: its bias or None; ``pre``: optional fixed ``m x n``
    map applied before the fitted stages.
    """
    w, b = _check(w2, bias, mom.n)
    p = None if pre is None else np.asarray(pre, dtype=np.float64)
    r0, c_yz, m_z, m_y = _moments_in(w, b, mom, p, intercept)
    full = min(w.shape[0], r0.shape[0])
    k = int(rank)
    if k != rank or not (1 <= k <= full):
        raise ValueError(f"lowrank_regression: rank must be an integer in [1, {full}], got {rank}")
    first, second = reduced_rank(r0, c_yz, k, ridge)
    mat = second @ first
    new_b = (m_y - mat @ m_z) if intercept else b
    rel = expected_error(w, b, mat, new_b, mom, p)
    return LinearFit(first=first, second=second, bias=new_b, rel_error=rel)


def refit_last_stage(w2: NDArray[np.floating], bias: NDArray[np.floating] | None, pre: NDArray[np.floating],
                     mom: CrossMoments, *, ridge: float = DEFAULT_RIDGE, intercept: bool = True) -> LinearFit:
    """Least-squares last stage ``L`` (``F x m``) and bias for fixed earlier stages ``z = P x^``.

    Used for the forms whose shape already fixes the rank (Tucker-2's output projection
    with a fixed core, spatial's horizontal filters, CP's output 1x1, a structured or
    perforated form's last conv): the target is the original response, so the last stage
    absorbs both the approximation of the earlier stages and the drift of ``x^``.
    """
    w, b = _check(w2, bias, mom.n)
    p = np.asarray(pre, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != mom.n:
        raise ValueError(f"pre must be (m, {mom.n}), got {p.shape}")
    r0, c_yz, m_z, m_y = _moments_in(w, b, mom, p, intercept)
    mat = _solve_right(_ridge(r0, ridge), c_yz)
    new_b = (m_y - mat @ m_z) if intercept else b
    return LinearFit(first=None, second=mat, bias=new_b, rel_error=expected_error(w, b, mat, new_b, mom, p))


class HeldOutErrors:
    """:func:`expected_error` of several fixed candidates, streamed from held-out rows.

    Why not held-out moments: comparing fixed candidates needs only their responses. Per
    row that is ``(1 + #candidates) F n`` multiply-adds against ``n^2`` (and more) for
    moments, 3x less for a 3x3 conv with as many outputs as inputs, and no ``n x n`` memory.
    ``candidates``: ``(M: F x n, b')`` pairs applied to ``x^``; the target is ``W x + b``.
    """

    def __init__(self, w2: NDArray[np.floating], bias: NDArray[np.floating] | None,
                 candidates: list[tuple[NDArray[np.floating], NDArray[np.floating] | None]]) -> None:
        w = np.asarray(w2, dtype=np.float64)
        self.n = w.shape[1]
        self.bias = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        dt = np.float32 if self.n >= GRAM_F32_MIN_COLS else np.float64
        self._dt = dt
        self._w = w.T.astype(dt)
        self._cands = [(np.asarray(m, dtype=np.float64).T.astype(dt),
                        self.bias if nb is None else np.asarray(nb, dtype=np.float64).reshape(-1))
                       for m, nb in candidates]
        self.energy = 0.0
        self.sq = [0.0 for _ in candidates]

    def update(self, x: NDArray[np.floating], xhat: NDArray[np.floating] | None = None) -> None:
        """Add rows ``x`` (original inputs, ``N x n``) and ``xhat`` (compressed inputs; None: same)."""
        xa = np.asarray(x, dtype=self._dt)
        ha = xa if xhat is None else np.asarray(xhat, dtype=self._dt)
        if xa.ndim != 2 or xa.shape[1] != self.n or ha.shape != xa.shape:
            raise ValueError(f"rows must be (N, {self.n}) and alike, got {xa.shape} and {ha.shape}")
        y = (xa @ self._w).astype(np.float64)
        self.energy += float(np.sum(y * y))
        y += self.bias
        for i, (mt, nb) in enumerate(self._cands):
            d = y - (ha @ mt).astype(np.float64) - nb
            self.sq[i] += float(np.sum(d * d))

    def errors(self) -> list[float]:
        """Each candidate's ``sqrt(E||W x + b - (M x^ + b')||^2 / E||W x||^2)``, as :func:`expected_error`."""
        if self.energy > 0:
            return [float(np.sqrt(e / self.energy)) for e in self.sq]
        return [float(np.sqrt(e)) for e in self.sq]


def pick_by_holdout(w2: NDArray[np.floating], bias: NDArray[np.floating] | None,
                    candidates: list[tuple[NDArray[np.floating], NDArray[np.floating] | None]],
                    held_out: CrossMoments, pre: list[NDArray[np.floating] | None] | None = None
                    ) -> tuple[int, list[float]]:
    """Index of the candidate ``(M, b')`` with the lowest held-out error, and all the errors.

    Put the data-metric fit first: ties keep it, so reconstruction is only used when it
    measurably helps on data it was not fitted on (the fallback rule for small sets).
    """
    errs = [expected_error(w2, bias, m, nb, held_out, None if pre is None else pre[i])
            for i, (m, nb) in enumerate(candidates)]
    best = int(np.argmin(errs))
    return best, errs


# ----------------------------------------------------------------------------- ReLU-aware


def _relu(a: F64) -> F64:
    return np.maximum(a, 0.0)


def relu_refine(w2: NDArray[np.floating], bias: NDArray[np.floating] | None, rank: int,
                x_rows: NDArray[np.floating], xhat_rows: NDArray[np.floating], init: LinearFit, *,
                pre: NDArray[np.floating] | None = None, n_iter: int = 25, mu0: float = 0.01, mu_growth: float = 1.3, ridge: float = DEFAULT_RIDGE
                ) -> LinearFit:
    """ReLU-aware rank-``rank`` fit of ``r(W x + b)`` from ``r(M x^ + b')`` (module docstring).

    ``x_rows`` / ``xhat_rows``: a bounded subsample (``N x n``) of original / compressed
    inputs; ``init``: the linear fit to start from (returned unchanged when the
    refinement does not lower the post-ReLU error on the rows); ``pre``: the fixed map of
    earlier stages, as in :func:`lowrank_regression`.
    """
    x = np.asarray(x_rows, dtype=np.float64)
    w, b = _check(w2, bias, x.shape[1])
    xh = np.asarray(xhat_rows, dtype=np.float64)
    if pre is not None:
        xh = xh @ np.asarray(pre, dtype=np.float64).T
    n_rows = x.shape[0]
    ry = _relu(x @ w.T + b)
    mh = xh.mean(axis=0)
    xc = xh - mh
    r = _ridge(xc.T @ xc / n_rows, ridge)
    r_half = _sym_sqrt(r)

    def post_err(mat: F64, nb: F64) -> float:
        return float(np.sum((ry - _relu(xh @ mat.T + nb)) ** 2))

    best_mat, best_b = init.matrix, init.bias
    best = post_err(best_mat, best_b)
    mat, nb = best_mat, best_b
    mu = mu0
    k = int(rank)
    for _ in range(n_iter):
        u = xh @ mat.T + nb
        z_pos = np.maximum(0.0, (ry + mu * u) / (1.0 + mu))
        z_neg = np.minimum(0.0, u)
        c_pos = (ry - z_pos) ** 2 + mu * (z_pos - u) ** 2
        c_neg = ry ** 2 + mu * (z_neg - u) ** 2
        z = np.where(c_pos <= c_neg, z_pos, z_neg)
        mz = z.mean(axis=0)
        m_star = _solve_right(r, (z - mz).T @ xc / n_rows)
        uu, _, _ = np.linalg.svd(m_star @ r_half, full_matrices=False)
        uk = uu[:, :k]
        mat = uk @ (uk.T @ m_star)
        nb = mz - mat @ mh
        e = post_err(mat, nb)
        if e < best:
            best, best_mat, best_b = e, mat, nb
        mu *= mu_growth
    if best_mat is init.matrix:
        return init
    uu, s, vt = np.linalg.svd(best_mat, full_matrices=False)
    first, second = balance(s[:k, None] * vt[:k], uu[:, :k])
    lin = float(np.sqrt(np.sum((x @ w.T + b - xh @ best_mat.T - best_b) ** 2) / max(np.sum((x @ w.T) ** 2), 1e-300)))
    return LinearFit(first=first, second=second, bias=best_b, rel_error=lin)


# ----------------------------------------------------------------------- maps of fixed stages


def tucker2_pre(first: NDArray[np.floating], kh: int, kw: int) -> F64:
    """``P = U_C^T (x) I_{kh*kw}``: Tucker-2's input projection acting on a ``(c, i, j)`` patch.

    ``first``: the ``(R_C, C, 1, 1)`` or ``(R_C, C)`` input projection. Its output is the
    ``(r, i, j)`` patch the core conv sees.
    """
    p = np.asarray(first, dtype=np.float64).reshape(first.shape[0], -1)
    return np.kron(p, np.eye(kh * kw))


def spatial_pre(vertical: NDArray[np.floating], kw: int) -> F64:
    """Map from a ``(c, i, j)`` patch to the ``(k, j)`` input of the horizontal ``1 x kw`` stage.

    ``vertical``: ``(K, C, kh, 1)``; ``z[k, j] = sum_{c,i} V[k, c, i] x[c, i, j]``.
    """
    v = np.asarray(vertical, dtype=np.float64)
    K, C, kh = v.shape[:3]
    p = np.einsum("kci,jl->kjcil", v[..., 0], np.eye(kw))
    return p.reshape(K * kw, C * kh * kw)


def cp_pre(first: NDArray[np.floating], depthwise: NDArray[np.floating]) -> F64:
    """Map from a ``(c, i, j)`` patch to the ``K`` inputs of CP's output 1x1 stage.

    ``first``: ``(K, C, 1, 1)``; ``depthwise``: ``(K, 1, kh, kw)``;
    ``z[k] = sum_{c,i,j} a[k, c] d[k, i, j] x[c, i, j]``.
    """
    a = np.asarray(first, dtype=np.float64).reshape(first.shape[0], -1)
    d = np.asarray(depthwise, dtype=np.float64)
    K = a.shape[0]
    return np.einsum("kc,kij->kcij", a, d[:, 0]).reshape(K, -1)
