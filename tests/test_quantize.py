"""int8 quantization after the plan (quantize.py): valid, runnable, interface kept, budget honoured."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_lr.quantize import already_quantized, quantizable_nodes, quantize_int8, quantize_with_budget

from helpers import run_ort, small_cnn


def _batches(n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_quantized_model_is_valid_runs_and_keeps_the_interface() -> None:
    m = small_cnn(bn=False)
    out = quantize_int8(m, _batches())
    assert out.model is not None, out.reason
    q = out.model
    onnx.checker.check_model(q, full_check=True)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert [i.name for i in q.graph.input] == ["x"] and [o.name for o in q.graph.output] == ["logits"]
    # the dynamic batch dim survives: run at a batch the calibration never used
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(5).standard_normal((3, 3, 16, 16)).astype(np.float32)
    ref, got = run_ort(m, {"x": x})[0], run_ort(q, {"x": x})[0]
    assert got.shape == (3, 10)
    assert 0 < _rel(ref, got) < 0.2  # quantized: close, not identical
    assert set(out.quantized) == {"conv1", "conv2", "fc"}
    assert q.ir_version <= 10


def test_already_quantized_model_is_refused_with_a_reason() -> None:
    q = quantize_int8(small_cnn(bn=False), _batches()).model
    assert already_quantized(q)
    again = quantize_int8(q, _batches())
    assert again.model is None and "already quantized" in again.reason


def test_no_calibration_data_is_a_reason_not_a_crash() -> None:
    out = quantize_int8(small_cnn(bn=False), [])
    assert out.model is None and "calibration" in out.reason


def test_budget_keeps_the_offending_layer_in_float() -> None:
    m = small_cnn(bn=False)
    batches = _batches()
    x = np.concatenate([b["x"] for b in batches])
    ref = run_ort(m, {"x": x})[0]

    def damage(model: onnx.ModelProto) -> float:
        return _rel(ref, run_ort(model, {"x": x})[0])

    full = quantize_int8(m, batches)
    full_damage = damage(full.model)
    # a budget int8 alone breaks: the planner must keep at least one layer in float
    out = quantize_with_budget(m, batches, damage, full_damage * 0.5)
    assert out.model is not None, out.reason
    assert out.excluded, "some layer must stay float"
    assert damage(out.model) <= full_damage * 0.5
    assert set(out.excluded) <= set(quantizable_nodes(m))
    # an excluded node's weight is not fed by a DequantizeLinear; the others' are
    deq_out = {o for n in out.model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in out.model.graph.node}
    for name in quantizable_nodes(m):
        assert (by_name[name].input[1] in deq_out) == (name not in out.excluded)
    # a generous budget quantizes everything
    easy = quantize_with_budget(m, batches, damage, full_damage * 2)
    assert easy.model is not None and easy.excluded == []


def _float_layers(model: onnx.ModelProto) -> set[str]:
    deq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] not in deq_out}


def test_budget_tries_the_first_layer_in_float_before_scoring_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first layer sees the raw input: keeping it float is tried first, at one quantization."""
    import onnxslim_lr.quantize as qmod

    m = small_cnn(bn=False)
    calls: list[tuple[str, ...]] = []
    real = qmod.quantize_int8

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(tuple(k.get("exclude") or ()))
        return real(*a, **k)

    monkeypatch.setattr(qmod, "quantize_int8", counting)
    first = quantizable_nodes(m)[0]
    out = quantize_with_budget(m, _batches(), lambda q: 0.0 if first in _float_layers(q) else 1.0, 0.5)
    assert out.model is not None and out.excluded == [first]
    assert calls == [(), (first,)]  # no per-layer scoring was needed
    assert "first/last" in out.note

    # quantizations the caller already made (the first-layer timing's) are reused, not redone
    calls.clear()
    known = {(): real(m, _batches()), (first,): real(m, _batches(), exclude=[first])}
    again = quantize_with_budget(m, _batches(), lambda q: 0.0 if first in _float_layers(q) else 1.0, 0.5,
                                 known=known)
    assert again.model is known[(first,)].model and again.excluded == [first]
    assert calls == []


