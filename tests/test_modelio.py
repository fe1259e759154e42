"""modelio: the write guard, staged writes (all outputs or none), modes, stale temporaries.

Issue 11 items 1-5 and the issue-10 items on file modes; the hostile corpus
(test_hostile_cli.py) runs the refusals through the CLI, these tests pin the mechanisms.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxslim_lr as lr
from onnxslim_lr import modelio
from onnxslim_lr.cli import main
from onnxslim_lr.errors import InputError
from test_hostile_cli import _conv_model, _nothing_to_rewrite, with_external_data


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _run(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- modes


def test_rewritten_output_and_report_honour_the_umask(tmp_path: Path, umask022: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_model().SerializeToString())
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    rc, err = _run([model, "-o", out, "--report", rep, "--allow-slower", "--rank-ratio", "0.25", "-q"], capsys)
    assert rc == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(rep.stat().st_mode) == 0o644
    os.umask(0o027)
    modelio.write_atomic(tmp_path / "x.bin", b"abc")
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o640


def test_unchanged_copy_keeps_the_input_mode(tmp_path: Path, umask022: None, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(_nothing_to_rewrite().SerializeToString())
    model.chmod(0o640)
    out = tmp_path / "o.onnx"
    rc, err = _run([model, "-o", out, "--allow-slower", "-q"], capsys)
    assert rc == 3, err
    assert out.read_bytes() == model.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_regular_input_bytes_are_not_kept_and_the_copy_comes_from_disk(tmp_path: Path) -> None:
    """The unchanged copy of a regular file is copied from it (575 MB not held through a VGG-19
    run); the copy is byte-identical, and a pipe's bytes, which cannot be read again, are kept."""
    model = tmp_path / "m.onnx"
    data = _nothing_to_rewrite().SerializeToString() + b""
    model.write_bytes(data)
    loaded = modelio.open_model(model)
    assert loaded.data is None
    src = loaded.unchanged()
    assert isinstance(src, modelio.InputCopy) and src.path == model
    out = tmp_path / "o.onnx"
    modelio.write_outputs([(out, src, 0o600)], input_path=model)
    assert out.read_bytes() == data and stat.S_IMODE(out.stat().st_mode) == 0o600
    given = modelio.open_model(model, data=data)  # bytes read by the caller (a pipe): kept
    assert given.unchanged() is data


