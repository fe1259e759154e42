"""The pass manager: every Conv / Gemm / MatMul is rewritten, or declined with a reason.

The pipeline, in order:

1. name every node, fold BatchNormalization / constant Mul-Add into convs (fold.py);
2. run the model once on a sample batch to learn every layer's real input shape and input
   values (calibration.probe), and, for the data metric, stream calibration batches to get
   each layer's input statistics;
3. for every candidate node, each selected pass matches it (or declines with a reason) and
   proposes a rewrite; each proposal is built as a one-layer model and compared with the
   original layer on the layer's real input: output error, and (unless ``allow_slower``)
   measured latency. A rewrite is kept only if it beats the original by ``min_speedup``;
   among several passing proposals the fastest wins;
4. the chosen rewrites are spliced in, the model is exported with its IR version and opset
   kept, and verified (checker, runtime load, outputs against the original);
5. end to end, original and rewritten are timed in the same interleaved run; if the
   rewritten model is not faster, the original is returned (never slower), unless the user
   allowed slower models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from . import passes as passes_pkg
from .calibration import PatchStats, probe
from .errors import InputError, UnsupportedModelError
from .feeds import check_feeds, random_feeds, resolve_shapes
from .fold import fold_into_convs
from .graph import MAX_EMITTED_IR, BuildFn, Names, min_ir_for_opset, constant_value, default_opset, export_model, import_graph, model_from_graph, single_node_graph, splice
from .passes.base import Budget, Candidate, Decline, Pass, PassContext
from .permute import fold_channel_gathers
from .speed import layer_decision, model_decision
from .timing import Timing, cuda_available, time_models
from .verify import Fidelity, compare_outputs, verify_model

log = logging.getLogger(__name__)

#: ops whose nodes are visited and reported (matched, declined or rewritten)
WATCHED_OPS = ("Conv", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "ConvTranspose")

#: with several candidates for one layer, only those whose layer output error is within this
#: factor of the most accurate one compete on measured speed
ERROR_SLACK = 1.5

#: passes tried by ``method="auto"`` for each op type, in preference order on ties
AUTO_METHODS = ("svd", "tucker2", "spatial", "fc-svd")


@dataclass
class Options:
    """Everything the pipeline needs besides the model (the CLI builds one of these)."""

    methods: Sequence[str] = ("auto",)
    budget: Budget = field(default_factory=Budget)
    #: keep a rewrite only if the measured layer speedup reaches this
    min_speedup: float = 1.1
    allow_slower: bool = False
    fold: bool = True
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    #: calibration batches (list of feed dicts); the first one is also the probe sample
    calib: Sequence[Mapping[str, np.ndarray]] | None = None
    threads: int | None = None
    #: only these node names are considered (None: all)
    only_nodes: Sequence[str] | None = None
    #: node names never touched
    skip_nodes: Sequence[str] = ()
    #: largest acceptable per-layer output relative error (None: no limit)
    max_layer_error: float | None = None
    #: end-to-end fidelity guard on the calibration (or sample) batches: least top-1 agreement
    #: with the original (classifier outputs) and largest relative output error; rewrites
    #: are dropped, worst layer first, until both hold (None: no limit)
    min_top1: float | None = None
    max_output_error: float | None = None
    #: time the original and rewritten model end to end and fall back if slower
    end_to_end: bool = True
    #: raise the model's opset (onnx.version_converter) when a chosen rewrite emits an op
    #: that needs a newer one; off: such rewrites are rejected with the reason
    upgrade_opset: bool = True
    seed: int = 0
    progress: Callable[[Iterable[Any], int, str], Iterable[Any]] | None = None


@dataclass
class Attempt:
    """One pass's outcome on one node."""

    method: str
    status: str  # "declined" | "rejected" | "candidate"
    reason: str = ""
    params: str = ""
    macs_after: int = 0
    rel_error: float = float("nan")
    out_error: float = float("nan")
    measured: float | None = None
    #: confidence interval of ``measured`` (speed.py), None when not timed
    interval: tuple[float, float] | None = None
    extra_adds: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LayerResult:
    """What happened to one node, for the report."""

    node: str
    op: str
    status: str  # "rewritten" | "kept" | "declined"
    method: str = ""
    params: str = ""
    macs_before: int = 0
    macs_after: int = 0
    extra_adds: int = 0
    rel_error: float = float("nan")
    out_error: float = float("nan")
    measured: float | None = None
    #: confidence interval of ``measured`` (speed.py), None when not timed
    interval: tuple[float, float] | None = None
    reason: str = ""
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def theoretical(self) -> float | None:
        if self.status != "rewritten" or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "attempts"}
        d["theoretical"] = self.theoretical
        d["attempts"] = [a.as_dict() for a in self.attempts]
        return d


