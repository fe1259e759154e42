"""Per-layer candidate selection: every applicable pass proposes, the checks filter, one wins.

For one node, each selected pass matches it (or declines with a reason) and proposes the
planner's rung of its ladder. Each proposal is built as a one-layer model and compared with
the original layer on the layer's real input (output error; the opset it needs; the MACs it
saves). Then, unless slower rewrites are allowed, all surviving candidates and the original
are timed in one interleaved run: a candidate must be :func:`~onnxslim_lr.guards.
layer_fast_enough`; among those, only candidates whose output error is within
:data:`ERROR_SLACK` times the most accurate one's compete, and the fastest of them wins.
With slower rewrites allowed, the fewest MACs win.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from .graph import BuildFn, Names, constant_value, model_from_graph, single_node_graph
from .guards import layer_error_failure, layer_fast_enough
from .passes.base import Candidate, Decline, Pass, PassContext
from .planning import Budget
from .progress import Progress
from .results import Attempt, LayerResult, Status
from .timing import default_threads, make_session, time_models

log = logging.getLogger(__name__)

#: with several candidates for one layer, only those whose layer output error is within this
#: factor of the most accurate one compete on measured speed
ERROR_SLACK = 1.5


@dataclass(frozen=True)
class LayerChecks:
    """The per-layer settings of the run (a slice of the manager's Options)."""

    allow_slower: bool
    min_speedup: float
    max_layer_error: float | None
    threads: int | None
    skip_nodes: frozenset[str]


#: weights of at least this many elements are decomposed with the run's thread count (VGG-19:
#: a 512-channel 3x3 conv holds 2.4M, fc6 103M); smaller ones on one BLAS thread
PARALLEL_FIT_MIN_WEIGHTS = 1 << 20


def fit_threads(node: gs.Node, threads: int | None) -> int:
    """BLAS threads for decomposing ``node``'s weight: one unless the weight is large.

    Why: most layers are many small-to-medium factorizations, where threads buy little and an
    oversubscribed machine can make them 100x slower; a large layer's fits are a few big
    products and eigendecompositions (n = 4608, F x n x n), which a second core nearly halves.
    ``threads`` is the run's (``--threads``; all cores when unset), the same the runtime uses.
    """
    w = node.inputs[1] if len(node.inputs) > 1 else None
    shape = getattr(w, "shape", None)
    try:
        size = int(np.prod([int(d) for d in shape])) if shape else 0
    except (TypeError, ValueError):  # symbolic dims: not a weight we can size
        size = 0
    if size < PARALLEL_FIT_MIN_WEIGHTS:
        return 1
    return max(1, threads or default_threads())


def original_builder(node: gs.Node) -> BuildFn:
    """Build function reproducing the original node on (x, y), weights inlined as constants."""
    consts = []
    for t in node.inputs[1:]:
        if t is None or not t.name:
            consts.append(None)
            continue
        consts.append(constant_value(t))

    def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
        n = names.scoped(f"{node.name}/orig")
        ins: list[gs.Tensor] = [x]
        for i, v in enumerate(consts):
            ins.append(gs.Variable.empty() if v is None else n.const(f"in{i + 1}", v))
        return [gs.Node(op=node.op, name=n.new("node"), attrs=dict(node.attrs), inputs=ins, outputs=[y])]

    return build


def _rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    den = float(np.linalg.norm(ref.astype(np.float64)))
    num = float(np.linalg.norm(ref.astype(np.float64) - got.astype(np.float64)))
    return num / den if den > 0 else num


def _reject(att: Attempt, reason: str) -> None:
    att.status, att.reason = Status.REJECTED, reason


def applicable_passes(node: gs.Node, pass_list: Sequence[Pass], checks: LayerChecks) -> tuple[list[Pass], str]:
    """The selected passes that handle ``node``, or none and the reason the report shows."""
    if node.name in checks.skip_nodes:
        return [], "skipped by the user"
    applicable = [p for p in pass_list if node.op in p.op_types]
    if applicable:
        return applicable, ""
    if node.op in ("ConvInteger", "QLinearConv"):
        return [], f"{node.op}: already quantized, left as is"
    if node.op == "ConvTranspose":
        return [], "ConvTranspose is not rewritten"
    return [], f"no selected method handles {node.op}"


def select_layer(
    node: gs.Node,
    pass_list: Sequence[Pass],
    ctx: PassContext,
    budget: Budget,
    checks: LayerChecks,
    values: Mapping[str, np.ndarray],
    opset: int,
    progress: Progress,
) -> tuple[LayerResult, Candidate | None]:
    """Try every applicable pass on one node; return its report entry and the winner (or None)."""
    res = LayerResult(node=node.name, op=node.op, status=Status.DECLINED)
    applicable, why = applicable_passes(node, pass_list, checks)
    if why:
        res.reason = why
        return res, None

    x_val = values.get(node.inputs[0].name)
    y_val = values.get(node.outputs[0].name)
    orig_model: onnx.ModelProto | None = None
    cands: list[tuple[Candidate, onnx.ModelProto, Attempt]] = []
    for p in applicable:
        att = Attempt(method=p.name, status=Status.DECLINED)
        res.attempts.append(att)
        site = p.match(node, ctx)
        if isinstance(site, Decline):
            att.reason = site.reason
            continue
        if not res.macs_before:
            res.macs_before = site.macs()
        try:
            with threadpool_limits(limits=fit_threads(node, checks.threads), user_api="blas"):
                cand = p.propose(site, budget, ctx)
        except (ValueError, np.linalg.LinAlgError) as exc:
            att.reason = f"decomposition failed: {exc}"
            continue
        progress.tick(f"{node.name}: {p.name}")
        if isinstance(cand, Decline):
            att.reason = cand.reason
            if cand.rejected:
                att.status = Status.REJECTED
            continue
        att.params, att.macs_after, att.rel_error, att.extra_adds = (
            cand.describe_params(), cand.macs_after, cand.rel_error, cand.extra_adds)
        if not checks.allow_slower and cand.macs_after and cand.macs_before and cand.macs_after >= cand.macs_before:
            _reject(att, f"{cand.describe_params()} saves no MACs ({cand.macs_after:,} >= {cand.macs_before:,})")
            continue
        if cand.min_opset > opset:
            _reject(att, f"needs opset >= {cand.min_opset}, the model has {opset}")
            att.needs_opset = cand.min_opset
            continue
        if x_val is None:
            _reject(att, "layer input was not reached by the sample run")
            continue
        try:
            cand_model = model_from_graph(single_node_graph(cand.build, x_val.shape, max(opset, cand.min_opset)))
            if orig_model is None:
                orig_model = model_from_graph(single_node_graph(original_builder(node), x_val.shape, opset))
            out = make_session(cand_model, threads=checks.threads, optimize=False).run(None, {"x": x_val})[0]
        except Exception as exc:  # a rewrite the runtime refuses is a bug we must not ship
            log.warning("%s: %s candidate failed to run: %s", node.name, p.name, exc)
            _reject(att, f"rewritten layer failed to run: {str(exc).splitlines()[0][:120]}")
            continue
        ref = y_val
        if ref is None or ref.shape != out.shape:
            _reject(att, f"rewritten layer output shape {out.shape} != original {None if ref is None else ref.shape}")
            continue
        att.out_error = _rel_err(ref, out)
        too_big = layer_error_failure(att.out_error, checks.max_layer_error)
        if too_big is not None:
            _reject(att, too_big)
            continue
        att.status = Status.CANDIDATE
        cands.append((cand, cand_model, att))

    if not cands:
        reasons = [f"{a.method}: {a.reason}" for a in res.attempts]
        res.reason = "; ".join(reasons) if len(reasons) > 1 else (res.attempts[0].reason if res.attempts else "")
        if any(a.status == Status.REJECTED for a in res.attempts):
            res.status = Status.KEPT
        return res, None

    if checks.allow_slower:
        # pure MAC model: fewest MACs wins
        best = min(cands, key=lambda c: c[0].macs_after)
    else:
        timing = time_models([orig_model] + [c[1] for c in cands], {"x": x_val},  # type: ignore[list-item]
                             threads=checks.threads, decide_at=checks.min_speedup)
        progress.tick(f"{node.name}: timed")
        passing = []
        shown = {}
        for i, c in enumerate(cands):
            mac_ratio = c[0].macs_before / c[0].macs_after if c[0].macs_after else None
            decision, sp = layer_fast_enough(timing, i + 1, checks.min_speedup, mac_ratio)
            c[2].measured, c[2].interval, shown[c[2].method] = sp.ratio, (sp.lo, sp.hi), sp
            if decision.keep:
                passing.append(c)
            else:
                _reject(c[2], decision.reason)
        if not passing:
            res.status = Status.KEPT
            res.reason = "slower or not surely fast enough when measured: " + ", ".join(
                f"{c[2].method} {shown[c[2].method]}" for c in cands)
            return res, None
        # the fastest wins, among the candidates nearly as accurate as the most accurate one:
        # otherwise an aggressive method (tucker2 at the same rank ratio) wins every layer on
        # speed and the model loses tens of points (measured on the trained VGG)
        best_err = min(c[2].out_error for c in passing)
        close = [c for c in passing if c[2].out_error <= ERROR_SLACK * best_err + 1e-6]
        for c in passing:
            if c not in close:
                _reject(c[2], f"output error {c[2].out_error:.3g} > {ERROR_SLACK:g}x the most accurate "
                              f"candidate's {best_err:.3g}")
        # the surest win: highest lower bound, then highest estimate
        best = max(close, key=lambda c: ((c[2].interval or (0.0, 0.0))[0], c[2].measured or 0))
    cand, _, att = best
    att.status = Status.CHOSEN
    res.status, res.method, res.params = Status.REWRITTEN, cand.method, cand.describe_params()
    res.macs_before, res.macs_after, res.extra_adds = cand.macs_before, cand.macs_after, cand.extra_adds
    res.rel_error, res.out_error, res.measured, res.interval = cand.rel_error, att.out_error, att.measured, att.interval
    res.reason = cand.note
    return res, cand
