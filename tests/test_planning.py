"""The planner's rules, applied the same way to any ladder (planning.choose)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_lr.calibration import Statistics, gather, im2col, output_covariance_request, patch_covariance_request
from onnxslim_lr.planning import DEFAULT_ENERGY, Budget, Declined, Ladder, choose, nearest_of, truncation_error


def _ladder(full: int = 10, before: int = 1000, per: int = 100, **kw) -> Ladder:
    return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=before,
                  macs=lambda s: s[0] * per, build=lambda s: s, **kw)


def test_rank_ratio_rounds_half_up_and_clamps() -> None:
    assert choose(_ladder(), Budget(rank_ratio=0.25)) == (3,)  # 2.5 -> 3
    assert choose(_ladder(), Budget(rank_ratio=0.01)) == (1,)
    assert choose(_ladder(), Budget(rank_ratio=5.0)) == (10,)


def test_ratio_on_a_ladder_with_gaps_takes_the_nearest_rung_ties_larger() -> None:
    divs = [(1,), (2,), (3,), (4,), (6,), (12,)]
    lad = Ladder(full=(12,), rungs=divs, macs_before=120, macs=lambda s: s[0] * 10, build=lambda s: s,
                 snap=nearest_of(divs))
    assert choose(lad, Budget(rank_ratio=0.75)) == (12,)  # 9: 6 and 12 both 3 away: the larger
    assert choose(lad, Budget(rank_ratio=0.7)) == (6,)   # 8.4: 6 nearer


def test_target_speedup_takes_the_last_rung_within_the_budget() -> None:
    assert choose(_ladder(), Budget(target_speedup=2.0)) == (5,)  # 500 <= 1000/2
    assert choose(_ladder(), Budget(target_speedup=2.5)) == (4,)
    assert choose(_ladder(), Budget(target_speedup=100.0)) == (1,)  # none fits: the cheapest rung


def test_target_speedup_among_equal_cost_rungs_takes_the_first_listed() -> None:
    # structured's 3x3 kernel: 2x1 and 1x2 cost the same; the ladder lists its preferred one first
    rungs = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2), (2, 3)]
    lad = Ladder(full=(3, 3), rungs=rungs, macs_before=9, macs=lambda s: s[0] * s[1], build=lambda s: s)
    assert choose(lad, Budget(target_speedup=4.0)) == (2, 1)  # 9/2 >= 4, and (2, 1) precedes (1, 2)
    assert choose(lad, Budget(target_speedup=1.5)) == (3, 2)
    lad.rungs = [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert choose(lad, Budget(target_speedup=4.0)) == (1, 2)
    with pytest.raises(Declined, match="neither spectra nor an error estimate"):
        choose(lad, Budget(energy=0.9))


def test_unknown_shapes_fall_back_to_the_ratio_one_over_s() -> None:
    lad = _ladder(before=0, per=0)
    assert choose(lad, Budget(target_speedup=4.0)) == (3,)  # ratio 0.25 of 10 -> 2.5 -> 3


def test_energy_reads_spectra_per_axis_and_takes_the_largest_over_a_list() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.1])
    lad = Ladder(full=(4, 4), rungs=[(1, 1)], macs_before=1, macs=lambda s: 0, build=lambda s: s,
                 spectra=lambda: [[s, np.array([1.0, 0, 0, 0])], [np.array([1.0, 1, 1, 1])]])
    assert choose(lad, Budget(energy=0.9)) == (2, 4)  # 13/14.01 >= 0.9 needs 2; flat spectrum needs 4
    default = choose(lad, Budget())
    assert default == (3, 4) and DEFAULT_ENERGY == 0.98


def test_energy_without_spectra_checks_the_error_bound_and_declines_when_out_of_reach() -> None:
    errors = {1: 0.5, 2: 0.2, 3: 0.1}
    lad = Ladder(full=(3,), rungs=[(1,), (2,), (3,)], macs_before=3, macs=lambda s: s[0], build=lambda s: s,
                 error=lambda s: errors[s[0]], unit="widget")
    assert choose(lad, Budget(energy=0.95)) == (2,)  # sqrt(0.05) = 0.224
    with pytest.raises(Declined, match="no widget keeps the relative error"):
        choose(lad, Budget(energy=0.999))


def test_fixed_and_default_rungs() -> None:
    assert choose(_ladder(fixed=(7,)), Budget(rank_ratio=0.1)) == (7,)
    assert choose(_ladder(default=(4,)), Budget()) == (4,)
    assert choose(_ladder(default=(4,)), Budget(rank_ratio=0.5)) == (5,)


def test_truncation_error_is_the_tail_energy() -> None:
    err = truncation_error(np.array([2.0, 1.0, 0.0]))
    assert err((1,)) == pytest.approx(np.sqrt(1 / 5)) and err((3,)) == 0.0


def test_gather_accumulates_declared_statistics_in_one_pass() -> None:
    from helpers import conv_model

    from onnxslim_lr.graph import import_graph
    from onnxslim_lr.passes import PassContext, get

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    model = conv_model(w, None, in_shape=("N", 3, 8, 8), pads=[1, 1, 1, 1])
    graph = import_graph(model)
    site = get("svd").match(graph.nodes[0], PassContext(opset=17, shapes={"x": (2, 3, 8, 8), "y": (2, 6, 8, 8)}))
    batches = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    stats = gather(model, batches, [patch_covariance_request(site), output_covariance_request(site)])
    assert isinstance(stats, Statistics)
    rows = np.concatenate([im2col(b["x"].astype(np.float64), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)) for b in batches])
    np.testing.assert_allclose(stats.patch_covariance(site), rows.T @ rows / len(rows), rtol=1e-6)
    y = rows @ w.reshape(6, -1).T.astype(np.float64)
    np.testing.assert_allclose(stats.output_covariance(site), y.T @ y / len(y), rtol=1e-4)


def test_gather_reduces_rows_of_several_batches_in_one_product_with_a_bounded_buffer(monkeypatch) -> None:
    """The buffered second moments equal the per-batch ones (the same rows are drawn), and the
    buffer is reduced whenever it reaches its cap, so what is held back stays bounded."""
    from helpers import conv_model

    import onnxslim_lr.calibration as cal
    from onnxslim_lr.graph import import_graph
    from onnxslim_lr.passes import PassContext, get

    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    model = conv_model(w, None, in_shape=("N", 4, 8, 8), pads=[1, 1, 1, 1])
    site = get("svd").match(import_graph(model).nodes[0],
                            PassContext(opset=17, shapes={"x": (1, 4, 8, 8), "y": (1, 6, 8, 8)}))
    batches = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(7)]
    # 40 of the 64 patch rows per batch, drawn at random: the draws must not depend on buffering
    reqs = [patch_covariance_request(site, max_rows=40), output_covariance_request(site, max_rows=40)]

    # reference: every batch reduced on its own, with the generator gather seeds
    g = np.random.default_rng(0)
    per_batch = {r.key: [np.zeros(1), 0] for r in reqs}
    import onnxruntime as ort
    sess = ort.InferenceSession(cal.expose(model, [site.node.outputs[0].name]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    for b in batches:
        got = {"x": b["x"], "y": sess.run(["y"], b)[0]}
        for r in reqs:
            total, count = r.reduce(got[r.tensor], g)
            per_batch[r.key][0] = per_batch[r.key][0] + total
            per_batch[r.key][1] += count

    products: list[int] = []
    real_gram = cal.gram
    monkeypatch.setattr(cal, "gram", lambda a, b=None: (products.append(a.shape[0]), real_gram(a, b))[1])
    held: list[int] = []
    real_add = cal._RowBuffers.add

    def add(self, key, rows):  # what the buffers hold after each batch's rows
        real_add(self, key, rows)
        held.append(sum(self._bytes.values()))

    monkeypatch.setattr(cal._RowBuffers, "add", add)
    monkeypatch.setattr(cal, "ROW_BLOCK", 1 << 30)
    # by bytes: everything at once; about 3 batches of patch rows; less than one batch (reduced as they come)
    for cap in (1 << 30, 3 * 40 * 36 * 4, 100, "rows"):
        if cap == "rows":  # by rows: 100 rows make a block, so every third batch reduces
            monkeypatch.setattr(cal, "ROW_BLOCK", 100)
            monkeypatch.setattr(cal, "ROW_BUFFER_BYTES", 1 << 30)
            products.clear()
            stats = gather(model, batches, reqs)
            assert products == [120, 120, 120, 120, 40, 40]  # two statistics, interleaved
            continue
        monkeypatch.setattr(cal, "ROW_BUFFER_BYTES", cap)
        products.clear()
        held.clear()
        stats = gather(model, batches, reqs)
        assert stats._counts[reqs[0].key] == 7 * 40
        for r in reqs:
            ref, n = per_batch[r.key]
            np.testing.assert_allclose(stats.get(r), ref / n, rtol=1e-5, atol=1e-6)
        if cap > 1 << 20:
            assert products == [7 * 40, 7 * 40]  # one product per statistic
        elif cap == 100:
            assert products == [40] * 14 and set(held) == {0}  # nothing buffered
            assert max(held) < 2 * cap and len(products) > 2


@pytest.mark.parametrize("kernel,strides,dil,pads", [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
                                                     ((3, 2), (2, 1), (1, 2), (0, 1, 2, 0))])
def test_sampled_patch_rows_are_the_im2col_rows_at_the_sampled_positions(kernel, strides, dil, pads) -> None:
    """The data metric samples positions before gathering (no full im2col): the rows must be
    exactly im2col's rows at the positions the same generator picks, in the same (c, i, j) order."""
    from onnxslim_lr.calibration import sample_patch_rows

    x = np.random.default_rng(1).standard_normal((3, 4, 9, 7)).astype(np.float32)
    full = im2col(x, kernel, strides, pads, dil)
    (got,) = sample_patch_rows([x], kernel, strides, dil, pads, 25, np.random.default_rng(5))
    pick = np.random.default_rng(5).choice(full.shape[0], 25, replace=False)
    np.testing.assert_array_equal(got, full[pick])
    (every,) = sample_patch_rows([x], kernel, strides, dil, pads, 10 ** 6, np.random.default_rng(5))
    np.testing.assert_array_equal(every, full)


