"""Tests of the data-aware forms and of asymmetric (sequential) reconstruction.

Everything is generated in code: planted low-dimensional inputs (where the data metric must
beat the Frobenius one), a 3-layer numpy chain (where sequential reconstruction must beat
independent fits end to end), and conv-level checks through a direct numpy convolution so
the factor layouts are tested with ONNX Conv semantics.
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_lr.calibration import im2col
from onnxslim_lr.decompose import reconstruct as rc
from onnxslim_lr.decompose.cp import cp_conv
from onnxslim_lr.decompose.svd import channel_svd, spatial_svd
from onnxslim_lr.decompose.tucker import tucker2

try:
    from tests._npconv import conv2d
except ImportError:  # pragma: no cover - run from inside tests/
    from _npconv import conv2d


def _planted(rng: np.random.Generator, n: int, dim: int, rows: int, noise: float = 0.0) -> np.ndarray:
    """Rows living (up to ``noise``) in a random ``dim``-dimensional subspace of R^n."""
    basis = rng.standard_normal((n, dim))
    x = rng.standard_normal((rows, dim)) @ basis.T
    return x + noise * rng.standard_normal((rows, n))


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


# ----------------------------------------------------------------------------- regression


def test_full_rank_is_exact() -> None:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 10)), rng.standard_normal(6)
    x = rng.standard_normal((500, 10)) + 0.3
    mom = rc.CrossMoments(10)
    mom.update(x)
    for intercept in (True, False):
        fit = rc.lowrank_regression(w, b, 6, mom, ridge=0.0, intercept=intercept)
        np.testing.assert_allclose(fit.matrix, w, atol=1e-9)
        np.testing.assert_allclose(fit.bias, b, atol=1e-9)
        assert fit.rel_error < 1e-7


def test_independent_fit_equals_data_metric_svd() -> None:
    """With x^ = x, no intercept and no ridge, the regression is the data-metric channel SVD."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 3, 3))
    x = _planted(rng, 27, 12, 2000, noise=0.05)
    mom = rc.CrossMoments(27)
    mom.update(x)
    ref = channel_svd(w, 4, mom.s_xx)
    fit = rc.lowrank_regression(w.reshape(8, -1), None, 4, mom, ridge=0.0, intercept=False)
    ref_m = ref.second.reshape(8, 4).astype(np.float64) @ ref.first.reshape(4, -1)
    np.testing.assert_allclose(fit.matrix, ref_m, atol=1e-4 * np.abs(ref_m).max())
    assert fit.rel_error == pytest.approx(ref.rel_error, rel=1e-6)


def test_expected_error_matches_rows() -> None:
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    x = rng.standard_normal((300, 7)) + 1.0
    xh = x + 0.2 * rng.standard_normal((300, 7))
    m, nb = rng.standard_normal((5, 7)), rng.standard_normal(5)
    mom = rc.CrossMoments(7)
    mom.update(x, xh)
    direct = np.sqrt(np.sum((x @ w.T + b - xh @ m.T - nb) ** 2) / np.sum((x @ w.T) ** 2))
    assert rc.expected_error(w, b, m, nb, mom) == pytest.approx(direct, rel=1e-9)


def test_bias_correction_makes_mean_response_exact() -> None:
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((9, 12)), rng.standard_normal(9)
    x = rng.standard_normal((800, 12)) + 0.5
    xh = 0.9 * x + 0.3 + 0.1 * rng.standard_normal(x.shape)  # a shifted, shrunk compressed input
    mom = rc.CrossMoments(12)
    mom.update(x, xh)
    with_b = rc.lowrank_regression(w, b, 3, mom, intercept=True)
    target = (x @ w.T + b).mean(axis=0)
    np.testing.assert_allclose((xh @ with_b.matrix.T + with_b.bias).mean(axis=0), target, atol=1e-9)
    without = rc.lowrank_regression(w, b, 3, mom, intercept=False)
    assert np.abs((xh @ without.matrix.T + without.bias).mean(axis=0) - target).max() > 1e-3
    assert with_b.rel_error < without.rel_error


