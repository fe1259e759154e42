"""Smoke test of the zoo benchmark pipeline (tools/bench_zoo.py) on a tiny in-code model.

One low-rank variant and int8, through the same helpers the benchmark uses: compress, evaluate,
quantize, time in one interleaved run, plot and render. Checks that the figures are real numbers,
not that they are good (speed goals live in BENCHMARKS.md).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import small_cnn

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

bench_zoo = pytest.importorskip("bench_zoo")


def test_zoo_pipeline_one_variant_and_int8(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime.quantization")
    model = small_cnn(seed=0, c=32, hw=16)
    rng = np.random.default_rng(0)
    calib_x = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    x = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, size=64)
    # allow_slower: the tiny model's rewrite must reach the timing run whatever this machine measures
    variant = dict(bench_zoo.lowrank_variant("svd", {"rank_ratio": 0.5}, "frobenius"), allow_slower=True)
    res = bench_zoo.bench_model("tiny", model, calib_x, calib_x, x, y, [variant], full=(x, y), full_label="tiny",
                                int8=True, onnxslim=False, lowrank_int8=False, batches=(1, 8), rounds=3,
                                max_total_s=1.0, log=lambda _msg: None)

    assert 0.0 <= res["orig_acc"] <= 1.0
    assert res["orig_acc_check"] == pytest.approx(res["orig_acc"])
    rows = {r["kind"]: r for r in res["rows"]}
    assert set(rows) == {"lowrank", "int8"}
    lowrank, int8 = rows["lowrank"], rows["int8"]
    assert lowrank["status"] == "changed" and lowrank["layers_rewritten"] >= 1
    for r in (lowrank, int8):
        assert 0.0 <= r["acc"] <= 1.0
        assert 0.0 <= r["acc_full"] <= 1.0
        assert 0.0 <= r["top1_agree"] <= 1.0
        assert math.isfinite(r["rel_err"]) and r["rel_err"] >= 0.0
        for b in (1, 8):
            assert r[f"speedup_b{b}"] > 0.0 and math.isfinite(r[f"speedup_b{b}"])
        assert r["params"] > 0
    assert lowrank["params"] < res["orig_params"]
    assert res["timing"]["b1"]["aa"] > 0.0

    res["goals"] = bench_zoo.goals(res)
    res["sweep_label"] = "64 random inputs"
    png = tmp_path / "zoo_tiny.png"
    bench_zoo.plot_model(res, png)
    assert png.stat().st_size > 1000
    text = bench_zoo.render({"models": {"tiny": res}, "environment": bench_zoo.environment()})
    assert "| svd r0.5 frob |" in text and "int8" in text


def test_param_count_counts_constants() -> None:
    from onnx import helper, numpy_helper

    model = small_cnn(seed=0, c=8, hw=8)
    n = bench_zoo.param_count(model)
    assert n == sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones((2, 3), np.float32))))
    assert bench_zoo.param_count(model) == n + 6
