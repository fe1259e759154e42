"""Tests of the low-rank numerics: channel/spatial/FC SVD, Tucker-2, CP, rank selection.

Exactness is checked through a direct numpy convolution (with stride, padding, dilation and
groups) of the rewritten stages against the original conv, so the factor layouts are tested
with the same semantics ONNX Conv gives them, not only through a 4-D reconstruction.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from onnxslim_lr.decompose import cp, ranks, svd, tucker


def conv2d(x: np.ndarray, w: np.ndarray, stride=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1),
           group: int = 1) -> np.ndarray:
    """Direct ONNX-semantics Conv (no bias) in float64: x (N, C, H, W), w (F, C/g, kh, kw)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, c, h, wd = x.shape
    f, cg, kh, kw = w.shape
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ho = (h + top + bottom - dil[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + left + right - dil[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, f, ho, wo))
    fg = f // group
    for g in range(group):
        xs = xp[:, g * cg:(g + 1) * cg]
        ws = w[g * fg:(g + 1) * fg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dil[0]: i * dil[0] + stride[0] * (ho - 1) + 1: stride[0],
                           j * dil[1]: j * dil[1] + stride[1] * (wo - 1) + 1: stride[1]]
                out[:, g * fg:(g + 1) * fg] += np.einsum("fc,nchw->nfhw", ws[:, :, i, j], patch)
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


GEOM = dict(stride=(2, 1), pads=(1, 2, 0, 1), dil=(1, 2))


# ----------------------------------------------------------------------------- channel SVD


def test_channel_svd_full_rank_exact_through_conv(rng) -> None:
    F, C, kh, kw = 7, 3, 3, 2
    w = rng.standard_normal((F, C, kh, kw)).astype(np.float32)
    full = ranks.svd_full_rank(F, C, kh, kw)
    res = svd.channel_svd(w, full)
    assert res.first.shape == (full, C, kh, kw) and res.second.shape == (F, full, 1, 1)
    assert res.first.dtype == np.float32 and res.second.dtype == np.float32
    assert res.rank == full and res.rel_error < 1e-12
    assert np.all(np.diff(res.singular_values) <= 0)
    x = rng.standard_normal((2, C, 9, 8))
    ref = conv2d(x, w, **GEOM)
    out = conv2d(conv2d(x, res.first, **GEOM), res.second)
    assert rel(out, ref) < 1e-6


def test_channel_svd_truncated_error_is_eckart_young(rng) -> None:
    w = rng.standard_normal((16, 4, 3, 3))
    w2 = w.reshape(16, -1)
    s = np.linalg.svd(w2, compute_uv=False)
    for k in (1, 5, 12):
        res = svd.channel_svd(w, k)
        w_hat = (res.second[:, :, 0, 0].astype(np.float64) @ res.first.reshape(k, -1))
        assert rel(w_hat, w2) == pytest.approx(res.rel_error, rel=1e-5)
        assert res.rel_error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)), rel=1e-10)
        # balanced factors: per component, both stages carry sqrt(s_k)
        n1 = np.linalg.norm(res.first.reshape(k, -1), axis=1)
        n2 = np.linalg.norm(res.second[:, :, 0, 0], axis=0)
        np.testing.assert_allclose(n1, n2, rtol=1e-5)


def test_channel_svd_sigma_identity_equals_plain(rng) -> None:
    w = rng.standard_normal((10, 3, 3, 3))
    n = 27
    for k in (1, 4, 10):
        plain = svd.channel_svd(w, k)
        ident = svd.channel_svd(w, k, sigma=np.eye(n))
        wp = plain.second[:, :, 0, 0].astype(np.float64) @ plain.first.reshape(k, -1)
        wi = ident.second[:, :, 0, 0].astype(np.float64) @ ident.first.reshape(k, -1)
        np.testing.assert_allclose(wi, wp, atol=1e-5)
        assert ident.rel_error == pytest.approx(plain.rel_error, abs=1e-10)
        np.testing.assert_allclose(ident.singular_values, plain.singular_values, rtol=1e-10)