def test_asymmetric_corrects_input_drift() -> None:
    """Fed x^ instead of x, the asymmetric fit beats the data-metric (independent) fit."""
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal((16, 30)), rng.standard_normal(16)
    x = _planted(rng, 30, 20, 4000, noise=0.1)
    xh = x @ (np.eye(30) + 0.15 * rng.standard_normal((30, 30)))
    fit_m, ho_m = rc.CrossMoments(30), rc.CrossMoments(30)
    fit_m.update(x[:3000], xh[:3000])
    ho_m.update(x[3000:], xh[3000:])
    ind = channel_svd(w.reshape(16, 30, 1, 1), 8, fit_m.s_xx)
    m_ind = ind.second.reshape(16, 8).astype(np.float64) @ ind.first.reshape(8, 30)
    asym = rc.lowrank_regression(w, b, 8, fit_m)
    best, errs = rc.pick_by_holdout(w, b, [(m_ind, b), (asym.matrix, asym.bias)], ho_m)
    assert best == 1
    assert errs[1] < 0.7 * errs[0]


def test_fallback_keeps_data_metric_when_reconstruction_overfits() -> None:
    """Too few rows for the inputs: the unregularised refit overfits, held-out picks the data fit."""
    rng = np.random.default_rng(5)
    n = 60
    w, b = rng.standard_normal((20, n)), rng.standard_normal(20)
    x = rng.standard_normal((2000, n))
    xh = x + 0.02 * rng.standard_normal(x.shape)
    fit_m, ho_m = rc.CrossMoments(n), rc.CrossMoments(n)
    fit_m.update(x[:40], xh[:40])  # 40 rows for 60 inputs
    ho_m.update(x[40:], xh[40:])
    big = rc.CrossMoments(n)
    big.update(x[40:], None)
    data = channel_svd(w.reshape(20, n, 1, 1), 10, big.s_xx)  # a well-estimated data-metric fit
    m_data = data.second.reshape(20, 10).astype(np.float64) @ data.first.reshape(10, n)
    over = rc.lowrank_regression(w, b, 10, fit_m, ridge=1e-12)
    assert over.rel_error < 0.5 * rc.expected_error(w, b, over.matrix, over.bias, ho_m)  # it did overfit
    best, errs = rc.pick_by_holdout(w, b, [(m_data, b), (over.matrix, over.bias)], ho_m)
    assert best == 0 and errs[0] < errs[1]


def test_ridge_helps_a_small_calibration_set() -> None:
    rng = np.random.default_rng(6)
    n = 80
    w, b = rng.standard_normal((30, n)), rng.standard_normal(30)
    x = _planted(rng, n, 50, 3000, noise=0.05)
    xh = x + 0.05 * rng.standard_normal(x.shape)
    fit_m, ho_m = rc.CrossMoments(n), rc.CrossMoments(n)
    fit_m.update(x[:90], xh[:90])
    ho_m.update(x[90:], xh[90:])
    errs = {r: rc.expected_error(w, b, (f := rc.lowrank_regression(w, b, 15, fit_m, ridge=r)).matrix, f.bias, ho_m)
            for r in (1e-12, rc.DEFAULT_RIDGE, 1e-1)}
    assert errs[rc.DEFAULT_RIDGE] < errs[1e-12]


# ----------------------------------------------------------------------------- chains


def _chain(rng: np.random.Generator, dims: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i]), 0.1 * rng.standard_normal(dims[i + 1]))
            for i in range(len(dims) - 1)]


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, relu: bool, upto: int | None = None,
             depth: int = 3) -> np.ndarray:
    """Run the first ``upto`` layers; a ReLU follows every layer but the network's last (``depth``)."""
    for i, (w, b) in enumerate(layers[:upto]):
        x = x @ w.T + b
        if relu and i < depth - 1:
            x = np.maximum(x, 0.0)
    return x