def test_input_changed_during_the_run_is_refused_not_copied(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(_nothing_to_rewrite().SerializeToString())
    src = modelio.open_model(model).unchanged()
    assert isinstance(src, modelio.InputCopy)
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    model.write_bytes(_conv_model().SerializeToString())  # another process rewrites the input
    with pytest.raises(InputError, match="changed on disk during the run"):
        modelio.write_outputs([(out, src, None)], input_path=model)
    assert out.read_bytes() == b"previous"  # nothing renamed in
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx"]  # no temporary file left
    model.unlink()
    with pytest.raises(InputError, match="removed during the run"):
        modelio.write_outputs([(out, src, None)], input_path=model)


def test_cli_input_changed_during_the_run_is_exit_1_and_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The README's promise: exit 3's copy is never a copy of a file other than the one read."""
    from onnxslim_lr import api

    model = tmp_path / "m.onnx"
    model.write_bytes(_nothing_to_rewrite().SerializeToString())
    real = api.compress

    def compress_then_change_the_input(*args, **kwargs):  # another process writes the model meanwhile
        result = real(*args, **kwargs)
        model.write_bytes(_conv_model().SerializeToString())
        return result

    monkeypatch.setattr(api, "compress", compress_then_change_the_input)
    out = tmp_path / "o.onnx"
    rc, err = _run([model, "-o", out, "--allow-slower", "-q"], capsys)
    assert rc == 1
    assert "changed on disk during the run" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# --------------------------------------------------------------------------- all outputs or none


def _model_and_paths(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_model().SerializeToString())
    return model, tmp_path / "o.onnx", tmp_path / "r.json"


def test_report_write_failing_leaves_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11 item 5: the report cannot be written (disk full): exit 1 and no model on disk."""
    model, out, rep = _model_and_paths(tmp_path)
    real = modelio.stage_bytes

    def full_disk(path, data, **kw):
        if Path(path) == rep:
            raise InputError(f"{path}: cannot write (No space left on device)")
        return real(path, data, **kw)

    monkeypatch.setattr(modelio, "stage_bytes", full_disk)
    rc, err = _run([model, "-o", out, "--report", rep, "--allow-slower", "--rank-ratio", "0.25", "-q"], capsys)
    assert rc == 1 and "No space left" in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("failing", ["o.onnx", "r.json"])
def test_a_failed_rename_leaves_neither_output(failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model, out, rep = _model_and_paths(tmp_path)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == failing:
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(modelio.os, "replace", replace)
    rc, err = _run([model, "-o", out, "--report", rep, "--allow-slower", "--rank-ratio", "0.25", "-q"], capsys)
    assert rc == 1, err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# --------------------------------------------------------------------------- the guard


def test_guard_refuses_every_file_the_run_reads(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.png").write_bytes(b"x")
    calib = tmp_path / "c.npy"
    calib.write_bytes(b"x")
    os.link(calib, tmp_path / "hard")
    for bad in (calib, tmp_path / "hard", tmp_path / "." / "c.npy", data / "a.png", data / "new.onnx"):
        with pytest.raises(InputError):
            modelio.check_output_path(bad, reads=[calib, data])
    assert modelio.check_output_path(tmp_path / "ok.onnx", reads=[calib, data]) == tmp_path / "ok.onnx"


def test_guard_refuses_existing_non_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        modelio.check_output_path(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        modelio.check_output_path("/dev/null")
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_external_data_files_are_sources_and_protected(tmp_path: Path) -> None:
    path = with_external_data(_conv_model(), tmp_path / "d", "weights.bin")
    loaded = modelio.open_model(path)
    assert loaded.sources == [path, tmp_path / "d" / "weights.bin"]
    before = (tmp_path / "d" / "weights.bin").read_bytes()
    with pytest.raises(InputError, match="reads"):
        modelio.save_model(loaded.model, tmp_path / "d" / "weights.bin", input_path=path, reads=loaded.sources)
    assert (tmp_path / "d" / "weights.bin").read_bytes() == before
    assert onnx.load(str(path)).graph.initializer[0].name == "w"  # still loads


# --------------------------------------------------------------------------- stale temporaries


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = tmp_path / f".o.onnx.onnxlr-{dead_pid}.abc123.tmp"
        stale.write_bytes(b"\0" * 100)
        stale_dir = tmp_path / f".o.onnx.onnxlr-{dead_pid}.xyz.d"
        stale_dir.mkdir()
        running = tmp_path / f".o.onnx.onnxlr-{live.pid}.def456.tmp"
        running.write_bytes(b"1")
        foreign = tmp_path / ".o.onnx.abc.tmp"  # not our naming: never touched
        foreign.write_bytes(b"2")
        modelio.write_atomic(tmp_path / "o.onnx", b"data")
        assert not stale.exists() and not stale_dir.exists()
        assert running.exists() and foreign.exists()
        assert (tmp_path / "o.onnx").read_bytes() == b"data"
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- loading


def test_output_without_declared_shape_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onnxruntime runs graph outputs of unknown rank; the checker's demand for a shape is waived."""
    m = _conv_model()
    m.graph.output[0].type.tensor_type.ClearField("shape")
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    loaded = modelio.open_model(path)
    assert not loaded.model.graph.output[0].type.tensor_type.HasField("shape")  # restored after the check
    rc, err = _run([path, "-o", tmp_path / "o.onnx", "--allow-slower", "--rank-ratio", "0.25", "-q"], capsys)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)


def test_api_refuses_threads_beyond_the_cores_and_bad_seeds() -> None:
    m = _conv_model()
    cores = os.cpu_count() or 1
    with pytest.raises(InputError, match="--threads"):
        lr.compress(m, threads=cores + 1, allow_slower=True)
    with pytest.raises(InputError, match="--threads"):
        lr.bench([m], threads=10000)
    with pytest.raises(InputError, match="--seed"):
        lr.compress(m, seed=-1, allow_slower=True)
    x = np.ones((2, 8, 16, 16), np.float32)
    with pytest.raises(InputError, match="--threads"):
        lr.accuracy(m, x, np.array([0, 1]), threads=10000)


def test_write_outputs_is_guarded_itself(tmp_path: Path) -> None:
    """The last line of defence: write_outputs checks every path even if the caller did not."""
    calib = tmp_path / "c.npy"
    calib.write_bytes(b"keep")
    with pytest.raises(InputError):
        modelio.write_outputs([(tmp_path / "o.onnx", b"m", None), (calib, b"r", None)], reads=[calib])
    with pytest.raises(InputError, match="same file"):
        modelio.write_outputs([(tmp_path / "a", b"1", None), (tmp_path / "." / "a", b"2", None)])
    assert calib.read_bytes() == b"keep" and sorted(os.listdir(tmp_path)) == ["c.npy"]
    modelio.write_outputs([(tmp_path / "r.json", b"r", None), (tmp_path / "o.onnx", b"m", None)], reads=[calib])
    assert (tmp_path / "r.json").read_bytes() == b"r" and (tmp_path / "o.onnx").read_bytes() == b"m"
