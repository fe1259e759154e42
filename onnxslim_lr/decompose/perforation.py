r"""Perforated convolutions (Figurnov et al. 2016): grid geometry, masks, index tables.

A perforated conv evaluates the original conv only at a subset of its ``Ho x Wo`` output
positions (the *mask*) and fills every other position with the value of its nearest
computed position (nearest-neighbour interpolation). The perforation *rate* is the share of
positions skipped; the conv's MACs scale with the share kept.

Grid perforation
----------------
With factors ``(rh, rw)`` the computed positions are the original output positions
``(rh*i, rw*j)``. Original output row ``y`` reads padded input rows ``sh*y + dh*u``
(``u < kh``), so row ``rh*i`` reads ``(sh*rh)*i + dh*u``: a Conv with strides
``(sh*rh, sw*rw)``, the same top/left pads and the same dilations computes exactly those
positions. Writing ``L = H + t + b - dh*(kh-1) - 1 >= 0`` (so ``Ho = floor(L/sh) + 1``), that
conv with the *original* bottom pad produces ``floor(L/(sh*rh)) + 1`` rows, and

    ceil(Ho/rh) = floor((Ho-1)/rh) + 1 = floor(floor(L/sh)/rh) + 1 = floor(L/(sh*rh)) + 1,

so it yields exactly ``ceil(Ho/rh)`` rows -- positions ``0, rh, 2rh, ... <= Ho-1`` and
nothing else -- for every input size. ``grid_conv_params`` therefore keeps the original
pads (size-independent); ``grid_plan`` may lower the bottom/right pad to the smallest
non-negative value that still gives ``ceil(Ho/rh)`` rows (a minor saving for static shapes).
The perforated map is then upsampled by ``(rh, rw)`` with nearest Resize and cropped to the
first ``Ho x Wo`` rows/cols.

Nearest upsampling convention: ONNX Resize with ``coordinate_transformation_mode=asymmetric``
maps output row ``i`` to source coordinate ``i/r``. With ``nearest_mode=floor`` the source
is ``floor(i/r)`` -- the computed position at or above ``i`` -- which is the nearest one only
for ``r <= 2`` (for ``r = 3`` row 2 is at distance 2 from row 0 but 1 from row 3). With
``nearest_mode=round_prefer_floor`` the source is ``round(i/r)`` with exact halves going
to the top/left, clamped to the last computed row, which is the true nearest computed row
(per axis, and hence in Euclidean distance since the computed set is a product grid) with
ties to the top/left -- the same tie rule ``interpolation_map`` uses. ``i/r`` with an even
``r`` and a half-integer result is exact in float, so the tie rule is reproducible. That
is why the plan recommends ``RESIZE_NEAREST``.

Arbitrary masks ("mask form")
-----------------------------
Pad the input, flatten it per image to ``(N, C*Hp*Wp)``, Gather the ``C*kh*kw`` patch
entries of every computed position (``patch_indices``, ordered like ``W.reshape(F, -1)``),
one MatMul with ``W2d^T`` (+ bias) gives ``(N, n_computed, F)``, and a second Gather through
``interpolation_map`` gives ``(N, Ho*Wo, F)``, transposed/reshaped to ``(N, F, Ho, Wo)``.

Masks (``make_mask``): "grid" (pseudo-random regular grid), "uniform" (random), "pooling"
(positions covered by the most windows of the following pooling layer), "weight" (largest
importance computed from the consumer's weights), "impact" (largest estimated increase of
the error when the position is interpolated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..cost import conv_out_size  # the one conv geometry helper (re-exported)

__all__ = [
    "RESIZE_NEAREST",
    "GridPlan",
    "SymbolicGrid",
    "conv_out_size",
    "grid_plan",
    "grid_conv_params",
    "grid_pads_symbolic",
    "upsample_source",
    "kept_count",
    "make_mask",
    "window_coverage",
    "interpolation_map",
    "patch_indices",
    "perforated_macs",
    "mask_form_macs",
]

#: Resize attributes giving true nearest-neighbour upsampling by an integer factor, ties to
#: the top/left, clamped at the last computed row/col (see the module docstring).
RESIZE_NEAREST: dict[str, str] = {
    "mode": "nearest",
    "coordinate_transformation_mode": "asymmetric",
    "nearest_mode": "round_prefer_floor",
}

_STRATEGIES = ("grid", "uniform", "pooling", "weight", "impact")


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@dataclass(frozen=True)
class GridPlan:
    """Static-shape grid perforation of one conv.

    ``out_size``: original ``(Ho, Wo)``. ``strides`` / ``pads``: attributes of the perforated
    conv (``pads`` as ``(t, l, b, r)``; top/left unchanged, bottom/right the smallest
    non-negative values giving ``perforated_size``). ``perforated_size``: ``(ceil(Ho/rh),
    ceil(Wo/rw))``, its ``(i, j)`` output is original position ``(rh*i, rw*j)``.
    ``upsampled_size``: Resize output. ``crop``: Slice ends on axes 2, 3 (starts are 0).
    """

    out_size: tuple[int, int]
    rates: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    perforated_size: tuple[int, int]
    upsampled_size: tuple[int, int]
    crop: tuple[int, int]

    def mask(self) -> np.ndarray:
        """Boolean ``(Ho, Wo)`` mask of the computed positions (for cost and checks)."""
        ho, wo = self.out_size
        m = np.zeros((ho, wo), dtype=bool)
        m[:: self.rates[0], :: self.rates[1]] = True
        return m


@dataclass(frozen=True)
class SymbolicGrid:
    """Size-independent grid perforation (dynamic H, W).

    The perforated conv uses ``strides`` and ``pads``; the upsampled map is cropped to
    ``Ho = (H + crop_offset[0]) // crop_div[0] + 1`` rows and likewise for columns, where
    ``H`` comes from ``Shape(x)``. ``H + crop_offset >= 0`` whenever the original conv is
    valid, so ONNX's truncating int64 Div equals the floor here.
    """

    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    rates: tuple[int, int]
    crop_offset: tuple[int, int]
    crop_div: tuple[int, int]


def grid_plan(
    H: int,
    W: int,
    kh: int,
    kw: int,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    rh: int,
    rw: int,
) -> GridPlan:
    """Attributes of the grid-perforated conv for a known input size.

    The bottom/right pads are lowered to the smallest non-negative value that still yields
    ``ceil(Ho/r)`` outputs (never above the original: see the module docstring), so no
    padded row is produced that the crop would throw away. Raises ValueError for an empty
    original output or non-positive factors.
    """
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    t, l, b, r = (int(p) for p in pads)
    rh, rw = int(rh), int(rw)
    if rh < 1 or rw < 1:
        raise ValueError("perforation factors must be >= 1")
    ho = conv_out_size(H, kh, sh, dh, t, b)
    wo = conv_out_size(W, kw, sw, dw, l, r)
    if ho < 1 or wo < 1:
        raise ValueError(f"empty conv output {ho}x{wo}")
    hq, wq = _ceil_div(ho, rh), _ceil_div(wo, rw)
    nsh, nsw = sh * rh, sw * rw
    # smallest pad with floor((H + t + pad - dh*(kh-1) - 1)/nsh) == hq - 1
    nb = max(0, (hq - 1) * nsh + dh * (kh - 1) + 1 - int(H) - t)
    nr = max(0, (wq - 1) * nsw + dw * (kw - 1) + 1 - int(W) - l)
    assert conv_out_size(H, kh, nsh, dh, t, nb) == hq
    assert conv_out_size(W, kw, nsw, dw, l, nr) == wq
    return GridPlan(
        out_size=(ho, wo),
        rates=(rh, rw),
        strides=(nsh, nsw),
        pads=(t, l, nb, nr),
        perforated_size=(hq, wq),
        upsampled_size=(hq * rh, wq * rw),
        crop=(ho, wo),
    )


def grid_conv_params(
    kh: int,
    kw: int,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    rh: int,
    rw: int,
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Size-independent ``(new_strides, new_pads)`` of the grid-perforated conv.

    The pads are the original ones: by the identity in the module docstring the conv with
    strides ``(sh*rh, sw*rw)`` then produces exactly ``ceil(Ho/rh) x ceil(Wo/rw)`` outputs,
    equal to the original positions ``(rh*i, rw*j)``, for every input size -- no extra
    bottom/right padding is needed. Over-padding by ``(r-1)*s`` would be harmful, not just
    wasteful: for some sizes it adds one output beyond the original grid (computed partly
    over padding) which a round-to-nearest Resize would then copy into the last rows.
    ``kh``, ``kw`` and ``dilations`` do not enter the result; they are accepted so callers
    pass the full conv geometry.
    """
    del kh, kw, dilations
    sh, sw = (int(s) for s in strides)
    t, l, b, r = (int(p) for p in pads)
    return (sh * int(rh), sw * int(rw)), (t, l, b, r)


