"""``onnx-lowrank``: the command line front end (the only module that prints).

    onnx-lowrank MODEL.onnx -o OUT.onnx [options]     rewrite a model
    onnx-lowrank bench A.onnx [B.onnx ...] [options]  time models side by side
    onnx-lowrank methods                              list the rewrite methods

Exit status: 0 the model was rewritten and written; 3 nothing was worth rewriting (the
output is then a byte-identical copy of the input, so pipelines still get a model);
1 an error (bad input, unusable model, failed verification: one line on stderr, no output
file); 2 invalid command-line usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import InputError, OnnxSlimLRError
from .graph import check_output_path, write_atomic
from .passes.base import float_in, int_at_least
from .manager import AUTO_METHODS

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3

log = logging.getLogger("onnxslim_lr")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors kept to one line plus a hint."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"onnx-lowrank: error: {message} (see --help)\n")


_positive_float = float_in(0.0, float("inf"), high_open=True)
_positive_int = int_at_least(1)


def _method_parser() -> tuple[argparse.ArgumentParser, list[Any]]:
    from .passes import registry

    reg = registry()
    p = _Parser(
        prog="onnx-lowrank",
        description="Rewrite the Conv/Gemm/MatMul layers of an ONNX model into cheaper factorized subgraphs, "
        "keep only the rewrites that are measurably faster, verify and time the result.",
        epilog="Other commands: 'onnx-lowrank bench A.onnx [B.onnx]' times models; 'onnx-lowrank methods' lists methods. "
        "Exit status: 0 rewritten, 3 nothing worth rewriting (output = copy of input), 1 error, 2 usage.",
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the rewritten model (written atomically)")
    p.add_argument("--version", action="version", version=f"onnx-lowrank {__version__}")
    g = p.add_argument_group("method and budget")
    g.add_argument("-m", "--method", action="append", choices=["auto", *reg],
                   help=f"rewrite method; repeat to try several per layer (fastest measured wins). "
                   f"'auto' tries {', '.join(m for m in AUTO_METHODS if m in reg)}. Default: auto")
    rule = g.add_mutually_exclusive_group()
    rule.add_argument("--rank-ratio", type=_positive_float, metavar="R", help="keep this fraction of each layer's full rank (0 < R <= 1)")
    rule.add_argument("--energy", type=_positive_float, metavar="E",
                      help="keep this share of singular-value energy per layer (0 < E <= 1); default 0.98")
    rule.add_argument("--target-speedup", type=_positive_float, metavar="S", help="ranks so that each rewritten layer has S times fewer MACs")
    g.add_argument("--metric", choices=["frobenius", "data"], default=None,
                   help="approximation metric: plain weights, or weighted by the layer inputs' covariance (needs "
                   "--calib). Default: data when --calib is given, else frobenius")
    guard = p.add_argument_group("speed guard")
    guard.add_argument("--min-speedup", type=_positive_float, default=1.1, metavar="X",
                       help="keep a rewrite only if the layer measures at least X times faster (default 1.1)")
    guard.add_argument("--allow-slower", action="store_true",
                       help="skip all timing: choose by MAC count and keep the result even if slower (tests, MAC studies)")
    guard.add_argument("--max-layer-error", type=_positive_float, metavar="E",
                       help="reject a layer rewrite whose relative output error on the sample exceeds E")
    guard.add_argument("--min-top1", type=_positive_float, metavar="A",
                       help="fidelity guard: keep top-1 agreement with the original >= A (0 < A <= 1) on the calibration "
                       "data; rewrites are dropped, worst layer first, until it holds")
    guard.add_argument("--max-output-error", type=_positive_float, metavar="E",
                       help="fidelity guard: keep the model's relative output error <= E on the calibration data")
    guard.add_argument("--threads", type=_positive_int, help="onnxruntime intra-op threads for timing (default: all cores)")
    guard.add_argument("--timing-batch", type=_positive_int, metavar="N",
                       help="time (layers and end to end) at batch N, your deployment batch: sets a dynamic leading "
                       "dim of the sample input, or the calibration batch size with --calib (default: 1, or 16 with --calib)")
    d = p.add_argument_group("data")
    d.add_argument("--calib", metavar="PATH", help="calibration inputs: .npy, .npz (keys = input names, or x) or an image folder")
    d.add_argument("--calib-limit", type=_positive_int, default=512, metavar="N", help="use at most N calibration samples (default 512)")
    d.add_argument("--eval", metavar="PATH", help="labelled data (.npz with x and y, or class sub-folders of images): accuracy before/after")
    d.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="concrete input shape for dynamic dims, e.g. input:1x3x224x224 (default: batch 1, other dims must be static)")
    d.add_argument("--image-mean", type=float, nargs="+", default=[0.0], metavar="M", help="image folder preprocessing: mean per channel (after scaling to [0,1])")
    d.add_argument("--image-std", type=float, nargs="+", default=[1.0], metavar="S", help="image folder preprocessing: std per channel")
    sel = p.add_argument_group("selection")
    sel.add_argument("--only", action="append", metavar="NODE", help="consider only these node names (repeatable)")
    sel.add_argument("--skip", action="append", default=[], metavar="NODE", help="never touch these node names (repeatable)")
    sel.add_argument("--no-fold", action="store_true", help="do not fold BatchNormalization/Mul/Add into convs first")
    sel.add_argument("--no-opset-upgrade", action="store_true",
                     help="never raise the model's opset; rewrites that emit newer ops are then rejected")
    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="FILE.json", help="write the full per-layer report as JSON")
    out.add_argument("-q", "--quiet", action="store_true", help="no table, no progress bar: errors only")
    out.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    out.add_argument("--seed", type=int, default=0, help="seed for random inputs and decompositions (default 0)")

    seen: set[str] = set()
    method_opts = []
    for name, cls in reg.items():
        opts = [o for o in cls.options if o.flag not in seen]
        if not opts:
            continue
        grp = p.add_argument_group(f"{name} options")
        for o in opts:
            seen.add(o.flag)
            method_opts.append(o)
            grp.add_argument(o.flag, type=o.type, default=None, metavar=o.metavar, help=o.help)
    return p, method_opts


def _bench_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnx-lowrank bench", description="onnxruntime latency of models on the same seeded inputs, in "
                "interleaved rounds; each ratio against the first model comes with a 95%% interval, and an A/A control "
                "(a second session of the first model) shows the noise floor.")
    p.add_argument("models", nargs="+", help="two or more .onnx files to compare (or one to time)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS")
    p.add_argument("--batch", type=_positive_int, help="batch size for a dynamic leading dimension (default 1)")
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--rounds", type=_positive_int, default=15, help="rounds run first (default 15, at least 6)")
    p.add_argument("--max-rounds", type=_positive_int, default=41,
                   help="rounds are added up to this many while a ratio's interval contains 1 (default 41)")
    p.add_argument("--provider", choices=["cpu", "cuda", "all"], default="all",
                   help="cpu, cuda, or all available (default)")
    return p


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None

    def wrap(items: Any, total: int, desc: str) -> Any:
        return tqdm(items, total=total, desc=desc, unit="layer", leave=False, file=sys.stderr,
                    disable=not sys.stderr.isatty())

    return wrap


def _check_paths(model: str, output: str, report: str | None) -> None:
    """Everything about the paths that can be refused before any work is done."""
    if not Path(model).exists():
        raise InputError(f"{model}: no such file")
    check_output_path(output, model)
    if report:
        check_output_path(report, model)
        if Path(report).resolve() == Path(output).resolve():
            raise InputError(f"{report}: --report and -o name the same file")


def _run_compress(argv: Sequence[str]) -> int:
    parser, method_opts = _method_parser()
    a = parser.parse_args(argv)
    _setup_logging(a.verbose, a.quiet)
    from . import api
    from .report import dumps, layer_table, summary_lines, to_json

    _check_paths(a.model, a.output, a.report)
    model = api.load_model(a.model)
    method_options = {o.key: getattr(a, o.key) for o in method_opts if getattr(a, o.key, None) is not None}
    result = api.compress(
        model, method=a.method or ["auto"], rank_ratio=a.rank_ratio, energy=a.energy, target_speedup=a.target_speedup,
        metric=a.metric, method_options=method_options, calib=a.calib, calib_limit=a.calib_limit,
        input_shape=a.input_shape, allow_slower=a.allow_slower, min_speedup=a.min_speedup,
        max_layer_error=a.max_layer_error, min_top1=a.min_top1, max_output_error=a.max_output_error, threads=a.threads, timing_batch=a.timing_batch, only=a.only, skip=a.skip, fold=not a.no_fold,
        upgrade_opset=not a.no_opset_upgrade, seed=a.seed, progress=_progress(not a.quiet),
    )
    extra: dict[str, Any] = {"input": a.model, "output": a.output}
    eval_lines: list[str] = []
    if a.eval:
        x, y = api.load_eval(a.eval, model)
        if y is not None:
            before = api.accuracy(model, x, y, threads=a.threads)
            after = api.accuracy(result.model, x, y, threads=a.threads) if result.changed else before
            extra["accuracy"] = {"samples": int(len(y)), "original": before, "rewritten": after}
            eval_lines.append(f"accuracy on {len(y)} labelled samples: original {before * 100:.2f}% -> "
                              f"rewritten {after * 100:.2f}% ({(after - before) * 100:+.2f} pts)")
        fid = api.fidelity_on(model, result.model, x, threads=a.threads)
        extra["eval_fidelity"] = fid.as_dict()
        top1 = f", top-1 agreement {fid.top1 * 100:.2f}%" if fid.top1 is not None else ""
        eval_lines.append(f"fidelity on {fid.samples} eval samples: max rel error {fid.worst_rel_error:.2e}{top1}")

    if result.changed:
        api.save(result, a.output, input_path=a.model)
    else:
        write_atomic(a.output, Path(a.model).read_bytes())
    if a.report:
        write_atomic(a.report, dumps(to_json(result, extra)).encode())
    if not a.quiet:
        print(layer_table(result.layers))
        print()
        for line in summary_lines(result) + eval_lines:
            print(line)
        print(f"wrote {a.output}" + ("" if result.changed else " (unchanged copy of the input)"))
    return EXIT_OK if result.changed else EXIT_NOTHING


def _run_bench(argv: Sequence[str]) -> int:
    a = _bench_parser().parse_args(argv)
    _setup_logging(False, False)
    from . import api
    from .timing import cuda_available

    models = [api.load_model(m) for m in a.models]
    providers = ["CPUExecutionProvider"]
    if a.provider == "cuda" or (a.provider == "all" and cuda_available()):
        providers = (["CPUExecutionProvider"] if a.provider == "all" else []) + ["CUDAExecutionProvider"]
    # ---- bench output: header, one line per model with its interval, the A/A line ----
    from .speed import describe

    for prov in providers:
        t = api.bench(models, input_shape=a.input_shape, batch=a.batch, threads=a.threads, provider=prov,
                      rounds=a.rounds, max_rounds=max(a.rounds, a.max_rounds))
        print(t.header())
        first = Path(a.models[0]).name
        for i, path in enumerate(a.models):
            ratio = "" if i == 0 else f"  {describe(t.speedup(0, i))} vs {first}"
            print(f"  {path}: median {t.medians[i] * 1e3:.3f} ms{ratio}")
        if t.aa is not None:
            print(f"  A/A control (a second session of {first}): {t.aa}; ratios are widened by its deviation from 1")
    return EXIT_OK


def _run_methods() -> int:
    from .passes import registry

    for name, cls in registry().items():
        auto = " (auto)" if name in AUTO_METHODS else ""
        print(f"{name:14s} {', '.join(cls.op_types):12s} {cls.summary}{auto}")
    return EXIT_OK


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "bench" and not Path("bench").is_file():
            return _run_bench(args[1:])
        if args and args[0] == "methods" and not Path("methods").is_file():
            return _run_methods()
        return _run_compress(args)
    except OnnxSlimLRError as exc:
        print(f"onnx-lowrank: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:  # argparse: usage errors (2), --help / --version (0)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("onnx-lowrank: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnx-lowrank: error: out of memory", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
