"""Static int8 quantization after the low-rank plan, with per-layer accuracy control.

Why onnxruntime's quantizer and not our own: it is the quantizer every onnxruntime user
already trusts, it emits QDQ (``QuantizeLinear``/``DequantizeLinear`` pairs around float
ops) that every ONNX runtime reads, and onnxruntime fuses QDQ around Conv/Gemm/MatMul into
integer kernels. We drive it the way its documentation recommends:

1. ``quant_pre_process`` (symbolic shape inference + onnxruntime's basic graph
   optimisations) on a copy; if it fails the model is quantized as it is;
2. ``quantize_static`` in QDQ format, signed int8 activations and weights, per-channel
   weights, MinMax calibration on the user's calibration batches;
3. the result keeps the graph's input/output names and dynamic dimensions, and its IR
   version is kept within what onnxruntime reads. The quantizer needs opset >= 13 for
   per-channel QDQ and raises the opset itself when the model's is older; that happens only
   in this mode.

Accuracy control, in the spirit of NNCF's ``quantize_with_accuracy_control``: when the
quantized model breaks the user's budget, each quantized layer is scored by how much of the
damage reverting it alone to float recovers, and layers are reverted (``nodes_to_exclude``)
in that order until the budget holds, or all are float (then the float plan stands, with the
reason).

Models the quantizer cannot or should not handle (already quantized, a quantizer failure,
a runtime that refuses the result) get a clear reason and the float model, never a crash.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from .progress import SILENT, Progress

log = logging.getLogger(__name__)

#: ops whose presence means the model is already quantized: we never quantize twice
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                           "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"})
#: ops the quantizer turns into integer kernels, and which accuracy control may revert
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
#: highest IR version we write (onnxruntime 1.31 reads up to 10 safely for our opsets)
_MAX_IR = 10


@dataclass
class QuantOutcome:
    """What quantization produced: a model (or None, with the reason) and what was kept float."""

    model: onnx.ModelProto | None
    reason: str = ""
    excluded: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    opset_from: int = 0
    opset_to: int = 0
    note: str = ""


def already_quantized(model: onnx.ModelProto) -> str | None:
    """Why the model must not be quantized again (None when it is a float model)."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    return f"the model is already quantized ({', '.join(found)})" if found else None


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


class _Reader:
    """A CalibrationDataReader over our feed dicts (restricted to the model's inputs)."""

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> None:
        self._batches = [{k: np.asarray(v) for k, v in b.items() if k in names} for b in batches]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def _io_signature(model: onnx.ModelProto) -> list[tuple[str, str, tuple[object, ...]]]:
    init = {t.name for t in model.graph.initializer}
    sig = []
    for kind, vis in (("in", model.graph.input), ("out", model.graph.output)):
        for vi in vis:
            if vi.name in init:
                continue
            dims: tuple[object, ...] = ()
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                             for d in vi.type.tensor_type.shape.dim)
            sig.append((kind, vi.name, dims))
    return sig


def _same_io(model: onnx.ModelProto, q: onnx.ModelProto) -> bool:
    """The quantized model keeps the names, order and stated dims of the graph's inputs/outputs.

    An input/output the original states no shape for may gain one (the quantizer's shape
    inference fills it in); that changes nothing a caller relies on.
    """
    a, b = _io_signature(model), _io_signature(q)
    return len(a) == len(b) and all(ka == kb and na == nb and (not da or da == db)
                                    for (ka, na, da), (kb, nb, db) in zip(a, b))