def test_budget_plans_keep_the_first_layer_float_and_more_when_int8_alone_spends_half_the_budget() -> None:
    from onnxslim_lr.budget_search import Contract, Rung, Split
    from onnxslim_lr.budgeting import INT8_SHARE, plan_to_budget
    from onnxslim_lr.progress import SILENT

    m = small_cnn(bn=False)
    batches = _batches()
    choose, verify = Split(m, batches[:2]), Split(m, batches[2:])
    nodes = quantizable_nodes(m)
    first, last = nodes[0], nodes[-1]
    d_first = choose.score(quantize_int8(m, batches, exclude=[first]).model).rel_error
    d_both = choose.score(quantize_int8(m, batches, exclude=[first, last]).model).rel_error
    assert d_both < d_first  # with the first layer float, the last is the next one int8 hurts
    limit = (d_first + d_both) / 2 / INT8_SHARE  # first-float int8 spends more than its share; first+last does not

    # one layer with one rung (a no-op rewrite: the model itself), so a plan with a rewrite exists
    class Noop:  # stands in for a Candidate: the budget keys plans by method and parameters
        method = "noop"

        def describe_params(self) -> str:
            return ""

    noop = Noop()
    rung = Rung("conv2", "noop", 1.0, payload=noop)
    plan = plan_to_budget({"conv2": [rung]}, lambda chosen: m, Contract("output_error", limit), choose, verify,
                          quantize="int8", quant_batches=batches, original=m, progress=SILENT)
    assert plan.chosen == [("conv2", noop)] and plan.model is not None
    assert _float_layers(plan.model) == {first, last}
    assert plan.quant is not None and plan.quant.excluded == [first, last]
    assert any("first layer (conv1) kept in float in every plan" in n for n in plan.notes)
    assert any("1 more layer(s) kept in float in every plan (fc)" in n for n in plan.notes)
    # a generous budget: only the first layer stays float (it always does under a budget)
    easy = plan_to_budget({"conv2": [rung]}, lambda chosen: m, Contract("output_error", 10 * d_first / INT8_SHARE),
                          choose, verify, quantize="int8", quant_batches=batches, original=m, progress=SILENT)
    assert easy.model is not None and _float_layers(easy.model) == {first}
    assert not any("more layer(s)" in n for n in easy.notes)


def test_int8_exclusions_cover_the_rewrites_of_an_excluded_layer() -> None:
    """The budget names original layers; once a plan factorizes one, its stages stay float too."""
    import onnxslim_lr as lr

    m = small_cnn(bn=False)
    res = lr.compress(m, method="svd", rank_ratio=0.5, allow_slower=True, end_to_end=False)
    stages = [n.name for n in res.model.graph.node if n.name.startswith("conv1/")]
    assert stages, "conv1 was not rewritten"
    q = quantize_int8(res.model, _batches(), exclude=["conv1"])
    assert q.model is not None
    assert set(stages) <= _float_layers(q.model)
    every = quantize_int8(res.model, _batches())
    assert every.model is not None and not set(stages) & _float_layers(every.model)


