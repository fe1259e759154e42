"""Numerics of structured convolutions (no onnx): projection and the sum-pool equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_lr.decompose.structured import (
    composition_matrix,
    project,
    small_kernel,
    structured_macs,
    structured_params_for_speedup,
    structured_pool_adds,
    structured_rewrite,
)

try:
    from tests._npconv import avgpool, conv2d, sumpool
except ImportError:  # tests/ is not a package: pytest put it on sys.path
    from _npconv import avgpool, conv2d, sumpool


@pytest.mark.parametrize("C,kh,kw,c,nh,nw", [
    (4, 3, 3, 4, 2, 2), (3, 3, 5, 2, 2, 3), (5, 1, 1, 3, 1, 1), (2, 5, 3, 1, 1, 1),
    (3, 3, 3, 3, 3, 3),
])
def test_composition_matrix_columns_are_boxes(C, kh, kw, c, nh, nw):
    A = composition_matrix(C, kh, kw, c, nh, nw)
    assert A.shape == (C * kh * kw, c * nh * nw)
    pc, ph, pw = C - c + 1, kh - nh + 1, kw - nw + 1
    np.testing.assert_array_equal(A.sum(axis=0), np.full(A.shape[1], pc * ph * pw))
    for j, (a, p, q) in enumerate(np.ndindex(c, nh, nw)):
        box = np.zeros((C, kh, kw))
        box[a:a + pc, p:p + ph, q:q + pw] = 1
        np.testing.assert_array_equal(A[:, j], box.ravel())
    assert np.linalg.matrix_rank(A) == A.shape[1]


def test_spatial_only_has_channel_window_one():
    A = composition_matrix(3, 3, 3, 3, 2, 2)
    # every column touches exactly one channel
    per_channel = A.reshape(3, 9, -1).sum(axis=1) > 0
    np.testing.assert_array_equal(per_channel.sum(axis=0), np.ones(A.shape[1]))


def test_projection_equals_lstsq():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 4))
    res = project(w, 2, 2, 3)
    A = composition_matrix(3, 3, 4, 2, 2, 3)
    for f in range(6):
        beta = np.linalg.lstsq(A, w[f].ravel(), rcond=None)[0]
        np.testing.assert_allclose(res.beta[f].ravel(), beta, atol=1e-10)
    np.testing.assert_allclose(res.w_hat.reshape(6, -1), res.beta.reshape(6, -1) @ A.T,
                               atol=1e-10)
    expect = np.linalg.norm(res.w_hat - w) / np.linalg.norm(w)
    assert res.rel_error == pytest.approx(expect)
    assert res.pool == (2, 2, 2)
    assert res.params == (2, 2, 3)
    assert 0 < res.rel_error < 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_for_structured_kernels(dtype):
    rng = np.random.default_rng(1)
    C, kh, kw, c, nh, nw = 4, 5, 3, 3, 3, 2
    A = composition_matrix(C, kh, kw, c, nh, nw)
    beta = rng.standard_normal((7, c * nh * nw))
    w = (beta @ A.T).reshape(7, C, kh, kw).astype(dtype)
    res = project(w, c, nh, nw)
    assert res.rel_error < 1e-6
    assert res.beta.dtype == dtype and res.w_hat.dtype == dtype
    np.testing.assert_allclose(res.beta.reshape(7, -1), beta, rtol=1e-4, atol=1e-5)
    sigma = np.cov(rng.standard_normal((C * kh * kw, 500)))
    assert project(w, c, nh, nw, sigma=sigma).rel_error < 1e-6


def _correlated_patches(rng, n, d):
    """Patches whose covariance is far from isotropic (a few dominant directions)."""
    basis = rng.standard_normal((d, d))
    scales = np.exp(-np.arange(d) / 2.0)
    return (rng.standard_normal((n, d)) * scales) @ basis.T


def test_data_aware_projection_beats_frobenius_on_output_error():
    rng = np.random.default_rng(2)
    C, kh, kw = 4, 3, 3
    d = C * kh * kw
    w = rng.standard_normal((8, C, kh, kw))
    p = _correlated_patches(rng, 4000, d)
    sigma = p.T @ p / len(p)
    frob = project(w, C, 2, 2)
    data = project(w, C, 2, 2, sigma=sigma)

    def out_err(w_hat):
        return np.linalg.norm(p @ (w_hat - w).reshape(8, -1).T)

    assert out_err(data.w_hat) < 0.8 * out_err(frob.w_hat)
    # rel_error is measured in the Sigma metric: it is the relative output error
    rel = out_err(data.w_hat) / np.linalg.norm(p @ w.reshape(8, -1).T)
    assert data.rel_error == pytest.approx(rel, rel=1e-6)
    # ... and the Frobenius error of the data-aware solution is the larger one
    assert np.linalg.norm(data.w_hat - w) > np.linalg.norm(frob.w_hat - w)


def test_singular_sigma_is_well_posed():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 2, 3, 3))
    p = rng.standard_normal((4, 18))  # rank 4 << 18
    res = project(w, 2, 2, 2, sigma=p.T @ p)
    assert np.all(np.isfinite(res.beta))
    assert res.rel_error < 1e-3  # 8 coefficients per filter can match 4 data directions


CASES = [
    # C, F, H, W, kh, kw, (c, nh, nw), strides, pads (t,l,b,r), dilations
    (3, 4, 9, 8, 3, 3, (3, 2, 2), (1, 1), (1, 1, 1, 1), (1, 1)),
    (3, 4, 11, 10, 3, 3, (3, 2, 2), (2, 2), (1, 1, 1, 1), (1, 1)),
    (2, 3, 12, 13, 3, 5, (2, 2, 3), (1, 2), (0, 2, 1, 2), (1, 1)),
    (2, 3, 13, 12, 5, 3, (2, 3, 1), (2, 1), (2, 0, 2, 1), (2, 1)),
    (3, 2, 14, 14, 3, 3, (3, 2, 2), (1, 1), (2, 2, 2, 2), (2, 2)),
    (3, 2, 15, 16, 3, 3, (3, 1, 2), (3, 2), (0, 0, 0, 0), (2, 3)),
    (5, 3, 9, 9, 3, 3, (3, 2, 2), (1, 1), (1, 1, 1, 1), (1, 1)),   # channel structure
    (6, 4, 10, 11, 3, 5, (2, 3, 2), (2, 1), (1, 2, 0, 1), (1, 2)),  # channel + dilation
    (4, 3, 8, 8, 1, 1, (2, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),   # 1x1: channel only
    (4, 3, 8, 9, 3, 3, (4, 3, 3), (2, 1), (1, 1, 1, 1), (1, 1)),   # identity structure
]


@pytest.mark.parametrize("C,F,H,W,kh,kw,cnn,strides,pads,dil", CASES)
def test_sumpool_then_small_conv_equals_structured_conv(C, F, H, W, kh, kw, cnn, strides,
                                                        pads, dil):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, C, H, W))
    w = rng.standard_normal((F, C, kh, kw))
    b = rng.standard_normal(F)
    res = project(w, *cnn)
    ref = conv2d(x, res.w_hat, b, strides, pads, dil)

    # 1) the stated identity: explicit pad -> window sum (stride 1, dilation d) -> conv
    t, l, bo, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    pc, ph, pw = res.pool
    s = sumpool(xp.reshape(2, 1, C, *xp.shape[2:]), (pc, ph, pw),
                dilations=(1, *dil)).reshape(2, cnn[0], -1, xp.shape[3] - dil[1] * (pw - 1))
    out = conv2d(s, res.beta, b, strides, (0, 0, 0, 0), dil)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)

    # 2) the ONNX realisation: AveragePool with folded pads (count_include_pad=1), area
    #    folded into the small kernel, 5-D reshape when the pool covers channels
    rw = structured_rewrite(res, strides, pads, dil)
    if not rw.has_pool:
        out2 = conv2d(x, rw.conv_weight, b, rw.conv_strides, rw.conv_pads, rw.conv_dilations)
    elif rw.channel_pool:
        pooled = avgpool(x.reshape(2, 1, C, H, W), rw.pool_kernel, rw.pool_strides,
                         rw.pool_pads, rw.pool_dilations, count_include_pad=True)
        out2 = conv2d(pooled.reshape(2, cnn[0], *pooled.shape[3:]), rw.conv_weight, b,
                      rw.conv_strides, rw.conv_pads, rw.conv_dilations)
    else:
        pooled = avgpool(x, rw.pool_kernel, rw.pool_strides, rw.pool_pads,
                         rw.pool_dilations, count_include_pad=True)
        out2 = conv2d(pooled, rw.conv_weight, b, rw.conv_strides, rw.conv_pads,
                      rw.conv_dilations)
    np.testing.assert_allclose(out2, ref, rtol=1e-9, atol=1e-9)


def test_count_include_pad_matters():
    """With count_include_pad=0 the border windows are divided by fewer elements."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 7, 7))
    w = rng.standard_normal((3, 2, 3, 3))
    res = project(w, 2, 2, 2)
    rw = structured_rewrite(res, (1, 1), (1, 1, 1, 1), (1, 1))
    ref = conv2d(x, res.w_hat, None, (1, 1), (1, 1, 1, 1))
    bad = conv2d(avgpool(x, rw.pool_kernel, None, rw.pool_pads, count_include_pad=False),
                 rw.conv_weight)
    assert not np.allclose(bad, ref)