@dataclass
class CompressResult:
    """The rewritten model (or the original, when nothing paid off) and how it was obtained."""

    model: onnx.ModelProto
    original: onnx.ModelProto
    layers: list[LayerResult]
    changed: bool
    fidelity: Fidelity | None = None
    timing: Timing | None = None
    #: end-to-end timing on the CUDA provider, when onnxruntime-gpu is installed
    timing_cuda: Timing | None = None
    notes: list[str] = field(default_factory=list)
    folded: int = 0
    feeds_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[LayerResult]:
        return [r for r in self.layers if r.status == "rewritten"]

    @property
    def speedup(self) -> float | None:
        return self.timing.ratio(0, 1) if self.timing else None


# --------------------------------------------------------------------------------------


def resolve_methods(methods: Sequence[str]) -> list[Pass]:
    """Pass instances for the requested method names (``auto`` expands to AUTO_METHODS)."""
    names: list[str] = []
    known = passes_pkg.registry()
    for m in methods:
        names.extend([a for a in AUTO_METHODS if a in known] if m == "auto" else [m])
    out: list[Pass] = []
    for n in dict.fromkeys(names):
        out.append(passes_pkg.get(n))
    if not out:
        raise InputError("no method selected")
    return out


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, non-empty name (reports and re-application use names)."""
    seen: set[str] = set()
    counter = 0
    for node in graph.nodes:
        if not node.name or node.name in seen:
            base = node.name or node.op.lower()
            name = base
            while name in seen:
                counter += 1
                name = f"{base}_{counter}"
            node.name = name
        seen.add(node.name)


def original_builder(node: gs.Node) -> BuildFn:
    """Build function reproducing the original node on (x, y), weights inlined as constants."""
    consts = []
    for t in node.inputs[1:]:
        if t is None or not t.name:
            consts.append(None)
            continue
        v = constant_value(t)
        consts.append(v)

    def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
        n = names.scoped(f"{node.name}/orig")
        ins: list[gs.Tensor] = [x]
        for i, v in enumerate(consts):
            ins.append(gs.Variable.empty() if v is None else n.const(f"in{i + 1}", v))
        return [gs.Node(op=node.op, name=n.new("node"), attrs=dict(node.attrs), inputs=ins, outputs=[y])]

    return build


def _subgraph_nodes(graph: gs.Graph) -> list[tuple[str, gs.Node]]:
    """(owner, node) for watched nodes inside If/Loop/Scan bodies: reported, never rewritten."""
    found: list[tuple[str, gs.Node]] = []
    for node in graph.nodes:
        for v in node.attrs.values():
            subs = v if isinstance(v, list) else [v]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    for inner in sub.nodes:
                        if inner.op in WATCHED_OPS:
                            found.append((node.name, inner))
                    found.extend(_subgraph_nodes(sub))
    return found


def _rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    den = float(np.linalg.norm(ref.astype(np.float64)))
    num = float(np.linalg.norm(ref.astype(np.float64) - got.astype(np.float64)))
    return num / den if den > 0 else num


def compress(model: onnx.ModelProto, options: Options | None = None) -> CompressResult:
    """Rewrite a model. See the module docstring for the pipeline."""
    options = options or Options()
    pass_list = resolve_methods(options.methods)
    opset = default_opset(model)
    budget = options.budget

    graph = import_graph(model)
    name_nodes(graph)
    folded = fold_into_convs(graph) if options.fold else 0
    base = export_model(graph, like=model)
    graph = import_graph(base)  # fresh graph matching `base` exactly

    # ---- sample input and real per-layer shapes -------------------------------------
    if options.calib:
        sample = dict(options.calib[0])
        check_feeds(model, sample)
    else:
        shapes = resolve_shapes(model, options.input_shapes)
        sample = random_feeds(model, shapes, seed=options.seed)
    feeds_shapes = {k: tuple(v.shape) for k, v in sample.items()}

    watched = [n for n in graph.nodes if n.op in WATCHED_OPS]
    if options.only_nodes is not None:
        keep = set(options.only_nodes)
        watched = [n for n in watched if n.name in keep]
    probe_names = []
    for n in watched:
        probe_names.append(n.inputs[0].name)
        probe_names.append(n.outputs[0].name)
    try:
        values = probe(base, sample, probe_names, threads=options.threads)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot run the input model: {_first_line(exc)}") from None
    shapes_seen = {k: tuple(v.shape) for k, v in values.items()}
    ctx = PassContext(opset=opset, shapes=shapes_seen, graph=graph, require_saving=not options.allow_slower,
                      calib=options.calib)

    # ---- data metric: statistics of every matched site, in one streamed pass ----------
    if budget.metric == "data":
        if not options.calib:
            raise InputError("--metric data needs calibration data (--calib FILE)")
        stats = PatchStats(seed=options.seed)
        sites = []
        for n in watched:
            for p in pass_list:
                if n.op in p.op_types:
                    s = p.match(n, ctx)
                    if not isinstance(s, Decline):
                        sites.append(s)
                        break
        stats.collect(base, options.calib, sites, threads=options.threads)
        ctx.stats = stats

    # ---- per node: match, propose, measure, choose ------------------------------------
    layers: list[LayerResult] = []
    chosen: list[tuple[str, Candidate]] = []
    iterator: Iterable[gs.Node] = watched
    if options.progress is not None:
        iterator = options.progress(watched, len(watched), "layers")
    for node in iterator:
        res = _plan_node(node, pass_list, ctx, budget, options, values, opset)
        layers.append(res[0])
        if res[1] is not None:
            chosen.append((node.name, res[1]))
    for owner, inner in _subgraph_nodes(graph):
        layers.append(LayerResult(node=inner.name or inner.op, op=inner.op, status="declined",
                                  reason=f"inside the control-flow subgraph of {owner}: not rewritten"))

    result = CompressResult(model=model, original=model, layers=layers, changed=False, folded=folded,
                            feeds_shapes=feeds_shapes)
    upgraded = _retry_with_upgraded_opset(model, options, layers, opset)
    if upgraded is not None:
        return upgraded
    if not chosen:
        result.notes.append("no layer was worth rewriting: the model is returned unchanged")
        return result

    # ---- apply, verify, and back off while the end-to-end fidelity guard fails ----------
    # the user's model is the reference, unless the runtime refuses it as written (duplicate
    # node names, say): then the renamed, numerically identical `base` stands in
    reference = model if _runtime_accepts(model) else base
    batches = options.calib or [sample]
    by_node = {r.node: r for r in layers}
    guarded = options.min_top1 is not None or options.max_output_error is not None
    cost_of_keeping: dict[str, float] = {}
    if guarded and len(chosen) > 1:
        # each rewrite's end-to-end output error when applied alone, per MAC it saves: the
        # guard drops the most expensive-to-keep rewrite first (a layer's own output error
        # says little about how much the model's output moves)
        for c in chosen:
            alone, _ = _apply(base, model, [c])
            err = compare_outputs(reference, alone, batches, threads=options.threads).worst_rel_error
            r = by_node[c[0]]
            cost_of_keeping[c[0]] = err / max(r.macs_before - r.macs_after, 1)
    while True:
        new_model, n_perm = _apply(base, model, chosen)
        verify_model(new_model)
        fidelity = compare_outputs(reference, new_model, batches, threads=options.threads)
        failing = _fidelity_failure(fidelity, options)
        if failing is None:
            break
        # drop the rewrite that costs the most fidelity per MAC saved, and try again
        worst = max(chosen, key=lambda c: cost_of_keeping.get(c[0], by_node[c[0]].out_error))
        chosen.remove(worst)
        r = by_node[worst[0]]
        r.status, r.reason = "kept", f"fidelity guard: dropped because the model's {failing}"
        if not chosen:
            result.notes.append(f"fidelity guard: every rewrite had to be dropped ({failing}); "
                                "the model is returned unchanged")
            return result
    if n_perm:
        result.notes.append(f"folded {n_perm} channel permutation(s) into neighbouring layers")
    dropped = sum(1 for r in layers if r.reason.startswith("fidelity guard"))
    if dropped:
        result.notes.append(f"fidelity guard: {dropped} rewrite(s) dropped to keep the outputs within the limits")
    result.fidelity = fidelity
    result.model = new_model
    result.changed = True

    if options.end_to_end:
        result.timing = time_models([reference, new_model], sample, threads=options.threads, decide_at=1.0)
        if cuda_available():
            tc = time_models([reference, new_model], sample, provider="CUDAExecutionProvider", decide_at=1.0)
            result.timing_cuda = tc if tc.provider == "CUDAExecutionProvider" else None  # never CPU labelled CUDA
        macs_before = sum(r.macs_before for r in layers)
        macs_after = sum(r.macs_after if r.status == "rewritten" else r.macs_before for r in layers)
        decision = model_decision(result.timing.speedup(0, 1), macs_before / macs_after if macs_after else None)
        if not decision.keep and not options.allow_slower:
            result.notes.append(f"{decision.reason}: returning the original (use --allow-slower to keep it)")
            for r in result.rewritten:
                r.status, r.reason = "kept", "end-to-end guard: rewritten model was not surely faster"
            result.model, result.changed = model, False
    return result


_NEEDS_OPSET = "needs opset >= "


def _apply(base: onnx.ModelProto, like: onnx.ModelProto, chosen: Sequence[tuple[str, Candidate]]
           ) -> tuple[onnx.ModelProto, int]:
    """Splice the chosen rewrites into a fresh copy of ``base``; fold channel permutations.

    Rebuilding from ``base`` each time lets the fidelity guard drop a rewrite and try again.
    """
    graph = import_graph(base)
    nodes = {n.name: n for n in graph.nodes}
    names = Names.for_graph(graph)
    for name, cand in chosen:
        node = nodes[name]
        splice(graph, node, cand.build(node.inputs[0], node.outputs[0], names))
    new_model = export_model(graph, like=like)
    # rewrites that emit channels in another order end with a Gather: push each into the
    # neighbouring layers' weights where that is exact (permute.py). It needs channel counts,
    # so it runs on the shape-inferred export.
    n_perm = 0
    if any(n.op_type == "Gather" for n in new_model.graph.node):
        shaped = import_graph(new_model)
        n_perm = fold_channel_gathers(shaped)
        if n_perm:
            new_model = export_model(shaped, like=like)
    return new_model, n_perm


def _fidelity_failure(fid: Fidelity, options: Options) -> str | None:
    """Why the rewritten model's outputs are outside the user's limits, or None."""
    if options.min_top1 is not None and fid.top1 is not None and fid.top1 < options.min_top1:
        return f"top-1 agreement {fid.top1:.4f} < --min-top1 {options.min_top1:g}"
    if options.max_output_error is not None and fid.worst_rel_error > options.max_output_error:
        return f"output error {fid.worst_rel_error:.3g} > --max-output-error {options.max_output_error:g}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _runtime_accepts(model: onnx.ModelProto) -> bool:
    from .timing import make_session

    try:
        make_session(model, threads=1, optimize=False)
        return True
    except Exception:
        return False


def _retry_with_upgraded_opset(model: onnx.ModelProto, options: Options, layers: list[LayerResult],
                               opset: int) -> CompressResult | None:
    """If a rewrite was refused only for the model's opset, convert the model and run again.

    The opset is raised only this way: when an op a rewrite emits needs it. The converted
    model is verified against the user's original like any other output.
    """
    if not options.upgrade_opset:
        return None
    needed = 0
    for r in layers:
        for a in r.attempts:
            if a.status == "rejected" and a.reason.startswith(_NEEDS_OPSET):
                needed = max(needed, int(a.reason[len(_NEEDS_OPSET):].split()[0].rstrip(",")))
    if needed <= opset:
        return None
    from dataclasses import replace

    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, needed)
        # the converter keeps the old IR version; opsets need a minimum one
        converted.ir_version = max(converted.ir_version, min(min_ir_for_opset(needed), MAX_EMITTED_IR))
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises many types; any failure means "cannot"
        log.warning("could not raise the opset from %d to %d: %s", opset, needed, exc)
        for r in layers:
            for a in r.attempts:
                if a.reason.startswith(_NEEDS_OPSET):
                    a.reason += f" (converting the model failed: {str(exc).splitlines()[0][:80]})"
        return None
    again = compress(converted, replace(options, upgrade_opset=False))
    again.original = model
    if not again.changed:
        again.model = model
        return again
    again.notes.insert(0, f"opset raised from {opset} to {needed} because a chosen rewrite emits an op that needs it")
    return again


def _plan_node(
    node: gs.Node,
    pass_list: Sequence[Pass],
    ctx: PassContext,
    budget: Budget,
    options: Options,
    values: Mapping[str, np.ndarray],
    opset: int,
) -> tuple[LayerResult, Candidate | None]:
    """Try every applicable pass on one node; pick the fastest candidate that passes."""
    res = LayerResult(node=node.name, op=node.op, status="declined")
    if node.name in set(options.skip_nodes):
        res.reason = "skipped by the user"
        return res, None
    applicable = [p for p in pass_list if node.op in p.op_types]
    if not applicable:
        res.reason = f"no selected method handles {node.op}"
        if node.op in ("ConvInteger", "QLinearConv"):
            res.reason = f"{node.op}: already quantized, left as is"
        elif node.op == "ConvTranspose":
            res.reason = "ConvTranspose is not rewritten"
        return res, None

    x_val = values.get(node.inputs[0].name)
    y_val = values.get(node.outputs[0].name)
    orig_model: onnx.ModelProto | None = None
    cands: list[tuple[Candidate, onnx.ModelProto, Attempt]] = []
    for p in applicable:
        att = Attempt(method=p.name, status="declined")
        res.attempts.append(att)
        site = p.match(node, ctx)
        if isinstance(site, Decline):
            att.reason = site.reason
            continue
        if not res.macs_before:
            res.macs_before = site.macs()
        try:
            # one BLAS thread: decompositions are many small-to-medium factorizations, where
            # threads buy little and an oversubscribed machine can make them 100x slower
            with threadpool_limits(limits=1, user_api="blas"):
                cand = p.propose(site, budget, ctx)
        except (ValueError, np.linalg.LinAlgError) as exc:
            att.reason = f"decomposition failed: {exc}"
            continue
        if isinstance(cand, Decline):
            att.reason = cand.reason
            if cand.rejected:
                att.status = "rejected"
            continue
        att.params, att.macs_after, att.rel_error, att.extra_adds = cand.describe_params(), cand.macs_after, cand.rel_error, cand.extra_adds
        if not options.allow_slower and cand.macs_after and cand.macs_before and cand.macs_after >= cand.macs_before:
            att.status, att.reason = "rejected", f"{cand.describe_params()} saves no MACs ({cand.macs_after:,} >= {cand.macs_before:,})"
            continue
        if cand.min_opset > opset:
            att.status, att.reason = "rejected", f"{_NEEDS_OPSET}{cand.min_opset}, the model has {opset}"
            continue
        if x_val is None:
            att.status, att.reason = "rejected", "layer input was not reached by the sample run"
            continue
        try:
            cand_model = model_from_graph(single_node_graph(cand.build, x_val.shape, max(opset, cand.min_opset)))
            if orig_model is None:
                orig_model = model_from_graph(single_node_graph(original_builder(node), x_val.shape, opset))
            from .timing import make_session

            out = make_session(cand_model, threads=options.threads, optimize=False).run(None, {"x": x_val})[0]
        except Exception as exc:  # a rewrite the runtime refuses is a bug we must not ship
            log.warning("%s: %s candidate failed to run: %s", node.name, p.name, exc)
            att.status, att.reason = "rejected", f"rewritten layer failed to run: {str(exc).splitlines()[0][:120]}"
            continue
        ref = y_val
        if ref is None or ref.shape != out.shape:
            att.status, att.reason = "rejected", f"rewritten layer output shape {out.shape} != original {None if ref is None else ref.shape}"
            continue
        att.out_error = _rel_err(ref, out)
        if options.max_layer_error is not None and att.out_error > options.max_layer_error:
            att.status, att.reason = "rejected", f"layer output error {att.out_error:.3g} > --max-layer-error {options.max_layer_error:g}"
            continue
        att.status = "candidate"
        cands.append((cand, cand_model, att))

    if not cands:
        reasons = [f"{a.method}: {a.reason}" for a in res.attempts]
        res.reason = "; ".join(reasons) if len(reasons) > 1 else (res.attempts[0].reason if res.attempts else "")
        if any(a.status == "rejected" for a in res.attempts):
            res.status = "kept"
        return res, None

    if options.allow_slower:
        # pure MAC model: fewest MACs wins
        best = min(cands, key=lambda c: c[0].macs_after)
    else:
        timing = time_models([orig_model] + [c[1] for c in cands], {"x": x_val}, threads=options.threads,  # type: ignore[list-item]
                             decide_at=options.min_speedup)
        shown = {}
        for i, (c, _, att) in enumerate(cands):
            sp = timing.speedup(0, i + 1)
            att.measured, att.interval, shown[att.method] = sp.ratio, (sp.lo, sp.hi), sp
            d = layer_decision(sp, options.min_speedup, c.macs_before / c.macs_after if c.macs_after else None)
            if not d.keep:
                att.status, att.reason = "rejected", d.reason
        passing = [c for c in cands if c[2].status == "candidate"]
        if not passing:
            res.status = "kept"
            res.reason = "slower or not surely fast enough when measured: " + ", ".join(
                f"{c[2].method} {shown[c[2].method]}" for c in cands
            )
            return res, None
        # the fastest wins, among the candidates nearly as accurate as the most accurate one:
        # otherwise an aggressive method (tucker2 at the same rank ratio) wins every layer on
        # speed and the model loses tens of points (measured on the trained VGG)
        best_err = min(c[2].out_error for c in passing)
        close = [c for c in passing if c[2].out_error <= ERROR_SLACK * best_err + 1e-6]
        for c in passing:
            if c not in close:
                c[2].status, c[2].reason = "rejected", (
                    f"output error {c[2].out_error:.3g} > {ERROR_SLACK:g}x the most accurate candidate's {best_err:.3g}")
        best = max(close, key=lambda c: ((c[2].interval or (0.0, 0.0))[0], c[2].measured or 0))
    cand, _, att = best
    att.status = "chosen"
    res.status, res.method, res.params = "rewritten", cand.method, cand.describe_params()
    res.macs_before, res.macs_after, res.extra_adds = cand.macs_before, cand.macs_after, cand.extra_adds
    res.rel_error, res.out_error, res.measured, res.interval = cand.rel_error, att.out_error, att.measured, att.interval
    res.reason = cand.note
    return res, cand
