r"""Structured convolutions (Bhalgat et al. 2020): projection and the sum-pool rewrite.

Structure
---------
A kernel ``K`` of shape ``C x kh x kw`` is *structured* with parameters ``(c, nh, nw)``
(``1 <= c <= C``, ``1 <= nh <= kh``, ``1 <= nw <= kw``) when it is a weighted sum of
``c*nh*nw`` *composite kernels*: the composite kernel at offset ``(a, p, q)`` is the
indicator of the box

    channels a .. a+Pc-1,  rows p .. p+Ph-1,  cols q .. q+Pw-1,
    Pc = C - c + 1,  Ph = kh - nh + 1,  Pw = kw - nw + 1            (the pool window)

Flattening kernels in ONNX order (channel, row, col), the composite kernels are the columns
of the composition matrix ``A`` of shape ``(C*kh*kw, c*nh*nw)`` and a structured kernel is
``vec(K) = A beta`` with ``beta`` of shape ``(c, nh, nw)`` (flattened in the same order).
``A`` is the Kronecker product of three 1-D band matrices of ones, so it has full column
rank. *Spatial-only* structure is ``c = C`` (channel window ``Pc = 1``).

Projection
----------
Post-training, each output filter ``W_f`` is replaced by its least-squares projection onto
``range(A)``:

    beta_f = argmin_b ||A b - W_f||^2                    (Frobenius)
    beta_f = argmin_b (A b - W_f)^T Sigma (A b - W_f)    (data-aware)

where ``Sigma = E[p p^T]`` is the second moment of the layer's input patches ``p`` (in the
same flattened order), so the data-aware objective is exactly the expected squared error of
the layer's pre-bias output. ``A`` is shared by all filters: one least-squares solve with
``F`` right-hand sides.

Equivalence with sum-pooling
----------------------------
Let ``xp`` be the input zero-padded with the conv's pads, strides ``(sh, sw)``, dilations
``(dh, dw)``. With ``W_f = sum_{a,p,q} beta[f,a,p,q] * box(a,p,q)``:

    conv_W(x)[f, y, z]
      = sum_{ch,u,v} W[f,ch,u,v] * xp[ch, sh*y + dh*u, sw*z + dw*v]
      = sum_{a,p,q} beta[f,a,p,q] * sum_{i<Pc, j<Ph, k<Pw} xp[a+i, sh*y + dh*(p+j), sw*z + dw*(q+k)]
      = sum_{a,p,q} beta[f,a,p,q] * S[a, sh*y + dh*p, sw*z + dw*q]
      = conv_beta(S)[f, y, z]     (strides (sh, sw), dilations (dh, dw), NO padding)

with the sum-pool

    S[a, r, t] = sum_{i<Pc, j<Ph, k<Pw} xp[a+i, r + dh*j, t + dw*k],

i.e. a window ``Pc x Ph x Pw``, stride 1 on every axis, dilation 1 over channels and
``(dh, dw)`` over space, applied to the *padded* input. ``S`` has shape
``c x (Hp - dh*(Ph-1)) x (Wp - dw*(Pw-1))`` and the small conv then produces
``floor((Hp - dh*(kh-1) - 1)/sh) + 1`` rows -- exactly the original output size. The
identity is exact for any pads/strides/dilations (it is a re-association of one sum), so
``conv(W_hat) == conv(beta, sumpool(pad(x)))`` up to float rounding.

ONNX realisation: ``AveragePool(kernel=(Ph, Pw), strides=1, pads=original pads,
dilations=(dh, dw), count_include_pad=1)`` computes ``S / (Pc*Ph*Pw)`` (``count_include_pad=1``
is required so the padded zeros are part of the divisor; with the default 0 the border
windows would be divided by fewer elements). Folding the area into the small kernel
(``small_kernel``) makes the pool a plain AveragePool. With channel structure (``c < C``) the
pool is 3-D over (channel, row, col): Reshape ``(N, C, H, W) -> (N, 1, C, H, W)``, AveragePool
with kernel ``(Pc, Ph, Pw)``, pads ``(0, t, l, 0, b, r)``, dilations ``(1, dh, dw)``, then
Reshape to ``(N, c, Hs, Ws)``. AveragePool has a ``dilations`` attribute only from opset 19,
so a dilated conv whose dilated axis has a pool window > 1 needs opset >= 19
(``StructuredRewrite.min_opset``). Only ``group == 1`` convs are covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = [
    "Structured",
    "StructuredRewrite",
    "composition_matrix",
    "project",
    "small_kernel",
    "structured_rewrite",
    "structured_macs",
    "structured_pool_adds",
    "structured_params_for_speedup",
]


@dataclass(frozen=True, eq=False)
class Structured:
    """Projection of a conv weight onto the structured subspace.

    ``beta``: (F, c, nh, nw) composite-kernel coefficients (the small conv *before* the pool
    area is folded in; see ``small_kernel``). ``w_hat``: (F, C, kh, kw) = ``A beta``, the
    structured kernel whose conv the rewrite reproduces. ``rel_error``: relative error of
    ``w_hat`` against the original weight, Frobenius or in the ``Sigma`` metric when one was
    given. ``pool``: sum-pool window ``(C-c+1, kh-nh+1, kw-nw+1)``.
    """

    beta: np.ndarray
    w_hat: np.ndarray
    rel_error: float
    pool: tuple[int, int, int]

    @property
    def params(self) -> tuple[int, int, int]:
        """``(c, nh, nw)``."""
        return tuple(int(s) for s in self.beta.shape[1:])  # type: ignore[return-value]

    @property
    def area(self) -> int:
        """Number of elements in the pool window (the AveragePool divisor)."""
        return int(np.prod(self.pool))

    @property
    def channel_pool(self) -> bool:
        """True when the pool also runs over channels (needs the 5-D reshape)."""
        return self.pool[0] > 1


@dataclass(frozen=True, eq=False)
class StructuredRewrite:
    """Attributes of the two ONNX nodes (AveragePool then Conv) replacing the original conv.

    When ``channel_pool`` is true the pool attributes are 3-D (channel, row, col) and the
    pool runs on the input reshaped to ``(N, 1, C, H, W)``; otherwise they are 2-D. ``has_pool``
    is false when the window is a single element (structure equal to the full kernel): the
    pool is then the identity and can be skipped, and ``conv_pads`` carries the original pads
    (otherwise they are all zeros because the padding moved onto the pool).
    """

    pool_kernel: tuple[int, ...]
    pool_strides: tuple[int, ...]
    pool_pads: tuple[int, ...]
    pool_dilations: tuple[int, ...]
    count_include_pad: int
    conv_weight: np.ndarray
    conv_strides: tuple[int, int]
    conv_pads: tuple[int, int, int, int]
    conv_dilations: tuple[int, int]
    channel_pool: bool
    has_pool: bool
    min_opset: int


def _band(length: int, n: int) -> np.ndarray:
    """1-D composition matrix: column j holds ones at rows j .. j + length - n."""
    if not 1 <= n <= length:
        raise ValueError(f"structure size {n} must be in [1, {length}]")
    a = np.zeros((length, n))
    win = length - n + 1
    for j in range(n):
        a[j:j + win, j] = 1.0
    return a


def composition_matrix(C: int, kh: int, kw: int, c: int, nh: int, nw: int) -> np.ndarray:
    """Composition matrix ``A`` of shape ``(C*kh*kw, c*nh*nw)`` (float64, entries 0/1).

    Built as ``kron(band(C, c), band(kh, nh), band(kw, nw))`` because a box indicator is the
    outer product of three 1-D intervals; the Kronecker order matches the C-order flattening
    of both the kernel ``(C, kh, kw)`` and ``beta`` ``(c, nh, nw)``.
    """
    return np.kron(_band(C, c), np.kron(_band(kh, nh), _band(kw, nw)))


def _kron_apply(
    x: np.ndarray, m0: np.ndarray | None, m1: np.ndarray | None, m2: np.ndarray | None
) -> np.ndarray:
    """``(m0 kron m1 kron m2) @ vec`` applied to the trailing three axes of ``x``.

    Working on the factors avoids ever forming (or solving with) the ``D x m`` matrix ``A``:
    for a 512-channel 3x3 layer that is the difference between milliseconds and a minute.
    ``None`` stands for an identity factor (an axis without structure, e.g. ``c = C``) and
    skips that contraction.
    """
    y = x
    if m2 is not None:
        y = np.tensordot(y, m2, axes=([-1], [1]))
    if m1 is not None:
        y = np.moveaxis(np.tensordot(y, m1, axes=([-2], [1])), -1, -2)
    if m0 is not None:
        y = np.moveaxis(np.tensordot(y, m0, axes=([-3], [1])), -1, -3)
    return y


def _factors(C: int, kh: int, kw: int, c: int, nh: int, nw: int) -> list[np.ndarray | None]:
    """The three band factors of ``A``; None where the factor is the identity (n == length)."""
    return [None if n == length else _band(length, n)
            for length, n in ((C, c), (kh, nh), (kw, nw))]


def project(
    w: np.ndarray,
    c: int,
    nh: int,
    nw: int,
    sigma: np.ndarray | None = None,
    ridge: float = 1e-6,
) -> Structured:
    """Closest structured kernel, per output filter, in the Frobenius or data metric.

    The structured subspace is linear, so the best kernel is a least-squares projection in
    closed form; no iterative regulariser (the paper's training-time route) is needed
    post-training. All ``F`` filters share ``A`` and are solved together.

    Frobenius: ``A`` is a Kronecker product of three band matrices, so
    ``pinv(A) = pinv(a0) kron pinv(a1) kron pinv(a2)`` and the projection is three small
    contractions. With ``sigma`` the objective is the expected output error on the
    calibration patches, which matters when the input is correlated (natural images,
    post-ReLU maps): errors along directions the data rarely excites are cheap. It is solved
    through the ``m x m`` normal equations ``A^T S A beta = A^T S W`` with
    ``S = sigma + ridge*mean(diag(sigma))*I``; the diagonal loading keeps them well posed when
    the patch covariance is singular (directions the data never excites then fall back to the
    Frobenius solution instead of an arbitrary one). ``rel_error`` is reported in the
    unloaded metric, computed in float64 before the factors are cast back to ``w``'s dtype.
    """
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"expected a conv weight (F, C, kh, kw), got shape {w.shape}")
    F, C, kh, kw = (int(s) for s in w.shape)
    if not (1 <= c <= C and 1 <= nh <= kh and 1 <= nw <= kw):
        raise ValueError(
            f"structure ({c}, {nh}, {nw}) must lie within the kernel ({C}, {kh}, {kw})"
        )
    bands = _factors(C, kh, kw, c, nh, nw)
    D, m = C * kh * kw, c * nh * nw
    w64 = w.astype(np.float64)
    if sigma is None:
        beta = _kron_apply(w64, *(None if b is None else np.linalg.pinv(b) for b in bands))
    else:
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.shape != (D, D):
            raise ValueError(f"sigma must be ({D}, {D}), got {sigma.shape}")
        s = 0.5 * (sigma + sigma.T)
        mean_diag = float(np.trace(s)) / D
        lam = ridge * mean_diag if mean_diag > 0 else 1.0
        bt = [None if b is None else b.T for b in bands]
        sa = _kron_apply(s.reshape(D, C, kh, kw), *bt).reshape(D, m)  # S A
        gram = _kron_apply(sa.T.reshape(m, C, kh, kw), *bt).reshape(m, m)  # A^T S A
        ata = [np.eye(n) if b is None else b.T @ b for b, n in zip(bands, (c, nh, nw))]
        gram += lam * np.kron(ata[0], np.kron(ata[1], ata[2]))  # lam A^T A
        ws = w64.reshape(F, D) @ s  # (F, D): the one F x D x D product
        rhs = _kron_apply(ws.reshape(F, C, kh, kw), *bt).reshape(F, m)  # W S A
        rhs += lam * _kron_apply(w64, *bt).reshape(F, m)
        gram = 0.5 * (gram + gram.T)
        try:
            sol = scipy.linalg.solve(gram, rhs.T, assume_a="pos")
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            sol = np.linalg.lstsq(gram, rhs.T, rcond=None)[0]
        beta = sol.T.reshape(F, c, nh, nw)
    w_hat = _kron_apply(beta, *bands)  # (F, C, kh, kw)
    E = (w_hat - w64).reshape(F, D)
    W2 = w64.reshape(F, D)
    if sigma is None:
        num = float(np.sum(E * E))
        den = float(np.sum(W2 * W2))
    else:
        es = beta.reshape(F, m) @ sa.T - ws  # E S = beta A^T S - W S
        num = max(float(np.sum(es * E)), 0.0)
        den = max(float(np.sum(ws * W2)), 0.0)
    rel = float(np.sqrt(num / den)) if den > 0 else (0.0 if num == 0 else float("inf"))
    dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float64
    return Structured(
        beta=beta.astype(dtype),
        w_hat=w_hat.astype(dtype),
        rel_error=rel,
        pool=(C - c + 1, kh - nh + 1, kw - nw + 1),
    )


def small_kernel(result: Structured) -> np.ndarray:
    """Weights ``(F, c, nh, nw)`` of the small conv that follows a plain AveragePool.

    AveragePool (count_include_pad=1) returns the window *mean*, i.e. the sum-pool divided by
    the window area; multiplying ``beta`` by the area undoes that, so no extra Mul is needed.
    """
    return (result.beta * result.area).astype(result.beta.dtype)


def structured_rewrite(
    result: Structured,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> StructuredRewrite:
    """Node attributes for ``pool -> conv`` that reproduce ``conv(w_hat)`` exactly.

    The original padding moves onto the pool (with ``count_include_pad=1`` the folded pads
    count as zeros, the same as an explicit Pad), the pool has stride 1 and the conv's
    spatial dilation, and the small conv keeps the original stride and dilation with no
    padding (see the module docstring for the derivation). ``min_opset`` is 19 when a dilated
    axis has a pool window longer than 1 (AveragePool gained ``dilations`` in opset 19);
    callers on older opsets must decline then.
    """
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    t, l, b, r = (int(p) for p in pads)
    pc, ph, pw = result.pool
    needs_dil = (dh > 1 and ph > 1) or (dw > 1 and pw > 1)
    if result.channel_pool:
        kernel: tuple[int, ...] = (pc, ph, pw)
        ppads: tuple[int, ...] = (0, t, l, 0, b, r)
        pdil: tuple[int, ...] = (1, dh, dw)
    else:
        kernel, ppads, pdil = (ph, pw), (t, l, b, r), (dh, dw)
    return StructuredRewrite(
        pool_kernel=kernel,
        pool_strides=(1,) * len(kernel),
        pool_pads=ppads,
        pool_dilations=pdil,
        count_include_pad=1,
        conv_weight=small_kernel(result),
        conv_strides=(sh, sw),
        conv_pads=(0, 0, 0, 0) if result.area > 1 else (t, l, b, r),
        conv_dilations=(dh, dw),
        channel_pool=result.channel_pool,
        has_pool=result.area > 1,
        min_opset=19 if needs_dil else 7,
    )


def structured_macs(
    F: int, C: int, kh: int, kw: int, Ho: int, Wo: int, c: int, nh: int, nw: int
) -> int:
    """Multiply-adds of the small conv, ``F*c*nh*nw*Ho*Wo`` (the pool is counted apart)."""
    if not (1 <= c <= C and 1 <= nh <= kh and 1 <= nw <= kw):
        raise ValueError("structure (c, nh, nw) must lie within the kernel (C, kh, kw)")
    return int(F) * int(c) * int(nh) * int(nw) * int(Ho) * int(Wo)


def structured_pool_adds(
    C: int,
    kh: int,
    kw: int,
    H: int,
    W: int,
    c: int,
    nh: int,
    nw: int,
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
) -> int:
    """Additions of the sum-pool, naive window sums: ``c*Hs*Ws*(Pc*Ph*Pw - 1)``.

    The pool runs at stride 1 over the whole padded input (``Hs = H+t+b - dh*(Ph-1)``), even
    when the small conv is strided and reads only some of its outputs, because that is what
    one ONNX AveragePool computes. Each output is counted as ``area - 1`` additions (no
    running/separable sums, which a runtime may or may not use), and the AveragePool's final
    scaling (one multiply per output) is not included. Kept apart from ``structured_macs``
    because additions are much cheaper than multiply-adds on most hardware.
    """
    t, l, b, r = (int(p) for p in pads)
    dh, dw = (int(d) for d in dilations)
    pc, ph, pw = C - c + 1, kh - nh + 1, kw - nw + 1
    hs = H + t + b - dh * (ph - 1)
    ws = W + l + r - dw * (pw - 1)
    if hs < 1 or ws < 1:
        return 0
    return int(c) * hs * ws * (pc * ph * pw - 1)


def structured_params_for_speedup(
    F: int, C: int, kh: int, kw: int, S: float, channel: bool = False
) -> tuple[int, int, int] | None:
    """Largest structure ``(c, nh, nw)`` whose MAC ratio ``C*kh*kw / (c*nh*nw)`` is >= ``S``.

    Largest = most coefficients per filter (``c*nh*nw``), hence the smallest approximation
    error one can expect for that speed-up. Ties prefer a larger ``c`` (less or no channel
    pooling, which needs the 5-D reshape) and then a small kernel whose shape follows the
    original aspect ratio. Spatial only (``c = C``) unless ``channel``. ``F`` cancels in the
    ratio and is accepted only for symmetry with the other planners. Returns None when no
    structure reaches ``S`` (e.g. 1x1 kernels without channel structure). The pool's
    additions are not part of the ratio (see ``structured_pool_adds``).
    """
    del F
    full = C * kh * kw
    best: tuple[tuple[float, ...], tuple[int, int, int]] | None = None
    c_range = range(1, C + 1) if channel else (C,)
    for c in c_range:
        for nh in range(1, kh + 1):
            for nw in range(1, kw + 1):
                m = c * nh * nw
                if full < S * m * (1.0 - 1e-12):
                    continue
                key = (m, c, -abs(nh / kh - nw / kw), nh)
                if best is None or key > best[0]:
                    best = (key, (c, nh, nw))
    return None if best is None else best[1]