@pytest.mark.parametrize("relu", [False, True])
def test_sequential_beats_independent_on_a_3_layer_chain(relu: bool) -> None:
    rng = np.random.default_rng(7)
    dims = [40, 48, 48, 32]
    layers = _chain(rng, dims)
    x_all = _planted(rng, 40, 25, 6000, noise=0.05)
    x_fit, x_test = x_all[:4000], x_all[4000:]
    ranks = [10, 10, 24]

    indep: list[tuple[np.ndarray, np.ndarray]] = []
    seq: list[tuple[np.ndarray, np.ndarray]] = []
    for i, (w, b) in enumerate(layers):
        xi = _forward(layers, x_fit, relu, upto=i)
        m_ind = rc.CrossMoments(w.shape[1])
        m_ind.update(xi)
        f_ind = rc.lowrank_regression(w, b, ranks[i], m_ind, intercept=False)
        indep.append((f_ind.matrix, b))
        xh = _forward(seq, x_fit, relu, upto=i) if seq else x_fit
        m_seq = rc.CrossMoments(w.shape[1])
        m_seq.update(xi, xh)
        f_seq = rc.lowrank_regression(w, b, ranks[i], m_seq)
        seq.append((f_seq.matrix, f_seq.bias))
    ref = _forward(layers, x_test, relu)
    e_ind = _mse(_forward(indep, x_test, relu), ref)
    e_seq = _mse(_forward(seq, x_test, relu), ref)
    assert e_seq < 0.9 * e_ind, (e_seq, e_ind)


def test_relu_aware_not_worse_on_post_relu_error() -> None:
    rng = np.random.default_rng(8)
    n, F = 40, 32
    w, b = rng.standard_normal((F, n)) / np.sqrt(n), 0.2 * rng.standard_normal(F)
    x = _planted(rng, n, 25, 6000, noise=0.05)
    xh = x + 0.1 * rng.standard_normal(x.shape)
    fit_m = rc.CrossMoments(n)
    fit_m.update(x[:4000], xh[:4000])
    lin = rc.lowrank_regression(w, b, 8, fit_m)
    ref = rc.relu_refine(w, b, 8, x[:4000], xh[:4000], lin)

    def post(f: rc.LinearFit, sl: slice) -> float:
        return _mse(np.maximum(xh[sl] @ f.matrix.T + f.bias, 0), np.maximum(x[sl] @ w.T + b, 0))

    assert post(ref, slice(0, 4000)) <= post(lin, slice(0, 4000))
    assert post(ref, slice(4000, None)) < post(lin, slice(4000, None))  # and it generalises here
    assert np.linalg.matrix_rank(ref.matrix, tol=1e-8) <= 8


# ----------------------------------------------------------------------------- data-aware forms


