"""Numerics of perforated convolutions (no onnx): grid geometry, masks, mask-form tables."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxslim_lr.decompose.perforation import (
    RESIZE_NEAREST,
    conv_out_size,
    grid_conv_params,
    grid_pads_symbolic,
    grid_plan,
    interpolation_map,
    kept_count,
    make_mask,
    mask_form_macs,
    patch_indices,
    perforated_macs,
    upsample_source,
    window_coverage,
)

try:
    from tests._npconv import conv2d
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from _npconv import conv2d

GEOMS = [
    # H, W, kh, kw, strides, pads (t,l,b,r), dilations, rh, rw
    (9, 9, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 2, 2),
    (10, 11, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 3, 2),
    (13, 12, 5, 3, (2, 1), (2, 1, 2, 1), (1, 1), 2, 3),
    (14, 15, 3, 3, (1, 2), (0, 0, 0, 0), (2, 1), 4, 2),
    (11, 16, 3, 5, (3, 2), (1, 2, 0, 1), (1, 2), 2, 2),
    (7, 7, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 3, 3),
    (8, 9, 3, 3, (2, 2), (3, 3, 3, 3), (2, 2), 2, 1),
    (5, 6, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 7, 7),  # factor above the output size
]


def _interp_via_map(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Nearest-neighbour fill of y (N, F, Ho, Wo) from the positions in mask."""
    n, f, ho, wo = y.shape
    comp = y.reshape(n, f, -1)[:, :, np.flatnonzero(mask)]
    return comp[:, :, interpolation_map(mask)].reshape(n, f, ho, wo)


