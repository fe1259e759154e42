"""``onnx-lowrank``: the command line front end (the only module that prints).

    onnx-lowrank MODEL.onnx OUT.onnx [options]        rewrite a model (-o OUT.onnx works too)
    onnx-lowrank bench A.onnx [B.onnx ...] [options]  time models side by side
    onnx-lowrank methods [NAME]                       list the rewrite methods / one method's options

Exit status: 0 the model was rewritten and written; 3 nothing was worth rewriting (the
output is then a byte-identical copy of the input, so pipelines still get a model);
1 an error (bad input, unusable model, failed verification: one line on stderr, no output
file); 2 invalid command-line usage.

Start-up is kept under a second: this module imports only the standard library, the option
schema and the progress interface at import time; onnx, onnxruntime, numpy and the passes
are imported after the first progress line is printed (and not at all for ``--help``).
Method-specific flags (``--colors``, ``--clusters`` ...) are not in the main parser: they are
split off the command line and parsed by a second parser built from the pass registry.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TextIO, TypeVar

from . import __version__
from .errors import InputError, OnnxSlimLRError
from .options import BY_NAME, GROUPS, SCHEMA, Opt
from .progress import Progress

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING = 3

log = logging.getLogger("onnxslim_lr")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors kept to one line plus a hint."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"onnx-lowrank: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    """argparse type for counts (bench options)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _threads(text: str) -> int:
    """argparse type for --threads (bench): the schema's bounds, 1 .. the machine's cores."""
    return BY_NAME["threads"].argparse_type()(text)


# --------------------------------------------------------------------------------------
# progress on stderr
# --------------------------------------------------------------------------------------


