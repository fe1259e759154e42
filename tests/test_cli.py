"""The ``onnx-lowrank`` command line, end to end.

In-process through ``onnxslim_lr.cli.main(argv)`` (returns the exit code), plus real runs of
the installed console script. The contract (cli.py docstring): 0 rewritten, 3 nothing worth
rewriting (output = byte-identical copy of the input), 1 error (one line on stderr, no output
file), 2 usage error; the input file is never modified.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from helpers import conv_model, small_cnn
from onnxslim_lr.cli import main

PREFIX = "onnx-lowrank: error:"


@dataclass
class Env:
    root: Path
    model: Path  # a small valid model (in its own folder)
    out_dir: Path  # an empty, writable folder for outputs

    @property
    def out(self) -> Path:
        return self.out_dir / "o.onnx"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    model = tmp_path / "in" / "m.onnx"
    onnx.save_model(small_cnn(hw=8, c=8), str(model))
    return Env(tmp_path, model, tmp_path / "out")


def _snap(p: Path) -> tuple[bytes, int]:
    return p.read_bytes(), p.stat().st_mtime_ns


def _cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv)'s exit code; argparse usage errors leave main() as SystemExit(2), counted the same."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


PROGRESS_LINE = re.compile(r"^\[ *\d+\.\ds\] |^warning: ")


def _assert_one_line_error(err: str) -> None:
    """The error is one line, the last one; anything before it is a progress line or a warning."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if not PROGRESS_LINE.match(ln)]
    assert len(errors) == 1, f"expected exactly one error line, got:\n{err}"
    assert lines[-1] == errors[0] and errors[0].startswith(PREFIX), err


def _grouped_model() -> onnx.ModelProto:
    """Nothing to rewrite: a grouped conv (declined) only."""
    w = np.random.default_rng(0).standard_normal((8, 2, 3, 3)).astype(np.float32)
    m = conv_model(w, in_shape=("N", 4, 8, 8), group=2, pads=[1, 1, 1, 1])
    del m.graph.output[:]
    m.graph.output.append(oh.make_tensor_value_info("y", TP.FLOAT, ["N", 8, 8, 8]))
    return m


# --------------------------------------------------------------------------- success paths