@pytest.mark.parametrize("H,W,kh,kw,strides,pads,dil,rh,rw", GEOMS)
def test_grid_plan_computes_original_positions(H, W, kh, kw, strides, pads, dil, rh, rw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, H, W))
    w = rng.standard_normal((4, 3, kh, kw))
    b = rng.standard_normal(4)
    ref = conv2d(x, w, b, strides, pads, dil)
    plan = grid_plan(H, W, kh, kw, strides, pads, dil, rh, rw)
    ho, wo = ref.shape[2:]
    assert plan.out_size == (ho, wo) and plan.crop == (ho, wo)
    assert plan.perforated_size == (-(-ho // rh), -(-wo // rw))
    assert plan.strides == (strides[0] * rh, strides[1] * rw)
    assert plan.pads[:2] == tuple(pads[:2])
    assert all(0 <= plan.pads[i] <= pads[i] for i in (2, 3))
    perf = conv2d(x, w, b, plan.strides, plan.pads, dil)
    assert perf.shape[2:] == plan.perforated_size
    np.testing.assert_allclose(perf, ref[:, :, ::rh, ::rw], rtol=1e-12, atol=1e-12)

    # the whole graph: Resize(RESIZE_NEAREST) -> Slice equals nearest interpolation
    ri = upsample_source(plan.upsampled_size[0], rh, plan.perforated_size[0])
    ci = upsample_source(plan.upsampled_size[1], rw, plan.perforated_size[1])
    up = perf[:, :, ri][:, :, :, ci]
    assert up.shape[2:] == plan.upsampled_size
    out = up[:, :, :plan.crop[0], :plan.crop[1]]
    np.testing.assert_allclose(out, _interp_via_map(ref, plan.mask()), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geom", GEOMS)
def test_grid_conv_params_are_size_independent(geom):
    _, _, kh, kw, strides, pads, dil, rh, rw = geom
    new_strides, new_pads = grid_conv_params(kh, kw, strides, pads, dil, rh, rw)
    sym = grid_pads_symbolic(kh, kw, strides, pads, dil, rh, rw)
    assert (sym.strides, sym.pads) == (new_strides, new_pads)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 2, kh, kw))
    min_h = dil[0] * (kh - 1) + 1 - pads[0] - pads[2]
    min_w = dil[1] * (kw - 1) + 1 - pads[1] - pads[3]
    for H, W in itertools.product(range(max(1, min_h), max(1, min_h) + 14),
                                  range(max(1, min_w), max(1, min_w) + 5)):
        ho = conv_out_size(H, kh, strides[0], dil[0], pads[0], pads[2])
        wo = conv_out_size(W, kw, strides[1], dil[1], pads[1], pads[3])
        # the dynamic crop formula reproduces Ho, Wo
        assert (H + sym.crop_offset[0]) // sym.crop_div[0] + 1 == ho
        assert (W + sym.crop_offset[1]) // sym.crop_div[1] + 1 == wo
        hq = conv_out_size(H, kh, new_strides[0], dil[0], new_pads[0], new_pads[2])
        wq = conv_out_size(W, kw, new_strides[1], dil[1], new_pads[1], new_pads[3])
        assert (hq, wq) == (-(-ho // rh), -(-wo // rw))
        if H % 3 == 0:  # numeric check on a subset of sizes
            x = rng.standard_normal((1, 2, H, W))
            ref = conv2d(x, w, None, strides, pads, dil)
            perf = conv2d(x, w, None, new_strides, new_pads, dil)
            np.testing.assert_allclose(perf, ref[:, :, ::rh, ::rw], atol=1e-12)


def test_over_padding_would_add_positions_beyond_the_grid():
    """Why grid_conv_params keeps the pads: over-padding by (r-1)*s adds a bogus output."""
    kh, s, p, r = 3, 1, 1, 3
    extra = []
    for H in range(3, 20):
        ho = conv_out_size(H, kh, s, 1, p, p)
        n_over = conv_out_size(H, kh, s * r, 1, p, p + (r - 1) * s)
        extra.append(n_over - -(-ho // r))
    assert min(extra) == 0 and max(extra) == 1


def test_upsample_source_floor_is_not_nearest_for_r3():
    assert list(upsample_source(6, 3, 2, "floor")) == [0, 0, 0, 1, 1, 1]
    assert list(upsample_source(6, 3, 2)) == [0, 0, 1, 1, 1, 1]
    assert list(upsample_source(4, 2, 2)) == [0, 0, 1, 1]  # tie at 1 goes up
    assert list(upsample_source(3, 3, 1)) == [0, 0, 0]  # clamped
    assert RESIZE_NEAREST["nearest_mode"] == "round_prefer_floor"
    with pytest.raises(ValueError):
        upsample_source(3, 3, 1, "ceil")


@pytest.mark.parametrize("strategy", ["grid", "uniform", "pooling", "weight", "impact"])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_masks_rate_and_determinism(strategy, rate):
    ho, wo = 13, 14
    rng = np.random.default_rng(2)
    stats = {"pool_kernel": (3, 3), "pool_stride": (2, 2), "pool_pads": (1, 1, 1, 1),
             "importance": rng.random((ho, wo)), "impact": rng.random((ho, wo))}
    m = make_mask(ho, wo, rate, strategy, seed=7, **stats)
    assert m.shape == (ho, wo) and m.dtype == bool
    assert m.sum() >= 1
    np.testing.assert_array_equal(m, make_mask(ho, wo, rate, strategy, seed=7, **stats))
    want = kept_count(ho * wo, rate)
    if strategy == "grid":
        # the closest count a product grid can reach
        best = min(abs(kx * ky - want) for kx in range(1, ho + 1) for ky in range(1, wo + 1))
        assert abs(int(m.sum()) - want) == best
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert m.sum() == len(rows) * len(cols)  # a product grid
    else:
        assert m.sum() == want
    if rate == 0.0:
        assert m.all()


def test_kept_count():
    assert kept_count(100, 0.0) == 100
    assert kept_count(100, 0.25) == 75
    assert kept_count(100, 1.0) == 1
    assert kept_count(3, 0.99) == 1
    with pytest.raises(ValueError):
        kept_count(10, 1.5)


def test_mask_strategies_keep_the_right_positions():
    rng = np.random.default_rng(3)
    imp = rng.random((6, 7))
    m = make_mask(6, 7, 0.5, "weight", importance=imp)
    assert imp[m].min() >= imp[~m].max()
    m = make_mask(6, 7, 0.5, "impact", impact=imp)
    assert imp[m].min() >= imp[~m].max()
    # 3x3 windows with stride 2: even rows/cols are covered by 2 windows, odd by 1
    cov = window_coverage(9, 9, (3, 3), (2, 2))
    assert cov[2, 2] == 4 and cov[1, 1] == 1 and cov[2, 1] == 2 and cov[0, 0] == 1
    m = make_mask(9, 9, 1 - 9 / 81, "pooling", pool_kernel=(3, 3), pool_stride=(2, 2))
    assert m.sum() == 9 and np.all(cov[m] == 4)
    # non-overlapping pooling ties everywhere: the seeded shuffle spreads the kept positions
    a = make_mask(8, 8, 0.5, "pooling", seed=0, pool_kernel=(2, 2))
    b = make_mask(8, 8, 0.5, "pooling", seed=1, pool_kernel=(2, 2))
    assert a.sum() == b.sum() == 32 and not np.array_equal(a, b)
    assert 0 < a[:4].sum() < 32  # not one solid block
    with pytest.raises(ValueError):
        make_mask(4, 4, 0.5, "pooling")
    with pytest.raises(ValueError):
        make_mask(4, 4, 0.5, "weight", importance=np.ones((3, 4)))
    with pytest.raises(ValueError):
        make_mask(4, 4, 0.5, "bogus")


def test_window_coverage_with_tap_weights():
    tw = np.arange(1.0, 10.0).reshape(3, 3)
    cov = window_coverage(5, 6, (3, 3), (1, 1), (1, 1, 1, 1), tap_weight=tw)
    brute = np.zeros((5, 6))
    for oy, ox, u, v in itertools.product(range(5), range(6), range(3), range(3)):
        y, x = oy - 1 + u, ox - 1 + v
        if 0 <= y < 5 and 0 <= x < 6:
            brute[y, x] += tw[u, v]
    np.testing.assert_allclose(cov, brute)


@pytest.mark.parametrize("strategy,rate,seed", [
    ("uniform", 0.5, 0), ("uniform", 0.9, 1), ("uniform", 0.97, 2), ("grid", 0.75, 0),
    ("grid", 0.6, 3), ("uniform", 0.0, 0),
])
def test_interpolation_map_brute_force(strategy, rate, seed):
    ho, wo = 11, 13
    m = make_mask(ho, wo, rate, strategy, seed=seed)
    imap = interpolation_map(m)
    comp = np.flatnonzero(m)
    assert imap.shape == (ho * wo,) and imap.dtype == np.int64
    pts = np.stack(np.divmod(comp, wo), 1)
    for p in range(ho * wo):
        d2 = ((pts - np.array(divmod(p, wo))) ** 2).sum(1)
        nearest = np.flatnonzero(d2 == d2.min())
        assert imap[p] == nearest.min()  # nearest, ties to the smallest flat index
        if m.flat[p]:
            assert comp[imap[p]] == p


def test_interpolation_map_single_point_and_errors():
    m = np.zeros((3, 4), dtype=bool)
    m[2, 1] = True
    np.testing.assert_array_equal(interpolation_map(m), np.zeros(12, dtype=np.int64))
    with pytest.raises(ValueError):
        interpolation_map(np.zeros((3, 3), dtype=bool))


@pytest.mark.parametrize("H,W,kh,kw,strides,pads,dil,rh,rw", GEOMS[:6])
@pytest.mark.parametrize("rate", [0.0, 0.6])
def test_mask_form_simulation(H, W, kh, kw, strides, pads, dil, rh, rw, rate):
    del rh, rw
    rng = np.random.default_rng(4)
    C, F, N = 3, 5, 2
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((F, C, kh, kw))
    b = rng.standard_normal(F)
    ref = conv2d(x, w, b, strides, pads, dil)
    ho, wo = ref.shape[2:]
    mask = make_mask(ho, wo, rate, "uniform", seed=5)
    idx = patch_indices(H, W, C, kh, kw, strides, pads, dil, mask)
    assert idx.shape == (int(mask.sum()), C * kh * kw) and idx.dtype == np.int64
    # Pad -> Reshape(N, -1) -> Gather(idx, axis=1) -> MatMul(W2d^T) -> Add(b)
    #   -> Gather(interp, axis=1) -> Transpose -> Reshape
    t, l, bo, r = pads
    xpad = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    assert idx.min() >= 0 and idx.max() < xpad[0].size
    patches = xpad.reshape(N, -1)[:, idx]  # (N, n, C*kh*kw)
    y = patches @ w.reshape(F, -1).T + b  # (N, n, F)
    y = y[:, interpolation_map(mask)]  # (N, Ho*Wo, F)
    out = y.transpose(0, 2, 1).reshape(N, F, ho, wo)
    np.testing.assert_allclose(out[:, :, mask], ref[:, :, mask], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out, _interp_via_map(ref, mask), rtol=1e-12, atol=1e-12)
    if rate == 0.0:
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert mask_form_macs(F, C, kh, kw, mask) == F * C * kh * kw * int(mask.sum())
    with pytest.raises(ValueError):
        patch_indices(H, W, C, kh, kw, strides, pads, dil, mask[:-1])


def test_rate_zero_grid_is_identity_and_costs():
    plan = grid_plan(10, 10, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1)
    assert plan.strides == (1, 1) and plan.pads == (1, 1, 1, 1)
    assert plan.perforated_size == plan.out_size == (10, 10)
    assert perforated_macs(8, 4, 3, 3, 10, 10, 1, 1) == 8 * 4 * 9 * 100
    assert perforated_macs(8, 4, 3, 3, 10, 11, 3, 2) == 8 * 4 * 9 * 4 * 6
    assert mask_form_macs(8, 4, 3, 3, 17) == 8 * 4 * 9 * 17
    with pytest.raises(ValueError):
        grid_plan(2, 2, 5, 5, (1, 1), (0, 0, 0, 0), (1, 1), 2, 2)
    with pytest.raises(ValueError):
        grid_plan(8, 8, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), 0, 2)