def _conv_sigma(rng: np.random.Generator, C: int, k: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose channels live in a ``dim``-dimensional subspace; their patches' second moment."""
    basis = rng.standard_normal((C, dim))
    img = np.einsum("cd,ndhw->nchw", basis, rng.standard_normal((40, dim, 10, 10)))
    img += 0.02 * rng.standard_normal(img.shape)
    rows = im2col(img, (k, k), (1, 1), (1, 1, 1, 1), (1, 1))
    return img, rows.T @ rows / rows.shape[0]


def _data_err(w: np.ndarray, w_hat: np.ndarray, img: np.ndarray) -> float:
    a = conv2d(img, w, pads=(1, 1, 1, 1))
    return float(np.linalg.norm(a - conv2d(img, w_hat, pads=(1, 1, 1, 1))) / np.linalg.norm(a))


def _tucker_w(t) -> np.ndarray:  # noqa: ANN001
    return np.einsum("fa,abij,bc->fcij", t.last[:, :, 0, 0], t.core, t.first[:, :, 0, 0]).astype(np.float64)


def _spatial_w(s) -> np.ndarray:  # noqa: ANN001
    return np.einsum("fkj,kci->fcij", s.horizontal[:, :, 0, :], s.vertical[:, :, :, 0]).astype(np.float64)


def _cp_w(c) -> np.ndarray:  # noqa: ANN001
    return np.einsum("kc,kij,fk->fcij", c.first[:, :, 0, 0], c.depthwise[:, 0], c.last[:, :, 0, 0]).astype(np.float64)


def test_data_metric_beats_frobenius_on_planted_inputs() -> None:
    rng = np.random.default_rng(9)
    F, C = 24, 16
    w = rng.standard_normal((F, C, 3, 3))
    img, sigma = _conv_sigma(rng, C, 3, 5)
    forms = {
        "tucker2": (lambda s: _tucker_w(tucker2(w, 8, 5, sigma=s))),
        "spatial": (lambda s: _spatial_w(spatial_svd(w, 10, s))),
        "cp": (lambda s: _cp_w(cp_conv(w, 12, sigma=s))),
        "svd": (lambda s: (lambda f: np.einsum("fk,kcij->fcij", f.second[:, :, 0, 0], f.first))(channel_svd(w, 16, s))),
    }
    for name, make in forms.items():
        frob, data = _data_err(w, make(None), img), _data_err(w, make(sigma), img)
        assert data < 0.7 * frob, (name, frob, data)


def test_data_forms_report_their_data_error_and_are_exact_at_full_rank() -> None:
    rng = np.random.default_rng(10)
    F, C = 10, 6
    w = rng.standard_normal((F, C, 3, 3))
    x = rng.standard_normal((3000, C * 9))
    sigma = x.T @ x / 3000  # nonsingular
    t = tucker2(w, F, C, sigma=sigma)
    s = spatial_svd(w, min(C * 3, F * 3), sigma)
    for w_hat, rel in ((_tucker_w(t), t.rel_error), (_spatial_w(s), s.rel_error)):
        np.testing.assert_allclose(w_hat, w, atol=1e-4)
        assert rel < 1e-6
    t2 = tucker2(w, 4, 3, sigma=sigma)
    assert t2.rel_error == pytest.approx(rc.data_rel_error(w.reshape(F, -1), _tucker_w(t2).reshape(F, -1), sigma),
                                         rel=1e-4)
    # spatial reads its error off the fit's own statistics too: it matches the direct formula
    s2 = spatial_svd(w, 7, sigma)
    assert s2.rel_error == pytest.approx(rc.data_rel_error(w.reshape(F, -1), _spatial_w(s2).reshape(F, -1), sigma),
                                         rel=1e-4)
    c = cp_conv(w, 10, sigma=sigma)
    assert c.rel_error == pytest.approx(rc.data_rel_error(w.reshape(F, -1), _cp_w(c).reshape(F, -1), sigma), rel=1e-4)
    assert t.first.dtype == s.vertical.dtype == c.last.dtype == np.float32


def test_data_forms_reject_a_wrong_sigma() -> None:
    w = np.ones((4, 3, 3, 3))
    for call in (lambda: tucker2(w, 2, 2, sigma=np.eye(5)), lambda: spatial_svd(w, 2, np.eye(5)),
                 lambda: cp_conv(w, 2, sigma=np.eye(5)), lambda: cp_conv(w, 2, sigma=np.full((27, 27), np.nan))):
        with pytest.raises(ValueError):
            call()


# ----------------------------------------------------------------------------- last-stage refit


@pytest.mark.parametrize("form", ["tucker2", "spatial", "cp"])
def test_pre_maps_match_the_conv_stages(form: str) -> None:
    """``P p`` equals the input the last stage sees when the earlier stages run as convs."""
    rng = np.random.default_rng(11)
    C, F = 5, 7
    img = rng.standard_normal((2, C, 6, 6))
    rows = im2col(img, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))  # (2*6*6, C*9)
    w = rng.standard_normal((F, C, 3, 3))
    if form == "tucker2":
        t = tucker2(w, 4, 3)
        mid = conv2d(img, t.first)
        pre = rc.tucker2_pre(t.first, 3, 3)
        z = im2col(mid, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    elif form == "spatial":
        s = spatial_svd(w, 4)
        mid = conv2d(img, s.vertical, pads=(1, 0, 1, 0))
        pre = rc.spatial_pre(s.vertical, 3)
        z = im2col(mid, (1, 3), (1, 1), (0, 1, 0, 1), (1, 1))
    else:
        c = cp_conv(w, 4)
        mid = conv2d(conv2d(img, c.first), c.depthwise, pads=(1, 1, 1, 1), group=4)
        pre = rc.cp_pre(c.first, c.depthwise)
        z = mid.transpose(0, 2, 3, 1).reshape(-1, 4)
    np.testing.assert_allclose(rows @ pre.T, z, atol=1e-5)


def test_refit_last_stage_improves_and_is_exact_when_it_can_be() -> None:
    rng = np.random.default_rng(12)
    F, C = 12, 8
    w, b = rng.standard_normal((F, C, 3, 3)), rng.standard_normal(F)
    img, _ = _conv_sigma(rng, C, 3, 8)
    rows = im2col(img, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    rows_h = rows + 0.05 * rng.standard_normal(rows.shape)
    mom = rc.CrossMoments(C * 9)
    mom.update(rows, rows_h)
    t = tucker2(w, 6, 4)
    pre = rc.tucker2_pre(t.first, 3, 3)
    fixed = t.last.reshape(F, 6).astype(np.float64) @ t.core.reshape(6, -1)
    refit = rc.refit_last_stage(w.reshape(F, -1), b, t.core.reshape(6, -1) @ pre, mom)
    e_fixed = rc.expected_error(w.reshape(F, -1), b, fixed, b, mom, pre)
    assert refit.rel_error < e_fixed
    # pre = identity and x^ = x: the refit is W itself
    same = rc.CrossMoments(C * 9)
    same.update(rows + 0.1 * rng.standard_normal(rows.shape))
    exact = rc.refit_last_stage(w.reshape(F, -1), b, np.eye(C * 9), same, ridge=0.0)
    np.testing.assert_allclose(exact.matrix, w.reshape(F, -1), atol=1e-8)


def test_moments_validate_shapes() -> None:
    mom = rc.CrossMoments(4)
    with pytest.raises(ValueError):
        mom.update(np.ones((3, 5)))
    with pytest.raises(ValueError):
        mom.update(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError):
        _ = mom.s_xx  # nothing accumulated
    mom.update(np.ones((3, 4)))
    with pytest.raises(ValueError):
        rc.lowrank_regression(np.ones((2, 4)), None, 3, mom)


# ----------------------------------------------------------------------------- large FC route


@pytest.mark.parametrize("with_sigma", [False, True])
def test_fc_gram_route_matches_the_exact_svd(monkeypatch: pytest.MonkeyPatch, with_sigma: bool) -> None:
    """The Gram route used for big FC weights gives the same spectrum, factors' product and error."""
    from onnxslim_lr.decompose import svd

    rng = np.random.default_rng(13)
    b = (rng.standard_normal((300, 40)) @ np.diag(np.linspace(3, 0.1, 40))).astype(np.float32)
    x = _planted(rng, 300, 60, 2000, noise=0.1)
    sigma = x.T @ x / 2000 if with_sigma else None
    exact_s = svd.fc_spectrum(b, sigma)
    exact = svd.fc_svd(b, 12, sigma)
    monkeypatch.setattr(svd, "GRAM_ROUTE_ELEMENTS", 0)
    monkeypatch.setattr(svd, "_CHUNK_ROWS", 64)  # several chunks
    gram_s = svd.fc_spectrum(b, sigma)
    gram = svd.fc_svd(b, 12, sigma)
    np.testing.assert_allclose(gram_s[:12], exact_s[:12], rtol=1e-5)
    np.testing.assert_allclose(gram.left @ gram.right, exact.left @ exact.right, atol=2e-4 * np.abs(b).max())
    assert gram.rel_error == pytest.approx(exact.rel_error, rel=1e-4)
    assert gram.left.shape == (300, 12) and gram.right.shape == (12, 40)


def test_gram_wide_rows_in_float32_match_float64_and_narrow_rows_stay_exact():
    """Wide moment products run in float32 (the reconstruction's dominant cost) and stay close."""
    from onnxslim_lr.decompose.reconstruct import GRAM_F32_MIN_COLS, gram

    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, GRAM_F32_MIN_COLS + 4)).astype(np.float32)
    b = a + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
    exact = a.astype(np.float64).T @ b.astype(np.float64)
    got = gram(a, b)
    assert got.dtype == np.float64
    assert np.abs(got - exact).max() / np.abs(exact).max() < 1e-5
    narrow = rng.standard_normal((50, 8))
    assert np.array_equal(gram(narrow), narrow.T @ narrow)  # float64 throughout below the threshold


