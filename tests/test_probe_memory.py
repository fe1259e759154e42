"""The probe and the data service run sessions on large models without copying their weights
(calibration.exposed_session, graph.weightless, graph.infer): same values as the plain route."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxslim_lr.calibration import expose, exposed_bytes, exposed_session, probe
from onnxslim_lr.graph import export_model, import_graph, infer, weightless


def _mlp(ir: int, K: int = 600, F: int = 500) -> onnx.ModelProto:
    """Reshape -> MatMul (a 1.2 MB weight, above the strip limit) -> Relu -> Gemm (small)."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((K, F)).astype(np.float32)
    V = rng.standard_normal((8, F)).astype(np.float32)
    shape = np.array([-1, K], dtype=np.int64)
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(V, "V"), numpy_helper.from_array(shape, "shape")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"], name="r"),
             helper.make_node("MatMul", ["flat", "W"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "V"], ["y"], name="fc", transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, K // 4])]
    if ir < 4:  # legacy models list every initializer among the graph inputs
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = ir
    return m


def test_weightless_strips_only_large_initializers_and_keeps_the_model() -> None:
    m = _mlp(8)
    before = m.SerializeToString()
    lite, big = weightless(m)  # type: ignore[misc]
    assert [t.name for t in big] == ["W"]
    shells = {t.name: t for t in lite.graph.initializer}
    assert list(shells["W"].dims) == [600, 500] and not shells["W"].raw_data and not shells["W"].float_data
    assert shells["V"].raw_data == m.graph.initializer[1].raw_data  # small ones keep their values
    assert m.SerializeToString() == before
    assert weightless(m, min_bytes=1 << 30) is None


@pytest.mark.parametrize("ir", [3, 8])
def test_exposed_session_gives_the_same_values_as_a_copied_model(ir: int) -> None:
    m = _mlp(ir)
    before = m.SerializeToString()
    x = np.random.default_rng(1).standard_normal((2, 4, 150)).astype(np.float32)
    names = ["h", "a", "y"]
    got = probe(m, {"x": x}, names, threads=1)
    exposed = expose(m, names)
    ref = dict(zip([o.name for o in exposed.graph.output], run_ort(exposed, {"x": x})))
    # the large weight is fed as an input (timing.FedSession): onnxruntime's GEMM then reads
    # it unpacked, which changes the summation order, not the values beyond float32 rounding
    for n in names:
        np.testing.assert_allclose(got[n], ref[n], rtol=1e-5, atol=1e-5 * float(np.abs(ref[n]).max()))
    assert m.SerializeToString() == before  # the caller's proto is left as it was
    sess = exposed_session(m, ["h"], threads=1)
    assert {o.name for o in sess.get_outputs()} == {"y", "h"}
    assert [i.name for i in sess.get_inputs()] == ["x"]  # the fed weight is not an input to give


def test_fed_session_reads_the_weight_buffer_in_place() -> None:
    """Weights handed to make_session are fed as inputs from the caller's buffers (not copied
    into the session): the same session sees a change of the buffer on its next run."""
    from onnxslim_lr.timing import FedSession, make_session

    m = _mlp(8)
    lite, big = weightless(m)  # type: ignore[misc]
    for t in lite.graph.initializer:
        if t.name == "W":
            t.data_location = onnx.TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", "W.bin"
    w = numpy_helper.to_array(big[0]).copy()
    sess = make_session(lite, threads=1, optimize=False, initializers={"W": w})
    assert isinstance(sess, FedSession)
    x = np.random.default_rng(1).standard_normal((2, 4, 150)).astype(np.float32)
    want = run_ort(m, {"x": x})[0]
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-4)
    w *= 0.0  # in place: a copy inside the session would not see this
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], run_ort(m, {"x": x * 0})[0], atol=1e-6)


def test_exposed_bytes_is_the_exposed_model_and_leaves_the_proto_alone() -> None:
    m = _mlp(8)
    before = m.SerializeToString()
    assert exposed_bytes(m, ["h", "y"]) == expose(m, ["h", "y"]).SerializeToString()
    assert m.SerializeToString() == before


def test_infer_on_a_weightless_copy_matches_full_inference() -> None:
    m = _mlp(8)
    full = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    got = infer(export_model(import_graph(m), like=m, infer_shapes=False))
    want = {vi.name: vi.type.SerializeToString() for vi in full.graph.value_info}
    have = {vi.name: vi.type.SerializeToString() for vi in got.graph.value_info}
    assert have == want and {"h", "a", "flat"} <= set(have)
    assert list(got.graph.output[0].type.tensor_type.shape.dim)  # the output's shape was inferred
    weights = {t.name: numpy_helper.to_array(t) for t in got.graph.initializer}
    np.testing.assert_array_equal(weights["W"], numpy_helper.to_array(m.graph.initializer[0]))  # untouched


def test_constant_value_does_not_cache_weights_on_the_graph() -> None:
    import onnx_graphsurgeon as gs

    from onnxslim_lr.graph import constant_value

    m = _mlp(8)
    g = import_graph(m)
    w = g.tensors()["W"]
    assert isinstance(w, gs.Constant)
    first = constant_value(w)
    np.testing.assert_array_equal(first, numpy_helper.to_array(m.graph.initializer[0]))
    assert type(w._values).__name__ == "LazyValues"  # still lazy: nothing kept on the graph
    first[0, 0] = 123.0  # a caller's copy: the graph's value is not changed through it
    assert constant_value(w)[0, 0] != 123.0