def _correlated_patches(rng: np.random.Generator, n: int, samples: int) -> np.ndarray:
    """Samples with a strongly decaying, rotated spectrum (like real activations)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    scales = 0.7 ** np.arange(n)
    return (rng.standard_normal((samples, n)) * scales) @ q.T


def _conv_and_patches(rng: np.random.Generator, F: int, C: int, samples: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random F x C x 3 x 3 weight, correlated patches for it, their second moment, and W as F x n."""
    w = rng.standard_normal((F, C, 3, 3))
    x = _correlated_patches(rng, C * 9, samples)
    return w, x, x.T @ x / len(x), w.reshape(F, C * 9)


def test_whitened_channel_svd_beats_plain_in_data_metric(rng) -> None:
    w, x, sigma, w2 = _conv_and_patches(rng, 12, 4, 4000)
    for k in (2, 5):
        plain = svd.channel_svd(w, k)
        white = svd.channel_svd(w, k, sigma=sigma)

        def data_err(res: svd.ChannelSVD) -> float:
            # empirical output error over the samples == the Sigma metric
            w_hat = res.second[:, :, 0, 0].astype(np.float64) @ res.first.reshape(k, -1)
            return float(np.linalg.norm((w2 - w_hat) @ x.T) / np.linalg.norm(w2 @ x.T))

        assert data_err(white) < 0.8 * data_err(plain)
        assert white.rel_error == pytest.approx(data_err(white), rel=1e-4)


def test_data_metric_channel_svd_from_the_small_gram_is_the_whitened_svd(rng) -> None:
    """The F x F Gram route (no n x n square root) gives the same optimal approximant as the
    SVD of W Sigma^1/2, for a wide layer (n = C kh kw > F) where it matters."""
    F = 8
    w, x, sigma, w2 = _conv_and_patches(rng, F, 6, 3000)
    u, s, _ = np.linalg.svd(w2 @ svd.psd_sqrt(sigma), full_matrices=False)
    basis = svd.channel_basis(w, sigma)
    np.testing.assert_allclose(basis.s, s, rtol=1e-6, atol=1e-9 * s[0])
    for k in (1, 3, F):
        res = svd.channel_svd(w, k, sigma=sigma, basis=basis)
        w_hat = res.second[:, :, 0, 0].astype(np.float64) @ res.first.reshape(k, -1).astype(np.float64)
        np.testing.assert_allclose(w_hat, u[:, :k] @ u[:, :k].T @ w2, atol=1e-5)


def test_channel_svd_singular_sigma_and_bad_args(rng) -> None:
    w = rng.standard_normal((6, 2, 2, 2))
    basis = rng.standard_normal((8, 3))
    sigma = basis @ basis.T  # rank 3, PSD only up to rounding
    res = svd.channel_svd(w, 3, sigma=sigma)
    assert res.rel_error < 1e-6  # a rank-3 input space is captured by rank 3
    assert np.all(np.isfinite(res.first)) and np.all(np.isfinite(res.second))
    for bad in (0, 7, 2.5):
        with pytest.raises(ValueError):
            svd.channel_svd(w, bad)
    with pytest.raises(ValueError):
        svd.channel_svd(w, 2, sigma=np.eye(5))
    with pytest.raises(ValueError):
        svd.channel_svd(w[0], 1)


# ----------------------------------------------------------------------------- spatial SVD


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 6, 3, 5), (8, 2, 1, 3)])
def test_spatial_svd_full_rank_exact_through_conv(rng, shape) -> None:
    F, C, kh, kw = shape
    w = rng.standard_normal(shape).astype(np.float32)
    full = ranks.spatial_full_rank(F, C, kh, kw)
    res = svd.spatial_svd(w, full)
    assert res.vertical.shape == (full, C, kh, 1) and res.horizontal.shape == (F, full, 1, kw)
    assert res.rel_error < 1e-12
    (sh, sw), (t, l, b, r), (dh, dw) = GEOM["stride"], GEOM["pads"], GEOM["dil"]
    x = rng.standard_normal((2, C, 10, 11))
    ref = conv2d(x, w, **GEOM)
    mid = conv2d(x, res.vertical, stride=(sh, 1), pads=(t, 0, b, 0), dil=(dh, 1))
    assert mid.shape[3] == x.shape[3]  # vertical stage keeps the input width
    out = conv2d(mid, res.horizontal, stride=(1, sw), pads=(0, l, 0, r), dil=(1, dw))
    assert rel(out, ref) < 1e-6


