"""Planning to the user's accuracy budget inside the pipeline: ladders, timing, search, int8.

The rank rules (``--rank-ratio`` and friends) pick one rung per layer without knowing what
it costs the model or what it buys in latency. With an accuracy budget
(:class:`~onnxslim_lr.budget_search.Contract`) the pipeline instead:

1. asks every selected pass for its ladder on every layer and builds the rungs at
   :data:`RATIOS` of full rank (methods without a ladder contribute their one proposal);
2. times every rung of a layer against the original layer in ONE interleaved run (with the
   A/A control of :mod:`onnxslim_lr.timing`), and prices a rung by the latency it saves at
   the *lower bound* of its interval (a rung that is not surely faster saves nothing and is
   dropped; with ``allow_slower`` the MACs saved stand in for latency);
3. hands the ladders to :func:`onnxslim_lr.budget_search.search`, which measures each rung's
   damage alone, walks the Lagrangian frontier, evaluates plans for real on the choose
   split and verifies the chosen one on held-out samples, backing off until it holds; every
   judged plan is first refined by the manager's reconstruction (``refine``), so the budget
   is spent on what the refit leaves of each rung's damage;
4. with ``--quantize int8`` the plans the search evaluates are quantized first
   (:mod:`onnxslim_lr.quantize`), so the budget covers the combined model; when int8 breaks
   the budget even on the original, layers are kept in float (most damaging first).

With ``--quantize int8`` the rungs are also *priced* quantized (step 2): the layers that
will ship in int8 have their original and every rung quantized alone (QDQ, the layer's own
input as calibration) and timed that way, so a rung saves what it saves against the int8
layer it replaces. The landscape differs from float: onnxruntime's integer kernels speed a
dense conv up more than a chain of thin ones, whose every stage pays a requantization, so a
rung that is faster in float can be slower than the int8 original and is then not offered.
Which layers stay float is settled first (:func:`int8_baseline`) so those are priced in
float.

int8 does not pay on every runtime: on this machine onnxruntime's int8 ResNet ran 0.86x the
float one, and a combined plan there can only be slower than low rank alone. So with
``--quantize int8`` the int8-priced layers are timed in float too, the best float plan is
searched beside the combined one (on the same per-rung sensitivities: a rung alone is
judged in float either way), and :attr:`BudgetPlan.float_plan` carries it to the manager,
which times both end to end and ships the combined plan unless the float one is surely
faster.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from .budget_search import Contract, Rung, SearchResult, SharedModel, Split, rung_damages, search
from .graph import model_from_graph, single_node_graph
from .passes.base import Candidate, Decline, Pass, PassContext, Settings
from .planning import Budget, Declined, choose
from .progress import Progress
from .reconstruction import split_samples
from .quantize import QuantOutcome, quantizable_nodes, quantize_int8, quantize_with_budget
from .results import Attempt, LayerResult, Status
from .selection import LayerChecks, applicable_passes, fit_threads, original_builder
from .timing import ModelSession, make_session, time_models

log = logging.getLogger(__name__)

#: the rungs of every ladder the budget planner considers, as fractions of full rank
RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625)
#: share of the accuracy budget int8 alone may spend before layers are kept in float in every plan
INT8_SHARE = 0.5
#: wall-clock cap of one layer's ladder timing run (the adaptive rounds stop there)
LADDER_TIMING_S = 6.0


@dataclass
class BudgetPlan:
    """What the budget planner decided, for the manager and the report."""

    chosen: list[tuple[str, Candidate]]
    search: SearchResult | None
    quant: QuantOutcome | None = None
    model: onnx.ModelProto | None = None
    notes: list[str] = field(default_factory=list)
    #: held-out damage of the int8 accuracy-control model (when int8 alone broke the budget)
    quant_verify_damage: float | None = None
    #: under int8, the best float plan within the budget (searched on float prices), which the
    #: caller times against the combined plan
    float_plan: BudgetPlan | None = None

    def summary(self, contract: Contract) -> dict[str, Any]:
        """The plan for the report: the contract, damages predicted and measured, the frontier."""
        res = self.search
        doc: dict[str, Any] = {"contract": {"kind": contract.kind, "limit": contract.limit},
                               "quantized": self.model is not None}
        if res is not None:
            doc.update({
                "chosen_index": res.index, "ok": res.ok, "reason": res.reason,
                "predicted_proxy": res.plan.damage, "choose_damage": res.choose_damage,
                "verify_damage": res.verify_damage, "saving": res.plan.saving,
                "frontier": [{"index": p.index, "saving": p.saving, "predicted_proxy": p.predicted,
                              "choose_damage": p.choose_damage, "verify_damage": p.verify_damage}
                             for p in res.points],
                "samples": {"choose": res.choose_samples, "verify": res.verify_samples},
                "sensitivity": res.sensitivity_how,
            })
        if self.quant is not None:
            doc["int8"] = {"reason": self.quant.reason, "excluded": self.quant.excluded}
            if self.quant_verify_damage is not None:
                doc["int8"]["verify_damage"] = self.quant_verify_damage
        return doc


def _rungs_of(node: gs.Node, p: Pass, ctx: PassContext, budget: Budget, att: Attempt,
              threads: int | None = None) -> list[Candidate]:
    """The candidates of one pass on one node: the ladder at RATIOS, or its single proposal."""
    site = p.match(node, ctx)
    if isinstance(site, Decline):
        att.reason = site.reason
        return []
    settings = Settings.of(budget)
    out: list[Candidate] = []
    with threadpool_limits(limits=fit_threads(node, threads), user_api="blas"):
        try:
            ladder = p.ladder(site, ctx, settings)
        except NotImplementedError:
            cand = p.propose(site, budget, ctx)
            if isinstance(cand, Candidate):
                out.append(cand)
            else:
                att.reason = cand.reason
            return out
        if isinstance(ladder, Decline):
            att.reason = ladder.reason
            return out
        seen: set[tuple[int, ...]] = set()
        # the largest rung first: fitters form their rank-nested products once at the largest
        # rank and slice them for the smaller ones (spatial's products with Sigma)
        for r in sorted(RATIOS, reverse=True):
            try:
                sizes = choose(ladder, Budget(rank_ratio=r, metric=budget.metric, options=budget.options,
                                              seed=budget.seed))
            except Declined:
                continue
            if sizes in seen:
                continue
            seen.add(sizes)
            try:
                cand = ladder.build(sizes)
            except (ValueError, np.linalg.LinAlgError) as exc:
                log.info("%s %s %s: %s", node.name, p.name, sizes, exc)
                continue
            if isinstance(cand, Candidate):
                out.append(cand)
    if not out and not att.reason:
        att.reason = "no rung of the ladder saves MACs"
    return out[::-1]


@dataclass
class Int8Baseline:
    """What int8 alone settles before the ladders are priced: which layers stay float.

    ``keep_float``: the first layer (it sees the raw input), float in every plan.
    ``excluded``: those plus the layers int8 hurt most, when int8 alone spent more than
    :data:`INT8_SHARE` of the budget, and the layers it would slow down (``slower``, added
    once :func:`layer_ladders` has timed them). ``model``: the original quantized with
    exactly these exclusions (plan 0 of the search), None when not (yet) built.
    """

    keep_float: list[str]
    excluded: list[str]
    model: onnx.ModelProto | None = None
    #: layers kept float because int8 was not surely faster there (measured by the ladders)
    slower: list[str] = field(default_factory=list)


def int8_baseline(original: onnx.ModelProto, contract: Contract, choose_split: Split,
                  quant_batches: Sequence[Mapping[str, np.ndarray]], progress: Progress, *,
                  sample: Mapping[str, np.ndarray] | None = None, threads: int | None = None) -> Int8Baseline:
    """The layers every ``--quantize int8`` plan keeps in float, decided on the choose split.

    Why before the ladders: a layer that ships float must be priced in float, and one that
    ships int8 priced in int8 (the module docstring); the exclusions used to be decided only
    after every rung had been priced in float.

    The first layer stays float unless that is measured to cost speed (:func:`_first_layer_float`).
    """
    keep_float, known = _first_layer_float(original, quant_batches, progress, sample, threads)
    # int8 alone may spend at most INT8_SHARE of the budget, or low rank has nothing left:
    # keep the layers int8 hurts most in float in every judged plan (NNCF-style control)
    q0 = quantize_with_budget(original, quant_batches, lambda m: contract.damage(choose_split.score(m)),
                              contract.max_damage * INT8_SHARE, keep_float=keep_float, progress=progress,
                              known=known)
    if q0.model is None:
        return Int8Baseline(keep_float=list(keep_float), excluded=list(keep_float))
    return Int8Baseline(keep_float=list(keep_float), excluded=list(q0.excluded), model=q0.model)


#: keeping the first layer float is given up when quantizing it too is surely this much faster
FIRST_LAYER_INT8_GAIN = 1.1
#: wall-clock cap of the timing run that settles it
FIRST_LAYER_TIMING_S = 10.0


def _first_layer_float(original: onnx.ModelProto, quant_batches: Sequence[Mapping[str, np.ndarray]],
                       progress: Progress, sample: Mapping[str, np.ndarray] | None, threads: int | None
                       ) -> tuple[list[str], dict[tuple[str, ...], QuantOutcome]]:
    """``[first layer]`` when every int8 plan should keep it float, else ``[]``; and the two
    quantizations timed to decide it, by exclusion list, for the accuracy control to reuse.

    Why float by default: the first layer sees the raw input, and on the bundled VGG int8 lost
    0.94 pts on the test set with it quantized, 0.02 with it float, at the same speed, while
    a 1000-image choose split saw no loss at all, so the accuracy control could not have
    found it. Why not always: on the zoo ZFNet (a 7x7 stride-2 first conv) int8 ran 3.70x
    with every layer quantized and 2.24x with the first one float (the float/int8 boundary
    and the float conv both cost), at -0.04 pts either way, so every combined plan was
    slower than int8 alone. Both models are quantized and timed end to end on ``sample``;
    when quantizing the first layer too is surely at least :data:`FIRST_LAYER_INT8_GAIN`
    faster, it is quantized and left to the accuracy control like any other layer.
    """
    first = quantizable_nodes(original)[:1]
    if not first or sample is None:
        return first, {}
    whole = quantize_int8(original, quant_batches)
    part = quantize_int8(original, quant_batches, exclude=first)
    known = {(): whole, tuple(first): part}
    if whole.model is None or part.model is None:
        return first, known
    gain = time_models([part.model, whole.model], sample, threads=threads, max_total_s=FIRST_LAYER_TIMING_S,
                       decide_at=FIRST_LAYER_INT8_GAIN).speedup(0, 1)
    quantize_it = gain.lo > FIRST_LAYER_INT8_GAIN
    progress.decision(first[0], f"int8 with it quantized {gain.ratio:.2f}x [{gain.lo:.2f}, {gain.hi:.2f}] "
                      f"the model with it float: " + ("quantized like the rest" if quantize_it else
                                                      "kept float in every plan"))
    return ([] if quantize_it else first), known


def _quantized_layer(m: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto | None:
    """A single-layer model as it will ship under ``--quantize int8`` (None: the quantizer failed).

    Calibrated on the layer's own input; the scales only need to be plausible, this model is
    timed, never scored. No pre-processing: a single node has nothing for it to fold.
    """
    q = quantize_int8(m, [{"x": x}], preprocess=False)
    if q.model is None:
        log.info("int8 pricing: %s", q.reason)
    return q.model


def layer_ladders(
    watched: Sequence[gs.Node],
    pass_list: Sequence[Pass],
    ctx: PassContext,
    budget: Budget,
    checks: LayerChecks,
    values: Mapping[str, np.ndarray],
    opset: int,
    progress: Progress,
    *,
    int8_layers: frozenset[str] | set[str] = frozenset(),
) -> Ladders:
    """Every layer's priced rungs (see the module docstring), a report entry per layer, the
    measured speedup of every timed candidate, and the layers int8 would slow down
    (:class:`Ladders`).

    ``int8_layers``: the layers that ship in int8 (``--quantize int8``); their original and
    rungs are timed quantized, and a rung the quantizer cannot handle is not offered. The
    float original is timed beside them: where int8 is not surely faster than float
    (onnxruntime's int8 kernels lose on some shapes: the zoo ResNet ran 0.93x in int8), the
    layer is named in ``int8_slower``, ships float, and its rungs are timed again in float.
    The layers that stay int8-priced are timed in float too, in a run of their own
    (``float_rungs``): the float plan is searched beside the combined one and the faster
    of the two ships (:func:`plan_to_budget`).
    """
    ladders: dict[str, list[Rung]] = {}
    float_ladders: dict[str, list[Rung]] = {}
    int8_slower: list[str] = []
    layers: list[LayerResult] = []
    speed_of: dict[int, Any] = {}
    float_speed_of: dict[int, Any] = {}
    any_int8 = False
    for node in progress.steps(watched, len(watched), "ladder layer"):
        res = LayerResult(node=node.name, op=node.op, status=Status.DECLINED)
        layers.append(res)
        applicable, why = applicable_passes(node, pass_list, checks)
        if why:
            res.reason = why
            continue
        x_val, y_val = values.get(node.inputs[0].name), values.get(node.outputs[0].name)
        cands: list[tuple[Candidate, onnx.ModelProto]] = []
        local_err: dict[int, float] = {}  # the layer's output error with each rung, on the sample
        # the session that measured a rung's error times it too (in float): one session per
        # rung instead of two (VGG-19: ~250 rungs, sessions were a third of the timing time)
        session_of: dict[int, Any] = {}
        for p in applicable:
            att = Attempt(method=p.name, status=Status.DECLINED)
            res.attempts.append(att)
            for cand in _rungs_of(node, p, ctx, budget, att, checks.threads):
                res.macs_before = res.macs_before or cand.macs_before
                if cand.macs_before and cand.macs_after and cand.macs_after >= cand.macs_before:
                    continue
                if cand.min_opset > opset or x_val is None or y_val is None:
                    continue
                try:
                    m = model_from_graph(single_node_graph(cand.build, x_val.shape, opset))
                    sess = ModelSession(m, make_session(m, threads=checks.threads))
                    out = sess.run(None, {"x": x_val})[0]
                except Exception as exc:  # a rung the runtime refuses is never offered
                    log.warning("%s: %s rung failed to run: %s", node.name, cand.method, exc)
                    continue
                if out.shape != y_val.shape:
                    continue
                local_err[id(cand)] = _rel_error(y_val, out)
                if not checks.allow_slower:
                    session_of[id(cand)] = sess
                cands.append((cand, m))
            progress.tick(f"{node.name}: {p.name}")
            if any(c.method == p.name for c, _ in cands):
                att.status, att.reason = Status.CANDIDATE, ""
        if not cands:
            res.reason = "; ".join(f"{a.method}: {a.reason}" for a in res.attempts if a.reason) or \
                "no candidate saves MACs"
            continue
        res.status = Status.KEPT
        rungs: list[Rung] = []
        float_rungs: list[Rung] | None = None  # None: the same as rungs
        if checks.allow_slower:
            for cand, _ in cands:
                rungs.append(Rung(node.name, _key(cand), float(cand.macs_before - cand.macs_after), cand,
                                  local_error=local_err.get(id(cand))))
        else:
            orig = model_from_graph(single_node_graph(original_builder(node), x_val.shape, opset))
            float_orig, float_cands = orig, cands
            if node.name in int8_layers:
                orig, cands = _as_int8(node.name, orig, cands, x_val, res)
            quantized = orig is not float_orig
            # one interleaved run per layer, all rungs together; capped so a ladder costs seconds.
            # Quantized, the float original runs last: is int8 faster for this layer at all?
            def runners(pairs: list[tuple[Candidate, onnx.ModelProto]], in_float: bool) -> list[Any]:
                return [session_of.get(id(c), m) if in_float else m for c, m in pairs]

            timing = time_models([orig] + runners(cands, not quantized) + ([float_orig] if quantized else []),
                                 {"x": x_val},
                                 threads=checks.threads, max_total_s=LADDER_TIMING_S)
            if quantized:
                # the rungs in float, in a run of their own: the layer's prices if int8 does not
                # pay here, else the float plan's (the plan-level comparison, plan_to_budget)
                ftiming = time_models([float_orig] + runners(float_cands, True), {"x": x_val},
                                      threads=checks.threads, max_total_s=LADDER_TIMING_S)
                float_rungs = _priced(node.name, ftiming, [c for c, _ in float_cands], local_err, float_speed_of)
                gain = timing.speedup(len(cands) + 1, 0)  # float latency / int8 latency
                if gain.lo > 1.0:
                    any_int8 = True
                else:
                    # int8 does not surely pay here: the layer ships float, priced in float
                    int8_slower.append(node.name)
                    res.priced = f"float: int8 {gain.ratio:.2f}x [{gain.lo:.2f}, {gain.hi:.2f}] not surely faster"
                    cands, timing, float_rungs = float_cands, ftiming, None
            rungs = _priced(node.name, timing, [c for c, _ in cands], local_err, speed_of)
            progress.tick(f"{node.name}: timed {len(cands)} rung(s)")
        if float_rungs is None:
            float_rungs = rungs
            float_speed_of.update({id(c): speed_of[id(c)] for c, _ in cands if id(c) in speed_of})
        if float_rungs:
            float_ladders[node.name] = float_rungs
        if not rungs:
            res.reason = "no rung was surely faster when measured"
            continue
        res.reason = f"accuracy budget: {len(rungs)} rung(s) offered, none chosen"
        ladders[node.name] = rungs
    return Ladders(ladders, layers, speed_of, int8_slower, float_ladders if any_int8 else None, float_speed_of)


@dataclass
class Ladders:
    """What :func:`layer_ladders` measured: the rungs the search is given, and the rest."""

    #: every layer's rungs, priced as they ship (in int8 where the layer ships int8)
    rungs: dict[str, list[Rung]]
    #: one report entry per watched layer
    layers: list[LayerResult]
    #: the measured speedup of every timed candidate, by ``id(candidate)``
    speed_of: dict[int, Any]
    #: layers int8 would slow down: they ship float
    int8_slower: list[str]
    #: every layer's rungs priced in float, when some layer was priced in int8 (else None)
    float_rungs: dict[str, list[Rung]] | None = None
    #: the float speedups behind ``float_rungs``, by ``id(candidate)``
    float_speed_of: dict[int, Any] = field(default_factory=dict)


def _priced(layer: str, timing: Any, cands: Sequence[Candidate], local_err: Mapping[int, float],
            speed_of: dict[int, Any]) -> list[Rung]:
    """The rungs of one timing run (model 0 the layer, then ``cands``) surely faster than the layer,
    each priced at the latency it saves at the lower bound of its interval."""
    base_s = timing.medians[0]
    rungs: list[Rung] = []
    for i, cand in enumerate(cands):
        sp = timing.speedup(0, i + 1)
        speed_of[id(cand)] = sp
        if sp.lo > 1.0:  # priced at the lower bound: a rung not surely faster saves nothing
            rungs.append(Rung(layer, _key(cand), base_s * (1.0 - 1.0 / sp.lo), cand,
                              local_error=local_err.get(id(cand))))
    return rungs


def _as_int8(name: str, orig: onnx.ModelProto, cands: list[tuple[Candidate, onnx.ModelProto]], x: np.ndarray,
             res: LayerResult) -> tuple[onnx.ModelProto, list[tuple[Candidate, onnx.ModelProto]]]:
    """The layer and its rungs quantized for timing; float when the original will not quantize."""
    q_orig = _quantized_layer(orig, x)
    if q_orig is None:
        log.info("%s: the layer does not quantize alone; its rungs are priced in float", name)
        return orig, cands
    out: list[tuple[Candidate, onnx.ModelProto]] = []
    for cand, m in cands:
        qm = _quantized_layer(m, x)
        if qm is None:
            log.info("%s: %s %s does not quantize; not offered under --quantize int8", name, cand.method,
                     cand.describe_params())
            continue
        out.append((cand, qm))
    res.priced = "int8"
    return q_orig, out


def _rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """``||got - ref|| / ||ref||`` in float64 (inf when not finite: such a rung interpolates nothing)."""
    r = np.asarray(ref, dtype=np.float64)
    d = float(np.linalg.norm((np.asarray(got, dtype=np.float64) - r).ravel()))
    n = float(np.linalg.norm(r.ravel()))
    v = d / n if n > 0 else d
    return v if math.isfinite(v) else float("inf")


def _key(cand: Candidate) -> str:
    return f"{cand.method} {cand.describe_params()}"


def plan_to_budget(
    ladders: Mapping[str, Sequence[Rung]],
    apply: Callable[[Sequence[tuple[str, Candidate]]], onnx.ModelProto],
    contract: Contract,
    choose_split: Split,
    verify_split: Split,
    *,
    quantize: str = "none",
    quant_batches: Sequence[Mapping[str, np.ndarray]] = (),
    original: onnx.ModelProto | None = None,
    refine: Callable[[Sequence[tuple[str, Candidate]]], list[tuple[str, Candidate]]] | None = None,
    int8: Int8Baseline | None = None,
    apply_scored: Callable[[Sequence[tuple[str, Candidate]]], onnx.ModelProto | SharedModel] | None = None,
    float_ladders: Mapping[str, Sequence[Rung]] | None = None,
    progress: Progress,
) -> BudgetPlan:
    """Search the frontier (quantized when asked) and return the chosen rewrites.

    ``refine`` (the manager's reconstruction) maps a plan's rewrites to the ones shipped;
    every plan the search judges, on the choose and on the verify split, is refined first,
    so the budget is spent on what reconstruction leaves of each rung's damage rather than
    on the damage of the un-refit factors. Each rung's sensitivity alone stays un-refined:
    alone, a sequential refit is an independent one, which changes little.

    ``int8``: the float layers already settled by :func:`int8_baseline` (the ladders were
    priced with them); computed here when the caller did not.

    ``apply_scored``: builds a model that is only scored, never shipped or quantized (a
    :class:`~onnxslim_lr.budget_search.SharedModel` whose large weights are not copied);
    ``apply`` when not given.

    ``float_ladders``: the same rungs priced in float (:attr:`Ladders.float_rungs`). Under
    int8 the best float plan is then searched too, on the same sensitivity phase, and
    returned as :attr:`BudgetPlan.float_plan`: int8 does not pay on every runtime (the zoo
    ResNet ran 0.86x quantized), so the caller times both and ships the faster.
    """
    notes: list[str] = []
    scored = apply_scored or apply

    def float_model(choice: Mapping[str, Any]) -> onnx.ModelProto | SharedModel:
        return scored(list(choice.items()))

    def shipped(choice: Mapping[str, Any], *, full: bool = False) -> onnx.ModelProto | SharedModel:
        items = list(choice.items())
        return (apply if full else scored)(refine(items) if refine is not None and items else items)

    float_judge = shipped if refine is not None else None  # None: the search judges float_model itself
    use_int8 = quantize == "int8"
    quant_reason = ""
    cache: dict[tuple[tuple[str, str], ...], onnx.ModelProto] = {}
    # the first layer stays float in every plan unless that is measured to cost speed
    # (_first_layer_float: it sees the raw input, and on the bundled VGG it alone held int8's
    # 0.94-point test loss, which a 1000-image choose split did not show)
    keep_float: list[str] = []
    excluded: list[str] = []
    if use_int8 and original is not None:
        if int8 is None:
            int8 = int8_baseline(original, contract, choose_split, quant_batches, progress)
        keep_float, excluded = list(int8.keep_float), list(int8.excluded)
        if int8.model is not None:
            cache[()] = int8.model  # plan 0, the original, quantized with exactly these exclusions
        if set(quantizable_nodes(original)) <= set(excluded):
            # nothing left to quantize: Q/DQ pairs around float layers would be pure overhead
            use_int8 = False
            quant_reason = ("int8 was not surely faster than float on any layer it could have quantized (each "
                            "layer timed both ways)" if int8.slower else
                            "every layer int8 could quantize is kept in float")
            notes.append(f"--quantize int8: {quant_reason}; the float plan is kept")

    def quantized(choice: Mapping[str, Any]) -> onnx.ModelProto:
        key = tuple(sorted((k, _key(v)) for k, v in choice.items()))
        if key not in cache:
            full = shipped(choice, full=True)
            assert isinstance(full, onnx.ModelProto)
            q = quantize_int8(full, quant_batches, exclude=excluded)
            if q.model is None:
                raise _QuantFailed(q.reason)
            cache[key] = q.model
        return cache[key]

    damages = None
    if use_int8 and float_ladders is not None:
        # one sensitivity phase for both searches: a rung alone is judged in float either way
        damages = rung_damages(_union(ladders, float_ladders), float_model, choose_split, progress=progress)
    try:
        if use_int8:
            progress.phase("combined plan", "low rank and int8, rungs priced in int8")
        res = search(ladders, float_model, contract, choose_split, verify_split, progress=progress,
                     final=quantized if use_int8 else float_judge, judge_original=use_int8, damages=damages)
    except _QuantFailed as exc:
        quant_reason = str(exc)
        notes.append(f"--quantize int8: {quant_reason}; the float plan is kept")
        use_int8 = False
        res = search(float_ladders or ladders, float_model, contract, choose_split, verify_split, progress=progress,
                     final=float_judge, damages=damages)
    raw = [(layer, o.payload) for layer, o in res.plan.choice.items()]
    chosen = refine(raw) if refine is not None and raw else raw  # cached: the plan as it was judged
    plan = BudgetPlan(chosen=chosen, search=res, notes=notes)
    if use_int8 and float_ladders is not None:
        progress.phase("float plan", "low rank alone, rungs priced in float, to time against the combined plan")
        fres = search(float_ladders, float_model, contract, choose_split, verify_split, progress=progress,
                      final=float_judge, damages=damages)
        if fres.ok and fres.plan.choice:
            fraw = [(layer, o.payload) for layer, o in fres.plan.choice.items()]
            plan.float_plan = BudgetPlan(chosen=refine(fraw) if refine is not None else fraw, search=fres)
    if quant_reason:  # the report says why int8 was not applied
        plan.quant = QuantOutcome(None, reason=quant_reason)
    if use_int8:
        if res.ok or chosen:
            plan.model = quantized(dict(raw))
            plan.quant = QuantOutcome(plan.model, note="int8 on the chosen plan", excluded=list(excluded))
            if keep_float:
                notes.append(f"--quantize int8: the first layer ({', '.join(keep_float)}) kept in float in every plan: "
                             "it sees the raw input")
            slower = [e for e in excluded if int8 is not None and e in int8.slower and e not in keep_float]
            more = [e for e in excluded if e not in keep_float and e not in slower]
            if more:
                notes.append(f"--quantize int8: {len(more)} more layer(s) kept in float in every plan "
                             f"({', '.join(more)}): int8 alone spent more than {INT8_SHARE:.0%} of the budget")
            if slower:
                notes.append(f"--quantize int8: {len(slower)} layer(s) kept in float because int8 was not surely "
                             f"faster there when timed ({', '.join(slower)})")
        else:
            # int8 alone breaks the budget: keep the offending layers in float
            assert original is not None
            progress.phase("int8 accuracy control", "int8 alone breaks the budget: keeping layers in float")
            # the layers to keep in float are chosen on the choose split and the result is checked
            # on the held-out split: never choose and report on the same samples
            q = quantize_with_budget(original, quant_batches, lambda m: contract.damage(choose_split.score(m)),
                                     contract.max_damage, keep_float=keep_float, progress=progress)
            plan.quant = q
            if q.model is not None:
                vd = contract.damage(verify_split.score(q.model))
                plan.quant_verify_damage = vd
                if contract.within(vd):
                    plan.model = q.model
                    notes.append(f"--quantize int8: {len(q.excluded)} layer(s) kept in float to hold the budget "
                                 f"({contract.describe(vd)} on {verify_split.samples} held-out samples)")
                else:
                    q.reason = (f"int8 with {len(q.excluded)} layer(s) in float fits on the choose split but "
                                f"not on held-out samples ({contract.describe(vd)}); the float model is kept")
                    q.model = None
                    notes.append(f"--quantize int8: {q.reason}")
            else:
                notes.append(f"--quantize int8: {q.reason}")
    return plan


def _union(*ladders: Mapping[str, Sequence[Rung]]) -> dict[str, list[Rung]]:
    """Every rung of several ladders of the same layers, once per (layer, key)."""
    out: dict[str, dict[Any, Rung]] = {}
    for lad in ladders:
        for layer, rungs in lad.items():
            for r in rungs:
                out.setdefault(layer, {}).setdefault(r.key, r)
    return {layer: list(rs.values()) for layer, rs in out.items()}


class _QuantFailed(Exception):
    """The quantizer could not handle a plan's model (the float plan is used instead)."""


def split_labels(batches: Sequence[Mapping[str, np.ndarray]], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels of the two halves :func:`split_batches` makes of the same batches, in order.

    Follows the batches exactly: a batch of one sample goes whole to one side, as it does in
    :func:`split_batches`, so the labels stay aligned with the samples even when a pool of
    full batches ends with a single sample (e.g. 2001 labelled images in batches of 16).
    """
    labels = np.asarray(labels)
    choose_i: list[np.ndarray] = []
    verify_i: list[np.ndarray] = []
    n_choose = n_verify = 0  # whole single-sample batches placed so far, as split_batches counts them
    start = 0
    for b in batches:
        n = int(next(iter(b.values())).shape[0])
        idx = np.arange(start, start + n)
        start += n
        if n >= 2:
            choose_i.append(idx[0::2])
            verify_i.append(idx[1::2])
            n_choose += 1
            n_verify += 1
        elif n_choose <= n_verify:
            choose_i.append(idx)
            n_choose += 1
        else:
            verify_i.append(idx)
            n_verify += 1
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return labels[cat(choose_i)], labels[cat(verify_i)]


#: two disjoint halves of the calibration batches (every other sample): choose, verify -- the
#: same split the reconstruction uses for its fit / held-out halves
split_batches = split_samples