def grid_pads_symbolic(
    kh: int,
    kw: int,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    rh: int,
    rw: int,
) -> SymbolicGrid:
    """Everything a dynamic-shape grid rewrite needs: conv attributes plus the crop formula.

    For dynamic spatial sizes the graph is Conv(``grid_conv_params``) -> Resize(scales
    ``(1, 1, rh, rw)``, ``RESIZE_NEAREST``) -> Slice(starts 0, ends ``(Ho, Wo)``) where the
    ends are computed from ``Shape(x)`` as ``(H + crop_offset) // crop_div + 1``: the Resize
    output has ``ceil(Ho/r)*r >= Ho`` rows, and only the original ``Ho`` rows are kept.
    """
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    t, l, b, r = (int(p) for p in pads)
    new_strides, new_pads = grid_conv_params(kh, kw, strides, pads, dilations, rh, rw)
    return SymbolicGrid(
        strides=new_strides,
        pads=new_pads,
        rates=(int(rh), int(rw)),
        crop_offset=(t + b - dh * (kh - 1) - 1, l + r - dw * (kw - 1) - 1),
        crop_div=(sh, sw),
    )


def upsample_source(
    n_out: int, r: int, n_computed: int, nearest_mode: str = "round_prefer_floor"
) -> np.ndarray:
    """Index of the computed row each of ``n_out`` output rows copies under a Resize by ``r``.

    Mirrors ONNX Resize (asymmetric, integer scale) in exact integer arithmetic, so the
    graph's behaviour can be checked without a runtime: "round_prefer_floor" rounds ``i/r``
    with halves down and clamps to the last computed row (true nearest, ties top/left);
    "floor" is a zero-order hold (nearest only for ``r <= 2``).
    """
    i = np.arange(int(n_out))
    q, rem = np.divmod(i, int(r))
    if nearest_mode == "round_prefer_floor":
        q = q + (2 * rem > r)
    elif nearest_mode != "floor":
        raise ValueError(f"unsupported nearest_mode {nearest_mode!r}")
    return np.minimum(q, int(n_computed) - 1)


