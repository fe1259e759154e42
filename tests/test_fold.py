"""The BatchNormalization / Mul / Add fold is exact and only fires when it cannot change results."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import IR, OPSET, run_ort, small_cnn
from onnx import TensorProto, helper, numpy_helper

from onnxslim_lr.fold import fold_into_convs
from onnxslim_lr.graph import export_model, import_graph


def _fold(m: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    g = import_graph(m)
    n = fold_into_convs(g)
    return export_model(g, like=m), n


def test_bn_fold_is_exact() -> None:
    m = small_cnn(bn=True)
    out, n = _fold(m)
    assert n == 1
    assert "BatchNormalization" not in [x.op_type for x in out.graph.node]
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(m, {"x": x})[0], rtol=1e-5, atol=1e-5)


def _conv_then(ops: list[tuple[str, np.ndarray]], branch: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="conv")]
    prev = "t0"
    for i, (op, c) in enumerate(ops):
        inits.append(numpy_helper.from_array(c.astype(np.float32), f"c{i}"))
        nodes.append(helper.make_node(op, [prev, f"c{i}"], [f"t{i + 1}"], name=f"{op}{i}"))
        prev = f"t{i + 1}"
    outs = [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)]
    if branch:
        nodes.append(helper.make_node("Relu", ["t0"], ["side"], name="side"))
        outs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR
    return m


def test_per_channel_mul_add_fold_exactly() -> None:
    rng = np.random.default_rng(2)
    m = _conv_then([("Mul", rng.random((4, 1, 1)) + 0.5), ("Add", rng.standard_normal((1, 4, 1, 1)))])
    out, n = _fold(m)
    assert n == 2 and [x.op_type for x in out.graph.node] == ["Conv"]
    assert out.graph.output[0].name == m.graph.output[0].name
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(m, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_no_fold_when_it_could_change_results() -> None:
    rng = np.random.default_rng(3)
    # spatially varying Mul: not a per-channel affine
    m = _conv_then([("Mul", rng.random((1, 1, 4, 4)))])
    assert _fold(m)[1] == 0
    # conv output also used elsewhere: folding would change the other consumer
    m = _conv_then([("Mul", rng.random((4, 1, 1)))], branch=True)
    assert _fold(m)[1] == 0
