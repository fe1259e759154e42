"""Reconstruction of the chosen rewrites (onnxslim_lr/reconstruction.py and Pass.refit)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxslim_lr as lr
from onnxslim_lr.decompose import reconstruct as rc
from onnxslim_lr.graph import import_graph
from onnxslim_lr.manager import apply_rewrites
from onnxslim_lr.passes import get as get_pass
from onnxslim_lr.passes.base import PassContext, Settings
from onnxslim_lr.reconstruction import reconstruct, split_samples

from helpers import IR, OPSET, run_ort, small_cnn


def chain3(seed: int = 0, c_in: int = 4, c: int = 24, hw: int = 10) -> onnx.ModelProto:
    """x -> Conv3x3 -> Relu -> Conv3x3 -> Relu -> Conv3x3 -> y: a 3-conv chain."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i, (ci, co) in enumerate([(c_in, c), (c, c), (c, c)]):
        inits.append(numpy_helper.from_array((rng.standard_normal((co, ci, 3, 3)) / np.sqrt(ci * 9)).astype(np.float32),
                                             f"w{i}"))
        inits.append(numpy_helper.from_array((rng.standard_normal(co) * 0.1).astype(np.float32), f"b{i}"))
        out = "y" if i == 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        prev = out
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    g = helper.make_graph(nodes, "chain3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR
    return m


def _data(n: int, seed: int, c_in: int = 4, hw: int = 10) -> np.ndarray:
    # low-dimensional, non-centred inputs: a few smooth patterns plus a little noise
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((3, c_in, hw, hw))
    z = rng.standard_normal((n, 3))
    return (np.einsum("nk,kchw->nchw", z, basis) + 0.5 + 0.05 * rng.standard_normal((n, c_in, hw, hw))).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _compress(model: onnx.ModelProto, calib: np.ndarray, mode: str, method: str = "svd", ratio: float = 0.3):
    return lr.compress(model, method=method, rank_ratio=ratio, calib=calib, allow_slower=True, end_to_end=False,
                       reconstruct=mode)


def test_sequential_beats_independent_end_to_end_on_held_out_data() -> None:
    model = chain3()
    calib, test = _data(96, 1), _data(64, 2)
    ref = run_ort(model, {"x": test})[0]
    err = {}
    for mode in ("none", "independent", "sequential"):
        res = _compress(model, calib, mode)
        assert len(res.rewritten) == 3, mode
        # onnxruntime with graph optimisations off on held-out inputs
        err[mode] = _rel(run_ort(res.model, {"x": test})[0], ref)
    assert err["sequential"] < err["independent"] <= err["none"] + 1e-6
    assert err["sequential"] < 0.9 * err["none"]


def test_full_rank_stays_exact_through_reconstruction() -> None:
    model = chain3(c=8)
    calib, test = _data(32, 3), _data(16, 4)
    res = _compress(model, calib, "sequential", ratio=1.0)
    assert len(res.rewritten) == 3
    assert _rel(run_ort(res.model, {"x": test})[0], run_ort(model, {"x": test})[0]) < 1e-4
    # the exact candidates are never replaced by a (ridge-regularised) refit
    assert all("candidate kept" in r.reason for r in res.rewritten)


def test_none_keeps_the_planner_candidates_and_the_default_reconstructs() -> None:
    model = chain3()
    calib = _data(64, 5)
    none = _compress(model, calib, "none")
    default = lr.compress(model, method="svd", rank_ratio=0.3, calib=calib, allow_slower=True, end_to_end=False)
    plain = lr.compress(model, method="svd", rank_ratio=0.3, allow_slower=True, end_to_end=False)
    assert not [n for n in none.notes if "reconstruction" in n]
    assert not any("reconstruction" in r.reason for r in none.rewritten)
    assert [n for n in default.notes if n.startswith("reconstruction (sequential")]
    assert not [n for n in plain.notes if "reconstruction" in n]
    # same ranks (so same MACs) either way; different weights only where reconstruction acted
    assert [r.params for r in none.rewritten] == [r.params for r in default.rewritten]
    inits = lambda m: {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}  # noqa: E731
    a, b = inits(none.model), inits(default.model)
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)