def kept_count(n: int, rate: float) -> int:
    """Positions kept out of ``n`` at perforation ``rate`` (skipped share), at least 1."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"perforation rate must be in [0, 1], got {rate}")
    skipped = int(np.floor(rate * n + 0.5))
    return int(min(max(n - skipped, 1), n))


def _grid_shape(ho: int, wo: int, n_keep: int) -> tuple[int, int]:
    """Grid ``kx x ky`` closest to ``n_keep`` points, balanced density as tie-break."""
    best: tuple[tuple[float, ...], tuple[int, int]] | None = None
    for kx in range(1, ho + 1):
        for ky in {max(1, min(wo, n_keep // kx)), max(1, min(wo, _ceil_div(n_keep, kx)))}:
            key = (abs(kx * ky - n_keep), abs(kx / ho - ky / wo), kx * ky, kx)
            if best is None or key < best[0]:
                best = (key, (kx, ky))
    assert best is not None
    return best[1]


def _spread(n: int, k: int, u: float) -> np.ndarray:
    """``k`` distinct indices in ``[0, n)``, evenly spaced with phase ``u`` in [0, 1)."""
    return np.floor((np.arange(k) + u) * (n / k)).astype(np.int64)


def _top(score: np.ndarray, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of the ``n_keep`` highest scores; equal scores ordered by a seeded shuffle.

    Random rather than positional tie-breaking matters: e.g. non-overlapping pooling gives
    every position the same coverage, and positional ties would keep one solid block.
    """
    flat = np.asarray(score, dtype=np.float64).ravel()
    tie = rng.permutation(flat.size)
    order = np.lexsort((tie, -flat))
    m = np.zeros(flat.size, dtype=bool)
    m[order[:n_keep]] = True
    return m.reshape(score.shape)


