"""One option schema for the command line and the Python API.

Every user-facing setting of a rewrite run is declared here once: its Python keyword, its
flag, its type and bounds, its default and its help text. The CLI builds its argparse
parser from :data:`SCHEMA` and the API (:func:`onnxslim_lr.api.compress`) validates its
keywords with :func:`check`; both therefore accept and refuse exactly the same values
(before this module the CLI took ``--energy 5`` that the API refused). Method-specific
options (``--colors``, ``--clusters`` ...) are declared by the passes themselves
(:class:`onnxslim_lr.passes.base.PassOption`); :func:`check_method_options` checks their
names against the registry of the selected methods and applies each option's declared
``type``, so the API parses them exactly like the CLI.

This module imports nothing heavy at import time (no numpy, onnx or onnxruntime): the CLI
imports it to answer ``--help`` in well under a second.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import InputError

#: the groups of ``onnx-lowrank --help``, in order
GROUPS = ("method and budget", "speed guard", "accuracy guard", "data", "selection", "output")


@dataclass(frozen=True)
class Opt:
    """One option: the API keyword ``name`` and the CLI ``flag`` carry the same value.

    ``kind`` is the element type (float, int, str, bool); ``many`` marks list-valued options
    (repeatable flags, or ``nargs="+"`` when ``nargs_plus``). Bounds are inclusive unless the
    matching ``*_open`` is set; ``None`` means unbounded.
    """

    name: str
    flag: str
    kind: type
    help: str
    group: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    many: bool = False
    nargs_plus: bool = False
    short: str | None = None
    #: why the bounds are what they are, appended to an out-of-range message
    bound_note: str = ""

    def span(self) -> str:
        """The accepted range in interval notation, for messages."""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def check_one(self, value: Any) -> Any:
        """One element, converted to ``kind`` and checked; raises InputError naming the flag."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InputError(f"{self.flag} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise InputError(f"{self.flag} must be a string, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise InputError(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        try:
            if self.kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                v: float | int = int(value)
            else:
                if isinstance(value, bool):
                    raise ValueError
                v = float(value)
        except (TypeError, ValueError):
            what = "an integer" if self.kind is int else "a number"
            raise InputError(f"{self.flag} must be {what}, got {value!r}") from None
        if not math.isfinite(v):
            where = f"in {self.span()}" if self.low is not None or self.high is not None else "finite"
            raise InputError(f"{self.flag} must be {where}, got {value!r}")
        bad_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        bad_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if bad_low or bad_high:
            note = f" ({self.bound_note})" if self.bound_note else ""
            raise InputError(f"{self.flag} must be in {self.span()}{note}, got {value!r}")
        return v

    def check(self, value: Any) -> Any:
        """The whole value (a list for ``many`` options), or None when not given."""
        if value is None:
            return None
        if self.many:
            items = [value] if isinstance(value, (str, int, float)) else list(value)
            if self.nargs_plus and not items:
                raise InputError(f"{self.flag} needs at least one value")
            return [self.check_one(v) for v in items]
        return self.check_one(value)

    def argparse_type(self) -> Callable[[str], Any]:
        """The argparse ``type=``: parse a string and apply the same check as the API."""
        import argparse

        def parse(text: str) -> Any:
            value: Any = text
            if self.kind in (int, float):
                try:
                    value = self.kind(text)
                except ValueError:
                    what = "an integer" if self.kind is int else "a number"
                    raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
            try:
                return self.check_one(value)
            except InputError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        return parse


_P = float("inf")

#: every general option of a rewrite run, in --help order
SCHEMA: tuple[Opt, ...] = (
    # ---- method and budget
    Opt("method", "--method", str, "rewrite method; repeat to try several per layer (the fastest measured wins). "
        "'auto' (the default) tries svd, tucker2, spatial for convs and fc-svd for Gemm/MatMul; "
        "'onnx-lowrank methods' lists all, 'onnx-lowrank methods NAME' shows a method's own options",
        GROUPS[0], default=None, many=True, short="-m", metavar="NAME"),
    Opt("rank_ratio", "--rank-ratio", float, "keep this fraction of each layer's full rank (0 < R <= 1)",
        GROUPS[0], low=0.0, high=1.0, low_open=True, metavar="R"),
    Opt("energy", "--energy", float, "keep this share of singular-value energy per layer (0 < E <= 1); "
        "the default rank rule (see README: with and without --calib)", GROUPS[0], low=0.0, high=1.0, low_open=True, metavar="E"),
    Opt("target_speedup", "--target-speedup", float, "ranks so that each rewritten layer has S times fewer MACs (S > 1)",
        GROUPS[0], low=1.0, low_open=True, metavar="S"),
    Opt("metric", "--metric", str, "approximation metric: plain weights, or weighted by the layer inputs' covariance "
        "(needs --calib). Default: data when --calib is given, else frobenius", GROUPS[0],
        choices=("frobenius", "data")),
    Opt("reconstruct", "--reconstruct", str, "refit the chosen rewrites from calibration data so that each reproduces "
        "the original layer's response (bias correction included, kept only where better on held-out samples): "
        "sequential (through the network compressed so far), independent (each layer alone) or none. Default: "
        "sequential when --calib is given, else none", GROUPS[0], choices=("none", "independent", "sequential")),
    # ---- speed guard
    Opt("min_speedup", "--min-speedup", float, "keep a rewrite only if the layer measures at least X times faster "
        "(default 1.1)", GROUPS[1], default=1.1, low=0.0, low_open=True, metavar="X"),
    Opt("allow_slower", "--allow-slower", bool, "choose by MAC count without timing layers, and keep the result even if "
        "it is slower end to end (the end-to-end latency is still measured and reported)", GROUPS[1], default=False),
    Opt("threads", "--threads", int, "onnxruntime intra-op threads, 1 to this machine's cores (default: all cores)",
        GROUPS[1], low=1, high=max(1, os.cpu_count() or 1), metavar="N", bound_note="1 to this machine's cores"),
    Opt("timing_batch", "--timing-batch", int, "time (layers and end to end) at batch N, your deployment batch: sets "
        "a dynamic leading dim of the sample input, or the calibration batch size with --calib (default: 1, or 16 "
        "with --calib)", GROUPS[1], low=1, metavar="N"),
    # ---- accuracy guard
    Opt("max_layer_error", "--max-layer-error", float, "reject a layer rewrite whose relative output error on the "
        "sample exceeds E", GROUPS[2], low=0.0, low_open=True, metavar="E"),
    Opt("min_top1", "--min-top1", float, "keep top-1 agreement with the original >= A (0 < A <= 1) on the calibration "
        "data; rewrites are dropped, worst first, until it holds", GROUPS[2], low=0.0, high=1.0, low_open=True, metavar="A"),
    Opt("max_output_error", "--max-output-error", float, "keep the model's relative output error <= E: with --calib "
        "and no rank rule, an accuracy budget (the fastest model within E, for detectors/OCR/regression); with a rank "
        "rule, a guard that drops rewrites until it holds", GROUPS[2], low=0.0, low_open=True, metavar="E"),
    Opt("max_accuracy_drop", "--max-accuracy-drop", float, "accuracy budget: the fastest model whose top-1 accuracy "
        "drops by at most PTS percentage points (needs labels: --eval with y, or y in --calib); replaces the rank rule",
        GROUPS[2], low=0.0, metavar="PTS"),
    Opt("min_agreement", "--min-agreement", float, "accuracy budget without labels: the fastest model whose top-1 "
        "agrees with the original's on at least FRAC of held-out calibration samples (default with --calib and no "
        "rank rule: 0.99)", GROUPS[2], low=0.0, high=1.0, low_open=True, metavar="FRAC"),
    Opt("quantize", "--quantize", str, "after the low-rank plan, static int8 quantization with onnxruntime's "
        "quantizer (QDQ, per-channel), planned under the same accuracy budget (needs --calib); the first layer "
        "stays float unless, under a budget, quantizing it too is measured surely 1.1x faster. Default: none",
        GROUPS[2], default="none", choices=("none", "int8")),
    # ---- data
    Opt("calib", "--calib", str, "calibration inputs: .npy, .npz (keys = input names, or x) or an image folder. "
        "Strongly recommended: without it ranks come from the weights alone", GROUPS[3], metavar="PATH"),
    Opt("calib_limit", "--calib-limit", int, "use at most N calibration samples (default 512)", GROUPS[3],
        default=512, low=1, metavar="N"),
    Opt("eval", "--eval", str, "labelled data (.npz with x and y, or class sub-folders of images): accuracy "
        "before/after", GROUPS[3], metavar="PATH"),
    Opt("input_shape", "--input-shape", str, "concrete input shape for dynamic dims, e.g. input:1x3x224x224 "
        "(default: batch 1, other dims must be static); repeatable", GROUPS[3], many=True, metavar="NAME:DIMS"),
    Opt("image_mean", "--image-mean", float, "image folders: mean per channel, subtracted after scaling to [0,1] "
        "(default 0)", GROUPS[3], default=(0.0,), many=True, nargs_plus=True, metavar="M"),
    Opt("image_std", "--image-std", float, "image folders: std per channel, divided after the mean (default 1)",
        GROUPS[3], default=(1.0,), many=True, nargs_plus=True, low=0.0, low_open=True, metavar="S"),
    # ---- selection
    Opt("only", "--only", str, "consider only these node names (repeatable)", GROUPS[4], many=True, metavar="NODE"),
    Opt("skip", "--skip", str, "never touch these node names (repeatable)", GROUPS[4], default=(), many=True, metavar="NODE"),
    Opt("fold", "--no-fold", bool, "do not fold BatchNormalization/Mul/Add into convs first", GROUPS[4], default=True),
    Opt("upgrade_opset", "--no-opset-upgrade", bool, "never raise the model's opset; rewrites that emit newer ops are "
        "then rejected (by default the opset is raised only when a chosen rewrite needs it)", GROUPS[4], default=True),
    Opt("seed", "--seed", int, "seed for random inputs and decompositions (default 0)", GROUPS[5], default=0, low=0, high=2**32 - 1),
)

BY_NAME: dict[str, Opt] = {o.name: o for o in SCHEMA}

#: the rank rules; at most one may be given
RANK_RULES = ("rank_ratio", "energy", "target_speedup")


def check(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate API keywords (``None`` = not given) against the schema; InputError names the flag.

    Also the cross-option rules: one rank rule at most.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        opt = BY_NAME.get(name)
        if opt is None:
            raise InputError(f"unknown option {name!r}")
        out[name] = opt.check(value)
    given = [BY_NAME[n].flag for n in RANK_RULES if out.get(n) is not None]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} are mutually exclusive: give one rank rule")
    return out


def _option_text(value: Any) -> str:
    """An API value as the text the CLI would have received (``(2, 2)`` -> ``"2,2"``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _textual(value: Any) -> bool:
    """A value the CLI could have spelled: a string, a number, or a list of them."""
    scalar = (str, int, float)
    return isinstance(value, scalar) or (isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value))


def check_method_options(method_options: Mapping[str, Any] | None, methods: Iterable[str]) -> dict[str, Any]:
    """Method-specific options, checked against the registry and parsed by their declared type.

    Keys are option names without dashes (``"colors"``) or flags (``"--colors"``). A key that no
    registered method declares is an error; a key declared only by methods that are not
    selected is an error too (it would silently do nothing). Values go through the
    :class:`PassOption`'s ``type`` exactly as on the command line.
    """
    import argparse

    from .passes import registry

    reg = registry()
    selected = set()
    for m in methods:
        if m == "auto":
            from .manager import AUTO_METHODS

            selected.update(a for a in AUTO_METHODS if a in reg)
        elif m in reg:
            selected.add(m)
    declared: dict[str, tuple[Any, list[str]]] = {}
    for name, cls in reg.items():
        for o in cls.options:
            entry = declared.setdefault(o.key, (o, []))
            entry[1].append(name)
    out: dict[str, Any] = {}
    for raw_key, value in (method_options or {}).items():
        key = raw_key.lstrip("-").replace("-", "_")
        if key not in declared:
            raise InputError(f"unknown method option {raw_key!r}; see 'onnx-lowrank methods NAME' for each method's options")
        opt, owners = declared[key]
        if not selected.intersection(owners):
            raise InputError(f"{opt.flag} belongs to {', '.join(owners)}, which is not selected (-m {owners[0]})")
        if value is None:
            continue
        if not _textual(value):
            # objects only the API can pass (arrays for --perforation-calib): the pass checks them
            out[key] = value
            continue
        try:
            out[key] = opt.type(_option_text(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise InputError(f"{opt.flag}: {exc}") from None
    return out


def method_names(values: str | Sequence[str] | None) -> list[str]:
    """The method list (``auto`` when none), each checked against the registry."""
    from .passes import registry

    items = ["auto"] if values is None else ([values] if isinstance(values, str) else list(values))
    if not items:
        raise InputError("no method selected")
    known = registry()
    for m in items:
        if m != "auto" and m not in known:
            raise InputError(f"unknown method {m!r}; choose from: auto, {', '.join(known)}")
    return items
