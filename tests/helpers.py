"""Fixtures built in code: small models, and onnxruntime runs with optimisations disabled.

Running with ORT_DISABLE_ALL matters: onnxruntime's own fusions (Conv+BN, Conv+Add ...) could
otherwise hide a numeric bug in a rewrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_lr.timing import make_session

IR = 8
OPSET = 17


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model, threads=1, optimize=False).run(None, dict(feeds))


def conv_model(
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    in_shape: Sequence[int | str] = ("N", 3, 8, 8),
    opset: int = OPSET,
    ir: int = IR,
    weight_as: str = "initializer",
    **attrs: object,
) -> onnx.ModelProto:
    """x -> Conv -> y. ``weight_as`` is 'initializer', 'constant' (a Constant node) or 'input'."""
    nodes = []
    inits = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))]
    if weight_as == "initializer":
        inits.append(numpy_helper.from_array(weight.astype(np.float32), "w"))
    elif weight_as == "constant":
        nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight.astype(np.float32), "wv")))
    elif weight_as == "input":
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.shape)))
    conv_in = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        conv_in.append("b")
    nodes.append(helper.make_node("Conv", conv_in, ["y"], name="conv0", **attrs))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def small_cnn(seed: int = 0, *, c: int = 16, hw: int = 16, bn: bool = True, classes: int = 10,
              dynamic: bool = True) -> onnx.ModelProto:
    """x(N,3,hw,hw) -> Conv3x3 -> [BN] -> Relu -> Conv3x3 -> Relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.1, "w2"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(rng.standard_normal((classes, c)).astype(np.float32) * 0.3, "wf"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "bf"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    prev = "c1"
    if bn:
        inits += [
            numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), "s"),
            numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "bb"),
            numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "m"),
            numpy_helper.from_array((rng.random(c) + 0.5).astype(np.float32), "v"),
        ]
        nodes.append(helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["n1"], name="bn1", epsilon=1e-3))
        prev = "n1"
    nodes += [
        helper.make_node("Relu", [prev], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    n = "N" if dynamic else 1
    g = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, classes])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR
    return m


# ---- file fixtures shared by the CLI report tests (import them into the test module) ----------


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A small CNN (8 channels, 8x8 input) saved as ``m.onnx``."""
    p = tmp_path / "m.onnx"
    onnx.save_model(small_cnn(hw=8, c=8), str(p))
    return p


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    """32 seeded calibration inputs for :func:`model`, saved as ``calib.npz``."""
    p = tmp_path / "calib.npz"
    np.savez(p, x=np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32))
    return p