def test_response_moment_is_w_sigma_wt_and_gives_the_data_metric_basis() -> None:
    """svd and fc-svd read W Sigma W^T from the layer's output (minus its bias) instead of the
    n x n patch covariance: the same statistic, so the same whitened basis and spectrum."""
    from helpers import conv_model

    from onnxslim_lr.calibration import response_moment_request
    from onnxslim_lr.decompose.svd import channel_basis
    from onnxslim_lr.graph import import_graph
    from onnxslim_lr.passes import PassContext, get

    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    model = conv_model(w, b, in_shape=("N", 3, 8, 8), pads=[1, 1, 1, 1])
    site = get("svd").match(import_graph(model).nodes[0], PassContext(opset=17, shapes={"x": (2, 3, 8, 8), "y": (2, 5, 8, 8)}))
    batches = [{"x": (rng.standard_normal((2, 3, 8, 8)) + 0.5).astype(np.float32)} for _ in range(3)]
    stats = gather(model, batches, [patch_covariance_request(site), response_moment_request(site)])
    sigma, g = stats.patch_covariance(site), stats.response_moment(site)
    w2 = w.reshape(5, -1).astype(np.float64)
    np.testing.assert_allclose(g, w2 @ sigma @ w2.T, rtol=1e-4, atol=1e-4 * np.abs(g).max())
    via_g, via_sigma = channel_basis(w, response=g), channel_basis(w, sigma)
    np.testing.assert_allclose(via_g.s, via_sigma.s, rtol=1e-4)
    np.testing.assert_allclose(np.abs(via_g.u.T @ via_sigma.u), np.eye(5), atol=1e-3)
    # the pass asks for the F x F statistic, not the n x n one
    from onnxslim_lr.passes.base import Settings
    from onnxslim_lr.planning import Budget
    needs = get("svd").needs(site, PassContext(opset=17), Settings.of(Budget(rank_ratio=0.5, metric="data")))
    assert [r.kind for r in needs] == ["response_moment"]


def test_prefix_model_computes_the_tensor_with_only_the_nodes_it_needs() -> None:
    """Reconstruction reads a layer's input through a prefix of the model (onnxruntime runs
    every node whatever is fetched): the values equal the full model's, on a residual net."""
    from pathlib import Path

    import onnx

    from onnxslim_lr.calibration import expose, prefix_model, probe
    from onnxslim_lr.timing import make_session

    model = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "resnet_fmnist.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    name = convs[len(convs) // 2].input[0]
    pre = prefix_model(model, [name])
    assert 0 < len(pre.graph.node) < len(model.graph.node)
    assert [o.name for o in pre.graph.output] == [name]
    assert len(pre.graph.initializer) < len(model.graph.initializer)
    inp = model.graph.input[0]
    dims = [d.dim_value or 2 for d in inp.type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    want = probe(model, {inp.name: x}, [name])[name]
    sess = make_session(pre, optimize=False)
    got = sess.run([name], {inp.name: x})[0]
    np.testing.assert_array_equal(got, want)
    assert len(expose(model, [name]).graph.node) == len(model.graph.node)