def quantize_int8(
    model: onnx.ModelProto,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    exclude: Sequence[str] = (),
    per_channel: bool = True,
    preprocess: bool = True,
) -> QuantOutcome:
    """QDQ int8 quantization of ``model`` calibrated on ``batches`` (float model back on failure).

    ``exclude`` names nodes to keep in float. Node names must be unique and non-empty (the
    pass manager names every node before planning).
    """
    why = already_quantized(model)
    if why:
        return QuantOutcome(None, reason=why)
    if not batches:
        return QuantOutcome(None, reason="int8 quantization needs calibration data (--calib)")
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:  # pragma: no cover - part of onnxruntime
        return QuantOutcome(None, reason=f"onnxruntime's quantizer is not available ({exc})")

    class Reader(_Reader, CalibrationDataReader):  # the quantizer checks the base class
        pass

    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    note = "quantize_static (QDQ, int8 activations and weights, " + ("per-channel" if per_channel else "per-tensor") + ", MinMax)"
    opset_from = _default_opset(model)
    with tempfile.TemporaryDirectory(prefix="onnxslim_lr_q") as tmp:
        src, pre, dst = Path(tmp, "in.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "q.onnx")
        onnx.save_model(model, str(src))
        qin = src
        if preprocess:
            for symbolic in (True, False):  # symbolic shape inference needs sympy
                try:
                    quant_pre_process(str(src), str(pre), skip_symbolic_shape=not symbolic)
                    qin = pre
                    note = "quant_pre_process, then " + note
                    break
                except Exception as exc:  # pre-processing is a recommendation, not a requirement
                    log.info("quant_pre_process failed (%s)", exc)
        try:
            with _quiet_preprocess_advice(quiet=not preprocess):
                quantize_static(str(qin), str(dst), Reader(batches, names), quant_format=QuantFormat.QDQ,
                                per_channel=per_channel, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=_expand(model, exclude) or None)
            q = onnx.load_model(str(dst))
        except Exception as exc:  # the quantizer raises many types on models it cannot handle
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            return QuantOutcome(None, reason=f"onnxruntime's quantizer failed: {first}")
    opset_to = _default_opset(q)
    q.ir_version = min(max(model.ir_version, min(q.ir_version, _MAX_IR)), max(model.ir_version, _MAX_IR))
    if not _same_io(model, q):
        return QuantOutcome(None, reason="the quantized model changed the graph's inputs/outputs; kept float")
    try:
        import onnxruntime as ort

        ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160]
        return QuantOutcome(None, reason=f"onnxruntime refuses the quantized model: {first}")
    quantized = sorted({n.name.rsplit("_quant", 1)[0] for n in q.graph.node if n.op_type in QUANTIZABLE_OPS}
                       & {n.name for n in model.graph.node if n.op_type in QUANTIZABLE_OPS} - set(exclude))
    return QuantOutcome(q, excluded=list(exclude), quantized=quantized, opset_from=opset_from, opset_to=opset_to,
                        note=note)


class _DropAdvice(logging.Filter):
    """Drops the quantizer's "consider pre-processing" advice (logged on the root logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_preprocess_advice(*, quiet: bool) -> Iterator[None]:
    """Silence the advice while quantizing a model we chose not to pre-process.

    Why: the budget planner quantizes every rung of every ladder alone to time it (one node,
    nothing for pre-processing to fold); onnxruntime's quantizer then logs its advice twice
    per rung on the root logger, dozens of lines a user can do nothing about. When the
    pre-processing was attempted and failed, the advice stays: it is true then.
    """
    if not quiet:
        yield
        return
    root = logging.getLogger()
    f = _DropAdvice()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _expand(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    """``exclude`` plus the nodes of rewrites of those nodes (named ``<node>/<method>/...``).

    Why: the budget decides which *original* layers stay float; once a plan rewrites such a
    layer, its factor convs must stay float too, or the first conv (the one that sees the raw
    input) would be quantized exactly when it was factorized.
    """
    if not exclude:
        return []
    want = set(exclude)
    prefixes = tuple(f"{e}/" for e in exclude)
    return list(dict.fromkeys(list(exclude) + [n.name for n in model.graph.node
                                               if n.name and n.name not in want and n.name.startswith(prefixes)]))


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes accuracy control may keep in float, in graph (topological) order."""
    return [n.name for n in model.graph.node if n.op_type in QUANTIZABLE_OPS and n.name]