class CliProgress(Progress):
    """The CLI's reporter: phase lines on stderr, a live bar on a terminal.

    ``verbosity`` is -1 (``-q``: nothing but errors, which main() prints), 0 (phases, step
    lines or a bar, warnings) or 1 (``-v``: also every decision and every step).
    Every line starts with the time elapsed since the command started, so a piped log
    (CI, notebooks) shows where the time went. On a terminal, ``steps`` draws a tqdm bar
    that is left on screen when done and whose postfix ``tick`` refreshes, so a long layer
    (a big decomposition, a timing run) never looks frozen. Off a terminal, steps and ticks
    print a line at most every ``interval`` seconds (always the first and last step).
    """

    def __init__(self, stream: TextIO | None = None, *, verbosity: int = 0, tty: bool | None = None,
                 interval: float = 5.0, start: float | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.verbosity = verbosity
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.interval = interval
        self.start = time.monotonic() if start is None else start
        self._last_line = -1e9
        self._bar: Any = None
        self._step_label = ""
        self.warnings: list[str] = []
        #: decisions received; when the pipeline sent none, the CLI replays them from the result
        self.decisions = 0

    # -- output ---------------------------------------------------------------------------
    def _elapsed(self) -> str:
        return f"[{time.monotonic() - self.start:7.1f}s]"

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last_line = time.monotonic()

    def _close_bar(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()

    # -- the Progress interface ---------------------------------------------------------------
    def phase(self, name: str, detail: str = "") -> None:
        self._close_bar()
        if self.verbosity >= 0:
            self._write(f"{self._elapsed()} {name}{': ' + detail if detail else ''}")

    def steps(self, items: Iterable[T], total: int, desc: str) -> Iterator[T]:
        if self.verbosity < 0:
            yield from items
            return
        if self.tty:
            from tqdm import tqdm

            self._close_bar()
            self._bar = tqdm(total=total, desc=desc, unit="step", leave=True, file=self.stream, dynamic_ncols=True)
            try:
                for item in items:
                    self._bar.set_postfix_str(_label(item), refresh=True)
                    yield item
                    if self._bar is not None:
                        self._bar.update(1)
            finally:
                self._close_bar()
            return
        for i, item in enumerate(items, 1):
            self._step_label = f"{desc} {i}/{total}" + (f" ({_label(item)})" if _label(item) else "")
            now = time.monotonic()
            if self.verbosity >= 1 or i == 1 or i == total or now - self._last_line >= self.interval:
                self._write(f"{self._elapsed()} {self._step_label}")
            yield item
        self._step_label = ""

    def tick(self, detail: str = "") -> None:
        if self.verbosity < 0:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(detail, refresh=True)
            return
        if not self.tty and time.monotonic() - self._last_line >= self.interval:
            where = f"{self._step_label}: " if self._step_label else ""
            self._write(f"{self._elapsed()} {where}{detail or 'working'}")

    def decision(self, node: str, text: str) -> None:
        self.decisions += 1
        if self.verbosity >= 1:
            self._write(f"{self._elapsed()}   {node}: {text}")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        if self.verbosity >= 0:
            self._write(f"warning: {text}")

    def close(self) -> None:
        self._close_bar()


def _label(item: Any) -> str:
    """A short name for a step's item (a node's name), or ''."""
    name = getattr(item, "name", None)
    return name if isinstance(name, str) else ""


# --------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------


def _add_schema_option(g: Any, o: Opt) -> None:
    flags = [o.short, o.flag] if o.short else [o.flag]
    if o.kind is bool:
        # flags that switch a default-on behaviour off (--no-fold) store False into `name`
        g.add_argument(*flags, dest=o.name, action="store_false" if o.default else "store_true", help=o.help)
        return
    kw: dict[str, Any] = {"dest": o.name, "help": o.help, "metavar": o.metavar}
    if o.choices is not None:
        kw["choices"] = list(o.choices)
        kw.pop("metavar")
    else:
        kw["type"] = o.argparse_type()
    if o.many and o.nargs_plus:
        kw["nargs"] = "+"
        kw["default"] = list(o.default) if o.default is not None else None
    elif o.many:
        kw["action"] = "append"
        kw["default"] = None
    else:
        kw["default"] = o.default
    g.add_argument(*flags, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The main parser, from the option schema (no registry: --help needs no heavy import)."""
    p = _Parser(
        prog="onnx-lowrank",
        usage="onnx-lowrank MODEL.onnx OUT.onnx [options]   (or -o OUT.onnx)",
        description="Rewrite the Conv/Gemm/MatMul layers of an ONNX model into cheaper factorized subgraphs, "
        "keep only the rewrites that are measurably faster, verify and time the result.",
        epilog="Method-specific options (--colors, --clusters, --perforation-rate, --struct-n ...): "
        "'onnx-lowrank methods NAME'. Other commands: 'onnx-lowrank bench A.onnx [B.onnx]' times models; "
        "'onnx-lowrank methods' lists methods. Exit status: 0 rewritten, 3 nothing worth rewriting "
        "(output = copy of input, the reasons and a next command are printed), 1 error, 2 usage.",
        allow_abbrev=False,
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("output_pos", nargs="?", metavar="OUT.onnx", help="where to write the result (written atomically)")
    p.add_argument("-o", "--output", dest="output_opt", metavar="OUT.onnx", help="the same as the positional OUT.onnx")
    p.add_argument("--version", action="version", version=f"onnx-lowrank {__version__}")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for o in SCHEMA:
        _add_schema_option(groups[o.group], o)
    out = groups["output"]
    out.add_argument("--report", metavar="FILE.json", help="write the full per-layer report (every method tried on every layer) as JSON")
    out.add_argument("--plot", metavar="FILE.png", help="plot per-layer MACs before/after and measured speedups "
                     "(needs matplotlib: pip install 'onnxslim_lr[plot]')")
    out.add_argument("-q", "--quiet", action="store_true", help="no report, no progress: errors only")
    out.add_argument("-v", "--verbose", action="store_true", help="every step and decision on stderr, every layer in the report")
    return p


def _method_option_parser() -> tuple[argparse.ArgumentParser, list[Any]]:
    """A parser for the passes' own flags (one per flag, the first declaration wins)."""
    from .passes import registry

    p = _Parser(prog="onnx-lowrank", add_help=False, allow_abbrev=False)
    seen: dict[str, Any] = {}
    for cls in registry().values():
        for o in cls.options:
            if o.flag not in seen:
                seen[o.flag] = o
                p.add_argument(o.flag, dest=o.key, type=o.type, default=None, metavar=o.metavar)
    return p, list(seen.values())


def _split_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(main parser's tokens, method-specific tokens): every ``--flag`` the main parser does not
    know is taken, with its one value, for the method parser."""
    known = set(parser._option_string_actions)  # noqa: SLF001 - argparse has no public accessor
    main_args: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        flag = tok.split("=", 1)[0]
        if tok.startswith("--") and len(tok) > 2 and flag not in known:
            extra.append(tok)
            if "=" not in tok and i + 1 < len(argv):
                extra.append(argv[i + 1])
                i += 1
        else:
            main_args.append(tok)
        i += 1
    return main_args, extra


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = build_parser()
    main_args, extra = _split_argv(argv, parser)
    a = parser.parse_intermixed_args(main_args)
    if a.output_pos and a.output_opt and a.output_pos != a.output_opt:
        parser.error(f"two outputs given ({a.output_pos} and -o {a.output_opt})")
    a.output = a.output_opt or a.output_pos
    if not a.output:
        parser.error("no output given: onnx-lowrank MODEL.onnx OUT.onnx")
    rules = [f for f, v in (("--rank-ratio", a.rank_ratio), ("--energy", a.energy), ("--target-speedup", a.target_speedup))
             if v is not None]
    if len(rules) > 1:
        parser.error(f"{' and '.join(rules)} are mutually exclusive: give one rank rule")
    a.usage_error = parser.error
    method_options: dict[str, Any] = {}
    if extra:
        mparser, mopts = _method_option_parser()
        ns = mparser.parse_args(extra)
        method_options = {o.key: getattr(ns, o.key) for o in mopts if getattr(ns, o.key, None) is not None}
    return a, method_options


def _bench_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnx-lowrank bench", description="onnxruntime latency of models on the same seeded inputs, in "
                "interleaved rounds; each ratio against the first model comes with a 95%% interval, and an A/A control "
                "(a second session of the first model) shows the noise floor.")
    p.add_argument("models", nargs="+", help="two or more .onnx files to compare (or one to time)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS")
    p.add_argument("--batch", type=_positive_int, help="batch size for a dynamic leading dimension (default 1)")
    p.add_argument("--threads", type=_threads)
    p.add_argument("--rounds", type=_positive_int, default=15, help="rounds run first (default 15, at least 6)")
    p.add_argument("--max-rounds", type=_positive_int, default=41,
                   help="rounds are added up to this many while a ratio's interval contains 1 (default 41)")
    p.add_argument("--provider", choices=["cpu", "cuda", "all"], default="all",
                   help="cpu, cuda, or all available (default)")
    return p


# --------------------------------------------------------------------------------------
# the rewrite command
# --------------------------------------------------------------------------------------


def _check_paths(model: str, output: str, report: str | None, plot: str | None,
                 reads: Sequence[str | Path] = ()) -> None:
    """Every output against every file the run reads (one guard: modelio.check_output_path)."""
    from .modelio import check_distinct, check_output_path

    if not Path(model).exists():
        raise InputError(f"{model}: no such file")
    check_output_path(output, model, reads=reads)
    named = [("-o", output)]
    for extra, flag in ((report, "--report"), (plot, "--plot")):
        if extra:
            check_output_path(extra, model, reads=reads, what=flag)
            named.append((flag, extra))
    check_distinct(named)


def _size(path: str) -> str:
    n = Path(path).stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _run_compress(argv: Sequence[str], start: float) -> int:
    a, method_options = _parse(argv)
    verbosity = -1 if a.quiet else (1 if a.verbose else 0)
    _setup_logging(a.verbose, a.quiet)
    progress = CliProgress(verbosity=verbosity, start=start)
    try:
        return _compress_with(a, method_options, progress)
    finally:
        progress.close()


#: the runtime distributions that provide the `onnxruntime` module; exactly one may be installed
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def _ort_distributions() -> list[str]:
    """Which onnxruntime distributions are installed (package metadata only: no import)."""
    from importlib import metadata

    found = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            metadata.version(dist)
            found.append(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def _check_runtime(progress: Progress) -> None:
    """A one-line answer for the two broken runtime installs (none, or CPU and GPU side by side)."""
    found = _ort_distributions()
    if not found:
        raise InputError("onnxruntime is not installed: pip install onnxruntime (CPU), or onnxruntime-gpu (CUDA) instead")
    if len(found) > 1:
        progress.warn("both onnxruntime and onnxruntime-gpu are installed; they provide the same module and "
                      "overwrite each other's files. Keep one: pip uninstall -y onnxruntime onnxruntime-gpu && "
                      "pip install onnxruntime-gpu (or onnxruntime)")


def _compress_with(a: argparse.Namespace, method_options: dict[str, Any], progress: CliProgress) -> int:
    progress.phase("load", f"{a.model} ({_size(a.model)})" if Path(a.model).is_file() else a.model)
    _check_runtime(progress)
    if a.method:
        from .options import method_names

        try:  # needs the pass registry: checked after the first line is out
            method_names(a.method)
        except InputError as exc:
            a.usage_error(str(exc))
    _check_paths(a.model, a.output, a.report, a.plot, [p for p in (a.calib, a.eval) if p])
    if a.plot:
        from .report import require_matplotlib

        require_matplotlib()
    from . import api
    from .report import dumps, exit3_lines, fidelity_warnings, plot_png, report_lines, to_json

    from .modelio import mode_of, open_model, write_outputs

    data_paths = [p for p in (a.calib, a.eval) if p]
    # read once: a pipe gives its bytes only once (they are kept); a regular file's bytes are
    # dropped after parsing and the unchanged copy is made from the file (modelio.InputCopy)
    loaded = open_model(a.model)
    model = loaded.model
    reads = [*loaded.sources[1:], *data_paths]
    _check_paths(a.model, a.output, a.report, a.plot, reads)
    result = api.compress(
        model, method=a.method or ["auto"], rank_ratio=a.rank_ratio, energy=a.energy, target_speedup=a.target_speedup,
        metric=a.metric, method_options=method_options, calib=a.calib, calib_limit=a.calib_limit,
        input_shape=a.input_shape, allow_slower=a.allow_slower, min_speedup=a.min_speedup,
        max_layer_error=a.max_layer_error, min_top1=a.min_top1, max_output_error=a.max_output_error,
        threads=a.threads, timing_batch=a.timing_batch, only=a.only, skip=a.skip, fold=a.fold,
        upgrade_opset=a.upgrade_opset, seed=a.seed, image_mean=a.image_mean, image_std=a.image_std, progress=progress,
        max_accuracy_drop=a.max_accuracy_drop, min_agreement=a.min_agreement, quantize=a.quantize, eval=a.eval,
        reconstruct=a.reconstruct,
    )
    if progress.decisions == 0:
        # the pipeline did not report its decisions as it went: give -v the final ones
        for r in result.layers:
            what = f"{r.status} ({r.method} {r.params})" if r.status == "rewritten" else r.status
            progress.decision(r.node, f"{what}{': ' + r.reason if r.reason else ''}")
    extra: dict[str, Any] = {"input": a.model, "output": a.output}
    eval_lines: list[str] = []
    if a.eval:
        progress.phase("eval", a.eval)
        x, y = api.load_eval(a.eval, model, image_mean=a.image_mean, image_std=a.image_std)
        if y is not None:
            before = api.accuracy(model, x, y, threads=a.threads)
            after = api.accuracy(result.model, x, y, threads=a.threads) if result.changed else before
            extra["accuracy"] = {"samples": int(len(y)), "original": before, "rewritten": after}
            eval_lines.append(f"accuracy on {len(y)} labelled samples: original {before * 100:.2f}% -> "
                              f"rewritten {after * 100:.2f}% ({(after - before) * 100:+.2f} pts)")
        if result.changed:
            fid = api.fidelity_on(model, result.model, x, threads=a.threads)
            extra["eval_fidelity"] = fid.as_dict()
            top1 = f", top-1 agreement {fid.top1 * 100:.2f}%" if fid.top1 is not None else ""
            eval_lines.append(f"fidelity on {fid.samples} eval samples: max rel error {fid.worst_rel_error:.2e}, "
                              f"min cosine {fid.min_cosine:.4f}{top1}")
            for w in fidelity_warnings(fid, f"{fid.samples} eval samples"):
                progress.warn(w)
    if result.changed and result.fidelity is not None:
        for w in fidelity_warnings(result.fidelity, getattr(result, "fidelity_source", "") or "the sample"):
            progress.warn(w)

    progress.phase("write", a.output + ("" if result.changed else " (unchanged copy of the input)"))
    # every output is staged, then renamed in together (report first): exit 1 leaves no output
    _check_paths(a.model, a.output, a.report, a.plot, reads)
    outputs: list[tuple[str, Any, int | None]] = []
    if a.report:
        outputs.append((a.report, dumps(to_json(result, extra)).encode(), None))
    if a.plot:
        outputs.append((a.plot, plot_png(result), None))
    outputs.append((a.output, result.model if result.changed else loaded.unchanged(),
                    None if result.changed else mode_of(a.model)))
    write_outputs(outputs, input_path=a.model, reads=reads)
    progress.phase("done")
    progress.close()
    if not a.quiet:
        lines = report_lines(result, full=a.verbose, rule=_rule_text(a)) + eval_lines
        if not result.changed:
            lines += exit3_lines(result, argv_hint=_next_command_base(a), calib_given=a.calib is not None,
                                 rule=_rule_text(a), lower_rule=_lower_rule(a))
        lines.append(f"wrote {a.output}" + ("" if result.changed else " (unchanged copy of the input)"))
        print("\n".join(lines))
    return EXIT_OK if result.changed else EXIT_NOTHING


def _rule_text(a: argparse.Namespace) -> str:
    from .planning import DEFAULT_ENERGY

    if a.rank_ratio is not None:
        return f"rank-ratio {a.rank_ratio:g}"
    if a.target_speedup is not None:
        return f"target-speedup {a.target_speedup:g}"
    energy = a.energy if a.energy is not None else DEFAULT_ENERGY
    return f"energy {energy:g}"


def _lower_rule(a: argparse.Namespace) -> str | None:
    """A more aggressive rank rule than the one used, for the exit-3 hint."""
    from .planning import DEFAULT_ENERGY

    if a.rank_ratio is not None:
        return f"--rank-ratio {a.rank_ratio * 0.75:.2g}" if a.rank_ratio > 0.1 else None
    if a.target_speedup is not None:
        return f"--target-speedup {a.target_speedup * 1.5:.2g}"
    energy = a.energy if a.energy is not None else DEFAULT_ENERGY
    return f"--energy {max(energy - 0.08, 0.5):.2g}" if energy > 0.5 else None


def _next_command_base(a: argparse.Namespace) -> str:
    """The user's command, reduced to model and output, for 'try this next' hints."""
    base = f"onnx-lowrank {a.model} {a.output}"
    base += "".join(f" --input-shape {spec}" for spec in a.input_shape or [])
    if a.calib:
        base += f" --calib {a.calib}"
    if a.method:
        base += "".join(f" -m {m}" for m in a.method)
    return base


# --------------------------------------------------------------------------------------
# other commands
# --------------------------------------------------------------------------------------


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


def _run_methods(argv: Sequence[str]) -> int:
    """``methods``: one line per method; ``methods NAME``: that method, its maths and its options."""
    from .manager import AUTO_METHODS
    from .passes import registry

    reg = registry()
    if not argv:
        for name, cls in reg.items():
            auto = " (auto)" if name in AUTO_METHODS else ""
            print(f"{name:14s} {', '.join(cls.op_types):12s} {cls.summary}{auto}")
        print("\n'onnx-lowrank methods NAME' shows a method's description and its own options.")
        return EXIT_OK
    if len(argv) > 1 or argv[0] not in reg:
        raise InputError(f"unknown method {' '.join(argv)!r}; choose from: {', '.join(reg)}")
    import inspect

    cls = reg[argv[0]]
    print(f"{cls.name}: {cls.summary} ({', '.join(cls.op_types)}){' - part of auto' if cls.name in AUTO_METHODS else ''}")
    doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
    if doc:
        print()
        print(doc)
    print()
    if cls.options:
        print("options:")
        for o in cls.options:
            meta = f" {o.metavar}" if o.metavar else ""
            default = f" (default {o.default})" if o.default is not None else ""
            print(f"  {o.flag}{meta}\n      {o.help}{default}")
    else:
        print("no method-specific options; the rank rules (--rank-ratio/--energy/--target-speedup) apply")
    return EXIT_OK


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "bench" and not Path("bench").is_file():
            return _run_bench(args[1:])
        if args and args[0] == "methods" and not Path("methods").is_file():
            return _run_methods(args[1:])
        return _run_compress(args, start)
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