def test_rewrite_small_model_with_report(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    report = env.out_dir / "r.json"
    before = _snap(env.model)
    rc, out, err = _cli([env.model, "-o", env.out, "--allow-slower", "--rank-ratio", "0.5", "--report", report], capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    assert f"wrote {env.out}" in out
    m = onnx.load(str(env.out))
    onnx.checker.check_model(m, full_check=True)
    assert any(n.name.startswith("conv1/") or n.name.startswith("conv2/") for n in m.graph.node)
    doc = json.loads(report.read_text())
    assert isinstance(doc["layers"], list) and doc["layers"]
    for entry in doc["layers"]:
        assert {"node", "status", "reason"} <= set(entry)
    statuses = {e["node"]: e["status"] for e in doc["layers"]}
    assert statuses["conv1"] == "rewritten" and statuses["conv2"] == "rewritten"
    assert all(e["reason"] for e in doc["layers"] if e["status"] != "rewritten")
    assert sorted(os.listdir(env.out_dir)) == ["o.onnx", "r.json"]  # no temp files left
    assert _snap(env.model) == before
    assert os.listdir(env.model.parent) == ["m.onnx"]


def test_quiet_prints_nothing(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli([env.model, "-o", env.out, "--allow-slower", "--rank-ratio", "0.5", "-q", "-m", "svd"], capsys)
    assert rc == 0 and out == "" and "Traceback" not in err
    assert env.out.exists()


def test_nothing_worth_rewriting_gives_exact_copy(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    src = env.root / "in" / "grouped.onnx"
    onnx.save_model(_grouped_model(), str(src))
    before = _snap(src)
    report = env.out_dir / "r.json"
    rc, out, err = _cli([src, "-o", env.out, "--allow-slower", "--report", report], capsys)
    assert rc == 3, err
    assert env.out.read_bytes() == src.read_bytes()
    assert "unchanged copy" in out
    doc = json.loads(report.read_text())
    assert doc["layers"][0]["status"] == "declined" and "grouped" in doc["layers"][0]["reason"]
    assert _snap(src) == before
    assert sorted(os.listdir(env.out_dir)) == ["o.onnx", "r.json"]


def test_overwrites_existing_output(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.out.write_bytes(b"old junk")
    rc, _, err = _cli([env.model, "-o", env.out, "--allow-slower", "--rank-ratio", "0.5", "-q"], capsys)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(str(env.out)), full_check=True)
    assert os.listdir(env.out_dir) == ["o.onnx"]


# --------------------------------------------------------------------------- bad input: exit 1/2, one line, nothing written


def _text(env: Env) -> Path:
    p = env.root / "in" / "notes.onnx"
    p.write_text("this is not an ONNX model, just some text\n" * 4)
    return p


def _empty(env: Env) -> Path:
    p = env.root / "in" / "empty.onnx"
    p.write_bytes(b"")
    return p


def _truncated(env: Env) -> Path:
    p = env.root / "in" / "trunc.onnx"
    data = env.model.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _symlink_to_input(env: Env) -> Path:
    link = env.out_dir / "link.onnx"
    link.symlink_to(env.model)
    return link


def _hardlink_to_input(env: Env) -> Path:
    link = env.out_dir / "hard.onnx"
    os.link(env.model, link)
    return link


# name -> (argv builder, expected exit code); {m} the model, {o} the output
BAD: dict[str, tuple[Callable[[Env], list], int]] = {
    "missing_path": (lambda e: [e.root / "in" / "nope.onnx", "-o", e.out], 1),
    "directory": (lambda e: [e.root / "in", "-o", e.out], 1),
    "empty_file": (lambda e: [_empty(e), "-o", e.out], 1),
    "text_file": (lambda e: [_text(e), "-o", e.out], 1),
    "truncated": (lambda e: [_truncated(e), "-o", e.out], 1),
    "output_is_input": (lambda e: [e.model, "-o", e.model], 1),
    "output_is_input_other_spelling": (lambda e: [e.model, "-o", e.model.parent / ".." / "in" / "m.onnx"], 1),
    "output_symlink_to_input": (lambda e: [e.model, "-o", _symlink_to_input(e)], 1),
    "output_hardlink_to_input": (lambda e: [e.model, "-o", _hardlink_to_input(e)], 1),
    "output_folder_missing": (lambda e: [e.model, "-o", e.out_dir / "nodir" / "o.onnx"], 1),
    "output_is_directory": (lambda e: [e.model, "-o", e.out_dir], 1),
    "output_under_a_file": (lambda e: [e.model, "-o", e.model / "o.onnx"], 1),
    "report_folder_missing": (lambda e: [e.model, "-o", e.out, "--report", e.out_dir / "nodir" / "r.json"], 1),
    "report_is_input": (lambda e: [e.model, "-o", e.out, "--report", e.model], 1),
    "no_output_option": (lambda e: [e.model], 2),
    "rank_ratio_0": (lambda e: [e.model, "-o", e.out, "--rank-ratio", "0"], 2),
    "rank_ratio_nan": (lambda e: [e.model, "-o", e.out, "--rank-ratio", "nan"], 2),
    "rank_ratio_1.5": (lambda e: [e.model, "-o", e.out, "--rank-ratio", "1.5"], 2),  # usage, like 0 (issue 11)
    "energy_2": (lambda e: [e.model, "-o", e.out, "--energy", "2"], 2),
    "target_speedup_0.5": (lambda e: [e.model, "-o", e.out, "--target-speedup", "0.5"], 2),
    "two_rank_rules": (lambda e: [e.model, "-o", e.out, "--rank-ratio", "0.5", "--energy", "0.9"], 2),
    "unknown_method": (lambda e: [e.model, "-o", e.out, "--method", "nosuch"], 2),
    "input_shape_not_numbers": (lambda e: [e.model, "-o", e.out, "--input-shape", "x:abc"], 1),
    "input_shape_unknown_input": (lambda e: [e.model, "-o", e.out, "--input-shape", "nosuch:1x3x8x8"], 1),
    "input_shape_contradicts_model": (lambda e: [e.model, "-o", e.out, "--input-shape", "x:1x3x9x9"], 1),
    "metric_data_without_calib": (lambda e: [e.model, "-o", e.out, "--metric", "data", "--allow-slower"], 1),
    "calib_missing": (lambda e: [e.model, "-o", e.out, "--calib", e.root / "nope.npy", "--allow-slower"], 1),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error_nothing_written(case: str, env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    build, expected = BAD[case]
    argv = build(env)
    inputs = {p: _snap(p) for p in (env.root / "in").iterdir() if p.is_file()}
    out_before = sorted(os.listdir(env.out_dir))
    rc, out, err = _cli(argv, capsys)
    assert rc == expected, (rc, err)
    _assert_one_line_error(err)
    assert not env.out.exists(), "no output file may be left behind"
    assert sorted(os.listdir(env.out_dir)) == out_before, "no stray (temporary) files in the output folder"
    assert {p: _snap(p) for p in (env.root / "in").iterdir() if p.is_file()} == inputs, "input files must be untouched"


def test_output_folder_not_writable(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    ro = env.root / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0o500 folder is still writable")
        before = _snap(env.model)
        rc, _, err = _cli([env.model, "-o", ro / "o.onnx", "--allow-slower"], capsys)
        assert rc == 1
        _assert_one_line_error(err)
        assert os.listdir(ro) == []
        assert _snap(env.model) == before
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("which", ["rewritten", "unchanged_copy"])
def test_os_refuses_the_write(which: str, env: Env, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied")

    src = env.model
    if which == "unchanged_copy":
        src = env.root / "in" / "grouped.onnx"
        onnx.save_model(_grouped_model(), str(src))
    before = _snap(src)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    rc, _, err = _cli([src, "-o", env.out, "--allow-slower", "--rank-ratio", "0.5", "-q"], capsys)
    assert rc == 1
    _assert_one_line_error(err)
    assert os.listdir(env.out_dir) == []
    assert _snap(src) == before


def test_report_path_equal_to_output(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli([env.model, "-o", env.out, "--report", env.out, "--allow-slower", "--rank-ratio", "0.5", "-q"],
                      capsys)
    if rc == 0:  # accepted: then the output must still be the model
        onnx.checker.check_model(onnx.load(str(env.out)), full_check=True)
    else:
        assert rc == 1
        _assert_one_line_error(err)
        assert not env.out.exists()


def test_model_onnxruntime_cannot_run(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3))  # float64
    g = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 1, 1])], "g",
                      [oh.make_tensor_value_info("x", TP.DOUBLE, ["N", 4, 8, 8])],
                      [oh.make_tensor_value_info("y", TP.DOUBLE, ["N", 8, 8, 8])], [nh.from_array(w, "w")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    src = env.root / "in" / "f64.onnx"
    onnx.save_model(m, str(src))
    rc, _, err = _cli([src, "-o", env.out, "--allow-slower"], capsys)
    assert rc in (1, 3), (rc, err)
    if rc == 1:
        _assert_one_line_error(err)
        assert not env.out.exists()


# --------------------------------------------------------------------------- other commands


def test_methods_lists_svd(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(["methods"], capsys)
    assert rc == 0
    names = [line.split()[0] for line in out.strip().splitlines() if line.strip()]
    assert "svd" in names


def test_bench_prints_ratio(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    other = env.out_dir / "b.onnx"
    shutil.copyfile(env.model, other)
    rc, out, err = _cli(["bench", env.model, other, "--rounds", "3", "--provider", "cpu", "--threads", "1"], capsys)
    assert rc == 0, err
    # the format only (real timing decides nothing in the default suite): ratio, interval, verdict
    ratio_line = next(line for line in out.splitlines() if "vs m.onnx" in line)
    m = re.search(r"ms  ([0-9.]+)x \[([0-9.]+), ([0-9.]+)\] \((faster|slower|no measurable difference)\) "
                  r"vs m\.onnx", ratio_line)
    assert m, ratio_line
    assert float(m.group(2)) <= float(m.group(1)) <= float(m.group(3))
    assert "batch 1, 1 threads" in out.splitlines()[0]
    aa = next(line for line in out.splitlines() if "A/A control" in line)
    lo, hi = (float(v) for v in re.search(r"\[([0-9.]+), ([0-9.]+)\]", aa).groups())
    assert lo <= hi


@pytest.mark.parametrize("bad", ["missing", "text"])
def test_bench_bad_model(bad: str, env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    path = env.root / "nope.onnx" if bad == "missing" else _text(env)
    rc, _, err = _cli(["bench", env.model, path, "--rounds", "3", "--provider", "cpu"], capsys)
    assert rc == 1
    _assert_one_line_error(err)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--version", "--help"):
        assert main([flag]) == 0
    out = capsys.readouterr().out
    assert "onnx-lowrank 0." in out and "--rank-ratio" in out


# --------------------------------------------------------------------------- the installed console script


def _script() -> str:
    exe = shutil.which("onnx-lowrank") or str(Path(sys.executable).parent / "onnx-lowrank")
    if not os.path.exists(exe):
        pytest.skip("onnx-lowrank console script is not installed (pip install -e .)")
    return exe


def test_console_script_rewrites(env: Env) -> None:
    before = _snap(env.model)
    p = subprocess.run([_script(), str(env.model), "-o", str(env.out), "--allow-slower", "--rank-ratio", "0.5", "-q",
                        "-m", "svd", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""
    onnx.checker.check_model(onnx.load(str(env.out)), full_check=True)
    assert os.listdir(env.out_dir) == ["o.onnx"]
    assert _snap(env.model) == before


def test_console_script_error_is_one_line(env: Env) -> None:
    p = subprocess.run([_script(), str(_truncated(env)), "-o", str(env.out)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    _assert_one_line_error(p.stderr)
    assert p.stdout == ""
    assert not env.out.exists()
