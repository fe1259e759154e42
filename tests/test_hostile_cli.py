"""The hostile-input corpus: every malformed model, data file and option, through the CLI.

Each case is generated in code into a fresh folder (nothing large is committed) and run
through ``onnx-lowrank``'s ``main``. The contract checked for every case, and listed in the
README's "Guarantees and limits":

* the exit status is 1 (bad input) or 2 (bad usage), never 0 or 3 and never an exception;
* stderr holds exactly one line and no traceback;
* no file anywhere in the case's folder is created, changed, replaced or removed: the input
  model, its external-data files and the calibration/eval data keep their bytes, device nodes
  and FIFOs stay what they are, and no temporary file is left behind.

A few cases need a real process (a pipe as input, Ctrl-C): they run the console script.
"""

from __future__ import annotations

import re

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import external_data_helper as edh
from onnx import helper as oh
from onnx import numpy_helper as nh

from onnxslim_lr.cli import main

RNG = np.random.default_rng(11)


# --------------------------------------------------------------------------- fixtures in code


def _conv_model(*, batch: int | str = "N", in_dim: int = 8, out_c: int = 16, hw: int = 16, classes: int = 10,
                opset: int = 17, ir: int = 8) -> onnx.ModelProto:
    """x -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: a small classifier."""
    w = (RNG.standard_normal((out_c, in_dim, 3, 3)) * 0.3).astype(np.float32)
    wf = (RNG.standard_normal((classes, out_c)) * 0.3).astype(np.float32)
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"], name="relu"),
        oh.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        oh.make_node("Flatten", ["p"], ["f"], name="flat"),
        oh.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1),
    ]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [batch, in_dim, hw, hw])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, [batch, classes])],
                      [nh.from_array(w, "w"), nh.from_array(wf, "wf")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def with_external_data(model: onnx.ModelProto, folder: Path, location: str, *, write: str | None = "weights.bin"
                       ) -> Path:
    """Save ``model`` into ``folder`` with tensor ``w`` pointing at ``location``.

    The bytes are written to ``folder/write`` (None: not written), so the location can be made
    to point anywhere: outside the folder, at a symlink, a FIFO, a missing file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(i for i in m.graph.initializer if i.name == "w")
    raw = nh.to_array(t).tobytes()
    if write is not None:
        (folder / write).write_bytes(raw)
    edh.set_external_data(t, location)
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TP.EXTERNAL
    path = folder / "model.onnx"
    path.write_bytes(m.SerializeToString())
    return path


@dataclass
class Env:
    """One case's folder: ``in/`` holds what the run reads, ``out/`` where it may write."""

    root: Path

    @property
    def ind(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out" / "o.onnx"

    @property
    def model(self) -> Path:
        p = self.ind / "m.onnx"
        if not p.exists():
            p.write_bytes(_conv_model().SerializeToString())
        return p

    def save(self, name: str, model: onnx.ModelProto) -> Path:
        p = self.ind / name
        p.write_bytes(model.SerializeToString())
        return p

    def npy(self, name: str, array: np.ndarray) -> Path:
        p = self.ind / name
        np.save(p, array)
        if p.suffix != ".npy":  # np.save appends .npy
            Path(str(p) + ".npy").rename(p)
        return p

    def npz(self, name: str, **arrays: np.ndarray) -> Path:
        p = self.ind / name
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)
        return p

    def calib(self, n: int = 4) -> Path:
        return self.npy("calib.npy", RNG.standard_normal((n, 8, 16, 16)).astype(np.float32))

    def eval(self, labels: np.ndarray | None = None) -> Path:
        x = RNG.standard_normal((4, 8, 16, 16)).astype(np.float32)
        y = np.array([0, 1, 2, 3]) if labels is None else labels
        return self.npz("eval.npz", x=x, y=y)

    def ext(self, location: str, write: str | None = "weights.bin") -> Path:
        return with_external_data(_conv_model(), self.ind / "ext", location, write=write)


def _corrupt_header_npy(e: Env) -> Path:
    """A 200-byte .npy whose header announces a (10**6, 10**6) float64 array (8 TB)."""
    p = e.ind / "huge.npy"
    with open(p, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
        fh.write(b"\0" * 64)
    return p


def _object_npy(e: Env) -> Path:
    p = e.ind / "obj.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return p


def _fifo(e: Env, name: str) -> Path:
    p = e.root / "out" / name
    os.mkfifo(p)
    return p


def _char_device(e: Env) -> Path:
    p = e.root / "out" / "null"
    try:
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (OSError, AttributeError):
        pytest.skip("cannot create a character device here (needs CAP_MKNOD)")
    return p


def _ext_traversal(e: Env) -> Path:
    m = e.ext("../w.bin")
    (e.ind / "ext" / "weights.bin").rename(e.ind / "w.bin")
    return m


def _ext_symlink(e: Env) -> Path:
    m = e.ext("link.bin")
    (e.ind / "ext" / "link.bin").symlink_to("weights.bin")
    return m


def _ext_hardlink(e: Env) -> Path:
    m = e.ext("hard.bin")
    os.link(e.ind / "ext" / "weights.bin", e.ind / "ext" / "hard.bin")
    return m


def _ext_fifo(e: Env) -> Path:
    m = e.ext("fifo.bin", write=None)
    os.mkfifo(e.ind / "ext" / "fifo.bin")
    return m


def _opset(e: Env, version: int) -> Path:
    return e.save("opset.onnx", _conv_model(opset=version))


def _no_opset(e: Env) -> Path:
    m = _conv_model()
    del m.opset_import[:]
    return e.save("noopset.onnx", m)


def _huge_dim(e: Env) -> Path:
    return e.save("huge.onnx", _conv_model(batch=2**62))


def _truncated(e: Env) -> Path:
    data = e.model.read_bytes()
    p = e.ind / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    return p


A = ["--allow-slower", "-q"]

# name -> argv builder; every case must exit 1 or 2 with one line and change nothing
CASES: dict[str, Callable[[Env], list]] = {
    # --- models that are not models
    "empty_model": lambda e: [e.save("empty.onnx", onnx.ModelProto()), "-o", e.out],
    "garbage_model": lambda e: [_write(e.ind / "g.onnx", os.urandom(256)), "-o", e.out],
    "truncated_model": lambda e: [_truncated(e), "-o", e.out],
    "npy_as_model": lambda e: [e.npy("m.onnx.npy", np.zeros(3, np.float32)), "-o", e.out],
    "model_is_folder": lambda e: [e.ind, "-o", e.out],
    "model_missing": lambda e: [e.ind / "nope.onnx", "-o", e.out],
    "opset_6": lambda e: [_opset(e, 6), "-o", e.out],
    "opset_99": lambda e: [_opset(e, 99), "-o", e.out],
    "no_opset_import": lambda e: [_no_opset(e), "-o", e.out],
    "declared_dim_2^62": lambda e: [_huge_dim(e), "-o", e.out, *A],
    "bench_declared_dim_2^62": lambda e: ["bench", _huge_dim(e)],
    # --- external data onnx refuses
    "ext_path_traversal": lambda e: [_ext_traversal(e), "-o", e.out, *A],
    "ext_absolute_path": lambda e: [e.ext(str((e.ind / "ext" / "weights.bin").resolve())), "-o", e.out, *A],
    "ext_symlink": lambda e: [_ext_symlink(e), "-o", e.out, *A],
    "ext_hardlink": lambda e: [_ext_hardlink(e), "-o", e.out, *A],
    "ext_fifo": lambda e: [_ext_fifo(e), "-o", e.out, *A],
    "ext_missing_file": lambda e: [e.ext("nope.bin", write=None), "-o", e.out, *A],
    "bench_ext_traversal": lambda e: ["bench", _ext_traversal(e)],
    "bench_ext_missing": lambda e: ["bench", e.ext("nope.bin", write=None)],
    # --- outputs that would destroy something the run reads, or a non-regular file
    "output_is_external_data": lambda e: [e.ext("weights.bin"), "-o", e.ind / "ext" / "weights.bin", *A],
    "report_is_external_data": lambda e: [e.ext("weights.bin"), "-o", e.out, "--report",
                                          e.ind / "ext" / "weights.bin", *A],
    "output_is_calib": lambda e: [e.model, "-o", e.calib(), "--calib", e.ind / "calib.npy", *A],
    "report_is_calib": lambda e: [e.model, "-o", e.out, "--calib", e.calib(), "--report", e.ind / "calib.npy", *A],
    "output_is_eval": lambda e: [e.model, "-o", e.eval(), "--eval", e.ind / "eval.npz", *A],
    "report_is_eval": lambda e: [e.model, "-o", e.out, "--eval", e.eval(), "--report", e.ind / "eval.npz", *A],
    "output_symlink_to_calib": lambda e: [e.model, "-o", _symlink(e.root / "out" / "l.onnx", e.calib()),
                                          "--calib", e.ind / "calib.npy", *A],
    "output_hardlink_to_eval": lambda e: [e.model, "-o", _hardlink(e.root / "out" / "h.onnx", e.eval()),
                                          "--eval", e.ind / "eval.npz", *A],
    "output_is_fifo": lambda e: [e.model, "-o", _fifo(e, "fifo"), *A],
    "report_is_fifo": lambda e: [e.model, "-o", e.out, "--report", _fifo(e, "rfifo"), *A],
    "output_is_char_device": lambda e: [e.model, "-o", _char_device(e), *A],
    "output_same_as_report": lambda e: [e.model, "-o", e.out, "--report", e.root / "out" / "." / "o.onnx", *A],
    # --- calibration and eval data
    "calib_nan": lambda e: [e.model, "-o", e.out, "--calib",
                            e.npy("nan.npy", _with(np.ones((4, 8, 16, 16), np.float32), np.nan)), *A],
    "calib_inf": lambda e: [e.model, "-o", e.out, "--calib",
                            e.npy("inf.npy", _with(RNG.standard_normal((4, 8, 16, 16)).astype(np.float32), np.inf)), *A],
    "calib_all_zero": lambda e: [e.model, "-o", e.out, "--calib", e.npy("z.npy", np.zeros((4, 8, 16, 16), np.float32)), *A],
    "calib_wrong_shape": lambda e: [e.model, "-o", e.out, "--calib",
                                    e.npy("s.npy", RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)), *A],
    "calib_uint8": lambda e: [e.model, "-o", e.out, "--calib", e.npy("u.npy", np.ones((4, 8, 16, 16), np.uint8)), *A],
    "calib_corrupt_huge_header": lambda e: [e.model, "-o", e.out, "--calib", _corrupt_header_npy(e), *A],
    "calib_object_array": lambda e: [e.model, "-o", e.out, "--calib", _object_npy(e), *A],
    "calib_text_named_npy": lambda e: [e.model, "-o", e.out, "--calib", _write(e.ind / "t.npy", b"hello"), *A],
    "calib_wrong_suffix": lambda e: [e.model, "-o", e.out, "--calib", _write(e.ind / "c.csv", b"1,2"), *A],
    "eval_label_out_of_range": lambda e: [e.model, "-o", e.out, "--eval", e.eval(np.array([0, 1, 2, 10])), *A],
    "eval_label_negative": lambda e: [e.model, "-o", e.out, "--eval", e.eval(np.array([0, -1, 2, 3])), *A],
    "eval_nan": lambda e: [e.model, "-o", e.out, "--eval",
                           e.npz("en.npz", x=_with(np.ones((2, 8, 16, 16), np.float32), np.nan), y=np.array([0, 1])), *A],
    "fixed_batch_2_odd_samples": lambda e: [e.save("b2.onnx", _conv_model(batch=2)), "-o", e.out, "--calib",
                                            e.npy("c3.npy", RNG.standard_normal((3, 8, 16, 16)).astype(np.float32)), *A],
    # --- options
    "seed_negative": lambda e: [e.model, "-o", e.out, "--seed", "-1", *A],
    "seed_too_big": lambda e: [e.model, "-o", e.out, "--seed", str(2**32), *A],
    "threads_10000": lambda e: [e.model, "-o", e.out, "--threads", "10000", *A],
    "threads_0": lambda e: [e.model, "-o", e.out, "--threads", "0", *A],
    "bench_threads_10000": lambda e: ["bench", e.model, "--threads", "10000"],
    "rank_ratio_2": lambda e: [e.model, "-o", e.out, "--rank-ratio", "2", *A],
    "rank_ratio_0": lambda e: [e.model, "-o", e.out, "--rank-ratio", "0", *A],
    "energy_inf": lambda e: [e.model, "-o", e.out, "--energy", "inf", *A],
    "min_top1_2": lambda e: [e.model, "-o", e.out, "--min-top1", "2", *A],
    "calib_limit_0": lambda e: [e.model, "-o", e.out, "--calib-limit", "0", *A],
    "input_shape_huge": lambda e: [e.model, "-o", e.out, "--input-shape", "x:99999999999x8x16x16", *A],
    "input_shape_garbage": lambda e: [e.model, "-o", e.out, "--input-shape", "x:1x-3", *A],
    "unknown_option": lambda e: [e.model, "-o", e.out, "--no-such-option", *A],
    "unknown_method": lambda e: [e.model, "-o", e.out, "-m", "magic", *A],
}


#: cases whose exit status or message is part of the contract too: (status, text in the message)
EXPECT: dict[str, tuple[int, str]] = {
    "rank_ratio_2": (2, "(0, 1]"),
    "rank_ratio_0": (2, "(0, 1]"),
    "energy_inf": (2, "(0, 1]"),
    "seed_negative": (2, "--seed"),
    "threads_10000": (2, "cores"),
    "bench_threads_10000": (2, "cores"),
    "calib_corrupt_huge_header": (1, "corrupt"),
    "calib_nan": (1, "non-finite"),
    "calib_inf": (1, "non-finite"),
    "calib_all_zero": (1, "zero variance"),
    "eval_label_out_of_range": (1, "out of range"),
    "output_is_external_data": (1, "weights.bin"),
    "output_is_char_device": (1, "not a regular file"),
    "output_is_fifo": (1, "not a regular file"),
    "declared_dim_2^62": (1, "--input-shape"),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _with(a: np.ndarray, value: float) -> np.ndarray:
    a.reshape(-1)[7] = value
    return a


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _hardlink(link: Path, target: Path) -> Path:
    os.link(target, link)
    return link


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, mode, inode, and for regular files a hash of the bytes."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            key = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                snap[key] = ("file", st.st_mode, st.st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                snap[key] = ("link", os.readlink(p))
            else:
                snap[key] = ("other", st.st_mode, st.st_ino, st.st_rdev)
    return snap


def _env(tmp_path: Path) -> Env:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return Env(tmp_path)


PROGRESS_LINE = re.compile(r"^\[ *\d+\.\ds\] |^warning: ")


def run_cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])  # an exception escaping here is the test failing
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_refused_cleanly(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = _env(tmp_path)
    argv = CASES[case](env)
    before = snapshot(tmp_path)
    rc, err = run_cli(argv, capsys)
    # progress lines ("[  0.0s] load: ...") and warnings may come first; the error is one line, the last
    lines = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]
    assert rc in (1, 2), (rc, err)
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "Traceback" not in err and lines[0].startswith("onnx-lowrank: error: "), err
    assert snapshot(tmp_path) == before, "a file was created, changed or removed"
    if case in EXPECT:
        code, text = EXPECT[case]
        assert rc == code and text in lines[0], (rc, lines[0])