def test_rank_rule_path_quantizes_all_but_the_first_layer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without a budget, --quantize int8 keeps the layer that sees the raw input in float, and says so."""
    import onnxslim_lr as lr

    m = small_cnn(bn=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([b["x"] for b in _batches()]))
    res = lr.compress(m, method="svd", rank_ratio=0.5, calib=str(calib), quantize="int8", allow_slower=True,
                      end_to_end=False)
    assert res.quantized and res.model is not None
    onnx.checker.check_model(res.model, full_check=True)
    (first,) = _float_layers(res.model)  # exactly one layer float: the one reading the raw input
    assert next(n for n in res.model.graph.node if n.name == first).input[0] == "x"
    assert first.startswith("conv1")  # conv1, or the first stage of its rewrite
    assert any(f"the first layer ({first}) kept in float" in n for n in res.notes), res.notes
    x = _batches(1, seed=9)[0]
    assert 0 < _rel(run_ort(m, x)[0], run_ort(res.model, x)[0]) < 0.3


def _timed_models(monkeypatch: pytest.MonkeyPatch) -> list[list[onnx.ModelProto]]:
    """Record every group of models the ladder timing is given (the real timing still runs, capped)."""
    import onnxslim_lr.budgeting as budgeting

    seen: list[list[onnx.ModelProto]] = []
    real = budgeting.time_models

    def recording(models, feeds, **kw):  # type: ignore[no-untyped-def]
        seen.append(list(models))
        kw["max_total_s"] = 0.3
        return real(models, feeds, **kw)

    monkeypatch.setattr(budgeting, "time_models", recording)
    return seen


def _is_qdq(m: onnx.ModelProto) -> bool:
    m = getattr(m, "model", m)  # a rung timed on the session that measured its error (ModelSession)
    return any(n.op_type == "QuantizeLinear" for n in m.graph.node)


def test_under_int8_the_ladders_are_timed_quantized_except_the_float_layers(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """#15 item 2: a rung is priced against the layer it replaces as it will ship (int8 or float)."""
    import onnxslim_lr as lr

    import onnxslim_lr.budgeting as budgeting

    seen = _timed_models(monkeypatch)
    # conv1 stays float whatever quantizing it would buy (that choice has its own test)
    monkeypatch.setattr(budgeting, "FIRST_LAYER_INT8_GAIN", float("inf"))
    m = small_cnn(c=32, bn=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([b["x"] for b in _batches()]))
    res = lr.compress(m, calib=str(calib), max_output_error=0.3, quantize="int8", method="svd")
    # the first run times the whole model in int8, with conv1 float and with it quantized
    whole, *seen[:] = seen
    assert [_float_layers(x) for x in whole] == [{"conv1"}, set()]
    by = {r.node: r for r in res.layers}
    # conv1 sees the raw input and stays float in every plan: timed in float; conv2 is timed in
    # int8 (and ships int8 unless int8 was not surely faster than float, then it is re-timed float)
    assert by["conv1"].priced == ""
    if res.budget.get("combined_or_float", {}).get("shipped_int8", True):
        assert by["conv2"].priced == "int8" or by["conv2"].priced.startswith("float: int8 ")
    else:  # the float plan was faster end to end: the report shows float speedups
        assert by["conv2"].priced == ""
    float_groups = [g for g in seen if not any(_is_qdq(x) for x in g)]
    int8_groups = [g for g in seen if all(_is_qdq(x) for x in g[:-1]) and not _is_qdq(g[-1])]
    assert float_groups and len(int8_groups) == 1
    # the int8 group is conv2's: the original layer first, then its rungs (two-stage chains),
    # then the float original (is int8 faster at all?)
    orig, *rungs, float_orig = int8_groups[0]
    assert sum(n.op_type == "Conv" for n in orig.graph.node) == 1
    assert rungs and all(sum(n.op_type == "Conv" for n in r.graph.node) == 2 for r in rungs)
    assert [n.op_type for n in float_orig.graph.node] == ["Conv"]
    assert len(seen) == len(float_groups) + 1

    # the float plan prices everything in float
    seen.clear()
    res = lr.compress(m, calib=str(calib), max_output_error=0.3, method="svd")
    assert seen and not any(_is_qdq(x) for g in seen for x in g)
    assert all(r.priced == "" for r in res.layers)


