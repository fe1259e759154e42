"""First contact with the CLI (issue 10): progress on stderr, the compact report, exit-3 hints,
fidelity that says what it was measured on, conventions (positional output, fast --help,
``methods NAME``), ``--plot``, ``--image-mean/--image-std``, and the option schema shared
with the Python API (issue 12 item 4).

CLI runs are in-process through ``main(argv)`` with pytest capturing stdout and stderr (so
stderr is not a terminal: the piped-log behaviour). Nothing here measures time.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

import onnxslim_lr as lr
from helpers import calib, model, small_cnn  # noqa: F401 - calib, model: shared fixtures
from onnxslim_lr.cli import CliProgress, main
from onnxslim_lr.manager import Attempt, CompressResult, LayerResult
from onnxslim_lr.report import exit3_lines, fidelity_warnings, report_lines, summary_lines
from onnxslim_lr.verify import Fidelity, OutputFidelity

ROOT = Path(__file__).resolve().parent.parent
PHASE = re.compile(r"^\[ *\d+\.\ds\] (\S[^:]*)")


def _cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # pragma: no cover - main() catches it
        rc = exc.code if isinstance(exc.code, int) else 1
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _phases(err: str) -> list[str]:
    return [m.group(1).split(" ")[0] for m in (PHASE.match(ln) for ln in err.splitlines()) if m]


# --------------------------------------------------------------------------- progress on stderr


def test_piped_run_prints_one_line_per_phase_with_elapsed_time(model: Path, calib: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--calib", calib, "--rank-ratio", "0.5", "--allow-slower"], capsys)
    assert rc == 0, err
    phases = _phases(err)
    # load first, write last; calibration data read by the API; the layers as i/N steps
    assert phases[0] == "load" and phases[-2:] == ["write", "done"], err
    assert "calibration" in phases
    assert re.search(r"plan layer 1/3 \(conv1\)", err) and re.search(r"plan layer 3/3 \(fc\)", err), err
    assert "warning: no calibration data" not in err


def test_quiet_prints_nothing_but_errors(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "0.5", "--allow-slower", "-q"], capsys)
    assert rc == 0 and out == "" and err == ""
    rc, out, err = _cli([model, tmp_path / "nodir" / "o.onnx", "-q"], capsys)
    assert rc == 1 and out == "" and err.startswith("onnx-lowrank: error:") and len(err.strip().splitlines()) == 1


def test_progress_off_a_terminal_throttles_steps_but_keeps_first_and_last() -> None:
    buf = io.StringIO()
    p = CliProgress(buf, tty=False, interval=3600.0)
    assert list(p.steps(range(5), 5, "plan layer")) == [0, 1, 2, 3, 4]
    lines = buf.getvalue().splitlines()
    assert [ln.split("] ")[1] for ln in lines] == ["plan layer 1/5", "plan layer 5/5"]
    buf2 = io.StringIO()
    p2 = CliProgress(buf2, tty=False, interval=0.0)
    for i in p2.steps(range(3), 3, "plan layer"):
        if i == 2:
            p2.tick("tucker2 decomposition done")  # interval 0: a liveness line inside a long step
    lines2 = buf2.getvalue().splitlines()
    assert len(lines2) == 4 and lines2[-1].endswith("plan layer 3/3: tucker2 decomposition done"), lines2
    p2.tick("after the loop")
    assert buf2.getvalue().splitlines()[-1].endswith("] after the loop")


def test_progress_on_a_terminal_draws_a_bar_that_stays_and_shows_ticks() -> None:
    buf = io.StringIO()
    p = CliProgress(buf, tty=True)
    for i in p.steps(range(3), 3, "plan layer"):
        p.tick(f"timing candidate {i}")
    p.phase("write", "o.onnx")
    text = buf.getvalue()
    assert "timing candidate 2" in text  # the postfix is refreshed by tick()
    assert "3/3" in text  # the finished bar is left on screen (leave=True), not erased
    assert text.rstrip().splitlines()[-1].endswith("write: o.onnx")


def test_verbosity_decides_what_is_shown() -> None:
    for verbosity, expect in ((-1, []), (0, ["warning: w"]), (1, ["n1: kept, slower", "warning: w"])):
        buf = io.StringIO()
        p = CliProgress(buf, tty=False, verbosity=verbosity)
        p.decision("n1", "kept, slower")
        p.warn("w")
        got = [ln.split("]", 1)[-1].strip() for ln in buf.getvalue().splitlines()]
        assert got == expect, (verbosity, got)


def test_api_reports_through_a_progress_object(model: Path, calib: Path) -> None:
    seen: list[tuple[str, str]] = []

    class Rec(lr.Progress):
        def phase(self, name: str, detail: str = "") -> None:
            seen.append(("phase", name))

        def warn(self, text: str) -> None:
            seen.append(("warn", text))

        def steps(self, items, total, desc):  # type: ignore[no-untyped-def]
            seen.append(("steps", f"{desc} {total}"))
            yield from items

    lr.compress(str(model), rank_ratio=0.5, allow_slower=True, calib=str(calib), progress=Rec())
    assert ("phase", "calibration data") in seen and ("steps", "plan layer 3") in seen
    assert not any(k == "warn" and "no calibration data" in t for k, t in seen)
    seen.clear()
    lr.compress(str(model), rank_ratio=0.5, allow_slower=True, progress=Rec())
    warns = [t for k, t in seen if k == "warn"]
    assert len(warns) == 1 and "no calibration data" in warns[0] and "--calib" in warns[0]


# --------------------------------------------------------------------------- no data, exit 3


def test_no_data_warns_once_and_exit_3_names_reasons_and_next_command(model: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "o.onnx"
    # rank ratio 1.0 without --allow-slower: every candidate saves no MACs
    rc, out, err = _cli([model, out_path, "--rank-ratio", "1.0"], capsys)
    assert rc == 3, err
    assert err.count("warning: no calibration data") == 1
    assert "nothing was worth rewriting (3 layers: no MAC saving at rank-ratio 1)" in out, out
    assert f"try next: onnx-lowrank {model} {out_path} --calib CALIB.npz" in out
    assert f"or: onnx-lowrank {model} {out_path} --rank-ratio 0.75 --eval TEST.npz" in out
    assert out_path.read_bytes() == model.read_bytes()


def test_exit_3_for_declined_layers_counts_them_and_points_at_methods(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import conv_model

    w = np.random.default_rng(0).standard_normal((8, 1, 3, 3)).astype(np.float32)
    src = tmp_path / "dw.onnx"
    m = conv_model(w, in_shape=("N", 8, 8, 8), group=8, pads=[1, 1, 1, 1])
    del m.graph.output[:]
    m.graph.output.append(oh.make_tensor_value_info("y", TP.FLOAT, ["N", 8, 8, 8]))
    onnx.save_model(m, str(src))
    rc, out, err = _cli([src, tmp_path / "o.onnx", "--calib", _npz(tmp_path, (8, 8, 8, 8))], capsys)
    assert rc == 3, err
    assert "1 layer: declined, depthwise conv (group=8): nothing to factorize across channels" in out, out
    assert "nothing was worth rewriting (1 layer: no selected method applies (declined))" in out
    assert "try next: onnx-lowrank methods" in out


def _npz(tmp_path: Path, shape: tuple[int, ...]) -> Path:
    p = tmp_path / "data.npz"
    np.savez(p, x=np.random.default_rng(2).standard_normal(shape).astype(np.float32))
    return p


# --------------------------------------------------------------------------- fidelity


def test_fidelity_without_data_uses_several_synthetic_inputs_and_says_so(model: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    res = lr.compress(str(model), rank_ratio=0.5, allow_slower=True)
    assert res.changed and res.fidelity is not None
    assert res.fidelity.samples == lr.api.SYNTHETIC_SAMPLES > 1
    assert "synthetic" in res.fidelity_source and "not an accuracy estimate" in res.fidelity_source
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "0.5", "--allow-slower"], capsys)
    assert rc == 0
    assert "fidelity on 8 synthetic inputs (random, not an accuracy estimate):" in out, out
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "0.5", "--allow-slower", "-q",
                         "--report", tmp_path / "r.json"], capsys)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["fidelity"]["samples"] == 8 and doc["fidelity_source"].startswith("8 synthetic inputs")


def test_fidelity_with_data_names_the_calibration_samples(model: Path, calib: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--calib", calib, "--rank-ratio", "0.5", "--allow-slower"], capsys)
    assert rc == 0, err
    assert "fidelity on 32 calibration samples:" in out, out


def _fid(top1: float | None, cos: float) -> Fidelity:
    return Fidelity(outputs=[OutputFidelity("y", 1.0, 0.5, cos, top1)], samples=8)


def test_fidelity_warnings_below_thresholds() -> None:
    assert fidelity_warnings(_fid(0.95, 0.99), "x") == []
    w = fidelity_warnings(_fid(0.5, 0.99), "8 synthetic inputs")
    assert len(w) == 1 and "top-1 agreement with the original is 50.0% on 8 synthetic inputs" in w[0]
    w = fidelity_warnings(_fid(None, 0.5), "s")
    assert len(w) == 1 and "cosine" in w[0]
    assert len(fidelity_warnings(_fid(0.1, 0.1), "s")) == 2


def test_low_fidelity_prints_a_warning_on_stderr(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxslim_lr.verify as verify

    monkeypatch.setattr(verify, "compare_outputs", lambda *a, **k: _fid(0.25, 0.5))
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "0.5", "--allow-slower"], capsys)
    assert rc == 0
    assert "warning: top-1 agreement with the original is 25.0% on 8 synthetic inputs" in err, err
    assert "warning: output cosine similarity with the original is 0.500" in err


def _layer(node: str, status: str, before: int, after: int = 0, reason: str = "", attempts=()) -> LayerResult:
    return LayerResult(node=node, op="Conv", status=status, method="svd" if status == "rewritten" else "",
                       params="rank=2,full=4" if status == "rewritten" else "", macs_before=before, macs_after=after,
                       reason=reason, attempts=list(attempts), measured=1.5 if status == "rewritten" else None)


def _result(layers: list[LayerResult], changed: bool, fidelity: Fidelity | None = None) -> CompressResult:
    m = small_cnn()
    return CompressResult(model=m, original=m, layers=layers, changed=changed, fidelity=fidelity)


def test_no_fidelity_line_for_a_discarded_rewrite() -> None:
    undone = _layer("c1", "kept", 100, reason="end-to-end guard: rewritten model was not faster",
                    attempts=[Attempt("svd", "chosen", measured=1.2)])
    lines = summary_lines(_result([undone], changed=False, fidelity=_fid(0.99, 0.99)))
    assert not any("fidelity" in ln for ln in lines)
    kept = summary_lines(_result([_layer("c1", "rewritten", 100, 50)], changed=True, fidelity=_fid(0.99, 0.99)))
    assert any(ln.startswith("fidelity on 8 sample(s)") for ln in kept)


# --------------------------------------------------------------------------- the report


def test_mac_line_never_says_1_00x() -> None:
    lines = summary_lines(_result([_layer("a", "rewritten", 151_650_000, 72_150_000)], changed=True))
    assert "MACs of watched layers: 151.65M -> 72.15M (2.10x fewer)" in lines
    tiny = summary_lines(_result([_layer("a", "rewritten", 2300, 1440), _layer("b", "kept", 9_890_000)], changed=True))
    line = next(ln for ln in tiny if ln.startswith("MACs"))
    assert "1.00x" not in line and "% fewer" in line, line
    same = summary_lines(_result([_layer("a", "kept", 100, reason="x")], changed=False))
    assert "MACs of watched layers: 100 (unchanged)" in same


def test_no_mac_saving_is_not_counted_as_kept_after_measuring() -> None:
    no_saving = _layer("a", "kept", 100, reason="rank=4,full=4 saves no MACs (100 >= 100)",
                       attempts=[Attempt("svd", "rejected", reason="rank=4,full=4 saves no MACs (100 >= 100)")])
    slower = _layer("b", "kept", 100, reason="slower or not fast enough when measured: svd 0.80x",
                    attempts=[Attempt("svd", "rejected", measured=0.8)])
    line = summary_lines(_result([no_saving, slower], changed=False))[0]
    assert "1 kept after measuring, 1 rejected before measuring, 0 declined" in line, line


def test_compact_report_lists_rewritten_layers_and_reason_counts_in_full() -> None:
    long_name = "/model.backbone/stage3/block7/conv_with_a_very_long_exporter_name/Conv"
    layers = [
        _layer(long_name, "rewritten", 1000, 400),
        *[_layer(f"dw{i}", "declined", 10, reason="depthwise conv (group=32): nothing to factorize across channels",
                 attempts=[Attempt(m, "declined", reason="depthwise conv (group=32): nothing to factorize across channels")
                           for m in ("svd", "tucker2")]) for i in range(5)],
    ]
    text = "\n".join(report_lines(_result(layers, changed=True), rule="energy 0.98"))
    assert long_name in text  # nothing truncated
    assert "5 layers: declined, depthwise conv (group=32): nothing to factorize across channels (dw0, dw1, dw2, and 2 more)" in text
    assert "dw3" not in text  # compact: no row per declined layer
    full = "\n".join(report_lines(_result(layers, changed=True), full=True))
    assert all(f"dw{i}" in full for i in range(5))


def test_verbose_cli_report_has_every_row(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "1.0", "--skip", "fc"], capsys)
    assert rc == 3
    assert "1 layer: skipped (--skip) (fc)" in out and "node " not in out
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "1.0", "--skip", "fc", "-v"], capsys)
    table = [ln for ln in out.splitlines() if ln.startswith(("conv1", "conv2", "fc "))]
    assert len(table) == 3, out


def test_exit3_lines_without_a_lower_rule_still_suggest_data() -> None:
    r = _layer("a", "kept", 100, reason="x saves no MACs (1 >= 1)", attempts=[Attempt("svd", "rejected", reason="x saves no MACs (1 >= 1)")])
    lines = exit3_lines(_result([r], changed=False), argv_hint="onnx-lowrank m.onnx o.onnx", calib_given=False,
                        rule="energy 0.98", lower_rule=None)
    assert lines[1] == "nothing was worth rewriting (1 layer: no MAC saving at energy 0.98)"
    assert lines[2].startswith("try next: onnx-lowrank m.onnx o.onnx --calib CALIB.npz")


def test_plot_writes_a_png(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    rc, out, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "0.5", "--allow-slower", "--plot", png], capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_one_line_error(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    out_path = tmp_path / "o.onnx"
    rc, out, err = _cli([model, out_path, "--plot", tmp_path / "p.png"], capsys)
    assert rc == 1 and not out_path.exists()
    assert err.strip().splitlines()[-1] == ("onnx-lowrank: error: --plot needs matplotlib: "
                                            "pip install 'onnxslim_lr[plot]' (or pip install matplotlib)")


# --------------------------------------------------------------------------- conventions


def test_positional_output_and_dash_o_both_work(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert _cli([model, a, "--rank-ratio", "0.5", "--allow-slower", "-q"], capsys)[0] == 0 and a.exists()
    assert _cli([model, "--rank-ratio", "0.5", b, "--allow-slower", "-q"], capsys)[0] == 0 and b.exists()
    assert _cli([model, "-o", tmp_path / "c.onnx", "--rank-ratio", "0.5", "--allow-slower", "-q"], capsys)[0] == 0
    rc, _, err = _cli([model, a, "-o", b, "-q"], capsys)
    assert rc == 2 and "two outputs given" in err
    rc, _, err = _cli([model, "-q"], capsys)
    assert rc == 2 and "no output given" in err


def test_help_is_grouped_without_method_options_and_imports_nothing_heavy() -> None:
    code = ("import sys\nfrom onnxslim_lr.cli import main\nrc = main(['--help'])\n"
            "heavy = [m for m in ('onnx', 'onnxruntime', 'numpy', 'onnx_graphsurgeon', 'onnxslim_lr.passes') if m in sys.modules]\n"
            "print('HEAVY', heavy, rc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip().endswith("HEAVY [] 0"), p.stdout[-300:]
    for group in ("method and budget:", "speed guard:", "accuracy guard:", "data:", "selection:", "output:"):
        assert group in p.stdout
    assert "--colors" not in p.stdout.replace("(--colors,", "")  # only named in the pointer to 'methods NAME'
    assert "onnx-lowrank methods NAME" in p.stdout
    assert "--no-opset-upgrade" in p.stdout


def test_help_names_the_auto_methods_the_manager_uses() -> None:
    from onnxslim_lr.manager import AUTO_METHODS
    from onnxslim_lr.options import BY_NAME

    assert "tries svd, tucker2, spatial for convs and fc-svd for Gemm/MatMul" in BY_NAME["method"].help
    assert tuple(AUTO_METHODS) == ("svd", "tucker2", "spatial", "fc-svd")


def test_methods_name_shows_the_method_and_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(["methods", "mono"], capsys)
    assert rc == 0 and out.startswith("mono: ") and "--colors" in out and "--mono-form" in out
    rc, out, _ = _cli(["methods", "svd"], capsys)
    assert rc == 0 and "no method-specific options" in out
    rc, _, err = _cli(["methods", "nosuch"], capsys)
    assert rc == 1 and "unknown method 'nosuch'" in err


def test_method_options_still_parse_on_the_command_line(model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli([model, tmp_path / "o.onnx", "-m", "cp", "--cp-method", "greedy", "--rank-ratio", "0.5",
                         "--allow-slower", "--report", tmp_path / "r.json"], capsys)
    assert rc in (0, 3), err
    rc, _, err = _cli([model, tmp_path / "o.onnx", "-m", "mono", "--colors", "0"], capsys)
    assert rc == 2 and "'0' must be >= 1" in err, err
    rc, _, err = _cli([model, tmp_path / "o.onnx", "--no-such-flag", "1"], capsys)
    assert rc == 2 and "--no-such-flag" in err


# --------------------------------------------------------------------------- image preprocessing


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            arr = np.full((8, 8, 3), 40 * (i + 1) + (100 if cls == "b" else 0), np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_image_mean_and_std_change_what_the_model_sees(model: Path, image_folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxslim_lr.api as api

    seen: dict[str, list[np.ndarray]] = {"calib": [], "eval": []}
    real_compress, real_accuracy = api._compress, api.accuracy

    def spy_compress(m, opts):  # type: ignore[no-untyped-def]
        seen["calib"].append(np.concatenate([b["x"] for b in opts.calib]))
        return real_compress(m, opts)

    def spy_accuracy(m, x, y, **kw):  # type: ignore[no-untyped-def]
        seen["eval"].append(x)
        return real_accuracy(m, x, y, **kw)

    monkeypatch.setattr(api, "_compress", spy_compress)
    monkeypatch.setattr(api, "accuracy", spy_accuracy)
    base = [model, tmp_path / "o.onnx", "--calib", image_folder, "--eval", image_folder, "--rank-ratio", "0.5",
            "--allow-slower", "-q"]
    assert _cli(base, capsys)[0] == 0
    assert _cli(base + ["--image-mean", "0.5", "0.4", "0.3", "--image-std", "0.25"], capsys)[0] == 0
    raw, norm = seen["calib"]
    mean = np.array([0.5, 0.4, 0.3], np.float32)[None, :, None, None]
    np.testing.assert_allclose(norm, (raw - mean) / 0.25, rtol=1e-5, atol=1e-5)
    assert not np.allclose(raw, norm)
    np.testing.assert_allclose(seen["eval"][2], (seen["eval"][0] - mean) / 0.25, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- one option schema


@dataclass
class Bad:
    flag: list[str]
    kw: dict


BAD_VALUES = {
    "energy_5": Bad(["--energy", "5"], {"energy": 5.0}),
    "target_speedup_0.5": Bad(["--target-speedup", "0.5"], {"target_speedup": 0.5}),
    "rank_ratio_0": Bad(["--rank-ratio", "0"], {"rank_ratio": 0.0}),
    "min_top1_1.5": Bad(["--min-top1", "1.5"], {"min_top1": 1.5}),
    "min_speedup_0": Bad(["--min-speedup", "0"], {"min_speedup": 0.0}),
    "threads_0": Bad(["--threads", "0"], {"threads": 0}),
    "calib_limit_0": Bad(["--calib-limit", "0"], {"calib_limit": 0}),
    "seed_-1": Bad(["--seed", "-1"], {"seed": -1}),
    "image_std_0": Bad(["--image-std", "0"], {"image_std": [0.0]}),
    "max_layer_error_nan": Bad(["--max-layer-error", "nan"], {"max_layer_error": float("nan")}),
    "metric_l1": Bad(["--metric", "l1"], {"metric": "l1"}),
    "two_rules": Bad(["--energy", "0.9", "--rank-ratio", "0.5"], {"energy": 0.9, "rank_ratio": 0.5}),
    "unknown_method": Bad(["-m", "nosuch"], {"method": "nosuch"}),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_cli_and_api_refuse_the_same_values(case: str, model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = BAD_VALUES[case]
    out_path = tmp_path / "o.onnx"
    rc, _, err = _cli([model, out_path, *bad.flag], capsys)
    assert rc == 2, (rc, err)
    assert not out_path.exists()
    with pytest.raises(lr.InputError):
        lr.compress(str(model), **bad.kw)


def test_api_method_options_are_checked_and_parsed_by_their_declared_type(model: Path) -> None:
    from onnxslim_lr.options import check_method_options

    assert check_method_options({"colors": "4"}, ["mono"]) == {"colors": 4}
    assert check_method_options({"--clusters": (2, 2)}, ["bicluster"]) == {"clusters": (2, 2)}
    with pytest.raises(lr.InputError, match="--colors"):
        check_method_options({"colors": 0}, ["mono"])
    with pytest.raises(lr.InputError, match="unknown method option 'colours'"):
        check_method_options({"colours": 4}, ["mono"])
    with pytest.raises(lr.InputError, match="--colors belongs to mono, which is not selected"):
        lr.compress(str(model), method="svd", method_options={"colors": 4})
    with pytest.raises(lr.InputError, match="--cp-method"):
        lr.compress(str(model), method="cp", method_options={"cp_method": "newton"})


def test_api_accepts_what_the_cli_accepts(model: Path) -> None:
    res = lr.compress(str(model), method=["svd"], rank_ratio=1, allow_slower=True, threads=1, seed=3,
                      image_mean=[0.5], image_std=0.5)
    assert res.layers and all(r.method in ("svd", "") for r in res.layers)


# --------------------------------------------------------------------------- third-party stand-ins


def _standins():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import standins
    finally:
        sys.path.pop(0)
    return standins


def test_yolo_standin_with_dynamic_dims_gives_a_readable_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = _standins()
    src = tmp_path / "yolo.onnx"
    onnx.save_model(st.yolo_detector(seed=0), str(src))
    out_path = tmp_path / "o.onnx"
    rc, out, err = _cli([src, out_path, "--input-shape", "images:1x3x64x64", "--report", tmp_path / "r.json"], capsys)
    assert rc in (0, 3), err
    assert _phases(err)[0] == "load" and "write" in _phases(err)
    assert err.count("warning: no calibration data") == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    n = len(doc["layers"])
    assert re.search(rf"not rewritten \(\d+ of {n}; -v or --report for every layer\):", out), out
    assert "declined, depthwise conv" in out and "declined, grouped conv" in out
    if rc == 3:
        assert "try next: onnx-lowrank" in out and "--input-shape images:1x3x64x64" in out
    else:
        assert "synthetic inputs (random, not an accuracy estimate)" in out
    assert out_path.exists()


def test_ocr_standin_rewrite_reports_synthetic_fidelity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = _standins()
    src = tmp_path / "ocr.onnx"
    onnx.save_model(st.ocr_recognizer(seed=0), str(src))
    rc, out, err = _cli([src, tmp_path / "o.onnx", "--input-shape", "x:1x3x32x128", "--rank-ratio", "0.5",
                         "--allow-slower"], capsys)
    assert rc == 0, err
    assert "fidelity on 8 synthetic inputs (random, not an accuracy estimate):" in out
    assert "rewritten layers (" in out and "declined, depthwise conv" in out


# --------------------------------------------------------------------------- runtime install, determinism


def test_runtime_install_problems_get_one_clear_line(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxslim_lr.cli as cli

    monkeypatch.setattr(cli, "_ort_distributions", lambda: [])
    rc, _, err = _cli([model, tmp_path / "o.onnx"], capsys)
    assert rc == 1 and err.strip().splitlines()[-1].startswith("onnx-lowrank: error: onnxruntime is not installed: pip install")
    monkeypatch.setattr(cli, "_ort_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    rc, _, err = _cli([model, tmp_path / "o.onnx", "--rank-ratio", "0.5", "--allow-slower"], capsys)
    assert rc == 0 and "warning: both onnxruntime and onnxruntime-gpu are installed" in err


def test_the_real_install_has_exactly_one_runtime() -> None:
    from onnxslim_lr.cli import _ort_distributions

    assert len(_ort_distributions()) == 1


def test_allow_slower_runs_are_deterministic(model: Path, calib: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for i in range(2):
        out_path = tmp_path / f"o{i}.onnx"
        rc, _, err = _cli([model, out_path, "--calib", calib, "--energy", "0.9", "--allow-slower", "-q"], capsys)
        assert rc == 0, err
        outs.append(out_path.read_bytes())
    assert outs[0] == outs[1]


def test_first_line_is_printed_before_the_heavy_imports(model: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "class W:\n"
        "    def __init__(self, real): self.real, self.first = real, None\n"
        "    def write(self, t):\n"
        "        if self.first is None and t.strip(): self.first = ('onnx' in sys.modules or 'numpy' in sys.modules, t)\n"
        "        return self.real.write(t)\n"
        "    def flush(self): self.real.flush()\n"
        "    def isatty(self): return False\n"
        "w = W(sys.stderr); sys.stderr = w\n"
        "from onnxslim_lr.cli import main\n"
        f"rc = main([{str(model)!r}, {str(tmp_path / 'o.onnx')!r}, '--rank-ratio', '0.5', '--allow-slower'])\n"
        "print('FIRST', rc, w.first[0], w.first[1].split('] ')[1].split(':')[0])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.stdout.strip().splitlines()[-1] == "FIRST 0 False load", (p.stdout[-500:], p.stderr[-500:])


def test_the_api_is_silent_by_default(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lr.compress(str(model), rank_ratio=0.5, allow_slower=True)
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""


def test_verbose_logs_every_decision_on_stderr(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [model, tmp_path / "o.onnx", "--rank-ratio", "1.0", "--skip", "fc"]
    _, _, err = _cli(argv, capsys)
    assert "fc: declined: skipped by the user" not in err
    _, _, err = _cli(argv + ["-v"], capsys)
    assert re.search(r"\] +fc: declined: skipped by the user", err), err
    assert re.search(r"\] +conv1: kept: ", err) and re.search(r"\] +conv2: kept: ", err), err