def test_corpus_covers_the_issue_cases() -> None:
    """The cases issue 11 names are in the corpus (external data, pipes, devices, NaN, threads)."""
    for name in ("ext_path_traversal", "ext_absolute_path", "ext_symlink", "ext_hardlink", "ext_fifo",
                 "ext_missing_file", "output_is_external_data", "output_is_calib", "output_is_eval",
                 "output_is_char_device", "calib_nan", "calib_all_zero", "threads_10000", "seed_negative",
                 "declared_dim_2^62", "calib_corrupt_huge_header", "eval_label_out_of_range", "rank_ratio_2"):
        assert name in CASES


# --------------------------------------------------------------------------- real processes


def _exe() -> list[str]:
    return [sys.executable, "-c", "import sys; from onnxslim_lr.cli import main; sys.exit(main())"]


def _proc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _nothing_to_rewrite() -> onnx.ModelProto:
    g = oh.make_graph([oh.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                      [oh.make_tensor_value_info("x", TP.FLOAT, [1, 4])], [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_pipe_input_gives_a_real_copy(tmp_path: Path) -> None:
    """Issue 11 item 4: a model read from a pipe, nothing to rewrite: the copy holds its bytes."""
    data = _nothing_to_rewrite().SerializeToString()
    out = tmp_path / "o.onnx"
    p = subprocess.run([*_exe(), "/dev/stdin", "-o", str(out), "--allow-slower", "-q"], input=data,
                       capture_output=True, env=_proc_env(), timeout=120)
    assert p.returncode == 3, p.stderr.decode()
    assert out.read_bytes() == data


def test_ctrl_c_during_start_up_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C while the heavy modules load: exit 130, one line, no traceback, nothing written."""
    model = tmp_path / "m.onnx"
    model.write_bytes(_conv_model().SerializeToString())
    out = tmp_path / "o.onnx"
    # 'ready' once the interpreter and the (light) package are up: the signal then lands in the
    # CLI's heavy imports or in the run, never in Python's own start-up
    code = ("import sys, argparse, logging, onnxslim_lr; print('ready', flush=True); "
            "from onnxslim_lr.cli import main; sys.exit(main())")
    p = subprocess.Popen([sys.executable, "-c", code, str(model), "-o", str(out), "--allow-slower"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=_proc_env())
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    time.sleep(0.15)  # past the interpreter's own start-up: inside our imports (or the run)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    text = err.decode()
    if p.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert p.returncode == 130, text
    lines = [ln for ln in text.strip().splitlines() if not PROGRESS_LINE.match(ln)]
    assert "Traceback" not in text and len(lines) == 1 and "interrupted" in lines[0], text
    assert not out.exists()
