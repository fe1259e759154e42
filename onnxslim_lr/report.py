"""The per-layer report: a terminal table and a JSON document.

The table answers the three questions a deployment engineer asks of every layer: what was
done to it, did it get faster *when measured* (next to what the MAC count promised), and how
much error it introduced, or, if it was left alone, why.
"""

from __future__ import annotations

import json
import math
import platform
import re
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
    tag = f" ({r.priced})" if r.priced and r.measured is not None else ""
    if r.measured is None or r.interval is None:
        return _fmt_x(r.measured) + tag
    return f"{r.measured:.2f}x [{r.interval[0]:.2f}, {r.interval[1]:.2f}]{tag}"


def _fmt_err(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.2e}"


def layer_table(layers: list[LayerResult]) -> str:
    """Fixed-width table, one row per given layer; nothing is cut (the note is the last column)."""
    head = ("node", "op", "status", "method", "params", "MACs", "MACs new", "theory", "measured", "out err", "note")
    rows = []
    for r in layers:
        rows.append((
            r.node, r.op, r.status, r.method or "-", r.params or "-",
            _fmt_macs(r.macs_before), _fmt_macs(r.macs_after) if r.status == "rewritten" else "-",
            _fmt_x(r.theoretical), _fmt_measured(r), _fmt_err(r.out_error) if r.status == "rewritten" else "-",
            r.reason if r.status != "rewritten"
            else "; ".join(x for x in (f"+{_fmt_macs(r.extra_adds)} adds" if r.extra_adds else "", r.reason) if x),
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ---- why layers were not rewritten, grouped ------------------------------------------------

_NUMBER = re.compile(r"\d[\d,.]*(?:e[-+]?\d+)?x?")


def _decline_text(r: LayerResult) -> str:
    """The reason a layer was declined, once (not repeated per method when all agree)."""
    texts = list(dict.fromkeys(a.reason for a in r.attempts if a.reason))
    if len(texts) == 1:
        return texts[0]
    return r.reason or "; ".join(f"{a.method}: {a.reason}" for a in r.attempts)


def reason_kind(r: LayerResult) -> str:
    """A short, count-able category for a layer that was not rewritten.

    The categories keep apart what the user can act on: no MAC saving at the rank rule (a
    lower energy or rank ratio), slower when measured (batch size, threads), a guard, or a
    method that does not apply to the layer at all (``declined: `` + the reason with its
    numbers blanked, so that 'group=16' and 'group=32' count together).
    """
    reason = r.reason
    if reason.startswith("skipped by the user"):
        return "skipped (--skip)"
    if reason.startswith("fidelity guard"):
        return "dropped by the fidelity guard"
    if reason.startswith("end-to-end guard"):
        return "undone: the rewritten model was not faster end to end"
    if any(a.measured is not None for a in r.attempts) or reason.startswith("slower or not fast enough"):
        return "slower, or not --min-speedup faster, when measured"
    texts = [a.reason for a in r.attempts] or [reason]
    if any("saves no MACs" in t for t in texts):
        return "no MAC saving at the rank rule"
    if any("--max-layer-error" in t for t in texts):
        return "layer error above --max-layer-error"
    if any(t.startswith("needs opset >= ") for t in texts):
        return "needs a newer opset than the model's"
    prefix = "rejected: " if r.status == "kept" else "declined: "
    return prefix + _NUMBER.sub("N", _decline_text(r))


def reason_groups(layers: list[LayerResult]) -> list[tuple[str, list[LayerResult]]]:
    """(category, layers) for every layer not rewritten, largest group first."""
    groups: dict[str, list[LayerResult]] = {}
    for r in layers:
        if r.status != "rewritten":
            groups.setdefault(reason_kind(r), []).append(r)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))


