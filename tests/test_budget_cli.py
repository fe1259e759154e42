"""The accuracy budget from the command line: contracts, labels, the no-fit case (no timing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_ort, small_cnn

from onnxslim_lr.cli import main


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, Path]:
    m = small_cnn(c=32, bn=False)
    model = tmp_path / "m.onnx"
    onnx.save(m, str(model))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    y = np.argmax(run_ort(m, {"x": x})[0], axis=1)
    np.savez(tmp_path / "labelled.npz", x=x, y=y)
    return {"model": model, "calib": tmp_path / "calib.npz", "labelled": tmp_path / "labelled.npz",
            "out": tmp_path / "o.onnx", "report": tmp_path / "r.json"}


def _run(env: dict[str, Path], *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(env["model"]), str(env["out"]), "--calib", str(env["calib"]), "--allow-slower",
               "--report", str(env["report"]), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_loose_agreement_budget_rewrites_and_reports_the_plan(env, capsys) -> None:
    rc, out, _ = _run(env, "--min-agreement", "0.5", capsys=capsys)
    assert rc == 0, out
    doc = json.loads(env["report"].read_text())
    b = doc["budget"]
    assert b["contract"] == {"kind": "agreement", "limit": 0.5}
    assert b["ok"] and b["chosen_index"] > 0 and b["verify_damage"] <= 0.5
    assert b["samples"]["choose"] == 32 and b["samples"]["verify"] == 32  # disjoint halves
    assert any(r["status"] == "rewritten" for r in doc["layers"])
    # the rewritten model runs and keeps the interface
    m = onnx.load(str(env["out"]))
    assert [i.name for i in m.graph.input] == ["x"] and [o.name for o in m.graph.output] == ["logits"]


def test_budget_no_plan_meets_returns_the_original(env, capsys) -> None:
    rc, out, _ = _run(env, "--max-output-error", "1e-9", capsys=capsys)
    assert rc == 3
    assert env["out"].read_bytes() == env["model"].read_bytes()
    doc = json.loads(env["report"].read_text())
    assert doc["budget"]["ok"] is False and "no rewrite fits" in doc["budget"]["reason"]


def test_accuracy_budget_needs_labels(env, capsys) -> None:
    rc, _, err = _run(env, "--max-accuracy-drop", "1", capsys=capsys)
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("onnx-lowrank: error")]
    assert len(lines) == 1 and "labels" in lines[0]
    assert not env["out"].exists()


def test_accuracy_budget_with_labelled_eval_splits_it(env, capsys) -> None:
    rc, out, _ = _run(env, "--max-accuracy-drop", "50", "--eval", str(env["labelled"]), capsys=capsys)
    assert rc == 0, out
    b = json.loads(env["report"].read_text())["budget"]
    assert b["contract"]["kind"] == "accuracy" and b["samples"] == {"choose": 32, "verify": 32}


def test_budget_and_rank_rule_are_exclusive(env, capsys) -> None:
    rc, _, err = _run(env, "--min-agreement", "0.9", "--rank-ratio", "0.5", capsys=capsys)
    assert rc == 1 and "replaces the rank rules" in err


def test_default_with_calib_is_the_agreement_budget(env, capsys) -> None:
    rc, out, _ = _run(env, capsys=capsys)
    doc = json.loads(env["report"].read_text())
    assert doc["budget"]["contract"] == {"kind": "agreement", "limit": 0.99}
    assert rc in (0, 3)
