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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from .budget_search import Contract, Rung, SearchResult, Split, search
from .graph import model_from_graph, single_node_graph
from .passes.base import Candidate, Decline, Pass, PassContext, Settings
from .planning import Budget, Declined, choose
from .progress import Progress
from .reconstruction import split_samples
from .quantize import QuantOutcome, quantizable_nodes, quantize_int8, quantize_with_budget
from .results import Attempt, LayerResult, Status
from .selection import LayerChecks, applicable_passes, original_builder
from .timing import make_session, time_models

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
            })
        if self.quant is not None:
            doc["int8"] = {"reason": self.quant.reason, "excluded": self.quant.excluded}
            if self.quant_verify_damage is not None:
                doc["int8"]["verify_damage"] = self.quant_verify_damage
        return doc


def _rungs_of(node: gs.Node, p: Pass, ctx: PassContext, budget: Budget, att: Attempt) -> list[Candidate]:
    """The candidates of one pass on one node: the ladder at RATIOS, or its single proposal."""
    site = p.match(node, ctx)
    if isinstance(site, Decline):
        att.reason = site.reason
        return []
    settings = Settings.of(budget)
    out: list[Candidate] = []
    with threadpool_limits(limits=1, user_api="blas"):
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
        for r in RATIOS:
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
    return out