def test_rewrite_attributes_and_opset():
    w = np.random.default_rng(6).standard_normal((2, 4, 3, 3)).astype(np.float32)
    res = project(w, 4, 2, 2)
    rw = structured_rewrite(res, (2, 2), (1, 1, 1, 1), (1, 1))
    assert rw.pool_kernel == (2, 2) and rw.pool_pads == (1, 1, 1, 1)
    assert rw.conv_pads == (0, 0, 0, 0) and rw.conv_strides == (2, 2)
    assert rw.min_opset == 7 and rw.count_include_pad == 1 and not rw.channel_pool
    assert rw.conv_weight.dtype == np.float32
    np.testing.assert_allclose(small_kernel(res), res.beta * 4)
    assert structured_rewrite(res, (1, 1), (2, 2, 2, 2), (2, 2)).min_opset == 19
    # dilation only along an axis whose pool window is 1 needs no pool dilation
    res_h = project(w, 4, 3, 2)  # pool (1, 1, 2)
    assert structured_rewrite(res_h, (1, 1), (0, 0, 0, 0), (2, 1)).min_opset == 7
    res_c = project(w, 2, 2, 2)
    rw_c = structured_rewrite(res_c, (1, 1), (1, 2, 1, 2), (1, 3))
    assert rw_c.channel_pool and rw_c.pool_kernel == (3, 2, 2)
    assert rw_c.pool_pads == (0, 1, 2, 0, 1, 2) and rw_c.pool_dilations == (1, 1, 3)