def quantize_with_budget(
    model: onnx.ModelProto,
    batches: Sequence[Mapping[str, np.ndarray]],
    damage: Callable[[onnx.ModelProto], float],
    max_damage: float,
    *,
    per_channel: bool = True,
    keep_float: Sequence[str] = (),
    progress: Progress = SILENT,
    known: Mapping[tuple[str, ...], QuantOutcome] | None = None,
) -> QuantOutcome:
    """Quantize, then keep layers in float (most damaging first) until ``damage(q) <= max_damage``.

    ``keep_float``: layers that stay float in every trial (the budget path passes the first
    layer unless quantizing it is measured to pay: on the bundled VGG, int8 with it float lost
    0.02 pts on the 10k test set against 0.94 with it quantized, at the same speed, while a
    1000-image choose split saw no loss).

    ``known``: quantizations the caller already made (with this ``per_channel``), keyed by
    their ``exclude`` list; a trial with that exclusion list reuses them instead of running the
    quantizer again (a whole-model calibration each).

    ``damage`` measures a candidate model against the user's budget on data the caller chose
    (it must not be the data the final figure is reported on). Scoring reverts each quantized
    layer alone once (one quantization per layer), then reverts greedily in that order,
    re-measuring after each revert: the first plan within budget is returned.
    """
    keep = list(dict.fromkeys(keep_float))

    def quantized(exclude: Sequence[str]) -> QuantOutcome:
        done = (known or {}).get(tuple(exclude))
        return done if done is not None else quantize_int8(model, batches, exclude=exclude, per_channel=per_channel)

    first = quantized(keep)
    if first.model is None:
        return first
    base = damage(first.model)
    what = f"all layers but {', '.join(keep)} quantized" if keep else "all layers quantized"
    progress.decision("int8", f"{what}: damage {base:.4g} (limit {max_damage:.4g})")
    if base <= max_damage:
        first.note += f"; damage {base:.4g} within {max_damage:.4g}"
        return first
    every = quantizable_nodes(model)
    nodes = [n for n in every if n not in keep]
    # the usual suspects first, at two quantizations instead of one per layer: the first layer
    # sees the raw input (on the bundled VGG keeping it float alone recovers all of int8's
    # 0.94 pts), the last produces the outputs the budget is measured on
    trials = [list(dict.fromkeys(keep + t)) for t in ([every[0]], [every[0], every[-1]])] if len(every) > 2 else []
    trials = [t for i, t in enumerate(trials) if t != keep and t not in trials[:i]]
    for trial in trials:
        out = quantized(trial)
        if out.model is None:
            return out
        d = damage(out.model)
        progress.decision(", ".join(trial), f"kept in float: damage now {d:.4g}")
        if d <= max_damage:
            out.note += f"; {len(trial)} layer(s) kept in float (first/last) to hold damage {d:.4g} <= {max_damage:.4g}"
            return out
    gains: list[tuple[float, str]] = []
    for name in progress.steps(nodes, len(nodes), "int8 sensitivity"):
        alone = quantize_int8(model, batches, exclude=keep + [name], per_channel=per_channel)
        if alone.model is None:
            continue
        gains.append((base - damage(alone.model), name))
    gains.sort(key=lambda g: (-g[0], g[1]))
    excluded: list[str] = list(keep)
    for gain, name in gains:
        if len(excluded) - len(keep) + 1 >= len(nodes):
            # every compute layer float: what is left is Q/DQ around cheap ops, pure overhead
            break
        excluded.append(name)
        out = quantize_int8(model, batches, exclude=excluded, per_channel=per_channel)
        if out.model is None:
            return out
        d = damage(out.model)
        progress.decision(name, f"kept in float (recovers {gain:.4g} alone); damage now {d:.4g}")
        if d <= max_damage:
            out.note += f"; {len(excluded)} layer(s) kept in float to hold damage {d:.4g} <= {max_damage:.4g}"
            return out
    return QuantOutcome(None, reason=f"int8 breaks the budget even with every layer in float "
                        f"(damage {base:.4g} > {max_damage:.4g}); the float plan is kept",
                        excluded=excluded, opset_from=first.opset_from, opset_to=first.opset_to)