def layer_ladders(
    watched: Sequence[gs.Node],
    pass_list: Sequence[Pass],
    ctx: PassContext,
    budget: Budget,
    checks: LayerChecks,
    values: Mapping[str, np.ndarray],
    opset: int,
    progress: Progress,
) -> tuple[dict[str, list[Rung]], list[LayerResult], dict[int, Any]]:
    """Every layer's priced rungs (see the module docstring), a report entry per layer, and the
    measured speedup of every timed candidate (keyed by ``id(candidate)``)."""
    ladders: dict[str, list[Rung]] = {}
    layers: list[LayerResult] = []
    speed_of: dict[int, Any] = {}
    for node in progress.steps(watched, len(watched), "ladder layer"):
        res = LayerResult(node=node.name, op=node.op, status=Status.DECLINED)
        layers.append(res)
        applicable, why = applicable_passes(node, pass_list, checks)
        if why:
            res.reason = why
            continue
        x_val, y_val = values.get(node.inputs[0].name), values.get(node.outputs[0].name)
        cands: list[tuple[Candidate, onnx.ModelProto]] = []
        for p in applicable:
            att = Attempt(method=p.name, status=Status.DECLINED)
            res.attempts.append(att)
            for cand in _rungs_of(node, p, ctx, budget, att):
                res.macs_before = res.macs_before or cand.macs_before
                if cand.macs_before and cand.macs_after and cand.macs_after >= cand.macs_before:
                    continue
                if cand.min_opset > opset or x_val is None or y_val is None:
                    continue
                try:
                    m = model_from_graph(single_node_graph(cand.build, x_val.shape, opset))
                    out = make_session(m, threads=checks.threads, optimize=False).run(None, {"x": x_val})[0]
                except Exception as exc:  # a rung the runtime refuses is never offered
                    log.warning("%s: %s rung failed to run: %s", node.name, cand.method, exc)
                    continue
                if out.shape != y_val.shape:
                    continue
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
        if checks.allow_slower:
            for cand, _ in cands:
                rungs.append(Rung(node.name, _key(cand), float(cand.macs_before - cand.macs_after), cand))
        else:
            orig = model_from_graph(single_node_graph(original_builder(node), x_val.shape, opset))
            # one interleaved run per layer, all rungs together; capped so a ladder costs seconds
            timing = time_models([orig] + [m for _, m in cands], {"x": x_val}, threads=checks.threads,
                                 max_total_s=LADDER_TIMING_S)
            base_s = timing.medians[0]
            for i, (cand, _) in enumerate(cands):
                sp = timing.speedup(0, i + 1)
                speed_of[id(cand)] = sp
                if sp.lo > 1.0:  # priced at the lower bound: a rung not surely faster saves nothing
                    rungs.append(Rung(node.name, _key(cand), base_s * (1.0 - 1.0 / sp.lo), cand))
            progress.tick(f"{node.name}: timed {len(cands)} rung(s)")
        if not rungs:
            res.reason = "no rung was surely faster when measured"
            continue
        res.reason = f"accuracy budget: {len(rungs)} rung(s) offered, none chosen"
        ladders[node.name] = rungs
    return ladders, layers, speed_of


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
    progress: Progress,
) -> BudgetPlan:
    """Search the frontier (quantized when asked) and return the chosen rewrites.

    ``refine`` (the manager's reconstruction) maps a plan's rewrites to the ones shipped;
    every plan the search judges, on the choose and on the verify split, is refined first,
    so the budget is spent on what reconstruction leaves of each rung's damage rather than
    on the damage of the un-refit factors. Each rung's sensitivity alone stays un-refined:
    alone, a sequential refit is an independent one, which changes little.
    """
    notes: list[str] = []

    def float_model(choice: Mapping[str, Any]) -> onnx.ModelProto:
        return apply(list(choice.items()))

    def shipped(choice: Mapping[str, Any]) -> onnx.ModelProto:
        items = list(choice.items())
        return apply(refine(items) if refine is not None and items else items)

    float_judge = shipped if refine is not None else None  # None: the search judges float_model itself
    use_int8 = quantize == "int8"
    quant_reason = ""
    cache: dict[tuple[tuple[str, str], ...], onnx.ModelProto] = {}
    # the first layer stays float in every plan, as on the rank-rule path: it sees the raw input,
    # and on the bundled VGG it alone held int8's 0.94-point test loss (a 1000-image choose
    # split saw none of it, so judging it there let it through)
    keep_float = quantizable_nodes(original)[:1] if use_int8 and original is not None else []
    excluded = list(keep_float)
    if use_int8 and original is not None:
        # int8 alone may spend at most INT8_SHARE of the budget, or low rank has nothing left:
        # keep the layers int8 hurts most in float in every judged plan (NNCF-style control)
        q0 = quantize_with_budget(original, quant_batches, lambda m: contract.damage(choose_split.score(m)),
                                  contract.max_damage * INT8_SHARE, keep_float=keep_float, progress=progress)
        if q0.model is not None:
            excluded = list(q0.excluded)
            cache[()] = q0.model  # plan 0, the original, quantized with exactly these exclusions

    def quantized(choice: Mapping[str, Any]) -> onnx.ModelProto:
        key = tuple(sorted((k, _key(v)) for k, v in choice.items()))
        if key not in cache:
            q = quantize_int8(shipped(choice), quant_batches, exclude=excluded)
            if q.model is None:
                raise _QuantFailed(q.reason)
            cache[key] = q.model
        return cache[key]

    try:
        res = search(ladders, float_model, contract, choose_split, verify_split, progress=progress,
                     final=quantized if use_int8 else float_judge, judge_original=use_int8)
    except _QuantFailed as exc:
        quant_reason = str(exc)
        notes.append(f"--quantize int8: {quant_reason}; the float plan is kept")
        use_int8 = False
        res = search(ladders, float_model, contract, choose_split, verify_split, progress=progress, final=float_judge)
    raw = [(layer, o.payload) for layer, o in res.plan.choice.items()]
    chosen = refine(raw) if refine is not None and raw else raw  # cached: the plan as it was judged
    plan = BudgetPlan(chosen=chosen, search=res, notes=notes)
    if quant_reason:  # the report says why int8 was not applied
        plan.quant = QuantOutcome(None, reason=quant_reason)
    if use_int8:
        if res.ok or chosen:
            plan.model = quantized(dict(raw))
            plan.quant = QuantOutcome(plan.model, note="int8 on the chosen plan", excluded=list(excluded))
            if keep_float:
                notes.append(f"--quantize int8: the first layer ({', '.join(keep_float)}) kept in float in every plan: "
                             "it sees the raw input")
            more = [e for e in excluded if e not in keep_float]
            if more:
                notes.append(f"--quantize int8: {len(more)} more layer(s) kept in float in every plan "
                             f"({', '.join(more)}): int8 alone spent more than {INT8_SHARE:.0%} of the budget")
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
                if vd <= contract.max_damage:
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