def test_spatial_svd_truncated_matches_reconstruction(rng) -> None:
    w = rng.standard_normal((6, 4, 3, 3))
    for k in (1, 4, 9):
        res = svd.spatial_svd(w, k)
        w_hat = np.einsum("kci,fkj->fcij", res.vertical[..., 0].astype(np.float64),
                          res.horizontal[:, :, 0, :].astype(np.float64))
        assert rel(w_hat, w) == pytest.approx(res.rel_error, rel=1e-5)
    errs = [svd.spatial_svd(w, k).rel_error for k in range(1, 13)]
    assert all(a >= b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-12


# ----------------------------------------------------------------------------- FC SVD


def test_fc_svd_full_rank_identity_and_whitening(rng) -> None:
    K, F = 20, 9
    b = rng.standard_normal((K, F)).astype(np.float32)
    res = svd.fc_svd(b, ranks.fc_full_rank(K, F))
    assert res.left.shape == (K, F) and res.right.shape == (F, F) and res.left.dtype == np.float32
    assert res.rel_error < 1e-12
    np.testing.assert_allclose(res.left.astype(np.float64) @ res.right, b, atol=1e-5)

    for r in (2, 5):
        plain = svd.fc_svd(b, r)
        ident = svd.fc_svd(b, r, sigma=np.eye(K))
        np.testing.assert_allclose(ident.left.astype(np.float64) @ ident.right,
                                   plain.left.astype(np.float64) @ plain.right, atol=1e-5)
        assert ident.rel_error == pytest.approx(plain.rel_error, abs=1e-10)

    x = _correlated_patches(rng, K, 3000)
    sigma = x.T @ x / len(x)
    b64 = b.astype(np.float64)
    for r in (2, 4):
        plain = svd.fc_svd(b, r)
        white = svd.fc_svd(b, r, sigma=sigma)

        def data_err(res: svd.FCSVD) -> float:
            y_hat = x @ res.left.astype(np.float64) @ res.right
            return float(np.linalg.norm(y_hat - x @ b64) / np.linalg.norm(x @ b64))

        assert data_err(white) < 0.8 * data_err(plain)
        assert white.rel_error == pytest.approx(data_err(white), rel=1e-4)


# ----------------------------------------------------------------------------- Tucker-2


def _tucker_weight(res: tucker.Tucker2) -> np.ndarray:
    return np.einsum("fa,abij,bc->fcij", res.last[:, :, 0, 0].astype(np.float64),
                     res.core.astype(np.float64), res.first[:, :, 0, 0].astype(np.float64))


def test_tucker2_full_rank_exact_through_conv(rng) -> None:
    F, C, kh, kw = 6, 5, 3, 3
    w = rng.standard_normal((F, C, kh, kw)).astype(np.float32)
    res = tucker.tucker2(w, *ranks.tucker2_full_ranks(F, C))
    assert res.first.shape == (C, C, 1, 1) and res.core.shape == (F, C, kh, kw)
    assert res.last.shape == (F, F, 1, 1) and res.ranks == (F, C)
    assert res.rel_error < 1e-6
    x = rng.standard_normal((1, C, 9, 10))
    ref = conv2d(x, w, **GEOM)
    out = conv2d(conv2d(conv2d(x, res.first), res.core, **GEOM), res.last)
    assert rel(out, ref) < 1e-5


def test_tucker2_truncated_hooi_and_exact_multilinear_rank(rng) -> None:
    w = rng.standard_normal((12, 10, 3, 3))
    hosvd = tucker.tucker2(w, 4, 3, n_iter=0)
    hooi = tucker.tucker2(w, 4, 3, n_iter=50, tol=1e-12)
    assert hosvd.n_iter_run == 0 and hooi.n_iter_run >= 1
    assert hooi.rel_error <= hosvd.rel_error + 1e-12
    assert rel(_tucker_weight(hooi), w) == pytest.approx(hooi.rel_error, rel=1e-5)
    # orthonormal outer factors
    u_f = hooi.last[:, :, 0, 0].astype(np.float64)
    u_c = hooi.first[:, :, 0, 0].T.astype(np.float64)
    np.testing.assert_allclose(u_f.T @ u_f, np.eye(4), atol=1e-6)
    np.testing.assert_allclose(u_c.T @ u_c, np.eye(3), atol=1e-6)
    # a weight of exact multilinear rank (4, 3) is recovered at (4, 3)
    g = rng.standard_normal((4, 3, 3, 3))
    low = np.einsum("fa,abij,cb->fcij", rng.standard_normal((12, 4)), g, rng.standard_normal((10, 3)))
    assert tucker.tucker2(low, 4, 3).rel_error < 1e-10


def test_tucker2_rank_out_above_core_rank_and_bad_args(rng) -> None:
    # 1x1 kernel: R_F = 6 > R_C * kh * kw = 2, the mode-F unfolding has too few columns
    w = rng.standard_normal((8, 4, 1, 1))
    res = tucker.tucker2(w, 6, 2)
    assert res.last.shape == (8, 6, 1, 1) and np.all(np.isfinite(res.core))
    assert rel(_tucker_weight(res), w) == pytest.approx(res.rel_error, rel=1e-5)
    for r_out, r_in in ((0, 1), (9, 1), (1, 5)):
        with pytest.raises(ValueError):
            tucker.tucker2(w, r_out, r_in)


# ----------------------------------------------------------------------------- CP


def _cp_weight(res: cp.CPConv) -> np.ndarray:
    kh, kw = res.depthwise.shape[2:]
    return np.einsum("kc,kij,fk->fcij", res.first[:, :, 0, 0].astype(np.float64),
                     res.depthwise[:, 0].astype(np.float64), res.last[:, :, 0, 0].astype(np.float64))


def _random_cp_weight(rng, F, C, kh, kw, K) -> np.ndarray:
    a = rng.standard_normal((C, K))
    b = rng.standard_normal((kh * kw, K))
    g = rng.standard_normal((F, K))
    return np.einsum("ck,sk,fk->fcs", a, b, g).reshape(F, C, kh, kw)


def test_cp_als_recovers_exact_low_rank_tensor(rng) -> None:
    for F, C, K in ((8, 6, 4), (10, 7, 3)):
        w = _random_cp_weight(rng, F, C, 3, 3, K)
        res = cp.cp_conv(w, K, method="als", n_iter=500, tol=1e-12)
        assert res.first.shape == (K, C, 1, 1) and res.depthwise.shape == (K, 1, 3, 3)
        assert res.last.shape == (F, K, 1, 1) and res.first.dtype == np.float32
        assert res.rel_error < 1e-4
        assert rel(_cp_weight(res), w) == pytest.approx(res.rel_error, rel=1e-2, abs=1e-6)


def test_cp_als_default_stopping_recovers_planted_rank_through_a_swamp() -> None:
    """Default tolerance on a small kernel: this planted rank-6 tensor sits at error 0.137 for
    ~150 sweeps before ALS finds it; the relative 0.1 % rule would stop there, so small
    kernels run to the tight tolerance."""
    rng = np.random.default_rng(20)
    for F, C, K in ((8, 6, 4), (10, 7, 3), (16, 12, 6)):
        w = _random_cp_weight(rng, F, C, 3, 3, K)
    assert cp.cp_conv(w, K, n_iter=60, tol=-1.0).rel_error > 0.1  # still in the swamp at 60 sweeps
    assert cp.cp_conv(w, K).rel_error < 1e-6


def test_cp_als_large_kernel_stops_on_relative_improvement_at_little_cost(rng) -> None:
    """A full-rank kernel above the small-work limit: the 0.1 % rule stops long before the
    200-sweep cap, within 3 % of the error the full 200 sweeps reach."""
    w = rng.standard_normal((64, 64, 3, 3))
    assert 64 * 64 * 9 * 40 > cp._SMALL_WORK
    quick = cp.cp_conv(w, 40)
    full = cp.cp_conv(w, 40, tol=0.0)
    assert full.n_iter_run == 200 and quick.n_iter_run < 50
    assert full.rel_error <= quick.rel_error <= 1.03 * full.rel_error


def test_cp_als_float32_contractions_still_recover_planted_rank(rng, monkeypatch) -> None:
    """Large kernels run the MTTKRP GEMMs in float32; forced on a small one, the fit is still exact."""
    monkeypatch.setattr(cp, "_F32_WORK", 0)
    w = _random_cp_weight(rng, 10, 7, 3, 3, 3)
    res = cp.cp_conv(w, 3, n_iter=500, tol=1e-12)
    assert res.rel_error < 1e-5
    assert rel(_cp_weight(res), w) == pytest.approx(res.rel_error, rel=1e-2, abs=1e-6)


def test_cp_factors_run_as_depthwise_graph(rng) -> None:
    w = _random_cp_weight(rng, 6, 4, 3, 3, 3)
    res = cp.cp_conv(w, 3, n_iter=500, tol=1e-12)
    x = rng.standard_normal((1, 4, 9, 10))
    ref = conv2d(x, w, **GEOM)
    mid = conv2d(conv2d(x, res.first), res.depthwise, group=3, **GEOM)
    out = conv2d(mid, res.last)
    assert rel(out, ref) < 1e-4
    # balanced scale: per term, the three factors have equal norms
    n1 = np.linalg.norm(res.first[:, :, 0, 0], axis=1)
    n2 = np.linalg.norm(res.depthwise.reshape(3, -1), axis=1)
    n3 = np.linalg.norm(res.last[:, :, 0, 0], axis=0)
    np.testing.assert_allclose(n1, n2, rtol=1e-4)
    np.testing.assert_allclose(n2, n3, rtol=1e-4)


def test_cp_greedy_exact_on_rank_one(rng) -> None:
    w = _random_cp_weight(rng, 5, 4, 3, 3, 1)
    res = cp.cp_conv(w, 1, method="greedy")
    assert res.rel_error < 1e-10
    # extra greedy terms on an exhausted residual stay harmless
    res3 = cp.cp_conv(w, 3, method="greedy")
    assert res3.rel_error < 1e-10 and np.all(np.isfinite(res3.first))


def test_cp_als_error_decreases_with_rank_and_beats_greedy(rng) -> None:
    als_minus_greedy = []
    for trial in range(3):
        w = rng.standard_normal((8, 6, 3, 3))
        errs = [cp.cp_conv(w, k, n_iter=150, seed=trial).rel_error for k in (1, 3, 6, 10)]
        assert all(a > b for a, b in zip(errs, errs[1:]))
        for k in (3, 6):
            als = cp.cp_conv(w, k, method="als", n_iter=150, seed=trial).rel_error
            greedy = cp.cp_conv(w, k, method="greedy").rel_error
            als_minus_greedy.append(als - greedy)
    assert np.mean(als_minus_greedy) < 0


def test_cp_deterministic_and_bad_args(rng) -> None:
    # K = 12 > kh*kw = 9: the spatial mode is padded with seeded random columns
    w = rng.standard_normal((6, 5, 3, 3))
    a = cp.cp_conv(w, 12, n_iter=30, seed=7)
    b = cp.cp_conv(w, 12, n_iter=30, seed=7)
    np.testing.assert_array_equal(a.first, b.first)
    np.testing.assert_array_equal(a.depthwise, b.depthwise)
    assert a.rel_error == b.rel_error
    assert cp.cp_conv(np.zeros((2, 2, 3, 3)), 2).rel_error == 0.0
    with pytest.raises(ValueError):
        cp.cp_conv(w, 2, method="bogus")
    with pytest.raises(ValueError):
        cp.cp_conv(w, 0)


# ----------------------------------------------------------------------------- ranks


def test_rank_for_energy_edge_cases() -> None:
    assert ranks.rank_for_energy([1.0, 1.0, 1.0, 1.0], 0.5) == 2  # exactly half at k = 2
    assert ranks.rank_for_energy([1.0, 1.0, 1.0, 1.0], 0.5000001) == 3
    assert ranks.rank_for_energy([4.0, 3.0], 0.64) == 1  # 16 / 25
    assert ranks.rank_for_energy([4.0, 3.0], 0.65) == 2
    assert ranks.rank_for_energy([3.0, 4.0], 0.64) == 1  # order of input does not matter
    assert ranks.rank_for_energy([5.0, 2.0, 0.0, 0.0], 1.0) == 2  # numerical rank, not size
    assert ranks.rank_for_energy([5.0, 2.0, 1.0], 1e-9) == 1
    assert ranks.rank_for_energy([0.0, 0.0, 0.0], 0.9) == 1
    assert ranks.rank_for_energy(np.array([7.0]), 1.0) == 1
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError):
            ranks.rank_for_energy([1.0, 2.0], bad)
    with pytest.raises(ValueError):
        ranks.rank_for_energy([], 0.5)


