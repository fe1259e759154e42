"""The accuracy budget as the user sees it (issues 14 and 15): the printed "accuracy budget"
block, ``result.budget`` in the JSON report, the frontier panel of ``--plot``, and
``--quantize int8`` with a budget on a small generated model (valid ONNX, runs on
onnxruntime, I/O names and dynamic dims kept; layers int8 breaks kept in float; an already
quantized model gets a reason and the float plan).

Every CLI run uses ``--allow-slower``: nothing here depends on what this machine measures.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxslim_lr as lr
from helpers import calib, model, run_ort, small_cnn  # noqa: F401 - calib, model: shared fixtures
from onnxslim_lr.cli import main
from onnxslim_lr.quantize import quantize_int8
from onnxslim_lr.report import budget_lines, contract_text, plot_png

pytest.importorskip("onnxruntime.quantization")


def _cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _png_shape(data: bytes) -> tuple[int, int]:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(data), format="png").shape[:2]


def test_budget_block_json_and_frontier_plot(model: Path, calib: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out, rep, png = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "p.png"
    rc, stdout, _ = _cli([model, out, "--calib", calib, "--min-agreement", "0.9", "--allow-slower",
                          "--report", rep, "--plot", png], capsys)
    assert rc in (0, 3), stdout
    doc = json.loads(rep.read_text())
    b = doc["budget"]
    assert b["contract"] == {"kind": "agreement", "limit": 0.9}
    assert isinstance(b["frontier"], list) and len(b["frontier"]) >= 2
    assert 0 <= b["chosen_index"] < len(b["frontier"])
    assert b["samples"]["choose"] == 16 and b["samples"]["verify"] == 16  # 32 samples, halved
    assert doc["quantized"] is False
    # the printed block: contract, damages with the held-out sample count, frontier size and index
    assert "accuracy budget: top-1 agreement >= 0.9" in stdout
    assert f"on {b['samples']['verify']} held-out samples" in stdout
    assert f"frontier: {len(b['frontier'])} plan(s) explored, chosen plan {b['chosen_index']}" in stdout
    # --plot: the per-layer figure with the frontier figure stacked below it
    result_no_budget = lr.compress(str(model), calib=str(calib), rank_ratio=0.5, allow_slower=True)
    assert result_no_budget.budget is None
    h_plain, _ = _png_shape(plot_png(result_no_budget))
    h_budget, _ = _png_shape(png.read_bytes())
    assert h_budget > h_plain + 200


def test_accuracy_drop_with_int8_gives_a_valid_quantized_model(model: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    m = onnx.load_model(str(model))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x[:32])
    ev = tmp_path / "e.npz"  # labels: the original's own predictions on held-out inputs
    xe = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    np.savez(ev, x=xe, y=np.argmax(run_ort(m, {"x": xe})[0], axis=1))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, stdout, _ = _cli([model, out, "--calib", calib, "--eval", ev, "--max-accuracy-drop", "5",
                          "--quantize", "int8", "--allow-slower", "--report", rep], capsys)
    assert rc == 0, stdout
    doc = json.loads(rep.read_text())
    assert doc["quantized"] is True and doc["budget"]["quantized"] is True
    assert doc["budget"]["contract"] == {"kind": "accuracy", "limit": 5.0}
    assert doc["budget"]["verify_damage"] <= 5.0
    assert "accuracy budget: top-1 drop <= 5 pts" in stdout and "int8: applied" in stdout
    q = onnx.load_model(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert "QuantizeLinear" in {n.op_type for n in q.graph.node}
    assert [i.name for i in q.graph.input] == [i.name for i in m.graph.input]
    assert [o.name for o in q.graph.output] == [o.name for o in m.graph.output]
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert q.ir_version <= 10
    # a batch size the calibration never used runs (the accuracy contract is checked above,
    # on the planner's held-out half; a random model's logits say nothing about accuracy)
    xt = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    ref, got = run_ort(m, {"x": xt})[0], run_ort(q, {"x": xt})[0]
    assert got.shape == ref.shape == (5, 10) and np.isfinite(got).all()


def test_budget_int8_alone_breaks_keeps_the_offending_layers_in_float(tmp_path: Path) -> None:
    m = small_cnn(hw=8, c=8, bn=False)
    x = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x)
    batches = [{"x": x[i:i + 16]} for i in range(0, 64, 16)]
    full = quantize_int8(m, batches).model
    ref = run_ort(m, {"x": x})[0]
    full_err = float(np.linalg.norm(ref - run_ort(full, {"x": x})[0]) / np.linalg.norm(ref))
    def err_of(q: onnx.ModelProto) -> float:
        return float(np.linalg.norm(ref - run_ort(q, {"x": x})[0]) / np.linalg.norm(ref))

    # a budget int8 alone breaks, but keeping the worst layer in float meets (with margin)
    best = min(err_of(quantize_int8(m, batches, exclude=[k]).model) for k in ("conv1", "conv2", "fc"))
    assert best < 0.8 * full_err
    limit = (best + full_err) / 2
    res = lr.compress(m, calib=str(calib), max_output_error=limit, quantize="int8", allow_slower=True)
    assert res.changed and res.quantized, res.notes
    i8 = res.budget["int8"]
    assert i8["excluded"] and set(i8["excluded"]) <= {"conv1", "conv2", "fc"}
    assert len(i8["excluded"]) < 3  # not everything float: some layer is still int8
    assert i8["verify_damage"] <= limit  # on the held-out half, not the half it was chosen on
    # excluded layers read float weights; the others read dequantized int8 weights
    deq = {o for n in res.model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    by_name = {n.name: n for n in res.model.graph.node}
    for name in ("conv1", "conv2", "fc"):
        assert (by_name[name].input[1] in deq) == (name not in i8["excluded"]), name
    assert err_of(res.model) < full_err
    lines = budget_lines(res.budget)
    assert any("int8: applied, " in ln and "kept in float (" in ln for ln in lines), lines


def test_already_quantized_model_gets_the_reason_and_the_float_plan(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    q = quantize_int8(small_cnn(hw=8, c=8, bn=False), [{"x": x[i:i + 8]} for i in range(0, 32, 8)]).model
    src, calib = tmp_path / "q.onnx", tmp_path / "c.npz"
    onnx.save_model(q, str(src))
    np.savez(calib, x=x)
    res = lr.compress(str(src), calib=str(calib), min_agreement=0.9, quantize="int8", allow_slower=True)
    assert not res.quantized
    assert any("already quantized" in n for n in res.notes), res.notes
    assert "already quantized" in res.budget["int8"]["reason"]
    assert any("int8: not applied: the model is already quantized" in ln for ln in budget_lines(res.budget))
    # the CLI: no traceback, the reason printed, exit 0 or 3 (float plan or nothing to do)
    rc, stdout, err = _cli([src, tmp_path / "o.onnx", "--calib", calib, "--min-agreement", "0.9",
                            "--quantize", "int8", "--allow-slower"], capsys)
    assert rc in (0, 3)
    assert "Traceback" not in err and "already quantized" in stdout


def test_budget_lines_name_the_contract_and_the_next_plan() -> None:
    b = {"contract": {"kind": "accuracy", "limit": 0.5}, "quantized": False, "chosen_index": 1, "ok": True,
         "reason": "", "predicted_proxy": 0.01, "choose_damage": 0.3, "verify_damage": 0.4, "saving": 10.0,
         "frontier": [{"index": 0, "saving": 0.0, "predicted_proxy": 0.0},
                      {"index": 1, "saving": 10.0, "predicted_proxy": 0.01, "choose_damage": 0.3, "verify_damage": 0.4},
                      {"index": 2, "saving": 15.0, "predicted_proxy": 0.05, "choose_damage": 0.9}],
         "samples": {"choose": 100, "verify": 100}}
    lines = budget_lines(b)
    assert lines[0] == "accuracy budget: top-1 drop <= 0.5 pts"
    assert "verified 0.4 on 100 held-out samples" in lines[1]
    assert "3 plan(s) explored, chosen plan 1 of 0..2" in lines[2]
    assert "next plan (2): saving 15" in lines[3] and "measured 0.9" in lines[3]
    assert budget_lines(None) == []
    assert contract_text({"kind": "output_error", "limit": 0.05}) == "relative output error <= 0.05"


def test_int8_with_every_compute_layer_float_is_not_shipped() -> None:
    """An impossible budget must not yield a 'quantized' model whose Conv/Gemm are all float
    (only Q/DQ overhead around cheap ops would be left): the float plan stands, with the reason."""
    from onnxslim_lr.quantize import quantize_with_budget

    m = small_cnn(hw=8, c=8, bn=False)
    x = np.random.default_rng(4).standard_normal((32, 3, 8, 8)).astype(np.float32)
    batches = [{"x": x[i:i + 8]} for i in range(0, 32, 8)]
    ref = run_ort(m, {"x": x})[0]

    def damage(q: onnx.ModelProto) -> float:
        got = run_ort(q, {"x": x})[0]
        return 0.0 if np.array_equal(got, ref) else float(np.linalg.norm(ref - got) / np.linalg.norm(ref))

    out = quantize_with_budget(m, batches, damage, 0.0)
    assert out.model is None and "every layer in float" in out.reason


@pytest.mark.parametrize("sizes", [[16, 16, 1], [1, 1, 1, 1, 1], [3, 3, 3, 2], [5, 3, 1, 4], [16, 16, 16]])
def test_split_labels_follow_the_split_samples(sizes: list[int]) -> None:
    """Labels of the choose and verify halves stay aligned with their samples, including a
    pool ending with a single sample (which split_batches places whole on one side) and odd
    batch sizes (--timing-batch 3): taking every other label of the pool misaligns those."""
    from onnxslim_lr.budgeting import split_batches, split_labels

    start, batches = 0, []
    for n in sizes:
        batches.append({"x": np.arange(start, start + n, dtype=np.float32).reshape(n, 1)})
        start += n
    labels = np.arange(start) * 10
    choose_b, verify_b = split_batches(batches)
    choose_y, verify_y = split_labels(batches, labels)
    for half, y in ((choose_b, choose_y), (verify_b, verify_y)):
        ids = np.concatenate([b["x"][:, 0] for b in half]).astype(int) if half else np.zeros(0, int)
        np.testing.assert_array_equal(y, ids * 10)
    assert len(choose_y) + len(verify_y) == start