def _kind_text(kind: str, members: list[LayerResult], rule: str) -> str:
    """The category as the user reads it: declines show the first layer's full reason."""
    if kind == "no MAC saving at the rank rule" and rule:
        return f"no MAC saving at {rule}"
    if kind.startswith(("declined: ", "rejected: ")):
        first = _decline_text(members[0])
        same = all(_decline_text(m) == first for m in members)
        return f"{kind.split(':')[0]}, {first}" + ("" if same else " (numbers differ per layer)")
    return kind


def _group_line(kind: str, members: list[LayerResult], rule: str = "") -> str:
    n = len(members)
    examples = ", ".join(_example(r) for r in members[:3]) + (f", and {n - 3} more" if n > 3 else "")
    return f"{n} layer{'s' if n != 1 else ''}: {_kind_text(kind, members, rule)} ({examples})"


def _example(r: LayerResult) -> str:
    timed = [a for a in r.attempts if a.measured is not None]
    if timed:
        return f"{r.node} " + " ".join(f"{a.method} {a.measured:.2f}x" for a in timed)
    return r.node


def report_lines(result: CompressResult, *, full: bool = False, rule: str = "") -> list[str]:
    """The report: the rewritten layers (every layer with ``full``), then one line per reason
    a layer was left alone, with counts, then the end-to-end figures."""
    lines: list[str] = []
    if full:
        lines.append(layer_table(result.layers))
    elif result.rewritten:
        lines.append(f"rewritten layers ({len(result.rewritten)} of {len(result.layers)}):")
        lines.append(layer_table(result.rewritten))
    groups = reason_groups(result.layers)
    if groups and not full:
        if lines:
            lines.append("")
        n = sum(len(m) for _, m in groups)
        lines.append(f"not rewritten ({n} of {len(result.layers)}; -v or --report for every layer):")
        lines += ["  " + _group_line(kind, members, rule) for kind, members in groups]
    lines.append("")
    lines += summary_lines(result)
    if not result.changed:
        lines.append("the model is returned unchanged")
    return lines


def summary_lines(result: CompressResult) -> list[str]:
    """End-to-end figures and notes, below the table."""
    lines = []
    n_rw = len(result.rewritten)
    total_before = sum(r.macs_before for r in result.layers)
    total_after = sum((r.macs_after if r.status == "rewritten" else r.macs_before) for r in result.layers)
    n_decl = sum(r.status == "declined" for r in result.layers)
    n_timed = sum(r.status != "rewritten" and any(a.measured is not None for a in r.attempts) for r in result.layers)
    lines.append(
        f"layers: {len(result.layers)} watched, {n_rw} rewritten, {n_timed} kept after measuring, "
        f"{len(result.layers) - n_rw - n_timed - n_decl} rejected before measuring, {n_decl} declined"
    )
    if result.folded:
        lines.append(f"folded {result.folded} BatchNormalization/Mul/Add node(s) into convs before decomposing")
    if total_before:
        if total_after < total_before:
            ratio = total_before / max(total_after, 1)
            gain = f"{ratio:.2f}x fewer" if ratio >= 1.005 else f"{(1 - total_after / total_before) * 100:.2g}% fewer"
            lines.append(f"MACs of watched layers: {_fmt_macs(total_before)} -> {_fmt_macs(total_after)} ({gain})")
        else:
            lines.append(f"MACs of watched layers: {_fmt_macs(total_before)} (unchanged)")
    if result.fidelity and result.changed:
        # no fidelity line for a rewrite that was then thrown away (end-to-end guard)
        f = result.fidelity
        source = getattr(result, "fidelity_source", "") or f"{f.samples} sample(s)"
        top1 = f" | top-1 agreement {f.top1 * 100:.1f}%" if f.top1 is not None else ""
        lines.append(f"fidelity on {source}: max rel error {f.worst_rel_error:.2e} | "
                     f"min cosine {f.min_cosine:.6f}{top1}")
    # ---- latency lines (timing.py / speed.py own the format) ----
    for t in (result.timing, result.timing_cuda):
        if t:
            aa = f", A/A {t.aa}" if t.aa is not None else ""
            lines.append(f"latency ({t.header()}): original {t.medians[0] * 1e3:.3f} ms, rewritten "
                         f"{t.medians[1] * 1e3:.3f} ms -> {t.speedup(0, 1)}{aa}")
    lines += budget_lines(getattr(result, "budget", None))
    lines.extend(n for n in result.notes if not n.startswith(_NOTHING_NOTE))
    return lines