def _conv_chain(stages: int, c: int = 3) -> onnx.ModelProto:
    """x(N,c,16,16) through ``stages`` 3x3 convs c->c: a layer (1) or a factorized rung (2)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(stages)
    inits, nodes, prev = [], [], "x"
    for i in range(stages):
        inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), f"w{i}"))
        out = "y" if i == stages - 1 else f"h{i}"
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [out], name=f"conv{i}", pads=[1, 1, 1, 1]))
        prev = out
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [8, c, 16, 16])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_rung_the_quantizer_refuses_is_not_offered_under_int8(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import onnxslim_lr.budgeting as budgeting
    from onnxslim_lr.results import LayerResult, Status

    from types import SimpleNamespace

    x = _batches(1)[0]["x"]
    one, two = _conv_chain(1), _conv_chain(2)
    cand = SimpleNamespace(method="svd", describe_params=lambda: "k=2")
    real = budgeting._quantized_layer
    # the quantizer fails on the two-conv rung and works on the original layer
    monkeypatch.setattr(budgeting, "_quantized_layer", lambda mm, xx: None if mm is two else real(mm, xx))
    res = LayerResult(node="c", op="Conv", status=Status.KEPT)
    orig, cands = budgeting._as_int8("c", one, [(cand, two)], x, res)  # type: ignore[list-item]
    assert _is_qdq(orig) and cands == [] and res.priced == "int8"
    # the original itself refuses: the layer is priced in float, its rungs untouched
    monkeypatch.setattr(budgeting, "_quantized_layer", lambda mm, xx: None)
    res = LayerResult(node="c", op="Conv", status=Status.KEPT)
    orig, cands = budgeting._as_int8("c", one, [(cand, two)], x, res)  # type: ignore[list-item]
    assert orig is one and cands == [(cand, two)] and res.priced == ""
    # and with the real quantizer both come back quantized, computing what the float ones do
    monkeypatch.setattr(budgeting, "_quantized_layer", real)
    res = LayerResult(node="c", op="Conv", status=Status.KEPT)
    orig, cands = budgeting._as_int8("c", one, [(cand, two)], x, res)  # type: ignore[list-item]
    assert _is_qdq(orig) and len(cands) == 1 and _is_qdq(cands[0][1])
    ref, got = run_ort(two, {"x": x})[0], run_ort(cands[0][1], {"x": x})[0]
    assert 0 < _rel(ref, got) < 0.1


def test_the_quantizer_advice_is_silenced_only_when_we_skip_pre_processing(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    x = _batches(1)[0]["x"]
    with caplog.at_level(logging.WARNING):
        assert quantize_int8(_conv_chain(1), [{"x": x}], preprocess=False).model is not None
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert not logging.getLogger().filters  # the filter is gone afterwards
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        # a direct quantize_static without our wrapper logs it: the filter is what silences it
        from onnxruntime.quantization import QuantFormat, quantize_static
        import tempfile, os

        class R:
            def __init__(self) -> None:
                self.it = iter([{"x": x}])

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.it, None)

        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "a.onnx"), os.path.join(d, "b.onnx")
            onnx.save_model(_conv_chain(1), src)
            from onnxruntime.quantization import CalibrationDataReader

            class RR(R, CalibrationDataReader):
                pass

            quantize_static(src, dst, RR(), quant_format=QuantFormat.QDQ)
    assert [r for r in caplog.records if "pre-processing" in r.getMessage()]


def test_an_output_without_a_stated_shape_may_gain_one() -> None:
    """A model whose output states no shape quantizes (the quantizer fills the shape in)."""
    m = _conv_chain(1)
    assert not m.graph.output[0].type.tensor_type.HasField("shape")
    out = quantize_int8(m, [{"x": _batches(1)[0]["x"]}])
    assert out.model is not None, out.reason
    assert [o.name for o in out.model.graph.output] == ["y"]


def test_same_io_rejects_renamed_reordered_or_reshaped_interfaces() -> None:
    from onnxslim_lr.quantize import _same_io

    a = _conv_chain(1)
    stated = onnx.shape_inference.infer_shapes(a)
    assert _same_io(a, stated)  # gaining a shape is fine
    assert not _same_io(stated, a)  # losing a stated one is not
    renamed = onnx.ModelProto()
    renamed.CopyFrom(stated)
    renamed.graph.output[0].name = "z"
    assert not _same_io(stated, renamed)
    other = onnx.ModelProto()
    other.CopyFrom(stated)
    other.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    assert not _same_io(stated, other)


def test_a_layer_int8_would_slow_down_ships_float_priced_in_float(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """#15: "float where int8 hurts" -- on this runtime it can hurt speed (the zoo ResNet: 0.93x)."""
    from types import SimpleNamespace

    import onnxslim_lr as lr
    import onnxslim_lr.budgeting as budgeting

    groups: list[list[bool]] = []

    def fake_timing(models, feeds, **kw):  # type: ignore[no-untyped-def]
        qdq = [_is_qdq(m) for m in models]
        groups.append(qdq)

        def speedup(i: int, j: int):  # type: ignore[no-untyped-def]
            if qdq[j] and not qdq[i]:  # float original vs int8 original: int8 is slower here
                return SimpleNamespace(ratio=0.9, lo=0.85, hi=0.95)
            return SimpleNamespace(ratio=2.0, lo=1.9, hi=2.1)  # every rung surely faster

        return SimpleNamespace(medians=[1e-3] * len(models), speedup=speedup)

    monkeypatch.setattr(budgeting, "time_models", fake_timing)
    m = small_cnn(c=32, bn=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([b["x"] for b in _batches()]))
    res = lr.compress(m, calib=str(calib), max_output_error=0.3, quantize="int8", method="svd", end_to_end=False)
    by = {r.node: r for r in res.layers}
    assert by["conv2"].priced.startswith("float: int8 0.90x")
    # conv2's group: int8 original + rungs + the float original last, then the float re-timing
    assert [True] * (len(groups[-2]) - 1) + [False] == groups[-2] and not any(groups[-1])
    # conv1 stays float (first layer) and conv2 (int8 slower): nothing the planner times is left
    # to quantize but fc, which was never timed: int8 still applies there
    assert res.quantized
    conv = [n.name for n in res.model.graph.node if n.op_type == "Conv"]
    assert conv and set(conv) <= _float_layers(res.model)  # conv1, conv2 or their rewrites' stages
    assert "fc" not in _float_layers(res.model)
    assert any("kept in float because int8 was not surely faster there" in n and "conv2" in n for n in res.notes), \
        res.notes


