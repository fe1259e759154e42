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