def test_rank_for_energy_bounds_svd_error(rng) -> None:
    w = rng.standard_normal((10, 2, 3, 3))
    s = svd.channel_svd(w, 1).singular_values
    for e in (0.5, 0.9, 0.99):
        k = ranks.rank_for_energy(s, e)
        assert svd.channel_svd(w, k).rel_error <= np.sqrt(1 - e) + 1e-12
        if k > 1:
            assert svd.channel_svd(w, k - 1).rel_error > np.sqrt(1 - e)


def test_rank_from_ratio_and_full_ranks() -> None:
    assert ranks.rank_from_ratio(5, 0.5) == 3  # half up, not banker's
    assert ranks.rank_from_ratio(10, 0.25) == 3
    assert ranks.rank_from_ratio(10, 0.01) == 1
    assert ranks.rank_from_ratio(10, 3.0) == 10
    assert ranks.rank_from_ratio(10, 1.0) == 10
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ranks.rank_from_ratio(10, bad)
    with pytest.raises(ValueError):
        ranks.rank_from_ratio(0, 0.5)
    assert ranks.svd_full_rank(64, 3, 7, 7) == 64 and ranks.svd_full_rank(256, 3, 7, 7) == 147
    assert ranks.spatial_full_rank(64, 3, 7, 7) == 21 and ranks.spatial_full_rank(2, 64, 3, 3) == 6
    assert ranks.tucker2_full_ranks(64, 32) == (64, 32)
    assert ranks.cp_full_rank(64, 3, 3, 3) == 27 and ranks.cp_full_rank(4, 5, 3, 3) == 20
    assert ranks.fc_full_rank(512, 10) == 10