class _Noop:
    """Stands in for a Candidate: the budget keys plans by method and parameters."""

    def __init__(self, method: str) -> None:
        self.method = method

    def describe_params(self) -> str:
        return ""


def test_under_int8_the_float_plan_is_searched_on_float_prices_with_one_sensitivity_phase(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """#15: int8 does not pay on every runtime, so the best float plan is found beside the combined one."""
    import onnxslim_lr.budget_search as bs
    import onnxslim_lr.budgeting as budgeting
    from onnxslim_lr.budget_search import Contract, Rung, Split
    from onnxslim_lr.progress import SILENT

    m = small_cnn(bn=False)
    batches = _batches()
    choose, verify = Split(m, batches[:2]), Split(m, batches[2:])
    a, b = _Noop("a"), _Noop("b")
    # in int8 only rung a is surely faster; in float only rung b is
    int8_ladders = {"conv2": [Rung("conv2", "a", 1.0, payload=a)]}
    float_ladders = {"conv2": [Rung("conv2", "b", 1.0, payload=b)]}
    phases: list[list[str]] = []
    real = bs.rung_damages

    def counting(ladders, *args, **kw):  # type: ignore[no-untyped-def]
        phases.append(sorted(r.key for rs in ladders.values() for r in rs))
        return real(ladders, *args, **kw)

    monkeypatch.setattr(budgeting, "rung_damages", counting)
    monkeypatch.setattr(bs, "rung_damages", counting)
    plan = budgeting.plan_to_budget(int8_ladders, lambda chosen: m, Contract("output_error", 10.0), choose, verify,
                                    quantize="int8", quant_batches=batches, original=m,
                                    float_ladders=float_ladders, progress=SILENT)
    assert phases == [["a", "b"]]  # both ladders' rungs priced alone once, together
    assert plan.chosen == [("conv2", a)] and plan.model is not None and _is_qdq(plan.model)
    assert plan.float_plan is not None and plan.float_plan.chosen == [("conv2", b)]
    assert plan.float_plan.model is None and plan.float_plan.search is not None and plan.float_plan.search.ok
    # without float prices (or without int8) there is no float plan to compare
    alone = budgeting.plan_to_budget(int8_ladders, lambda chosen: m, Contract("output_error", 10.0), choose, verify,
                                     quantize="int8", quant_batches=batches, original=m, progress=SILENT)
    assert alone.float_plan is None
    plain = budgeting.plan_to_budget(float_ladders, lambda chosen: m, Contract("output_error", 10.0), choose, verify,
                                     float_ladders=float_ladders, progress=SILENT)
    assert plain.float_plan is None and plain.model is None


def _fake_e2e(monkeypatch, float_over_combined: tuple[float, float, float]) -> list[list[bool]]:  # type: ignore[no-untyped-def]
    """The manager's end-to-end timings, faked: the float plan runs ``float_over_combined`` the
    speed of the combined one; any rewritten model runs 2x the original (the guard keeps it)."""
    from types import SimpleNamespace

    import onnxslim_lr.manager as manager
    from onnxslim_lr.speed import Speedup

    real = manager.time_models
    seen: list[list[bool]] = []

    def fake(models, feeds, **kw):  # type: ignore[no-untyped-def]
        qdq = [_is_qdq(x) for x in models]
        seen.append(qdq)
        if len(models) == 2 and qdq == [True, False]:
            r, lo, hi = float_over_combined
            return SimpleNamespace(speedup=lambda i, j: Speedup(r, lo, hi, 9, 0.95))
        kw["max_total_s"], kw["decide_at"] = 0.3, None
        t = real(models, feeds, **kw)
        return t

    monkeypatch.setattr(manager, "time_models", fake)
    return seen


@pytest.mark.parametrize("float_wins", [True, False])
def test_under_int8_the_faster_of_the_combined_and_the_float_plan_ships(tmp_path, monkeypatch, float_wins) -> None:  # type: ignore[no-untyped-def]
    """The float plan ships only when surely faster than the combined one; the report says which and why."""
    from types import SimpleNamespace

    import onnxslim_lr as lr
    import onnxslim_lr.budgeting as budgeting
    import onnxslim_lr.manager as manager
    from onnxslim_lr.report import budget_lines
    from onnxslim_lr.speed import Decision

    # every rung surely faster in either form (the real ladder timing is slow and noisy)
    monkeypatch.setattr(budgeting, "time_models", lambda models, feeds, **kw: SimpleNamespace(
        medians=[1e-3] * len(models), speedup=lambda i, j: SimpleNamespace(ratio=2.0, lo=1.9, hi=2.1)))
    seen = _fake_e2e(monkeypatch, (1.3, 1.1, 1.5) if float_wins else (1.05, 0.95, 1.15))
    # and the end-to-end guard keeps whatever ships
    monkeypatch.setattr(manager, "model_is_faster", lambda timing, mac: (
        Decision(True, "fake"), None))
    monkeypatch.setattr(budgeting, "FIRST_LAYER_INT8_GAIN", float("inf"))  # conv1 float: a combined-plan note
    m = small_cnn(c=32, bn=False)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([b["x"] for b in _batches()]))
    res = lr.compress(m, calib=str(calib), max_output_error=0.5, quantize="int8", method="svd")
    assert [True, False] in seen  # the combined and the float plan were timed together
    doc = res.budget["combined_or_float"]
    assert doc["shipped_int8"] is (not float_wins)
    assert res.quantized is (not float_wins) and _is_qdq(res.model) is (not float_wins)
    text = "\n".join(budget_lines(res.budget))
    assert ("the float plan ships" if float_wins else "the combined plan ships") in text
    # the plot shows the plans of the kind that did not ship beside the frontier that did
    pytest.importorskip("matplotlib")
    from onnxslim_lr.report import plot_frontier

    fig = plot_frontier(res.budget, quantized=res.quantized)
    labels = [ln.get_label() for ln in fig.axes[0].lines]
    assert ("combined plans (int8) (measured)" if float_wins else "float plans (measured)") in labels
    if float_wins:
        assert all(r.priced == "" for r in res.layers)  # float speedups, not int8 ones, are reported
        assert any("low rank alone ships" in n for n in res.notes), res.notes
        assert "int8: not applied" in text
        # what int8 kept float describes the combined plan, which did not ship: labelled so
        assert any(n.startswith("--quantize int8 (the combined plan, which did not ship): the first layer (conv1)")
                   for n in res.notes), res.notes
        assert not any("first layer" in n and n.startswith("--quantize int8: ") for n in res.notes)
    else:
        assert any("the combined plan ships" in n for n in res.notes), res.notes
        assert any(n.startswith("--quantize int8: the first layer (conv1) kept in float") for n in res.notes)


