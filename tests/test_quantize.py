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