def test_decompose_never_imports_onnx() -> None:
    from onnxslim_lr import cost

    files = [pathlib.Path(m.__file__) for m in (cost, ranks, svd, tucker, cp)]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("onnx", "onnxruntime") for n in names), path


def test_fitters_do_the_rank_independent_work_once_and_match_the_one_shot_fits(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Ladders fit one layer at five ranks: the decomposition / whitening is shared (fitters)."""
    import onnxslim_lr.decompose.svd as svd_mod
    import onnxslim_lr.decompose.tucker as tucker_mod
    from onnxslim_lr.decompose.svd import fc_svd, fc_svd_fitter, spatial_svd, spatial_svd_fitter
    from onnxslim_lr.decompose.tucker import tucker2, tucker2_fitter

    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 8, 3, 3))
    x = rng.standard_normal((2000, 8 * 9))
    sigma = x.T @ x / 2000
    calls: dict[str, int] = {"gram": 0, "setup": 0, "psd": 0}

    def counting(mod, name, key):  # type: ignore[no-untyped-def]
        real = getattr(mod, name)

        def spy(*a, **k):  # type: ignore[no-untyped-def]
            calls[key] += 1
            return real(*a, **k)

        monkeypatch.setattr(mod, name, spy)

    counting(svd_mod, "_fc_gram_basis", "gram")
    counting(tucker_mod, "_data_setup", "setup")
    counting(svd_mod, "psd_sqrt", "psd")
    b = rng.standard_normal((40, 30))
    resp = b.T @ (x[:, :40].T @ x[:, :40] / 2000) @ b
    fit_fc, fit_sp, fit_tk = fc_svd_fitter(b, response=resp), spatial_svd_fitter(w, sigma), tucker2_fitter(w, sigma=sigma)
    for r in (3, 7, 12):
        one = fc_svd(b, r, response=resp)
        assert np.allclose(fit_fc(r).left @ fit_fc(r).right, one.left @ one.right, atol=1e-5)
        sp = spatial_svd(w, r, sigma)
        assert fit_sp(r).rel_error == pytest.approx(sp.rel_error, rel=1e-9)
        tk = tucker2(w, min(r, 12), min(r, 8), sigma=sigma)
        assert fit_tk(min(r, 12), min(r, 8)).rel_error == pytest.approx(tk.rel_error, rel=1e-9)
    # the fitters' shared step ran once each (the one-shot calls above ran it once per call)
    assert calls == {"gram": 1 + 3, "setup": 1 + 3, "psd": 1 + 3}
    # a lower rank after a higher one reads the leading columns of the cached B Q
    one = fc_svd(b, 5, response=resp)
    assert np.allclose(fit_fc(5).left @ fit_fc(5).right, one.left @ one.right, atol=1e-5)


def test_spatial_and_tucker2_ladders_slice_their_sigma_products_from_the_largest_rank(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The products with Sigma are nested in the rank: formed once at the largest rank asked,
    a lower rank reads their leading blocks and gets the one-shot fit."""
    import onnxslim_lr.decompose.svd as svd_mod
    from onnxslim_lr.decompose.svd import spatial_svd, spatial_svd_fitter
    from onnxslim_lr.decompose.tucker import tucker2, tucker2_fitter

    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 8, 3, 3))
    x = rng.standard_normal((2000, 8 * 9)) @ rng.standard_normal((72, 72)) / 8
    sigma = x.T @ x / 2000
    made: list[int] = []
    real = svd_mod._spatial_products
    monkeypatch.setattr(svd_mod, "_spatial_products", lambda w64, s, v: (made.append(v.shape[0]), real(w64, s, v))[1])
    fit_sp, fit_tk = spatial_svd_fitter(w, sigma), tucker2_fitter(w, sigma=sigma)
    for r in (10, 6, 3):  # the largest first, as the budget ladders build them
        got, one = fit_sp(r), spatial_svd(w, r, sigma)
        assert got.rel_error == pytest.approx(one.rel_error, rel=1e-9)
        np.testing.assert_allclose(got.vertical, one.vertical, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.horizontal, one.horizontal, rtol=1e-5, atol=1e-6)
        tk, tk1 = fit_tk(r, min(r, 8)), tucker2(w, r, min(r, 8), sigma=sigma)
        assert tk.rel_error == pytest.approx(tk1.rel_error, rel=1e-9)
    assert made == [10, 10, 6, 3]  # the fitter's one product at rank 10, then the one-shot fits'