@pytest.mark.parametrize("gain,quantized", [((1.65, 1.6, 1.7), True), ((1.08, 1.02, 1.14), False),
                                            ((0.98, 0.95, 1.01), False)])
def test_the_first_layer_is_quantized_only_when_that_is_surely_faster_end_to_end(monkeypatch, gain, quantized) -> None:  # type: ignore[no-untyped-def]
    """Under a budget the first layer stays float (it sees the raw input) unless int8 with it
    quantized is surely FIRST_LAYER_INT8_GAIN faster end to end (the zoo ZFNet: 3.70x vs 2.24x);
    then the accuracy control judges it like any other layer."""
    from types import SimpleNamespace

    import onnxslim_lr.budgeting as budgeting
    from onnxslim_lr.progress import SILENT

    m = small_cnn(bn=False)
    first = quantizable_nodes(m)[0]
    timed: list[list[set[str]]] = []

    def fake_timing(models, feeds, **kw):  # type: ignore[no-untyped-def]
        timed.append([_float_layers(x) for x in models])
        return SimpleNamespace(speedup=lambda i, j: SimpleNamespace(ratio=gain[0], lo=gain[1], hi=gain[2]))

    monkeypatch.setattr(budgeting, "time_models", fake_timing)
    sample = _batches(1)[0]
    got, known = budgeting._first_layer_float(m, _batches(), SILENT, sample, threads=1)
    assert got == ([] if quantized else [first])
    # one run: int8 with the first layer float (the baseline), then int8 with every layer quantized
    assert timed == [[{first}, set()]]
    # both quantizations are handed on, by exclusion list, for the accuracy control to reuse
    assert {k: _float_layers(v.model) for k, v in known.items()} == {(): set(), (first,): {first}}
    assert budgeting._first_layer_float(m, _batches(), SILENT, None, threads=1) == ([first], {})  # nothing to time on
