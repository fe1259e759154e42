"""Graph layer: loading failures are one-line InputErrors, saving is atomic and never touches
the input, models keep their IR version / opset / interface, names are unique."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import conv_model, run_ort, small_cnn

import onnxslim_lr as lr
from onnxslim_lr.graph import Names, constant_value, export_model, import_graph
from onnxslim_lr.modelio import load_model, save_model


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"hello, this is not a model\n" * 10, "not an ONNX model"),
])
def test_load_rejects_non_models(tmp_path: Path, content: bytes, needle: str) -> None:
    with pytest.raises(lr.InputError, match=needle) as e:
        load_model(_write(tmp_path, "bad.onnx", content))
    assert "\n" not in str(e.value)


def test_load_rejects_missing_directory_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(lr.InputError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(lr.InputError, match="directory"):
        load_model(tmp_path)
    data = small_cnn().SerializeToString()
    with pytest.raises(lr.InputError):
        load_model(_write(tmp_path, "trunc.onnx", data[: len(data) // 2]))


def test_export_keeps_ir_version_opset_and_metadata() -> None:
    m = small_cnn()
    m.ir_version = 7
    m.producer_name = "someone-else"
    onnx.helper.set_model_props(m, {"author": "x"})
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    out = export_model(import_graph(m), like=m)
    assert out.ir_version == 7
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.microsoft", 1)}
    assert out.producer_name == "someone-else"
    assert {p.key: p.value for p in out.metadata_props} == {"author": "x"}


def test_ir_version_is_never_above_what_the_runtime_reads() -> None:
    # onnx 1.23 would write IR 14 by default; a graph built in code must come out <= 10
    g = import_graph(small_cnn())
    out = export_model(g, like=small_cnn())
    assert out.ir_version <= 10
    run_ort(out, {"x": np.zeros((1, 3, 16, 16), np.float32)})


def test_legacy_ir3_lists_initializers_as_inputs() -> None:
    m = small_cnn(dynamic=False)
    m.ir_version = 3
    del m.opset_import[:]
    m.opset_import.append(onnx.helper.make_opsetid("", 9))
    for init in m.graph.initializer:
        m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    res = lr.compress(m, method="svd", rank_ratio=1.0, allow_slower=True)
    out = res.model
    assert out.ir_version == 3
    inputs = {i.name for i in out.graph.input}
    assert {i.name for i in out.graph.initializer} <= inputs
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(m, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_external_data_models_load(tmp_path: Path) -> None:
    m = small_cnn()
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    assert (tmp_path / "w.data").exists()
    loaded = load_model(path)
    res = lr.compress(loaded, method="svd", rank_ratio=1.0, allow_slower=True)
    assert res.changed


def test_save_is_atomic_and_refuses_the_input(tmp_path: Path) -> None:
    m = small_cnn()
    src = tmp_path / "in.onnx"
    save_model(m, src)
    before = src.read_bytes()
    with pytest.raises(lr.InputError, match="input"):
        save_model(m, src, input_path=src)
    assert src.read_bytes() == before
    with pytest.raises(lr.InputError, match="does not exist"):
        save_model(m, tmp_path / "missing" / "out.onnx")
    out = tmp_path / "out.onnx"
    save_model(m, out)
    assert onnx.load(str(out)) == m
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx"]  # no temp files left


def test_save_failure_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = small_cnn()
    out = tmp_path / "out.onnx"

    def boom(self: object, *a: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", lambda fd: boom(None))
    with pytest.raises(lr.InputError, match="cannot write"):
        save_model(m, out)
    assert os.listdir(tmp_path) == []


def test_names_are_unique_and_readable() -> None:
    n = Names(["a", "conv/svd/w"])
    assert n.new("a") == "a_1" and n.new("a") == "a_2"
    s = n.scoped("conv/svd")
    assert s.new("w") == "conv/svd/w_1"
    assert len({s.new("x") for _ in range(5)}) == 5


def test_constant_value_follows_real_exporter_patterns() -> None:
    c = gs.Constant("c", np.arange(4, dtype=np.float32))
    assert np.array_equal(constant_value(c), np.arange(4))
    out = gs.Variable("o")
    gs.Node("Identity", inputs=[c], outputs=[out])
    assert np.array_equal(constant_value(out), np.arange(4))
    shape = gs.Constant("s", np.array([2, 3], dtype=np.int64))
    filled = gs.Variable("f")
    gs.Node("ConstantOfShape", inputs=[shape], outputs=[filled], attrs={"value": gs.Constant("v", np.array([1.5], np.float32))})
    assert np.array_equal(constant_value(filled), np.full((2, 3), 1.5, np.float32))
    dq = gs.Variable("dq")
    gs.Node("DequantizeLinear", inputs=[gs.Constant("q", np.ones(3, np.int8)), gs.Constant("sc", np.array(0.1, np.float32))], outputs=[dq])
    assert constant_value(dq) is None  # quantized weights are never silently dequantized


def test_opset_too_old_is_refused(tmp_path: Path) -> None:
    w = np.ones((2, 3, 3, 3), np.float32)
    m = conv_model(w, None, in_shape=(1, 3, 5, 5), opset=6, ir=3)
    p = tmp_path / "old.onnx"
    p.write_bytes(m.SerializeToString())
    with pytest.raises(lr.OnnxSlimLRError, match="opset 6"):
        load_model(p)


# --------------------------------------------------------------------------- issue 11


def _overridable(ir: int) -> onnx.ModelProto:
    """x -> Conv(w) -> y where w is an initializer *and* a graph input (overridable at run time)."""
    from onnx import TensorProto as TP, helper as oh, numpy_helper as nh

    w = (np.random.default_rng(5).standard_normal((16, 8, 3, 3)) * 0.3).astype(np.float32)
    g = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                      [oh.make_tensor_value_info("x", TP.FLOAT, [1, 8, 16, 16]),
                       oh.make_tensor_value_info("w", TP.FLOAT, [16, 8, 3, 3])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [1, 16, 16, 16])], [nh.from_array(w, "w")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = ir
    return m


def test_initializer_that_is_a_graph_input_is_declined_and_stays_an_input() -> None:
    """Issue 11 item 9: an overridable weight (IR >= 4) is a run-time input, not a constant."""
    m = _overridable(8)
    res = lr.compress(m, method=["svd", "tucker2", "spatial"], rank_ratio=0.25, allow_slower=True, end_to_end=False)
    assert not res.changed
    (layer,) = res.layers
    assert layer.status == "declined" and "graph input" in layer.reason
    # the interface survives export, and the weight can still be overridden at run time
    g = import_graph(m)
    out = export_model(g, like=m)
    assert [i.name for i in out.graph.input] == ["x", "w"]
    x = np.ones((1, 8, 16, 16), np.float32)
    w2 = np.zeros((16, 8, 3, 3), np.float32)
    assert np.all(run_ort(out, {"x": x, "w": w2})[0] == 0)


def test_ir3_initializers_listed_as_inputs_are_still_rewritten() -> None:
    """IR < 4 lists every initializer as an input: that says nothing about overriding."""
    res = lr.compress(_overridable(3), method="svd", rank_ratio=0.25, allow_slower=True, end_to_end=False)
    assert res.changed


def test_doc_strings_and_metadata_below_model_level_are_kept() -> None:
    """Issue 11 item 10: graph, graph I/O and untouched nodes keep doc_string and metadata_props."""
    m = small_cnn(bn=False)
    m.graph.doc_string = "graph doc"
    m.graph.metadata_props.add(key="gk", value="gv")
    m.graph.input[0].doc_string = "x doc"
    m.graph.output[0].doc_string = "logits doc"
    m.graph.output[0].metadata_props.add(key="ok", value="ov")
    relu = next(n for n in m.graph.node if n.name == "relu1")
    relu.doc_string = "relu doc"
    relu.metadata_props.add(key="nk", value="nv")
    res = lr.compress(m, method="svd", rank_ratio=0.25, allow_slower=True, end_to_end=False, only=["conv2"])
    assert res.changed
    out = res.model
    assert out.graph.doc_string == "graph doc"
    assert [(p.key, p.value) for p in out.graph.metadata_props] == [("gk", "gv")]
    assert out.graph.input[0].doc_string == "x doc"
    assert out.graph.output[0].doc_string == "logits doc"
    assert [(p.key, p.value) for p in out.graph.output[0].metadata_props] == [("ok", "ov")]
    r = next(n for n in out.graph.node if n.name == "relu1")
    assert r.doc_string == "relu doc" and [(p.key, p.value) for p in r.metadata_props] == [("nk", "nv")]


def test_nan_fails_every_fidelity_guard() -> None:
    """Issue 11 item 6: NaN compared false with every limit, so the guards passed anything."""
    from onnxslim_lr.guards import fidelity_failure
    from onnxslim_lr.verify import Fidelity, OutputFidelity

    nan = float("nan")
    fid = Fidelity(outputs=[OutputFidelity("a", 0.0, 0.001, 1.0, 1.0), OutputFidelity("b", nan, nan, nan, nan)])
    assert np.isnan(fid.worst_rel_error) and np.isnan(fid.min_cosine) and np.isnan(fid.top1) and not fid.finite
    assert fidelity_failure(fid, None, 0.01) is not None
    assert fidelity_failure(fid, 0.5, None) is not None
    ok = Fidelity(outputs=[OutputFidelity("a", 0.0, 0.001, 1.0, 1.0)])
    assert fidelity_failure(ok, 0.5, 0.01) is None


def test_compare_outputs_reports_nan_for_non_finite_outputs() -> None:
    from onnx import TensorProto as TP, helper as oh

    from onnxslim_lr.verify import compare_outputs

    def model(op: str) -> onnx.ModelProto:
        g = oh.make_graph([oh.make_node(op, ["x"], ["y"])], "g", [oh.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [2, 3])])
        mm = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
        mm.ir_version = 8
        return mm

    x = np.array([[1.0, -2.0, 3.0], [-1.0, 0.5, 2.0]], np.float32)
    fid = compare_outputs(model("Abs"), model("Sqrt"), [{"x": x}])  # sqrt of negatives: NaN
    assert np.isnan(fid.worst_rel_error) and np.isnan(fid.top1)
