"""Numerics of Denton et al.'s clustering approximations (balanced k-means, monochromatic,
biclustering): pure numpy, no onnx, fast."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_lr.decompose.cluster import balanced_kmeans
from onnxslim_lr.cost import conv_macs
from onnxslim_lr.decompose.denton import (
    bicluster,
    bicluster_cp_macs,
    bicluster_svd_macs,
    mono_macs,
    mono_speedup,
    monochromatic,
)


# --------------------------------------------------------------------------- numpy conv


def np_conv(x: np.ndarray, w: np.ndarray, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
            group: int = 1) -> np.ndarray:
    """ONNX Conv semantics (NCHW, pads = (top, left, bottom, right)) via einsum."""
    N, C, Hi, Wi = x.shape
    F, Cg, kh, kw = w.shape
    assert C == Cg * group and F % group == 0
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((N, C, kh, kw, Ho, Wo))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh,
                                  j * dw:j * dw + sw * (Wo - 1) + 1:sw]
    cols = cols.reshape(N, group, Cg, kh, kw, Ho, Wo)
    wg = w.reshape(group, F // group, Cg, kh, kw)
    return np.einsum("ngcijhw,gocij->ngohw", cols, wg).reshape(N, F, Ho, Wo)


def run_bicluster_graph(x, res, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    """Simulate the standard-op graph documented on :class:`Bicluster`, op by op."""
    N = x.shape[0]
    x1 = x[:, res.in_perm]
    y1 = np_conv(x1, res.stage1, group=res.stage1_group)
    G, H, K1 = res.shuffle_shape
    Hi, Wi = y1.shape[2:]
    y1s = y1.reshape(N, G, H, K1 * Hi * Wi).transpose(0, 2, 1, 3).reshape(N, H * G * K1, Hi, Wi)
    np.testing.assert_array_equal(y1s, y1[:, res.shuffle_perm])  # Gather alternative agrees
    y2 = np_conv(y1s, res.stage2, strides, pads, dilations, group=res.stage2_group)
    y3 = np_conv(y2, res.stage3, group=res.stage3_group)
    return y3[:, res.out_inverse]


# --------------------------------------------------------------------------- balanced k-means


def _blobs(rng, k, m, d, spread=0.05):
    centres = rng.standard_normal((k, d)) * 3
    X = np.repeat(centres, m, axis=0) + spread * rng.standard_normal((k * m, d))
    perm = rng.permutation(k * m)
    return X[perm], np.repeat(np.arange(k), m)[perm]


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("metric", ["euclidean", "subspace"])
def test_kmeans_equal_sizes(metric):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((48, 5))
    for k in (1, 2, 3, 4, 6, 8, 12, 48):
        c = balanced_kmeans(X, k, metric=metric, seed=3)
        assert c.labels.shape == (48,) and c.centers.shape == (k, 5)
        assert np.all(np.bincount(c.labels, minlength=k) == 48 // k)
        assert c.labels[0] == 0  # canonical numbering
    assert balanced_kmeans(X, 48, metric=metric).inertia == pytest.approx(0.0, abs=1e-12)


def test_kmeans_recovers_balanced_blobs():
    rng = np.random.default_rng(2)
    X, truth = _blobs(rng, 4, 6, 3)
    c = balanced_kmeans(X, 4, seed=0)
    assert _same_partition(c.labels, truth)


def test_kmeans_balance_is_enforced_over_geometry():
    # 9 points near one centre and 3 near another: k=2 must still split 6/6
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 0.1, (9, 2)), rng.normal(10, 0.1, (3, 2))])
    c = balanced_kmeans(X, 2)
    assert np.all(np.bincount(c.labels) == 6)
    assert len(set(c.labels[9:].tolist())) == 1  # the far points stay together


@pytest.mark.parametrize("metric", ["euclidean", "subspace"])
def test_kmeans_deterministic(metric):
    X = np.random.default_rng(5).standard_normal((60, 4))
    a = balanced_kmeans(X, 6, metric=metric, seed=11)
    b = balanced_kmeans(X, 6, metric=metric, seed=11)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.inertia == b.inertia


def test_subspace_metric_is_sign_invariant():
    rng = np.random.default_rng(7)
    dirs = rng.standard_normal((4, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    U = np.repeat(dirs, 5, axis=0) + 0.02 * rng.standard_normal((20, 3))
    flips = rng.choice([-1.0, 1.0], size=(20, 1))
    a = balanced_kmeans(U, 4, metric="subspace", seed=0)
    b = balanced_kmeans(U * flips * 2.5, 4, metric="subspace", seed=0)  # sign and scale
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.centers, b.centers, atol=1e-12)
    assert _same_partition(a.labels, np.repeat(np.arange(4), 5))
    # euclidean k-means is NOT sign invariant: opposite vectors are far apart
    e = balanced_kmeans(np.concatenate([dirs[:1]] * 2 + [-dirs[:1]] * 2), 2)
    assert e.labels.tolist() == [0, 0, 1, 1]
    s = balanced_kmeans(np.concatenate([dirs[:1]] * 2 + [-dirs[:1]] * 2), 2, metric="subspace")
    assert s.inertia == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(np.abs(s.centers @ dirs[0]), 1.0)


def test_kmeans_declines():
    X = np.zeros((10, 2))
    with pytest.raises(ValueError, match="divisible"):
        balanced_kmeans(X, 3)
    with pytest.raises(ValueError, match="metric"):
        balanced_kmeans(X, 2, metric="cosine")
    with pytest.raises(ValueError, match=r"\[1, n=10\]"):
        balanced_kmeans(X, 20)


# --------------------------------------------------------------------------- monochromatic


def _mono_filters(rng, F=24, C=3, n_colors=4, kh=5, kw=5):
    """Filters whose colour parts are rank 1 and use ``n_colors`` shared colours, shuffled."""
    colours = rng.standard_normal((n_colors, C))
    colours /= np.linalg.norm(colours, axis=1, keepdims=True)
    which = rng.permutation(np.repeat(np.arange(n_colors), F // n_colors))
    spatial = rng.standard_normal((F, kh, kw))
    scale = rng.choice([-1.0, 1.0], F) * rng.uniform(0.5, 2.0, F)  # arbitrary signs
    w = np.einsum("fc,fij->fcij", colours[which] * scale[:, None], spatial)
    return w, which


def test_mono_exact_on_structured_filters():
    rng = np.random.default_rng(0)
    w, which = _mono_filters(rng)
    m = monochromatic(w, 4, seed=0)
    assert m.rel_error < 1e-7
    np.testing.assert_allclose(m.reconstruct(), w, atol=1e-10)
    assert _same_partition(m.labels, which)
    assert m.projection.shape == (4, 3, 1, 1) and m.grouped.shape == (24, 1, 5, 5)
    np.testing.assert_allclose(np.linalg.norm(m.projection[:, :, 0, 0], axis=1), 1.0)


def test_mono_permutations_and_grouped_conv():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 3, 3, 3))
    m = monochromatic(w, 3, seed=0)
    Fc = 12 // 3
    # cluster order: output channel i belongs to cluster i // (F/C')
    np.testing.assert_array_equal(m.labels[m.order], np.repeat(np.arange(3), Fc))
    np.testing.assert_array_equal(m.order[m.inverse], np.arange(12))
    # the two-conv graph equals a dense conv by the reconstruction (stride/pads on stage 2)
    x = rng.standard_normal((2, 3, 9, 8))
    kw_ = dict(strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 2))
    y = np_conv(np_conv(x, m.projection), m.grouped, group=m.group, **kw_)[:, m.inverse]
    np.testing.assert_allclose(y, np_conv(x, m.reconstruct(), **kw_), atol=1e-10)
    # and the reported error is the Frobenius error of that reconstruction
    assert m.rel_error == pytest.approx(np.linalg.norm(m.reconstruct() - w) / np.linalg.norm(w))
    # the projection refit b_f = W_f^T U_c is never worse than Denton's eq. 9, U_c s_f v_f^T
    # (with the sign of u_f aligned to U_c, which eq. 9 leaves implicit)
    Wm = w.reshape(12, 3, 9)
    U, S, Vt = np.linalg.svd(Wm, full_matrices=False)
    Uc = m.projection[:, :, 0, 0][m.labels]
    sgn = np.sign(np.einsum("fc,fc->f", U[:, :, 0], Uc))
    denton = np.einsum("fc,f,fp->fcp", Uc, sgn * S[:, 0], Vt[:, 0])
    assert m.rel_error <= np.linalg.norm(denton - Wm) / np.linalg.norm(Wm) + 1e-12
    assert 0 < m.rel_error < 1


def test_mono_one_colour_per_filter_is_rank1_svd():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 3, 3, 3))
    m = monochromatic(w, 6)
    s = np.linalg.svd(w.reshape(6, 3, 9), compute_uv=False)
    expected = np.sqrt((s[:, 1:] ** 2).sum() / (s ** 2).sum())
    assert m.rel_error == pytest.approx(expected, rel=1e-9)


def test_mono_deterministic_and_declines():
    w = np.random.default_rng(3).standard_normal((12, 3, 3, 3))
    a, b = monochromatic(w, 4, seed=5), monochromatic(w, 4, seed=5)
    np.testing.assert_array_equal(a.grouped, b.grouped)
    np.testing.assert_array_equal(a.order, b.order)
    with pytest.raises(ValueError, match=r"F % C' = 2"):
        monochromatic(w, 5)
    with pytest.raises(ValueError, match="conv weight"):
        monochromatic(w[0], 3)


# --------------------------------------------------------------------------- biclustering


@pytest.mark.parametrize("G,H", [(1, 1), (2, 3), (4, 2), (8, 6)])
def test_bicluster_svd_exact_at_full_block_rank(G, H):
    rng = np.random.default_rng(G * 10 + H)
    w = rng.standard_normal((12, 8, 3, 2))
    r = bicluster(w, G, H, ranks=(8 // G, 12 // H), seed=1)
    assert r.rel_error < 1e-12
    np.testing.assert_allclose(r.reconstruct(), w, atol=1e-12)
    assert r.stage1.shape == (G * H * (8 // G), 8 // G, 1, 1)
    assert r.stage2.shape == (H * G * (12 // H), 8 // G, 3, 2)
    assert r.stage3.shape == (12, G * (12 // H), 1, 1)
    assert (r.stage1_group, r.stage2_group, r.stage3_group) == (G, G * H, H)
    assert np.all(np.bincount(r.in_labels) == 8 // G)
    assert np.all(np.bincount(r.out_labels) == 12 // H)


@pytest.mark.parametrize("mode", ["svd", "cp"])
def test_staged_graph_equals_dense_reconstruction(mode):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 8, 3, 3))
    kwargs = dict(ranks=(3, 2)) if mode == "svd" else dict(rank=3)
    r = bicluster(w, 2, 3, mode=mode, seed=0, **kwargs)
    np.testing.assert_array_equal(r.in_labels[r.in_perm], np.repeat(np.arange(2), 4))
    np.testing.assert_array_equal(r.out_labels[r.out_order], np.repeat(np.arange(3), 4))
    x = rng.standard_normal((2, 8, 9, 10))
    geo = dict(strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2))
    y = run_bicluster_graph(x, r, **geo)
    W_hat = r.reconstruct()
    np.testing.assert_allclose(y, np_conv(x, W_hat, **geo), atol=1e-10)
    assert 0 < r.rel_error < 1
    assert r.rel_error == pytest.approx(np.linalg.norm(W_hat - w) / np.linalg.norm(w))
    if mode == "cp":
        assert r.stage2.shape == (3 * 2 * 3, 1, 3, 3) and r.stage2_group == 18


def test_staged_graph_full_rank_equals_original_conv():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 6, 3, 3))
    r = bicluster(w, 3, 2, ranks=(2, 4))
    x = rng.standard_normal((1, 6, 7, 7))
    np.testing.assert_allclose(run_bicluster_graph(x, r, pads=(1, 1, 1, 1)),
                               np_conv(x, w, pads=(1, 1, 1, 1)), atol=1e-10)


def _lowrank_block_weight(rng, G, H, Cg, Fh, P, K):
    """Weight whose (g, h) blocks, for a hidden grouping, are each CP rank K."""
    C, F = G * Cg, H * Fh
    kh, kw = P
    w = np.zeros((F, C, kh, kw))
    cin = rng.permutation(C).reshape(G, Cg)
    fout = rng.permutation(F).reshape(H, Fh)
    for g in range(G):
        for h in range(H):
            A = rng.standard_normal((Fh, K))
            B = rng.standard_normal((Cg, K))
            S = rng.standard_normal((kh * kw, K))
            w[np.ix_(fout[h], cin[g])] = np.einsum("fk,ck,pk->fcp", A, B, S).reshape(Fh, Cg, kh, kw)
    return w


def test_bicluster_cp_exact_on_low_rank_blocks():
    rng = np.random.default_rng(6)
    # G = 1 / H = 1 make every clustering "correct", so the blocks are exactly rank K
    w = _lowrank_block_weight(rng, 1, 1, 6, 8, (3, 3), 4)
    r = bicluster(w, 1, 1, mode="cp", rank=4)
    assert r.rel_error < 1e-8
    # two hidden rank-3 output groups: the whole tensor has rank <= 6
    w = _lowrank_block_weight(rng, 1, 2, 8, 5, (3, 3), 3)
    r_all = bicluster(w, 1, 1, mode="cp", rank=6)
    assert r_all.rel_error < 1e-8
    # more terms than needed are still exact
    w1 = _lowrank_block_weight(rng, 1, 1, 4, 4, (1, 1), 2)
    assert bicluster(w1, 1, 1, mode="cp", rank=3).rel_error < 1e-8
    assert bicluster(w1, 1, 1, mode="cp", rank=2).rel_error < 1e-8


def test_bicluster_cp_exact_with_equal_grouping():
    # blocks = contiguous channel ranges; with identical clustering to the construction
    rng = np.random.default_rng(8)
    G, H, Cg, Fh, K = 2, 2, 4, 4, 2
    w = np.zeros((H * Fh, G * Cg, 3, 3))
    for g in range(G):
        for h in range(H):
            A = rng.standard_normal((Fh, K)) + 5.0 * (h + 1)  # distinct output groups
            B = rng.standard_normal((Cg, K)) + 5.0 * (g + 1)  # distinct input groups
            S = rng.standard_normal((9, K))
            w[h * Fh:(h + 1) * Fh, g * Cg:(g + 1) * Cg] = np.einsum(
                "fk,ck,pk->fcp", A, B, S).reshape(Fh, Cg, 3, 3)
    r = bicluster(w, G, H, mode="cp", rank=K)
    assert r.rel_error < 1e-8


def test_bicluster_svd_low_rank_and_cost():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((16, 8, 3, 3))
    errs = [bicluster(w, 2, 2, ranks=(k, k)).rel_error for k in (1, 2, 4)]
    assert errs[0] > errs[1] > errs[2] > 1e-12
    r = bicluster(w, 2, 4, ranks=(3, 2))
    assert r.macs(10, 10, 8, 8) == bicluster_svd_macs(8, 16, 3, 3, 10, 10, 8, 8, 2, 4, 3, 2)
    assert r.macs(10, 10, 8, 8) == (2 * 4 * 3 * 4 * 100 + (4 * 2 * 2) * 3 * 9 * 64
                                    + 16 * (2 * 2) * 64)
    c = bicluster(w, 2, 4, mode="cp", rank=3)
    assert c.macs(10, 10, 8, 8) == bicluster_cp_macs(8, 16, 3, 3, 10, 10, 8, 8, 2, 4, 3)
    assert c.macs(10, 10, 8, 8) == 24 * 4 * 100 + 24 * 9 * 64 + 16 * 6 * 64
    assert c.params == c.stage1.size + c.stage2.size + c.stage3.size


def test_bicluster_deterministic():
    w = np.random.default_rng(10).standard_normal((12, 8, 3, 3))
    a = bicluster(w, 2, 3, mode="cp", rank=2, seed=4)
    b = bicluster(w, 2, 3, mode="cp", rank=2, seed=4)
    for name in ("in_perm", "out_order", "stage1", "stage2", "stage3"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_bicluster_declines():
    w = np.zeros((12, 8, 3, 3))
    with pytest.raises(ValueError, match=r"8 input channels .* n_in_groups=3 .*C % G = 2"):
        bicluster(w, 3, 2, ranks=(1, 1))
    with pytest.raises(ValueError, match=r"12 output channels .* n_out_groups=5 .*F % H = 2"):
        bicluster(w, 2, 5, ranks=(1, 1))
    with pytest.raises(ValueError, match=r"K1 <= C/G=4"):
        bicluster(w, 2, 2, ranks=(5, 1))
    with pytest.raises(ValueError, match="ranks=\\(K1, K2\\)"):
        bicluster(w, 2, 2, rank=2)
    with pytest.raises(ValueError, match="rank=K"):
        bicluster(w, 2, 2, mode="cp", ranks=(2, 2))
    with pytest.raises(ValueError, match="mode"):
        bicluster(w, 2, 2, mode="tucker", ranks=(2, 2))
    with pytest.raises(ValueError, match="sigma"):
        bicluster(w, 2, 2, ranks=(2, 2), sigma=np.eye(5))


@pytest.mark.parametrize("mode", ["svd", "cp"])
def test_data_metric_beats_frobenius_on_output_error(mode):
    rng = np.random.default_rng(11)
    C, F = 8, 8
    w = rng.standard_normal((F, C, 3, 3))
    mix = rng.standard_normal((C, 2))

    def inputs(n):  # channels driven by 2 latent signals + small noise, spatially white
        z = rng.standard_normal((n, 2, 6, 6))
        return np.einsum("cr,nrhw->nchw", mix, z) + 0.05 * rng.standard_normal((n, C, 6, 6))

    x_cal, x_test = inputs(64), inputs(16)
    sigma_c = np.einsum("nchw,ndhw->cd", x_cal, x_cal) / (x_cal.shape[0] * 36)
    # the input-side rank is the bottleneck: K1 = 2 of C/G = 4 channels (svd), or rank 8 on
    # 4 x 4 x 9 blocks (cp); each group's inputs really live in 2 dimensions
    kwargs = dict(ranks=(2, 4)) if mode == "svd" else dict(rank=8)
    frob = bicluster(w, 2, 2, mode=mode, seed=0, **kwargs)
    data = bicluster(w, 2, 2, mode=mode, seed=0, sigma=sigma_c, **kwargs)
    y = np_conv(x_test, w)

    def out_err(r):
        return np.linalg.norm(np_conv(x_test, r.reconstruct()) - y) / np.linalg.norm(y)

    assert out_err(data) < 0.5 * out_err(frob)
    assert data.rel_error < frob.rel_error  # data rel_error is measured in the data metric
    # the patch covariance (C*kh*kw square, CONTRIBUTING's convention) works as well
    cols = np.stack([x_cal[:, :, i:i + 4, j:j + 4] for i in range(3) for j in range(3)], axis=2)
    pat = cols.transpose(0, 3, 4, 1, 2).reshape(-1, C * 9)  # index c*9 + p
    data_p = bicluster(w, 2, 2, mode=mode, seed=0, sigma=pat.T @ pat / pat.shape[0], **kwargs)
    assert out_err(data_p) < 0.5 * out_err(frob)


def test_data_metric_full_rank_still_exact():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((6, 4, 3, 3))
    a = rng.standard_normal((4, 4))
    r = bicluster(w, 2, 3, ranks=(2, 2), sigma=a @ a.T)
    assert r.rel_error < 1e-10
    np.testing.assert_allclose(r.reconstruct(), w, atol=1e-9)


# --------------------------------------------------------------------------- MAC model


def test_table3_theoretical_speedups():
    # Denton Table 3: MattNet layer 1 (C=3, F=96, 7x7, stride 2) on 224x224. The printed
    # speedups are reproduced with a 110x110 output (one pixel of padding per side).
    table = {6: 2.95, 8: 2.94, 12: 2.91, 16: 2.88, 24: 2.82, 48: 2.66, 96: 2.39}
    for n_colors, expected in table.items():
        s = mono_speedup(3, 96, 7, 7, 224, 224, 110, 110, n_colors)
        assert round(s, 2) == expected, (n_colors, s)
    assert conv_macs(96, 3, 7, 7, 110, 110) == 49 * 3 * 96 * 110 * 110
    assert mono_macs(3, 96, 7, 7, 224, 224, 110, 110, 6) == 6 * 3 * 224 * 224 + 49 * 96 * 110 * 110
    assert round(mono_speedup(3, 96, 7, 7, 224, 224, 109, 109, 96), 2) == 2.38  # not 109


def test_bicluster_macs_match_table1_formulas():
    C, F, kh, kw, Hi, Wi, Ho, Wo = 96, 256, 5, 5, 55, 55, 27, 27
    G, H, K, K1, K2 = 48, 2, 8, 2, 16
    NM, out = Hi * Wi, Ho * Wo
    assert bicluster_cp_macs(C, F, kh, kw, Hi, Wi, Ho, Wo, G, H, K) == \
        G * H * K * (NM * C // G + kh * kw * out + F // H * out)
    assert bicluster_svd_macs(C, F, kh, kw, Hi, Wi, Ho, Wo, G, H, K1, K2) == \
        G * H * (NM * C // G * K1 + K1 * kh * kw * K2 * out + K2 * F // H * out)
    with pytest.raises(ValueError, match="C % G"):
        bicluster_svd_macs(C, F, kh, kw, Hi, Wi, Ho, Wo, 5, H, K1, K2)