def test_reconstruct_without_calibration_data_is_an_input_error() -> None:
    with pytest.raises(lr.OnnxSlimLRError, match="needs calibration data"):
        lr.compress(small_cnn(), method="svd", rank_ratio=0.5, reconstruct="sequential", allow_slower=True,
                    end_to_end=False)
    with pytest.raises(lr.OnnxSlimLRError, match="reconstruct"):
        lr.compress(small_cnn(), method="svd", rank_ratio=0.5, reconstruct="relu", calib=_data(8, 0, 3, 16))


@pytest.mark.parametrize("method,node", [("svd", "conv1"), ("tucker2", "conv1"), ("spatial", "conv1"), ("cp", "conv1"),
                                         ("fc-svd", "fc")])
def test_bias_correction_makes_the_mean_response_exact(method: str, node: str) -> None:
    model = small_cnn(c=12, bn=False)
    graph = import_graph(model)
    ctx = PassContext(opset=OPSET, graph=graph)
    p = get_pass(method)
    site = p.match(next(n for n in graph.nodes if n.name == node), ctx)
    ladder = p.ladder(site, ctx, Settings())
    cand = ladder.build(ladder.rungs[len(ladder.rungs) // 3])
    w2 = (site.weight.T if method == "fc-svd" else site.weight.reshape(site.weight.shape[0], -1)).astype(np.float64)
    b = site.bias.astype(np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, w2.shape[1])) + 2.0  # non-centred
    xh = x + 0.3 * rng.standard_normal(x.shape) + 0.5  # a drifted, shifted compressed input
    mom = rc.CrossMoments(w2.shape[1])
    mom.update(x, xh)
    new = p.refit(site, cand, mom, intercept=True)
    assert new is not None and new.params == cand.params and new.macs_after == cand.macs_after
    m_new, b_new = p.effective(site, new)
    m_old, b_old = p.effective(site, cand)
    target = (x @ w2.T + b).mean(axis=0)
    np.testing.assert_allclose((xh @ m_new.T + b_new).mean(axis=0), target, rtol=1e-6, atol=1e-6)
    assert np.abs((xh @ m_old.T + b_old).mean(axis=0) - target).max() > 1e-2  # it was not exact before
    # and the refit reproduces the original response better than the candidate on these rows
    assert _rel(xh @ m_new.T + b_new, x @ w2.T + b) < _rel(xh @ m_old.T + b_old, x @ w2.T + b)


def test_fc_svd_refit_of_a_matmul_adds_its_bias_and_runs() -> None:
    rng = np.random.default_rng(0)
    B = rng.standard_normal((32, 24)).astype(np.float32) / 6
    g = helper.make_graph([helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(B, "B")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR
    basis = rng.standard_normal((4, 32))
    calib = (rng.standard_normal((200, 4)) @ basis + 1.0 + 0.05 * rng.standard_normal((200, 32))).astype(np.float32)
    test = (rng.standard_normal((100, 4)) @ basis + 1.0 + 0.05 * rng.standard_normal((100, 32))).astype(np.float32)
    none = lr.compress(model, method="fc-svd", rank_ratio=0.25, calib=calib, allow_slower=True, end_to_end=False,
                       reconstruct="none", metric="frobenius")
    seq = lr.compress(model, method="fc-svd", rank_ratio=0.25, calib=calib, allow_slower=True, end_to_end=False,
                      reconstruct="sequential", metric="frobenius")
    assert "Add" in {n.op_type for n in seq.model.graph.node}
    ref = test @ B
    assert _rel(run_ort(seq.model, {"x": test})[0], ref) < 0.5 * _rel(run_ort(none.model, {"x": test})[0], ref)


def test_holdout_fallback_keeps_the_candidate_when_the_refit_overfits() -> None:
    # 144 inputs per patch, 2 fit images of 4x4 positions = 32 rows: an unregularised refit
    # interpolates the fit rows and is worse on the held-out ones
    model = small_cnn(c=16, hw=4, bn=False)
    graph = import_graph(model)
    ctx = PassContext(opset=OPSET, graph=graph)
    p = get_pass("svd")
    site = p.match(next(n for n in graph.nodes if n.name == "conv2"), ctx)
    cand = p.ladder(site, ctx, Settings()).build((6,))
    calib = [{"x": np.random.default_rng(3).standard_normal((4, 3, 4, 4)).astype(np.float32)}]
    fit, held = split_samples(calib)
    assert fit[0]["x"].shape[0] == 2 == held[0]["x"].shape[0]
    rec = reconstruct(model, [("conv2", cand)], lambda c: apply_rewrites(model, model, c)[0], calib,
                      mode="independent", ridge=0.0)
    (layer,) = rec.layers
    assert not layer.refit and layer.error_after > layer.error_before
    (name, kept), = rec.chosen
    assert np.array_equal(kept.factors["first"], cand.factors["first"])
    assert "refit worse on held-out data" in kept.note
    # with enough data the same refit is kept
    big = [{"x": np.random.default_rng(4).standard_normal((64, 3, 4, 4)).astype(np.float32)}]
    rec2 = reconstruct(model, [("conv2", cand)], lambda c: apply_rewrites(model, model, c)[0], big,
                       mode="independent")
    assert rec2.layers[0].refit and rec2.layers[0].error_after < rec2.layers[0].error_before


def _chain3_classifier() -> onnx.ModelProto:
    """:func:`chain3` with a GAP -> Flatten -> Gemm head: logits a top-1 budget can read."""
    model = chain3()
    rng = np.random.default_rng(0)
    g = model.graph
    g.node.extend([helper.make_node("GlobalAveragePool", ["y"], ["p"], name="gap"),
                   helper.make_node("Flatten", ["p"], ["f"], name="flat"),
                   helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)])
    g.initializer.extend([numpy_helper.from_array(rng.standard_normal((10, 24)).astype(np.float32), "wf"),
                          numpy_helper.from_array(np.zeros(10, np.float32), "bf")])
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    return model


def test_budget_path_judges_every_plan_reconstructed() -> None:
    model = _chain3_classifier()
    calib = _data(128, 1)
    none = lr.compress(model, calib=calib, allow_slower=True, end_to_end=False, reconstruct="none", min_agreement=0.9)
    assert none.rewritten and not any("reconstruction" in n for n in none.notes)
    # by default too few samples to fit and hold out (64 of 128 fit, the rest verifies): skipped, said so
    few = lr.compress(model, calib=calib, allow_slower=True, end_to_end=False, min_agreement=0.9)
    assert any(n.startswith("reconstruction skipped under the budget: 64 calibration samples") for n in few.notes)
    assert [r.params for r in few.rewritten] == [r.params for r in none.rewritten]
    # asked for: every plan the search judges is refit first
    seq = lr.compress(model, calib=calib, allow_slower=True, end_to_end=False, min_agreement=0.9,
                      reconstruct="sequential")
    assert seq.rewritten
    note = [n for n in seq.notes if n.startswith("reconstruction (sequential")]
    assert note and "every plan the search judged was reconstructed" in note[0]
    # fitted on the choose half only: the other half verifies the plan (64 + 64 of 128 samples,
    # and the reconstruction splits its 64 again into fit and held-out)
    assert "on 32 calibration samples, checked on 32 held-out" in note[0]
    assert all("reconstruction: held-out error" in r.reason for r in seq.rewritten)
    # the verified damage is the reconstructed plan's, within the budget
    assert seq.budget["verify_damage"] <= 1 - 0.9 + 1e-12
    # with enough samples it is the default
    many = lr.compress(model, calib=_data(512, 1), allow_slower=True, end_to_end=False, min_agreement=0.9)
    assert any("every plan the search judged was reconstructed" in n for n in many.notes), many.notes


def test_fit_batches_exclude_the_verify_half_only_when_it_comes_from_calibration() -> None:
    from onnxslim_lr.budget_search import Contract
    from onnxslim_lr.manager import Options, _fit_batches

    calib = [{"x": np.arange(8, dtype=np.float32).reshape(8, 1)}]
    on_calib = _fit_batches(Options(calib=calib, contract=Contract("agreement", 0.99)))
    assert [b["x"].ravel().tolist() for b in on_calib] == [[0, 2, 4, 6]]
    with_eval = Options(calib=calib, contract=Contract("accuracy", 0.5), eval_batches=calib,
                        eval_labels=np.zeros(8, dtype=np.int64))
    assert _fit_batches(with_eval) is calib  # verified on the --eval pool: all calibration samples fit
    assert _fit_batches(Options(calib=calib)) is calib  # rank-rule path


def test_reconstruction_cache_gives_the_same_refits_and_skips_shared_prefixes() -> None:
    model = chain3()
    calib = [{"x": _data(48, 6)}]
    graph = import_graph(model)
    ctx = PassContext(opset=OPSET, graph=graph)
    p = get_pass("svd")
    cands = {}
    for name in ("conv0", "conv1", "conv2"):
        site = p.match(next(n for n in graph.nodes if n.name == name), ctx)
        lad = p.ladder(site, ctx, Settings())
        cands[name] = {r: lad.build((r,)) for r in (3, 4)}
    apply = lambda c: apply_rewrites(model, model, c)[0]  # noqa: E731
    plan_a = [("conv0", cands["conv0"][4]), ("conv1", cands["conv1"][4]), ("conv2", cands["conv2"][4])]
    plan_b = [("conv0", cands["conv0"][4]), ("conv1", cands["conv1"][4]), ("conv2", cands["conv2"][3])]
    cache: dict = {}
    a1 = reconstruct(model, plan_a, apply, calib, mode="sequential", cache=cache)
    assert len(cache) == 3
    b1 = reconstruct(model, plan_b, apply, calib, mode="sequential", cache=cache)
    assert len(cache) == 4  # only conv2's refit was new
    b0 = reconstruct(model, plan_b, apply, calib, mode="sequential")  # no cache: identical result
    for (n1, c1), (n0, c0) in zip(b1.chosen, b0.chosen):
        assert n1 == n0
        for k in c0.factors:
            np.testing.assert_array_equal(np.asarray(c1.factors[k]), np.asarray(c0.factors[k]))
    assert a1.chosen[0][1] is b1.chosen[0][1]  # the shared prefix came from the cache


def test_rewrites_are_walked_in_topological_order_whatever_the_plan_order() -> None:
    model = chain3()
    calib = _data(48, 6)
    graph = import_graph(model)
    ctx = PassContext(opset=OPSET, graph=graph)
    p = get_pass("svd")
    cands = []
    for name in ("conv2", "conv0", "conv1"):
        site = p.match(next(n for n in graph.nodes if n.name == name), ctx)
        cands.append((name, p.ladder(site, ctx, Settings()).build((4,))))
    rec = reconstruct(model, cands, lambda c: apply_rewrites(model, model, c)[0], [{"x": calib}], mode="sequential")
    assert [n for n, _ in rec.chosen] == ["conv0", "conv1", "conv2"] == [r.node for r in rec.layers]


def _resnet_and_batches(n_batches: int = 2):
    from pathlib import Path

    import onnx

    model = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "resnet_fmnist.onnx"))
    inp = model.graph.input[0]
    dims = [d.dim_value or 3 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    batches = [{inp.name: rng.standard_normal(dims).astype(np.float32)} for _ in range(n_batches)]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return model, batches, convs


def test_walk_reads_every_layer_input_in_about_one_network_pass_on_a_residual_net() -> None:
    """Reconstruction reads each layer's input from activations kept at a moving cut: the
    values are the full model's, and all layers together cost about one pass, not one each."""
    from onnxslim_lr.calibration import probe
    from onnxslim_lr.reconstruction import _Walk

    model, batches, convs = _resnet_and_batches()
    walk = _Walk(batches, threads=1)
    for conv in convs:
        got = walk.read(model, conv.input[0])
        for b, feeds in enumerate(batches):
            np.testing.assert_array_equal(got[b], probe(model, feeds, [conv.input[0]])[conv.input[0]])
    assert walk.walking and walk.passes <= 1.0 + 1e-9
    # a tiny memory cap: every read runs a prefix instead, with the same values
    capped = _Walk(batches, threads=1, max_bytes=1)
    for conv in convs[:3]:
        got = capped.read(model, conv.input[0])
        np.testing.assert_array_equal(got[0], probe(model, batches[0], [conv.input[0]])[conv.input[0]])
    assert not capped.walking and capped.passes >= 2


def test_walk_does_not_keep_graph_outputs_no_later_node_reads() -> None:
    """Reconstruction's partially rewritten models end in every chosen layer's output; the
    walk keeps only what later nodes read, or VGG-19's first conv output (411 MB for 32
    images) overflowed the cap and the whole run fell back to a prefix per read."""
    import onnx

    from onnxslim_lr.calibration import probe, prefix_model
    from onnxslim_lr.reconstruction import _Walk

    model, batches, convs = _resnet_and_batches()
    part = prefix_model(model, [c.output[0] for c in convs])  # every conv's output a graph output
    assert len(part.graph.output) == len(convs)
    cut_bytes: list[int] = []
    probe_walk = _Walk(batches, threads=1)
    for conv in convs:
        probe_walk.read(part, conv.input[0])
        cut_bytes.append(sum(v.nbytes for b in probe_walk.live or [] for v in b.values()))
    # a cap that holds every cut's live set, but not every conv output on top of it
    outs = sum(probe(model, b, [c.output[0] for c in convs])[c.output[0]].nbytes for b in batches for c in convs)
    cap = max(cut_bytes)
    assert cap < outs
    walk = _Walk(batches, threads=1, max_bytes=cap)
    for conv in convs:
        got = walk.read(part, conv.input[0])
        np.testing.assert_array_equal(got[0], probe(model, batches[0], [conv.input[0]])[conv.input[0]])
    assert walk.walking and walk.passes <= 1.0 + 1e-9
    assert isinstance(part, onnx.ModelProto)


def test_walk_starts_over_when_a_node_before_the_cut_changes() -> None:
    import onnx
    from onnx import numpy_helper

    from onnxslim_lr.calibration import probe
    from onnxslim_lr.reconstruction import _Walk

    model, batches, convs = _resnet_and_batches(1)
    walk = _Walk(batches, threads=1)
    walk.read(model, convs[3].input[0])
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    w_name = convs[0].input[1]
    for t in changed.graph.initializer:
        if t.name == w_name:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.5, w_name))
    got = walk.read(changed, convs[5].input[0])[0]
    np.testing.assert_allclose(got, probe(changed, batches[0], [convs[5].input[0]])[convs[5].input[0]], rtol=1e-6)
    assert not np.allclose(got, probe(model, batches[0], [convs[5].input[0]])[convs[5].input[0]])


def test_budget_path_reports_the_measured_speed_of_refit_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit returns new candidate objects: the report still shows each layer's timed speedup."""
    from types import SimpleNamespace

    import onnxslim_lr.budgeting as budgeting

    def fake_timing(models, feeds, **kw):  # type: ignore[no-untyped-def]
        # every rung surely 2x faster than its layer: the test is about the bookkeeping
        sp = SimpleNamespace(ratio=2.0, lo=1.9, hi=2.1)
        return SimpleNamespace(medians=[1e-3] * len(models), speedup=lambda i, j: sp)

    monkeypatch.setattr(budgeting, "time_models", fake_timing)
    model = _chain3_classifier()
    seq = lr.compress(model, calib=_data(128, 1), end_to_end=False, min_agreement=0.9, reconstruct="sequential")
    assert seq.rewritten and all("reconstruction: held-out error" in r.reason for r in seq.rewritten)
    assert all(r.measured == 2.0 and r.interval == (1.9, 2.1) for r in seq.rewritten), \
        [(r.node, r.measured) for r in seq.rewritten]
