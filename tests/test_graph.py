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