_CONTRACT_TEXT = {"accuracy": "top-1 drop <= {:g} pts", "agreement": "top-1 agreement >= {:g}",
                  "output_error": "relative output error <= {:g}"}


def contract_text(contract: Any) -> str:
    """The user's contract in words, e.g. ``top-1 drop <= 0.5 pts``."""
    if not isinstance(contract, dict):
        return str(contract)
    kind, limit = contract.get("kind"), contract.get("limit")
    tmpl = _CONTRACT_TEXT.get(str(kind))
    if tmpl is None or not isinstance(limit, (int, float)):
        return f"{kind} {limit}"
    return tmpl.format(limit)


def _dmg(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _saving(v: Any, unit: Any) -> str:
    """A frontier saving in its unit: measured layer latency (shown in ms) or MACs."""
    if not isinstance(v, (int, float)):
        return "-"
    if unit == "s":
        return f"{v * 1e3:.3g} ms of layer latency"
    if unit == "MACs":
        return f"{_fmt_macs(int(v))} MACs"
    return f"{v:.3g}"


def budget_lines(budget: dict[str, Any] | None) -> list[str]:
    """The accuracy-budget block: what the user asked, what the planner predicted, what the
    held-out half measured (and on how many samples), where on the frontier the chosen plan
    sits, and whether int8 was applied. Shown so the user can judge the plan against the
    contract without rerunning it, and see how much room the frontier had left."""
    if not budget:
        return []
    lines = [f"accuracy budget: {contract_text(budget.get('contract'))}"]
    frontier = budget.get("frontier") or []
    if frontier or budget.get("chosen_index") is not None:
        n = budget.get("samples") or {}
        lines.append(f"  damage: predicted {_dmg(budget.get('predicted_proxy'))} (proxy: sum of per-layer KL/squared error), "
                     f"measured {_dmg(budget.get('choose_damage'))} on {n.get('choose', '?')} choose samples, "
                     f"verified {_dmg(budget.get('verify_damage'))} on {n.get('verify', '?')} held-out samples")
        if budget.get("sensitivity"):
            lines.append(f"  sensitivity: {budget['sensitivity']}")
        idx = budget.get("chosen_index")
        lines.append(f"  frontier: {len(frontier)} plan(s) explored, chosen plan {idx}"
                     + (f" of 0..{len(frontier) - 1}" if frontier else "")
                     + (f" (saving {_saving(budget['saving'], budget.get('saving_unit'))})"
                        if isinstance(budget.get("saving"), (int, float)) else "")
                     + ("" if budget.get("ok", True) else " -- the budget could not be met"))
        # what one more step along the frontier would have cost: 'what 1 point more buys'
        if isinstance(idx, int) and 0 <= idx < len(frontier) - 1:
            nxt = frontier[idx + 1]
            lines.append(f"  next plan ({idx + 1}): saving {_saving(nxt.get('saving'), budget.get('saving_unit'))}, "
                         f"predicted damage "
                         f"{_dmg(nxt.get('predicted_proxy'))}"
                         + (f", measured {_dmg(nxt.get('choose_damage'))}" if nxt.get("choose_damage") is not None else ""))
    if budget.get("reason"):
        if budget.get("quantized"):  # int8 accuracy control rescued a plan the frontier could not give
            lines.append("  no low-rank plan fits the budget once quantized; int8 alone, with the layers it "
                         "hurts most kept in float, does")
        else:
            lines.append(f"  {budget['reason']}")
    cf = budget.get("combined_or_float")
    if cf:
        r, lo, hi = cf["float_over_combined"]
        lines.append(f"  int8 or float: the float plan ({cf['float_rewrites']} rewrites, verified "
                     f"{_dmg(cf.get('float_verify_damage'))}) ran {r:.2f}x [{lo:.2f}, {hi:.2f}] the speed of the "
                     f"combined plan ({cf['combined_rewrites']} rewrites + int8, verified "
                     f"{_dmg(cf.get('combined_verify_damage'))}): "
                     + ("the combined plan ships" if cf["shipped_int8"] else "the float plan ships"))
    q = budget.get("int8")
    if q is not None or budget.get("quantized"):
        q = q or {}
        if budget.get("quantized"):
            kept = q.get("excluded") or []
            status = "applied" + (f", {len(kept)} layer(s) kept in float ({', '.join(kept[:4])}"
                                  + (", ..." if len(kept) > 4 else "") + ")" if kept else ", every layer quantized")
            if q.get("verify_damage") is not None:
                status += f"; verified damage {_dmg(q['verify_damage'])} on held-out samples"
        else:
            status = "not applied" + (f": {q['reason']}" if q.get("reason") else "")
        lines.append(f"  int8: {status}")
    return lines


#: below these, the fidelity line comes with a warning
MIN_TOP1 = 0.90
MIN_COSINE = 0.90


def fidelity_warnings(fid: Any, source: str) -> list[str]:
    """Warnings for a fidelity far from the original's outputs (top-1 < 90 %, cosine < 0.9)."""
    out = []
    if fid.top1 is not None and fid.top1 < MIN_TOP1:
        out.append(f"top-1 agreement with the original is {fid.top1 * 100:.1f}% on {source} (< {MIN_TOP1:.0%}): "
                   "the rewritten model often predicts differently; check accuracy with --eval, or use "
                   "--min-top1 / a higher --energy")
    if fid.min_cosine < MIN_COSINE:
        out.append(f"output cosine similarity with the original is {fid.min_cosine:.3f} on {source} (< {MIN_COSINE:g}): "
                   "the outputs moved a lot; check with --eval, or use --max-output-error / a higher --energy")
    return out


#: the manager's closing note for an unchanged model; the reasons lines replace it
_NOTHING_NOTE = "no layer was worth rewriting"


def exit3_lines(result: CompressResult, *, argv_hint: str, calib_given: bool, rule: str,
                lower_rule: str | None = None) -> list[str]:
    """Why nothing was rewritten, per count, and the next command to try (exit status 3)."""
    groups = reason_groups(result.layers)
    short: dict[str, int] = {}
    for k, m in groups:
        text = k
        if k == "no MAC saving at the rank rule":
            text = f"no MAC saving at {rule}"
        elif k.startswith("declined: "):
            text = "no selected method applies (declined)"
        elif k.startswith("rejected: "):
            text = "rejected"
        short[text] = short.get(text, 0) + len(m)
    counts = "; ".join(f"{n} layer{'s' if n != 1 else ''}: {text}" for text, n in short.items())
    lines = ["", f"nothing was worth rewriting ({counts or 'no Conv/Gemm/MatMul layer found'})"]
    kinds = {k for k, _ in groups}
    tries = []
    if not calib_given:
        tries.append(f"{argv_hint} --calib CALIB.npz   (ranks fitted to your data: the largest gain)")
    if "no MAC saving at the rank rule" in kinds:
        if lower_rule:
            tries.append(f"{argv_hint} {lower_rule} --eval TEST.npz   (more compression, more error: check accuracy)")
    if "slower, or not --min-speedup faster, when measured" in kinds:
        tries.append(f"{argv_hint} --input-shape NAME:BATCHxCxHxW   (time at the batch you deploy with; "
                     "small layers at batch 1 rarely pay off)")
    if not tries:
        tries.append("onnx-lowrank methods   (other methods, e.g. -m cp or -m structured, apply to other layers)")
    lines.append("try next: " + tries[0])
    lines += ["      or: " + t for t in tries[1:]]
    return lines


# ---- the plot --------------------------------------------------------------------------


def require_matplotlib() -> None:
    """Fail early, in one line, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from .errors import InputError

        raise InputError("--plot needs matplotlib: pip install 'onnxslim_lr[plot]' (or pip install matplotlib)") from None


def plot_layers(result: CompressResult, path: str) -> None:
    """:func:`plot_png`, written atomically to ``path``."""
    from .modelio import write_atomic

    write_atomic(path, plot_png(result))


def plot_png(result: CompressResult) -> bytes:
    """Per-layer MACs before and after (log scale) and the measured layer speedups, as PNG bytes
    (layers in graph order); the CLI writes it with its other outputs, all or none."""
    require_matplotlib()
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r for r in result.layers if r.macs_before]
    names = [r.node for r in layers]
    x = np.arange(len(layers))
    before = np.array([r.macs_before for r in layers], dtype=float)
    after = np.array([r.macs_after if r.status == "rewritten" else r.macs_before for r in layers], dtype=float)
    measured = [r.measured if r.status == "rewritten" and r.measured else np.nan for r in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(layers) + 2), 7), sharex=True)
    ax1.bar(x - 0.2, before, 0.4, label="original")
    ax1.bar(x + 0.2, after, 0.4, label="rewritten")
    ax1.set_yscale("log")
    ax1.set_ylabel("MACs per inference")
    ax1.legend()
    total_b, total_a = before.sum(), after.sum()
    ax1.set_title(f"MACs {_fmt_macs(int(total_b))} -> {_fmt_macs(int(total_a))}"
                  + (f" ({total_b / total_a:.2f}x fewer)" if total_a < total_b else " (unchanged)"))
    ax2.bar(x, measured, 0.6, color="tab:green")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylabel("measured layer speedup (x)")
    ax2.set_xticks(x)
    ax2.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    budget = getattr(result, "budget", None)
    if budget and budget.get("frontier"):
        # the frontier goes in a second figure stacked below the per-layer one: the two have
        # different x axes (layers vs saving), and one PNG keeps --plot a single file
        fig2 = plot_frontier(budget, quantized=bool(getattr(result, "quantized", False)))
        return _stack_png([fig, fig2])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_frontier(budget: dict[str, Any], *, quantized: bool = False) -> Any:
    """The accuracy-budget frontier as a matplotlib figure: predicted damage against latency
    saved for every plan explored, the damages measured on the choose split and on the
    held-out split, the chosen plan, the original (no saving, no damage) and the budget.

    With int8, the plans were judged quantized, so the original point is int8 alone; the
    measured plans of the kind that did not ship (float or combined, ``combined_or_float``)
    are drawn beside them, so the user sees what the other route would have given."""
    import matplotlib.pyplot as plt

    pts = budget.get("frontier") or []
    contract = budget.get("contract") or {}
    kind, limit = contract.get("kind"), contract.get("limit")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # the predicted damage is the planner's smooth proxy (KL or squared error, summed over the
    # layers), not in the contract's units: it gets its own axis on the right
    px = ax.twinx()
    px.plot([p["saving"] for p in pts], [p["predicted_proxy"] for p in pts], "-", lw=1, color="tab:blue",
            alpha=0.7, label="predicted (proxy, right axis)")
    px.set_ylabel("predicted damage (proxy)", color="tab:blue")
    ch = [p for p in pts if p.get("choose_damage") is not None]
    ax.plot([p["saving"] for p in ch], [p["choose_damage"] for p in ch], "o", mfc="none", color="tab:orange",
            label="measured (choose split)")
    ver = [p for p in pts if p.get("verify_damage") is not None]
    ax.plot([p["saving"] for p in ver], [p["verify_damage"] for p in ver], "s", color="tab:green",
            label="verified (held-out split)")
    cf = budget.get("combined_or_float") or {}
    other = [p for p in cf.get("other_frontier") or []
             if p.get("verify_damage") is not None or p.get("choose_damage") is not None]
    if other:  # under int8, the plans of the kind that did not ship (measured points only)
        ax.plot([p["saving"] for p in other],
                [p["verify_damage"] if p.get("verify_damage") is not None else p["choose_damage"] for p in other],
                "x", color="grey", label=f"{cf.get('other', 'other plans')} (measured)")
    idx = budget.get("chosen_index")
    if isinstance(idx, int) and 0 <= idx < len(pts):
        p = pts[idx]
        y = next((p[k] for k in ("verify_damage", "choose_damage") if p.get(k) is not None), 0.0)
        ax.plot([p["saving"]], [y], "*", ms=16, color="tab:red", mec="k", label=f"chosen (plan {idx})")
    ax.plot([0.0], [0.0], "P", ms=10, color="tab:purple" if quantized else "k",
            label="int8 alone (plan 0)" if quantized else "original")
    unit_x = budget.get("saving_unit")
    scale = 1e3 if unit_x == "s" else 1.0  # seconds shown as ms
    for a in (ax, px):
        for line in a.lines:
            line.set_xdata(np.asarray(line.get_xdata(), dtype=float) * scale)
        a.relim()
        a.autoscale_view()
    if isinstance(limit, (int, float)):
        ax.axhline(1.0 - limit if kind == "agreement" else limit, color="grey", ls="--", lw=0.8, label="budget")
    unit = {"accuracy": "top-1 drop (points)", "agreement": "1 - top-1 agreement",
            "output_error": "relative output error"}.get(str(kind), str(kind))
    ax.set_xlabel("layer latency saved (ms, lower bound of the measured intervals)" if unit_x == "s" else
                  "MACs saved (--allow-slower: MACs stand in for latency)" if unit_x == "MACs" else "saving")
    ax.set_ylabel(f"measured damage: {unit}")
    ax.set_title("accuracy budget: " + contract_text(contract), fontsize=10)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = px.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8)
    fig.tight_layout()
    return fig


def _stack_png(figs: list[Any]) -> bytes:
    """Several figures rendered and stacked vertically into one PNG (white padding)."""
    import io

    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    arrays = []
    for f in figs:
        buf = io.BytesIO()
        f.savefig(buf, format="png", dpi=100)
        plt.close(f)
        buf.seek(0)
        arrays.append(mpimg.imread(buf, format="png"))
    width = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=1.0) for a in arrays]
    out = io.BytesIO()
    mpimg.imsave(out, np.concatenate(padded, axis=0), format="png")
    return out.getvalue()


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
        "budget": result.budget,
        "quantized": result.quantized,
        "input_shapes": {k: list(v) for k, v in result.feeds_shapes.items()},
        "fidelity": result.fidelity.as_dict() if result.fidelity and result.changed else None,
        "fidelity_source": getattr(result, "fidelity_source", "") if result.changed else "",
        "timing": None,
        "environment": environment(),
    }
    for key, t in (("timing", result.timing), ("timing_cuda", result.timing_cuda)):
        if t:
            doc[key] = {"provider": t.provider, "threads": t.threads, "batch": t.batch, "rounds": t.rounds,
                        "original_ms": t.medians[0] * 1e3, "rewritten_ms": t.medians[1] * 1e3,
                        "speedup": t.ratio(0, 1), "speedup_interval": [t.speedup(0, 1).lo, t.speedup(0, 1).hi],
                        "confidence": t.confidence, "aa": t.aa.as_dict() if t.aa is not None else None}
    budget = getattr(result, "budget", None)
    if budget:
        doc["budget"] = budget
    doc["quantized"] = bool(getattr(result, "quantized", False))
    doc.update(extra or {})
    return doc


def dumps(doc: dict[str, Any]) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        return str(o)

    text = json.dumps(doc, indent=2, default=default, allow_nan=True)
    return text.replace("NaN", "null")
