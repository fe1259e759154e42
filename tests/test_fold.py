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


def test_scalar_mul_of_higher_rank_is_not_folded() -> None:
    """Issue 11 item 8: Mul by a [1,1,1,1,1] constant raises the rank: folding it changed the
    Softmax axis downstream (97 % output error) or broke the declared output."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    k = numpy_helper.from_array(np.full((1, 1, 1, 1, 1), 2.5, np.float32), "k")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "k"], ["m"], name="mul"),
        helper.make_node("Softmax", ["m"], ["s"], name="sm", axis=1),
        helper.make_node("Reshape", ["s", "shape"], ["y"], name="rs"),
    ]
    x_vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])
    for outputs in ([helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 144])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 144]),
                     helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 1, 4, 6, 6])]):
        g = helper.make_graph(nodes, "g", [x_vi], outputs, [w, k, shape])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = IR
        onnx.checker.check_model(m, full_check=True)
        out, n = _fold(m)
        assert n == 0
        x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
        for a, b in zip(run_ort(out, {"x": x}), run_ort(m, {"x": x})):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the same scalar at the conv output's rank still folds
    k4 = numpy_helper.from_array(np.full((1, 1, 1, 1), 2.5, np.float32), "k")
    g = helper.make_graph(nodes, "g", [x_vi], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 144])],
                          [w, k4, shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR
    out, n = _fold(m)
    assert n == 1
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(m, {"x": x})[0], rtol=1e-5, atol=1e-6)
