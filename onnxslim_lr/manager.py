"""The pass manager: every Conv / Gemm / MatMul is rewritten, or declined with a reason.

The pipeline, in order (each step a phase reported through ``Options.progress``):

1. **fold**: name every node, fold BatchNormalization / constant Mul-Add into convs (fold.py);
2. **probe**: run the model once on a sample batch to learn every layer's real input shape
   and input values (:func:`onnxslim_lr.calibration.probe`);
3. **calibrate**: every pass declares the statistics it needs for the sites it matches
   (``Pass.needs``); the data service gathers them all in one streamed pass over the
   calibration batches (:func:`onnxslim_lr.calibration.gather`) and passes read them through
   ``PassContext.stats``;
4. **plan**: per layer (:func:`onnxslim_lr.selection.select_layer`), each selected pass
   describes a ladder, the planner picks its rung (planning.py), the rewrite is built and
   checked as a one-layer model; among candidates that are fast enough when measured, the
   fastest of those nearly as accurate as the most accurate one wins;
5. **verify**: the chosen rewrites are spliced in as one batch, channel permutations folded,
   the model exported with its IR version and opset kept and verified (checker, runtime load,
   outputs against the original); the fidelity guard backs off rewrite by rewrite while the
   outputs are outside ``--min-top1`` / ``--max-output-error`` (guards.py);
6. **time**: original and rewritten are timed end to end in the same interleaved run; if
   the rewritten model is not faster, the original is returned (never slower), unless the
   user allowed slower models.

A rewrite refused only for the model's opset makes the manager convert the model and run
again (opset.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import passes as passes_pkg
from .budget_search import Contract, SharedModel, Split
from .budgeting import BudgetPlan, int8_baseline, layer_ladders, plan_to_budget, split_batches, split_labels
from .calibration import Request, external_weights, gather, prefix_model, probe
from .errors import InputError, UnsupportedModelError
from .feeds import check_feeds, random_feeds, resolve_shapes
from .fold import fold_into_convs
from .graph import (Names, adopt, copy_graph, default_opset, export_model, import_graph, initializer_bytes,
                    splice_all)
from .guards import E2E_MAX_ROUNDS, fidelity_backoff, model_is_faster
from .opset import convert, needed_opset
from .passes.base import Candidate, Decline, Pass, PassContext, Settings
from .permute import fold_channel_gathers
from .planning import Budget
from .progress import SILENT, Progress
from .quantize import QuantOutcome, quantizable_nodes, quantize_int8
from .reconstruction import Reconstruction, count_samples, reconstruct as reconstruct_rewrites
from .results import Attempt, CompressResult, LayerResult, Status
from .selection import ERROR_SLACK, LayerChecks, original_builder, select_layer
from .timing import cuda_available, make_session, time_models
from .verify import compare_outputs, verify_model

__all__ = ["AUTO_METHODS", "ERROR_SLACK", "WATCHED_OPS", "Attempt", "CompressResult", "LayerResult", "Options",
           "Status", "compress", "name_nodes", "original_builder", "resolve_methods"]

log = logging.getLogger(__name__)

#: synthetic batches the fidelity guard compares on when no calibration data is given
SYNTHETIC_GUARD_BATCHES = 8

#: ops whose nodes are visited and reported (matched, declined or rewritten)
WATCHED_OPS = ("Conv", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "ConvTranspose")

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
    #: where phases, steps and per-layer decisions are reported (silent by default)
    progress: Progress = SILENT
    #: the user's accuracy budget (budget_search.Contract): plan the fastest model within it
    #: instead of applying a rank rule (None: the rank rule of ``budget``)
    contract: Contract | None = None
    #: labels of the calibration samples (row order of ``calib``), for an accuracy contract
    calib_labels: np.ndarray | None = None
    #: labelled eval batches and labels: with an accuracy contract, the labelled pool the
    #: plan is chosen (one half) and verified (the other half) on
    eval_batches: Sequence[Mapping[str, np.ndarray]] | None = None
    eval_labels: np.ndarray | None = None
    #: "int8": static int8 quantization after the plan (planned together under a contract)
    quantize: str = "none"
    #: refit the chosen rewrites from calibration moments (reconstruction.py): "sequential",
    #: "independent" or "none"; None: sequential with calibration data, none without
    reconstruct: str | None = None


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _runtime_accepts(model: onnx.ModelProto) -> bool:
    try:
        make_session(model, threads=1, optimize=False)
        return True
    except Exception:
        return False


def _requests(watched: Sequence[gs.Node], pass_list: Sequence[Pass], ctx: PassContext, settings: Settings
              ) -> list[Request]:
    """What every pass needs for every site it matches, in node order (one streamed pass gathers it)."""
    out: list[Request] = []
    for n in watched:
        for p in pass_list:
            if n.op in p.op_types:
                site = p.match(n, ctx)
                if not isinstance(site, Decline):
                    out.extend(p.needs(site, ctx, settings))
    return out


def _without_data_form(watched: Sequence[gs.Node], pass_list: Sequence[Pass]) -> list[str]:
    """Selected methods that apply here but have no data-aware form."""
    ops = {n.op for n in watched}
    return [p.name for p in pass_list if not p.data_aware and ops & set(p.op_types)]


def apply_rewrites(base: onnx.ModelProto, like: onnx.ModelProto, chosen: Sequence[tuple[str, Candidate]],
                   *, graph: gs.Graph | None = None) -> tuple[onnx.ModelProto, int]:
    """Splice the chosen rewrites into a fresh copy of ``base`` (one batch); fold permutations.

    Rebuilding from ``base`` each time lets the fidelity guard drop a rewrite and try again.
    ``graph``: ``base`` as a graph (the pipeline's, see :func:`onnxslim_lr.graph.adopt`); it
    is copied, not changed, and saves importing ``base`` again. One export per call, two
    when a channel permutation is folded (it reads the channel counts shape inference gives).
    """
    work = copy_graph(graph, base) if graph is not None else import_graph(base)
    nodes = {n.name: n for n in work.nodes}
    names = Names.for_graph(work)
    batch = []
    for name, cand in chosen:
        node = nodes[name]
        batch.append((node, cand.build(node.inputs[0], node.outputs[0], names)))
    splice_all(work, batch)
    new_model = export_model(work, like=like, clean=False)
    # rewrites that emit channels in another order end with a Gather: push each into the
    # neighbouring layers' weights where that is exact (permute.py). It needs channel counts,
    # so it runs on the shape-inferred export's shapes.
    n_perm = 0
    if any(n.op_type == "Gather" for n in new_model.graph.node):
        n_perm = fold_channel_gathers(adopt(work, new_model))
        if n_perm:
            new_model = export_model(work, like=like)
    return new_model, n_perm


def compress(model: onnx.ModelProto, options: Options | None = None) -> CompressResult:
    """Rewrite a model. See the module docstring for the pipeline."""
    options = options or Options()
    progress = options.progress
    pass_list = resolve_methods(options.methods)
    opset = default_opset(model)
    budget = options.budget
    settings = Settings.of(budget)

    progress.phase("fold")
    graph = import_graph(model)
    name_nodes(graph)
    folded = fold_into_convs(graph) if options.fold else 0
    base = export_model(graph, like=model)
    adopt(graph, base)  # the graph is now `base`, as importing it again would give

    # ---- sample input and real per-layer shapes -------------------------------------
    progress.phase("probe")
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
                      sample=values)

    # ---- the data service: what every pass declared, in one streamed pass ---------------
    if budget.metric == "data" and not options.calib:
        raise InputError("--metric data needs calibration data (--calib FILE)")
    if options.reconstruct not in (None, "none") and not options.calib:
        raise InputError(f"--reconstruct {options.reconstruct} needs calibration data (--calib FILE)")
    requests = _requests(watched, pass_list, ctx, settings)
    if requests:
        stats_batches = _fit_batches(options)
        progress.phase("calibrate", f"{len(requests)} statistics" + (
            f" on the fit half ({len(stats_batches)} batches; the other half verifies the plan)"
            if stats_batches is not options.calib else ""))
        ctx.stats = gather(base, stats_batches, requests, threads=options.threads, seed=options.seed)

    # ---- per node: ladder, planner, measure, choose ------------------------------------
    progress.phase("plan", f"{len(watched)} layers")
    checks = LayerChecks(allow_slower=options.allow_slower, min_speedup=options.min_speedup,
                         max_layer_error=options.max_layer_error, threads=options.threads,
                         skip_nodes=frozenset(options.skip_nodes))
    if options.contract is not None:
        return _compress_to_budget(model, base, graph, watched, pass_list, ctx, options, values, opset, sample,
                                   feeds_shapes, folded, checks)
    layers: list[LayerResult] = []
    chosen: list[tuple[str, Candidate]] = []
    for node in progress.steps(watched, len(watched), "plan layer"):
        res, cand = select_layer(node, pass_list, ctx, budget, checks, values, opset, progress)
        layers.append(res)
        progress.decision(node.name, _decision_text(res))
        if cand is not None:
            chosen.append((node.name, cand))
    for owner, inner in _subgraph_nodes(graph):
        layers.append(LayerResult(node=inner.name or inner.op, op=inner.op, status=Status.DECLINED,
                                  reason=f"inside the control-flow subgraph of {owner}: not rewritten"))

    result = CompressResult(model=model, original=model, layers=layers, changed=False, folded=folded,
                            feeds_shapes=feeds_shapes)
    if budget.metric == "data":
        plain = _without_data_form(watched, pass_list)
        if plain:
            note = (f"--metric data: {', '.join(plain)} ha{'s' if len(plain) == 1 else 've'} no data-aware form "
                    "and ran in the Frobenius metric")
            result.notes.append(note)
            progress.warn(note)
    upgraded = _retry_with_upgraded_opset(model, options, layers, opset)
    if upgraded is not None:
        return upgraded
    if not chosen:
        result.notes.append("no layer was worth rewriting: the model is returned unchanged")
        return result

    # ---- reconstruction: refit the chosen rewrites from calibration moments (r13) -------
    chosen = _reconstruct(base, graph, model, chosen, layers, result, options)

    # ---- apply, verify, and back off while the end-to-end fidelity guard fails ----------
    progress.phase("verify", f"{len(chosen)} rewrites")
    # the user's model is the reference, unless the runtime refuses it as written (duplicate
    # node names, say): then the renamed, numerically identical `base` stands in
    reference = model if _runtime_accepts(model) else base
    # without calibration data the guard compares on several synthetic batches, not one
    # (one random sample swung perforation's error from 0.54 to 3.17 between seeds)
    batches = options.calib or [sample] + [random_feeds(model, feeds_shapes, seed=options.seed + 1 + i)
                                           for i in range(SYNTHETIC_GUARD_BATCHES - 1)]
    new_model, n_perm, fidelity, failing = fidelity_backoff(
        chosen, layers, lambda c: apply_rewrites(base, model, c, graph=graph), reference, batches,
        min_top1=options.min_top1, max_output_error=options.max_output_error, threads=options.threads)
    if new_model is None:
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
    if options.quantize == "int8":
        progress.phase("int8", "static int8 quantization of the rewritten model")
        # without a budget to judge a float fallback against, the first layer stays float: it sees
        # the raw input, and on the bundled VGG it alone held int8's whole 0.94-point loss
        # (BENCHMARKS.md, "Accuracy-budget planning and int8": -0.02 pts with it float, same speed)
        first = quantizable_nodes(new_model)[:1]
        q = quantize_int8(new_model, options.calib or [], exclude=first)
        if q.model is None:
            result.notes.append(f"--quantize int8: {q.reason}; the float model is kept")
        else:
            verify_model(q.model)
            result.model, result.quantized = q.model, True
            result.fidelity = compare_outputs(reference, q.model, batches, threads=options.threads)
            result.notes.append(f"--quantize int8: {q.note}" + (
                f"; the first layer ({first[0]}) kept in float: it sees the raw input" if first else ""))
    _time_end_to_end(result, reference, sample, layers, options)
    return result


def _time_end_to_end(result: CompressResult, reference: onnx.ModelProto, sample: Mapping[str, np.ndarray],
                     layers: Sequence[LayerResult], options: Options) -> None:
    """Time original and result in one interleaved run; return the original unless surely faster."""
    progress = options.progress
    new_model, model = result.model, result.original
    if options.end_to_end and result.changed:
        progress.phase("time")
        # with --allow-slower nothing is decided on it: a fixed number of rounds, for the report
        decide = None if options.allow_slower else 1.0
        result.timing = time_models([reference, new_model], sample, threads=options.threads, decide_at=decide,
                                    max_rounds=E2E_MAX_ROUNDS)
        if cuda_available():
            tc = time_models([reference, new_model], sample, provider="CUDAExecutionProvider", decide_at=decide,
                             max_rounds=E2E_MAX_ROUNDS)
            result.timing_cuda = tc if tc.provider == "CUDAExecutionProvider" else None  # never CPU labelled CUDA
        macs_before = sum(r.macs_before for r in layers)
        macs_after = sum(r.macs_after if r.status == Status.REWRITTEN else r.macs_before for r in layers)
        # int8 saves no MACs: the MAC margin guards float rewrites only
        mac_ratio = None if result.quantized else (macs_before / macs_after if macs_after else None)
        decision, _ = model_is_faster(result.timing, mac_ratio)
        if not decision.keep and not options.allow_slower:
            result.notes.append(f"{decision.reason}: returning the original (use --allow-slower to keep it)")
            for r in result.rewritten:
                r.status, r.reason = Status.KEPT, "end-to-end guard: rewritten model was not surely faster"
            result.model, result.changed = model, False


def _verify_on_calib(options: Options) -> bool:
    """Whether the budget path verifies its plan on half of the calibration batches (no --eval pool)."""
    if options.contract is None:
        return False
    return not (options.contract.kind == "accuracy" and options.eval_batches and options.eval_labels is not None)


def _fit_batches(options: Options) -> Sequence[Mapping[str, np.ndarray]]:
    """The calibration batches candidates may be fitted on (statistics, reconstruction).

    Under an accuracy budget verified on calibration samples, only the choose half: a plan is
    never verified on samples its factors were fitted on (the bundled VGG's refits lost every
    held-out comparison while the data metric had seen the verify half).
    """
    if options.calib and _verify_on_calib(options):
        return split_batches(options.calib)[0]
    return options.calib


def _compress_to_budget(model: onnx.ModelProto, base: onnx.ModelProto, graph: gs.Graph, watched: Sequence[gs.Node],
                        pass_list: Sequence[Pass], ctx: PassContext, options: Options,
                        values: Mapping[str, np.ndarray], opset: int, sample: Mapping[str, np.ndarray],
                        feeds_shapes: dict[str, tuple[int, ...]], folded: int, checks: LayerChecks) -> CompressResult:
    """The accuracy-budget path (budgeting.py): ladders, frontier search, held-out check, int8."""
    progress = options.progress
    contract = options.contract
    assert contract is not None
    if not options.calib:
        raise InputError("an accuracy budget needs calibration data (--calib FILE)")
    reference = model if _runtime_accepts(model) else base
    # the data the plan is chosen on and the held-out data it is verified on: never the same
    # (_verify_on_calib decides it, as it decides what the fits may see in _fit_batches)
    if not _verify_on_calib(options):
        pool, labels = list(options.eval_batches), np.asarray(options.eval_labels)
    elif contract.kind != "accuracy":
        pool, labels = list(options.calib), None
    elif options.calib_labels is not None:
        pool, labels = list(options.calib), np.asarray(options.calib_labels)
    else:
        raise InputError("--max-accuracy-drop needs labels: an --eval file with y, or y in the --calib file")
    choose_b, verify_b = split_batches(pool)
    choose_y, verify_y = split_labels(pool, labels) if labels is not None else (None, None)
    # the reference outputs, a large model's weights handed over as buffers (VGG-19: no 575 MB
    # serialization per split); the same graph, so the same numbers
    shared_ref = external_weights(reference) if _weight_bytes(reference) >= SHARED_SCORING_BYTES else None
    ref_model = SharedModel(*shared_ref) if shared_ref is not None else reference
    choose = Split(ref_model, choose_b, choose_y, threads=options.threads)
    verify = Split(ref_model, verify_b, verify_y, threads=options.threads)
    del ref_model, shared_ref
    int8 = None
    if options.quantize == "int8":
        # which layers ship float is settled first: those are priced in float, the rest in int8
        progress.phase("int8 baseline", "which layers int8 alone makes stay float")
        int8 = int8_baseline(base, contract, choose, options.calib, progress, sample=sample, threads=options.threads)
    int8_layers = {n.name for n in watched} - set(int8.excluded) if int8 is not None else set()
    lad = layer_ladders(watched, pass_list, ctx, options.budget, checks, values, opset, progress,
                        int8_layers=int8_layers)
    layers, speed_of, int8_slower = lad.layers, lad.speed_of, lad.int8_slower
    if int8 is not None and int8_slower:
        # int8 would slow these layers down: they ship float in every plan (issue 15: "float
        # where int8 hurts"; on this runtime it hurts speed as well as accuracy)
        int8.excluded = list(dict.fromkeys(int8.excluded + int8_slower))
        int8.slower = list(int8_slower)
        int8.model = None  # plan 0 is re-quantized with the new exclusions
    for owner, inner in _subgraph_nodes(graph):
        layers.append(LayerResult(node=inner.name or inner.op, op=inner.op, status=Status.DECLINED,
                                  reason=f"inside the control-flow subgraph of {owner}: not rewritten"))
    result = CompressResult(model=model, original=model, layers=layers, changed=False, folded=folded,
                            feeds_shapes=feeds_shapes)
    apply = lambda chosen: apply_rewrites(base, model, chosen, graph=graph)[0]  # noqa: E731
    refine, last, skipped = _budget_refine(base, apply, options)
    plan = plan_to_budget(lad.rungs, apply, contract, choose, verify, quantize=options.quantize,
                          quant_batches=options.calib, original=base, refine=refine, int8=int8,
                          apply_scored=_scored_apply(base, model, apply), float_ladders=lad.float_rungs,
                          progress=progress)
    choice_doc, built = None, None
    if plan.model is not None and plan.float_plan is not None:
        plan, choice_doc, built = _combined_or_float(plan, apply, sample, options)
        if not choice_doc["shipped_int8"]:
            speed_of = lad.float_speed_of
            for r in layers:
                r.priced = ""
    result.notes.extend(plan.notes)
    if skipped:
        result.notes.append(skipped)
    elif plan.chosen and last:
        result.notes.append(last[-1].note() + " (every plan the search judged was reconstructed)")
    result.budget = plan.summary(contract)
    if choice_doc is not None:
        result.budget["combined_or_float"] = choice_doc
    # ladders are priced by measured layer latency (seconds), or by MACs with allow_slower
    result.budget["saving_unit"] = "MACs" if checks.allow_slower else "s"
    by_node = {r.node: r for r in layers}
    # timed before the refit: the ladder's own candidates (the refit changes weights, not shapes,
    # and returns new candidate objects, so a lookup by the shipped ones found nothing)
    speed_by_node = {name: speed_of.get(id(o.payload)) for name, o in plan.search.plan.choice.items()} \
        if plan.search is not None else {}
    for name, cand in plan.chosen:
        r = by_node[name]
        sp = speed_by_node.get(name)
        r.status, r.method, r.params = Status.REWRITTEN, cand.method, cand.describe_params()
        r.macs_before, r.macs_after, r.extra_adds, r.rel_error = cand.macs_before, cand.macs_after, cand.extra_adds, cand.rel_error
        r.measured, r.interval = (sp.ratio, (sp.lo, sp.hi)) if sp is not None else (None, None)
        r.reason = cand.note
        progress.decision(name, f"{cand.method} {cand.describe_params()}")
    if not plan.chosen and plan.model is None:
        result.notes.append(plan.search.reason if plan.search and plan.search.reason else
                            "no rewrite fits the accuracy budget: the model is returned unchanged")
        return result
    progress.phase("verify", f"{len(plan.chosen)} rewrites" + (" + int8" if plan.model is not None else ""))
    new_model = plan.model if plan.model is not None else built if built is not None else \
        apply_rewrites(base, model, plan.chosen, graph=graph)[0]
    result.quantized = plan.model is not None
    verify_model(new_model)
    result.fidelity = compare_outputs(reference, new_model, options.calib, threads=options.threads)
    result.model, result.changed = new_model, True
    _time_end_to_end(result, reference, sample, layers, options)
    return result


#: how the budget planner's int8 notes begin, and how they read once the float plan ships instead
INT8_NOTE = "--quantize int8: "
INT8_NOTE_NOT_SHIPPED = "--quantize int8 (the combined plan, which did not ship): "


def _combined_or_float(plan: BudgetPlan, apply: Callable[[Sequence[tuple[str, Candidate]]], onnx.ModelProto],
                       sample: Mapping[str, np.ndarray], options: Options
                       ) -> tuple[BudgetPlan, dict[str, Any], onnx.ModelProto | None]:
    """The combined (low rank + int8) plan or the float plan, whichever is surely faster, the
    report's record of the choice, and the float plan's model when it ships (built to be timed).

    Both fit the budget on held-out samples. They are timed end to end in one interleaved
    run; the float plan ships only when it is surely faster than the combined one (the
    interval's lower bound above 1): the user asked for int8, and where the run cannot tell
    them apart that request stands. On this machine int8 loses on some models outright (the
    zoo ResNet: 0.86x quantized), where the combined plan could only be slower than low
    rank alone.
    """
    assert plan.float_plan is not None and plan.model is not None
    progress = options.progress
    progress.phase("int8 or float", "the combined plan and the float plan timed end to end")
    fmodel = apply(plan.float_plan.chosen)
    t = time_models([plan.model, fmodel], sample, threads=options.threads, decide_at=1.0,
                    max_rounds=E2E_MAX_ROUNDS)
    sp = t.speedup(0, 1)  # float over combined
    use_float = sp.lo > 1.0
    fs, cs = plan.float_plan.search, plan.search
    doc = {"shipped_int8": not use_float, "float_over_combined": [sp.ratio, sp.lo, sp.hi],
           "float_verify_damage": fs.verify_damage if fs is not None else None,
           "combined_verify_damage": cs.verify_damage if cs is not None else plan.quant_verify_damage,
           "float_rewrites": len(plan.float_plan.chosen), "combined_rewrites": len(plan.chosen)}
    how = f"the float plan is {sp.ratio:.2f}x [{sp.lo:.2f}, {sp.hi:.2f}] the speed of the combined plan"
    other = cs if use_float else fs  # the frontier not shipped, for the plot
    if other is not None:
        doc["other"] = "combined plans (int8)" if use_float else "float plans"
        doc["other_frontier"] = [{"saving": p.saving, "choose_damage": p.choose_damage,
                                  "verify_damage": p.verify_damage} for p in other.points]
    if use_float:
        progress.decision("int8", f"{how}: shipping the float plan")
        shipped = plan.float_plan
        # the combined plan's int8 notes describe a model that does not ship: labelled as such
        shipped.notes = [n.replace(INT8_NOTE, INT8_NOTE_NOT_SHIPPED, 1) if n.startswith(INT8_NOTE) else n
                         for n in plan.notes]
        shipped.notes.append(f"{INT8_NOTE}not applied: {how} (both within the budget on held-out samples), so low "
                             "rank alone ships")
        shipped.quant = QuantOutcome(None, reason=f"{how}; low rank alone ships")
        return shipped, doc, fmodel
    progress.decision("int8", f"{how}: the combined plan ships")
    plan.notes.append(f"--quantize int8: {how}; the combined plan ships")
    return plan, doc, None


#: models with at least this many bytes of weights are scored from shared buffers under a
#: budget (:func:`_scored_apply`). Below it a full copy costs little, and the fed weights
#: would cost run time: onnxruntime cannot pre-pack weights it reads as inputs (the bundled
#: VGG, 4.9 MB, planned in 229 s instead of 184 s at one thread with every weight fed)
SHARED_SCORING_BYTES = 64 << 20


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(initializer_bytes(t) for t in model.graph.initializer)


def _scored_apply(base: onnx.ModelProto, like: onnx.ModelProto,
                  apply: Callable[[Sequence[tuple[str, Candidate]]], onnx.ModelProto]
                  ) -> Callable[[Sequence[tuple[str, Candidate]]], onnx.ModelProto | SharedModel]:
    """How the budget search builds the models it only scores: spliced into a weightless copy.

    The search scores a few hundred models (each rung alone, then plans); on VGG-19 each
    full splice exported 575 MB (3 s) and each session serialized it again (7 s). Only for
    models of at least :data:`SHARED_SCORING_BYTES` of weights. Splicing
    into a copy whose large weights are external shells, with the values handed to the
    runtime as shared buffers (:class:`~onnxslim_lr.budget_search.SharedModel`), costs
    neither. A rewrite that needs the weights' values while splicing (a folded channel
    permutation reads its neighbours') falls back to the full splice.
    """
    shared = external_weights(base) if _weight_bytes(base) >= SHARED_SCORING_BYTES else None
    if shared is None:
        return apply
    lite, values = shared
    lite_graph = import_graph(lite)

    def scored(chosen: Sequence[tuple[str, Candidate]]) -> onnx.ModelProto | SharedModel:
        try:
            return SharedModel(apply_rewrites(lite, like, chosen, graph=lite_graph)[0], values)
        except Exception as exc:  # noqa: BLE001 - any failure here has the full splice to fall back on
            log.info("scoring on the full model (%s)", exc)
            return apply(chosen)

    return scored


# ---- reconstruction hooks (r13) ----------------------------------------------------------


def _reconstruct_mode(options: Options) -> str:
    return options.reconstruct or ("sequential" if options.calib else "none")


def _reconstruct(base: onnx.ModelProto, graph: gs.Graph, model: onnx.ModelProto, chosen: list[tuple[str, Candidate]],
                 layers: Sequence[LayerResult], result: CompressResult, options: Options
                 ) -> list[tuple[str, Candidate]]:
    """Refit the rank-rule path's chosen rewrites (reconstruction.py); per-layer outcome in the reason."""
    mode = _reconstruct_mode(options)
    if mode == "none" or not chosen or not options.calib:
        return chosen
    # reconstruction reads only the chosen layers' inputs: the partially rewritten models are
    # built on the part of the network up to the chosen layers (VGG-19: without the 490 MB of
    # classifier weights, which every layer's model used to copy and serialize)
    part = prefix_model(base, [n.output[0] for n in base.graph.node if n.name in dict(chosen)])
    if len(part.graph.node) < len(base.graph.node):
        part_graph = import_graph(part)

        def apply(c: Sequence[tuple[str, Candidate]]) -> onnx.ModelProto:
            return apply_rewrites(part, part, c, graph=part_graph)[0]
    else:
        def apply(c: Sequence[tuple[str, Candidate]]) -> onnx.ModelProto:
            return apply_rewrites(base, model, c, graph=graph)[0]
    rec = reconstruct_rewrites(base, chosen, apply, options.calib, mode=mode,
                               threads=options.threads, seed=options.seed, progress=options.progress)
    by_node = {r.node: r for r in layers}
    for name, cand in rec.chosen:
        r = by_node[name]
        r.reason = cand.note
        r.rel_error = cand.rel_error
    result.notes.append(rec.note())
    return rec.chosen


#: fewest samples the budget path reconstructs from by default: half fit, half check the refit,
#: and below 128 per half the refits of the bundled VGG lost the held-out check (README run:
#: 64 + 64, 0 of 2 refits kept, minutes of search time)
BUDGET_RECONSTRUCT_MIN_SAMPLES = 256


def _budget_refine(base: onnx.ModelProto, apply: Callable[[Sequence[tuple[str, Candidate]]], onnx.ModelProto],
                   options: Options) -> tuple[Callable[[Sequence[tuple[str, Candidate]]], list[tuple[str, Candidate]]]
                                              | None, list[Reconstruction], str]:
    """The budget search's reconstruction: every judged plan refit (sequential by default), with a shared cache.

    Plans along the frontier share most of their layers, and a sequential refit depends only
    on a layer's own choice and the choices before it, so the cache makes each further plan
    cost only the layers after its first difference. The refits are fitted on the fit
    batches (:func:`_fit_batches`): when the plan is verified on calibration samples, those
    never enter a fit. Returns the refine function (None: no reconstruction), the list that
    holds the last call's :class:`Reconstruction` (the shipped plan's, for the report), and
    why reconstruction was skipped by default ("" when it runs or was not asked for).
    """
    mode = options.reconstruct or "sequential"
    if mode == "none" or not options.calib:
        return None, [], ""
    batches = _fit_batches(options)
    samples = count_samples(batches)
    if options.reconstruct is None and samples < BUDGET_RECONSTRUCT_MIN_SAMPLES:
        # too few to fit and hold out: the refits would lose the held-out check and cost minutes
        return None, [], (f"reconstruction skipped under the budget: {samples} calibration samples to fit on, "
                          f"fewer than {BUDGET_RECONSTRUCT_MIN_SAMPLES} (give more, or --reconstruct sequential "
                          "to force it)")
    cache: dict = {}
    log_: list[Reconstruction] = []

    def refine(chosen: Sequence[tuple[str, Candidate]]) -> list[tuple[str, Candidate]]:
        rec = reconstruct_rewrites(base, list(chosen), apply, batches, mode=mode, threads=options.threads,
                                   seed=options.seed, cache=cache)
        log_[:] = [rec]
        return list(rec.chosen)

    return refine, log_, ""


def _decision_text(res: LayerResult) -> str:
    if res.status == Status.REWRITTEN:
        return f"{res.method} {res.params}"
    return f"{res.status}: {res.reason}"


def _retry_with_upgraded_opset(model: onnx.ModelProto, options: Options, layers: list[LayerResult],
                               opset: int) -> CompressResult | None:
    """If a rewrite was refused only for the model's opset, convert the model and run again."""
    if not options.upgrade_opset:
        return None
    needed = needed_opset(layers)
    if needed <= opset:
        return None
    converted = convert(model, needed, layers)
    if converted is None:
        return None
    again = compress(converted, replace(options, upgrade_opset=False))
    again.original = model
    if not again.changed:
        again.model = model
        return again
    again.notes.insert(0, f"opset raised from {opset} to {needed} because a chosen rewrite emits an op that needs it")
    return again