def test_wide_data_metric_fits_use_float32_products_and_stay_exact_at_full_rank() -> None:
    """n >= 256: the products with Sigma run in float32; the errors match float64 arithmetic
    to float32 accuracy and full rank stays (near) exact."""
    from onnxslim_lr.decompose.reconstruct import GRAM_F32_MIN_COLS, data_rel_error
    from onnxslim_lr.decompose.svd import spatial_svd
    from onnxslim_lr.decompose.tucker import tucker2

    rng = np.random.default_rng(6)
    F, C = 24, 32
    assert C * 9 >= GRAM_F32_MIN_COLS
    w = rng.standard_normal((F, C, 3, 3))
    x = rng.standard_normal((4000, C * 9)) @ (np.eye(C * 9) + 0.3 * rng.standard_normal((C * 9, C * 9)) / 17)
    sigma = (x.T @ x / 4000).astype(np.float32).astype(np.float64)
    w2 = w.reshape(F, -1)
    for r in (4, 12):
        tk = tucker2(w, r, r, sigma=sigma)
        w_hat = tk.last.reshape(F, r).astype(np.float64) @ tk.core.reshape(r, -1).astype(np.float64) @ np.kron(
            tk.first.reshape(r, C).astype(np.float64), np.eye(9))
        assert tk.rel_error == pytest.approx(data_rel_error(w2, w_hat, sigma), rel=1e-3)
        sp = spatial_svd(w, r, sigma)
        assert 0.0 < sp.rel_error < 1.0
    assert tucker2(w, F, C, sigma=sigma).rel_error < 1e-3
    assert spatial_svd(w, min(C * 3, F * 3), sigma).rel_error < 1e-3