def window_coverage(
    Ho: int,
    Wo: int,
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    tap_weight: np.ndarray | None = None,
    ceil_mode: bool = False,
) -> np.ndarray:
    """How much a consumer op (pool or conv) reads each of the ``Ho x Wo`` positions.

    Without ``tap_weight`` the number of consumer windows covering each position (the
    "pooling structure" score). With ``tap_weight`` (kh, kw) -- e.g. ``|W_next|`` summed over
    filters and channels -- each covering window contributes the weight of the tap that
    reads the position (a "weight structure" score). Computed as ``R^T T Ccol`` where
    ``R[u, y]`` counts consumer rows whose tap ``u`` lands on ``y``.
    """
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in (strides if strides is not None else kernel))
    dh, dw = (int(d) for d in dilations)
    t, l, b, r = (int(p) for p in pads)

    def taps(n: int, k: int, s: int, p0: int, p1: int, d: int) -> np.ndarray:
        span = n + p0 + p1 - d * (k - 1) - 1
        m = (_ceil_div(span, s) if ceil_mode else span // s) + 1
        if ceil_mode and (m - 1) * s >= n + p0:
            m -= 1
        hits = np.zeros((k, n))
        for u in range(k):
            pos = np.arange(max(m, 0)) * s - p0 + u * d
            pos = pos[(pos >= 0) & (pos < n)]
            np.add.at(hits[u], pos, 1.0)
        return hits

    rows = taps(int(Ho), kh, sh, t, b, dh)
    cols = taps(int(Wo), kw, sw, l, r, dw)
    tw = np.ones((kh, kw)) if tap_weight is None else np.asarray(tap_weight, dtype=np.float64)
    if tw.shape != (kh, kw):
        raise ValueError(f"tap_weight must be ({kh}, {kw}), got {tw.shape}")
    return rows.T @ tw @ cols


def make_mask(
    Ho: int,
    Wo: int,
    rate: float,
    strategy: str = "grid",
    seed: int = 0,
    **stats: object,
) -> np.ndarray:
    """Boolean ``(Ho, Wo)`` perforation mask (True = computed) skipping ``rate`` of positions.

    Strategies and their statistics:

    * "grid": rows ``a(i)`` x cols ``b(j)``, each evenly spaced with a seeded random phase;
      ``kx x ky`` is the product closest to the kept count (so the rate is met as closely as
      a product grid allows, ties to balanced densities). A regular grid keeps every
      interpolated position close to a computed one.
    * "uniform": the kept positions are a seeded uniform random subset (exact count).
    * "pooling": ``pool_kernel``, ``pool_stride`` (default = kernel), ``pool_pads``
      (default 0), optional ``pool_dilations``, ``pool_ceil_mode``: keep the positions read
      by the most windows of the following pooling layer first.
    * "weight": ``importance`` (Ho, Wo): keep the largest (the caller derives it from the
      consumer's weights, e.g. ``window_coverage(..., tap_weight=|W_next|)``).
    * "impact": ``impact`` (Ho, Wo): estimated increase of the consumer's error when the
      position is interpolated; keep the largest.

    ``rate`` is the share skipped (0 keeps all); at least one position is always kept.
    Equal scores are ordered by a seeded shuffle, so every strategy is deterministic in
    ``seed``.
    """
    ho, wo = int(Ho), int(Wo)
    if ho < 1 or wo < 1:
        raise ValueError(f"empty output {ho}x{wo}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown perforation strategy {strategy!r}; choose from {_STRATEGIES}")
    n = ho * wo
    n_keep = kept_count(n, rate)
    rng = np.random.default_rng(seed)
    if n_keep == n:
        return np.ones((ho, wo), dtype=bool)
    if strategy == "grid":
        kx, ky = _grid_shape(ho, wo, n_keep)
        m = np.zeros((ho, wo), dtype=bool)
        m[np.ix_(_spread(ho, kx, rng.random()), _spread(wo, ky, rng.random()))] = True
        return m
    if strategy == "uniform":
        m = np.zeros(n, dtype=bool)
        m[rng.choice(n, size=n_keep, replace=False)] = True
        return m.reshape(ho, wo)
    if strategy == "pooling":
        if "pool_kernel" not in stats:
            raise ValueError("strategy 'pooling' needs pool_kernel")
        kernel = tuple(int(k) for k in stats["pool_kernel"])  # type: ignore[attr-defined]
        score = window_coverage(
            ho,
            wo,
            kernel,
            stats.get("pool_stride", kernel),  # type: ignore[arg-type]
            stats.get("pool_pads", (0, 0, 0, 0)),  # type: ignore[arg-type]
            stats.get("pool_dilations", (1, 1)),  # type: ignore[arg-type]
            ceil_mode=bool(stats.get("pool_ceil_mode", False)),
        )
        return _top(score, n_keep, rng)
    key = "importance" if strategy == "weight" else "impact"
    if key not in stats:
        raise ValueError(f"strategy {strategy!r} needs {key}")
    score = np.asarray(stats[key], dtype=np.float64)
    if score.shape != (ho, wo):
        raise ValueError(f"{key} must be ({ho}, {wo}), got {score.shape}")
    return _top(score, n_keep, rng)


def interpolation_map(mask: np.ndarray) -> np.ndarray:
    """For every position (row-major), the index of its nearest computed position.

    Indices point into ``np.flatnonzero(mask)`` (the order of the computed rows of the
    mask-form MatMul). Nearest is Euclidean; among equidistant computed positions the one
    with the smallest flat index (topmost, then leftmost) wins, matching the grid plan's
    Resize convention. Exact on the integer lattice: a KD-tree gives the nearest distance,
    then every computed point within that radius is re-checked with integer arithmetic.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError("mask must be 2-D (Ho, Wo)")
    ho, wo = mask.shape
    comp = np.flatnonzero(mask)
    if comp.size == 0:
        raise ValueError("mask computes no position")
    pts = np.stack(np.divmod(comp, wo), axis=1)  # (K, 2) integer (row, col)
    where = np.full(ho * wo, -1, dtype=np.int64)
    where[comp] = np.arange(comp.size)
    if comp.size == ho * wo:
        return where
    allp = np.stack(np.divmod(np.arange(ho * wo), wo), axis=1)
    todo = np.flatnonzero(where < 0)
    tree = cKDTree(pts.astype(np.float64))
    dist, _ = tree.query(allp[todo].astype(np.float64), k=1)
    balls = tree.query_ball_point(allp[todo].astype(np.float64), r=dist * (1 + 1e-9) + 1e-9)
    for pos, cand in zip(todo, balls):
        cand = np.asarray(cand, dtype=np.int64)
        d2 = ((pts[cand] - allp[pos]) ** 2).sum(axis=1)
        best = cand[d2 == d2.min()]
        where[pos] = best.min()  # computed indices are in flat order: min = top/left
    return where


def patch_indices(
    H: int,
    W: int,
    C: int,
    kh: int,
    kw: int,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    mask: np.ndarray,
) -> np.ndarray:
    """Gather table ``(n_computed, C*kh*kw)`` into the flattened padded input ``(C, Hp, Wp)``.

    ``xpad.reshape(N, -1)[:, idx]`` is ``(N, n_computed, C*kh*kw)`` with the last axis in
    ``(c, u, v)`` order, so one MatMul with ``W.reshape(F, -1).T`` evaluates the conv at the
    computed positions (``np.flatnonzero(mask)`` order). Indices fit int64 and are
    non-negative, as ONNX Gather expects.
    """
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilations)
    t, l, b, r = (int(p) for p in pads)
    hp, wp = int(H) + t + b, int(W) + l + r
    ho = conv_out_size(H, kh, sh, dh, t, b)
    wo = conv_out_size(W, kw, sw, dw, l, r)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (ho, wo):
        raise ValueError(f"mask must be the conv output size ({ho}, {wo}), got {mask.shape}")
    y, x = np.divmod(np.flatnonzero(mask), wo)
    c = np.arange(int(C))[:, None, None]
    u = np.arange(int(kh))[None, :, None]
    v = np.arange(int(kw))[None, None, :]
    base = (c * hp + u * dh) * wp + v * dw  # (C, kh, kw)
    start = (y * sh) * wp + x * sw  # (n,)
    return (start[:, None] + base.reshape(1, -1)).astype(np.int64)


def perforated_macs(
    F: int, C: int, kh: int, kw: int, Ho: int, Wo: int, rh: int, rw: int
) -> int:
    """MACs of the grid-perforated conv: ``F*C*kh*kw*ceil(Ho/rh)*ceil(Wo/rw)``.

    The Resize and Slice copies are not multiply-adds and are not counted.
    """
    return int(F) * int(C) * int(kh) * int(kw) * _ceil_div(Ho, rh) * _ceil_div(Wo, rw)


def mask_form_macs(F: int, C: int, kh: int, kw: int, n_computed: int | np.ndarray) -> int:
    """MACs of the mask form: ``F*C*kh*kw*n_computed`` (``n_computed`` or the mask itself).

    The two Gathers and the Pad move data but do no arithmetic, so they are not counted; on
    real runtimes the patch Gather (``n_computed*C*kh*kw`` reads) is what limits the speed.
    """
    if isinstance(n_computed, np.ndarray):
        n_computed = int(np.count_nonzero(n_computed))
    return int(F) * int(C) * int(kh) * int(kw) * int(n_computed)
