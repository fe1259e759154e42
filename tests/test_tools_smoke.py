"""Smoke tests of the benchmark tools (tools/light_models.py, tools/bench*.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import light_models  # noqa: E402


@pytest.fixture(scope="module")
def alexnet() -> onnx.ModelProto:
    return light_models.materialize("light_bvlc_alexnet", seed=0)


def test_materialized_alexnet_keeps_legacy_form_and_runs(alexnet: onnx.ModelProto) -> None:
    assert alexnet.ir_version == 3
    assert [(o.domain, o.version) for o in alexnet.opset_import] == [("", 9)]
    assert not any(n.op_type == "ConstantOfShape" for n in alexnet.graph.node)
    inputs = {i.name for i in alexnet.graph.input}
    assert all(t.name in inputs for t in alexnet.graph.initializer)  # IR 3: initializers listed as inputs
    onnx.checker.check_model(alexnet)

    inits = {t.name: numpy_helper.to_array(t) for t in alexnet.graph.initializer}
    w = inits["conv3_w_0"]  # 384 x 256 x 3 x 3
    assert w.shape == (384, 256, 3, 3)
    assert abs(float(w.std()) - np.sqrt(2.0 / (256 * 9))) < 0.05 * np.sqrt(2.0 / (256 * 9))
    assert float(np.abs(inits["conv3_b_0"]).max()) < 0.1

    info = light_models.check_runs(alexnet)
    assert info["shape"] == [1, 1000]
    assert 1.0 / 1000 < info["argmax_share"] < 1.0  # neither uniform nor saturated


@pytest.mark.slow
def test_compress_svd_on_materialized_alexnet(alexnet: onnx.ModelProto) -> None:
    import onnxslim_lr as lr

    name = light_models.data_input(alexnet).name
    assert name == "data_0"
    res = lr.compress(alexnet, method="svd", rank_ratio=0.5, allow_slower=True, end_to_end=False,
                      input_shape=[f"{name}:1x3x224x224"])
    assert res.changed
    rewritten = {r.node for r in res.rewritten}
    assert len(rewritten) == 2  # conv1 and conv3; the grouped convs are declined
    assert all(r.status == "declined" for r in res.layers if r.node not in rewritten)
    assert res.fidelity is not None and res.fidelity.samples >= 1
    assert res.model.ir_version == 3
    light_models.check_runs(res.model)


def test_bench_driver_discovers_sections_and_renders(tmp_path: Path) -> None:
    import bench
    import bench_layers

    names = bench.discover()
    assert names[:2] == ["layers", "arch"]
    row = {"layer": "3x3_64_112", "shape": "3x3 64->64 @112x112", "method": "svd", "rank_ratio": 0.25,
           "status": "rewritten", "params": "rank=16,full=64", "mac_ratio": 3.6, "out_error": 0.8, "rewrite_s": 1.0,
           "timings": {"1": {"speedup": 3.1, "efficiency": 3.1 / 3.6, "aa_ratio": 1.0}}}
    results = {"section": "layers", "rows": [row], "rounds": 3}
    (tmp_path / "layers.json").write_text(__import__("json").dumps(results))
    md = bench.render_all(tmp_path, tmp_path / "B.md", "python tools/bench.py --render-only")
    assert "## " + bench_layers.TITLE in md and "| svd |" in md and "**met**" in md
    assert "same interleaved run" in md
