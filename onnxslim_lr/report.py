"""The per-layer report: a terminal table and a JSON document.

The table answers the three questions a deployment engineer asks of every layer: what was
done to it, did it get faster *when measured* (next to what the MAC count promised), and how
much error it introduced, or, if it was left alone, why.
"""

from __future__ import annotations

import json
import math
import platform
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from .manager import CompressResult, LayerResult


def _fmt_macs(n: int) -> str:
    if not n:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_x(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"


def _fmt_measured(r: LayerResult) -> str:
    """Measured layer speedup with its interval (speed.py), e.g. ``1.42x [1.37, 1.48]``."""
    if r.measured is None or r.interval is None:
        return _fmt_x(r.measured)
    return f"{r.measured:.2f}x [{r.interval[0]:.2f}, {r.interval[1]:.2f}]"


def _fmt_err(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2e}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def layer_table(layers: list[LayerResult], width: int = 60) -> str:
    """Fixed-width table, one row per watched node."""
    head = ("node", "op", "status", "method", "params", "MACs", "MACs new", "theory", "measured", "out err", "note")
    rows = []
    for r in layers:
        rows.append((
            _short(r.node, 28), r.op, r.status, r.method or "-", _short(r.params, 22) or "-",
            _fmt_macs(r.macs_before), _fmt_macs(r.macs_after) if r.status == "rewritten" else "-",
            _fmt_x(r.theoretical), _fmt_measured(r), _fmt_err(r.out_error) if r.status == "rewritten" else "-",
            _short(r.reason, width) if r.status != "rewritten"
            else _short("; ".join(x for x in (f"+{_fmt_macs(r.extra_adds)} adds" if r.extra_adds else "", r.reason) if x), width),
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    return "\n".join(out)


def summary_lines(result: CompressResult) -> list[str]:
    """End-to-end figures and notes, below the table."""
    lines = []
    n_rw = len(result.rewritten)
    total_before = sum(r.macs_before for r in result.layers)
    total_after = sum((r.macs_after if r.status == "rewritten" else r.macs_before) for r in result.layers)
    lines.append(
        f"layers: {len(result.layers)} watched, {n_rw} rewritten, "
        f"{sum(r.status == 'kept' for r in result.layers)} kept after measuring, "
        f"{sum(r.status == 'declined' for r in result.layers)} declined"
    )
    if result.folded:
        lines.append(f"folded {result.folded} BatchNormalization/Mul/Add node(s) into convs before decomposing")
    if total_before:
        lines.append(f"MACs of watched layers: {_fmt_macs(total_before)} -> {_fmt_macs(total_after)} "
                     f"({total_before / max(total_after, 1):.2f}x fewer)")
    if result.fidelity:
        f = result.fidelity
        top1 = f" | top-1 agreement {f.top1 * 100:.1f}%" if f.top1 is not None else ""
        lines.append(f"fidelity on {f.samples} sample(s): max rel error {f.worst_rel_error:.2e} | "
                     f"min cosine {f.min_cosine:.6f}{top1}")
    # ---- latency lines (timing.py / speed.py own the format) ----
    for t in (result.timing, result.timing_cuda):
        if t:
            aa = f", A/A {t.aa}" if t.aa is not None else ""
            lines.append(f"latency ({t.header()}): original {t.medians[0] * 1e3:.3f} ms, rewritten "
                         f"{t.medians[1] * 1e3:.3f} ms -> {t.speedup(0, 1)}{aa}")
    lines.extend(result.notes)
    return lines


def environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "providers": ",".join(ort.get_available_providers()),
    }


def to_json(result: CompressResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "changed": result.changed,
        "layers": [r.as_dict() for r in result.layers],
        "folded": result.folded,
        "notes": result.notes,
        "input_shapes": {k: list(v) for k, v in result.feeds_shapes.items()},
        "fidelity": result.fidelity.as_dict() if result.fidelity else None,
        "timing": None,
        "environment": environment(),
    }
    for key, t in (("timing", result.timing), ("timing_cuda", result.timing_cuda)):
        if t:
            doc[key] = {"provider": t.provider, "threads": t.threads, "batch": t.batch, "rounds": t.rounds,
                        "original_ms": t.medians[0] * 1e3, "rewritten_ms": t.medians[1] * 1e3,
                        "speedup": t.ratio(0, 1), "speedup_interval": [t.speedup(0, 1).lo, t.speedup(0, 1).hi],
                        "confidence": t.confidence, "aa": t.aa.as_dict() if t.aa is not None else None}
    doc.update(extra or {})
    return doc


def dumps(doc: dict[str, Any]) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return str(o)

    text = json.dumps(doc, indent=2, default=default, allow_nan=True)
    return text.replace("NaN", "null")