@pytest.mark.parametrize("n", [12, 300])  # float64 products below GRAM_F32_MIN_COLS, float32 above
def test_target_moments_give_the_fits_of_the_full_moments(n: int) -> None:
    """Moments kept for a target weight (W S_xh and W S_xx W^T instead of S_xx and S_xh) give
    the same reduced-rank fit, last-stage refit and expected errors as the full moments."""
    rng = np.random.default_rng(11)
    F = 6
    w = rng.standard_normal((F, n))
    b = rng.standard_normal(F)
    x = _planted(rng, n, 5, 900, noise=0.05)
    xh = x + 0.1 * rng.standard_normal(x.shape)
    full, tgt = rc.CrossMoments(n), rc.CrossMoments(n, target=w)
    for part in np.array_split(np.arange(len(x)), 3):
        full.update(x[part].astype(np.float32), xh[part].astype(np.float32))
        tgt.update(x[part].astype(np.float32), xh[part].astype(np.float32))
    # float32 products (n >= GRAM_F32_MIN_COLS) round differently in the two paths: compare responses
    tol = 1e-3 if n >= rc.GRAM_F32_MIN_COLS else 1e-9

    def same_response(f1: rc.LinearFit, f2: rc.LinearFit, z: np.ndarray) -> None:
        r1, r2 = z @ f1.matrix.T + f1.bias, z @ f2.matrix.T + f2.bias
        assert np.linalg.norm(r1 - r2) <= tol * np.linalg.norm(r1)

    a, c = rc.lowrank_regression(w, b, 3, full), rc.lowrank_regression(w, b, 3, tgt)
    same_response(a, c, xh)
    assert c.rel_error == pytest.approx(a.rel_error, rel=10 * tol, abs=tol)
    pre = rng.standard_normal((4, n))
    a2, c2 = rc.refit_last_stage(w, b, pre, full), rc.refit_last_stage(w, b, pre, tgt)
    same_response(a2, c2, xh @ pre.T)
    with pytest.raises(ValueError, match="not kept"):
        tgt.s_xx
    with pytest.raises(ValueError, match="another target"):
        rc.lowrank_regression(w + 1.0, b, 3, tgt)


def test_held_out_errors_from_rows_equal_the_closed_form_on_their_moments() -> None:
    rng = np.random.default_rng(12)
    F, n = 5, 20
    w, b = rng.standard_normal((F, n)), rng.standard_normal(F)
    x = _planted(rng, n, 6, 500, noise=0.1)
    xh = x + 0.2 * rng.standard_normal(x.shape)
    cands = [(w + 0.1 * rng.standard_normal(w.shape), None), (0.9 * w, b + 0.3)]
    held, mom = rc.HeldOutErrors(w, b, cands), rc.CrossMoments(n)
    for part in np.array_split(np.arange(len(x)), 4):
        held.update(x[part], xh[part])
        mom.update(x[part], xh[part])
    want = [rc.expected_error(w, b, m, nb, mom) for m, nb in cands]
    np.testing.assert_allclose(held.errors(), want, rtol=1e-9)
    assert want[0] != pytest.approx(want[1])
