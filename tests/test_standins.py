"""The generated third-party stand-ins (tools/standins.py) are what they claim to be."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import standins  # noqa: E402


@pytest.fixture(scope="module")
def models() -> dict[str, onnx.ModelProto]:
    return standins.build_all(seed=0)


def _dims(vi: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_yolo_structure_and_dynamic_dims(models: dict[str, onnx.ModelProto]) -> None:
    m = models["yolo_standin"]
    ops = [n.op_type for n in m.graph.node]
    assert _dims(m.graph.input[0]) == ["batch", 3, "height", "width"]
    assert len(m.graph.output) == 4
    for op in ("Split", "Concat", "Resize", "MaxPool", "Sigmoid", "Constant"):
        assert op in ops, op
    groups = [a.i for n in m.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert max(groups) > 4 and 4 in groups  # a depthwise and a grouped conv
    # SiLU as x * Sigmoid(x): a Mul that consumes a Sigmoid's input and its output
    sig = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Sigmoid"}
    assert any(n.op_type == "Mul" and n.input[1] in sig and sig[n.input[1]] == n.input[0] for n in m.graph.node)
    assert m.ir_version == 8


def test_ocr_structure_and_dynamic_width(models: dict[str, onnx.ModelProto]) -> None:
    m = models["ocr_standin"]
    ops = [n.op_type for n in m.graph.node]
    assert _dims(m.graph.input[0]) == ["batch", 3, 32, "width"]
    for op in ("HardSwish", "BatchNormalization", "Reshape", "Transpose", "MatMul", "Gemm", "Softmax", "Shape"):
        assert op in ops, op


@pytest.mark.parametrize("name", ["yolo_standin", "ocr_standin"])
def test_runs_at_two_sizes_and_is_seeded(models: dict[str, onnx.ModelProto], name: str) -> None:
    shapes = standins.check_runs(models[name], name)
    if name == "yolo_standin":
        assert shapes[0] == [(1, 64, 8, 8), (1, 8, 8, 8), (1, 64, 4, 4), (1, 8, 4, 4)]
        assert shapes[1][0] == (2, 64, 16, 16)
    else:
        assert shapes == [[(1, 32, 97)], [(2, 64, 97)]]
    again = standins.build_all(seed=0)[name]
    other = standins.build_all(seed=1)[name]
    assert again.SerializeToString() == models[name].SerializeToString()
    assert other.SerializeToString() != models[name].SerializeToString()


def test_save_writes_both(tmp_path: Path) -> None:
    paths = standins.save(tmp_path)
    assert sorted(p.name for p in paths.values()) == ["ocr_standin.onnx", "yolo_standin.onnx"]
    for p in paths.values():
        onnx.checker.check_model(onnx.load(str(p)))
    assert not list(tmp_path.glob("*.tmp"))
    assert np.isfinite(standins.example_feeds("ocr_standin")["x"]).all()