def test_costs():
    assert structured_macs(64, 32, 3, 3, 10, 12, 32, 2, 2) == 64 * 32 * 4 * 120
    with pytest.raises(ValueError):
        structured_macs(1, 3, 3, 3, 1, 1, 4, 1, 1)
    # spatial 2x2 window over a 10x12 map padded by 1: 11 x 13 outputs, 3 adds each
    assert structured_pool_adds(32, 3, 3, 10, 12, 32, 2, 2, (1, 1, 1, 1)) == 32 * 11 * 13 * 3
    # channel window 3 (c=2 of 4), spatial 2x1, dilation 2 along rows
    assert structured_pool_adds(4, 3, 3, 10, 10, 2, 2, 3, (0, 0, 0, 0), (2, 1)) == (
        2 * (10 - 2) * 10 * (3 * 2 - 1))
    assert structured_pool_adds(4, 3, 3, 10, 10, 4, 3, 3) == 0


def test_params_for_speedup():
    assert structured_params_for_speedup(8, 16, 3, 3, 2.0) == (16, 2, 2)
    assert structured_params_for_speedup(8, 16, 3, 3, 2.25) == (16, 2, 2)
    assert structured_params_for_speedup(8, 16, 3, 3, 2.3) == (16, 1, 3) or \
        structured_params_for_speedup(8, 16, 3, 3, 2.3) == (16, 3, 1)
    assert structured_params_for_speedup(8, 16, 3, 3, 1.0) == (16, 3, 3)
    assert structured_params_for_speedup(8, 16, 5, 5, 4.0) == (16, 2, 3) or \
        structured_params_for_speedup(8, 16, 5, 5, 4.0) == (16, 3, 2)
    assert structured_params_for_speedup(8, 16, 3, 5, 2.0) == (16, 2, 3)
    assert structured_params_for_speedup(8, 16, 3, 3, 10.0) is None
    assert structured_params_for_speedup(8, 16, 1, 1, 2.0) is None
    c, nh, nw = structured_params_for_speedup(8, 16, 1, 1, 2.0, channel=True)
    assert (c, nh, nw) == (8, 1, 1)
    c, nh, nw = structured_params_for_speedup(8, 16, 3, 3, 2.0, channel=True)
    assert c * nh * nw == 72 and 16 * 9 / (c * nh * nw) >= 2.0
    assert c == 12 and nh * nw == 6  # among products of 72, the largest c (least pooling)
    # when spatial-only reaches the best product, it is preferred over channel pooling
    assert structured_params_for_speedup(8, 16, 3, 3, 9 / 4, channel=True) == (16, 2, 2)


def test_data_aware_projection_equals_weighted_lstsq():
    rng = np.random.default_rng(7)
    C, kh, kw, c, nh, nw = 3, 3, 4, 2, 2, 3
    d = C * kh * kw
    w = rng.standard_normal((5, C, kh, kw))
    p = _correlated_patches(rng, 2000, d)
    sigma = p.T @ p / len(p)
    res = project(w, c, nh, nw, sigma=sigma, ridge=0.0)
    A = composition_matrix(C, kh, kw, c, nh, nw)
    L = np.linalg.cholesky(sigma)  # sigma = L L^T
    ref = np.linalg.lstsq(L.T @ A, L.T @ w.reshape(5, -1).T, rcond=None)[0].T
    np.testing.assert_allclose(res.beta.reshape(5, -1), ref, rtol=1e-6, atol=1e-6)
