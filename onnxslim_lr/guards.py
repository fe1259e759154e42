"""The guards: every check a rewrite must pass to be kept, each decision in one small function.

* :func:`layer_fast_enough` -- per layer: is the measured speedup of a candidate enough?
* :func:`model_is_faster` -- end to end: is the rewritten model faster than the original?
* :func:`layer_error_failure` -- per layer: is the output error within ``--max-layer-error``?
* :func:`fidelity_failure` and :func:`fidelity_backoff` -- end to end on the calibration
  batches: drop rewrites, the most expensive to keep first, until the outputs are within
  ``--min-top1`` / ``--max-output-error``.

The two speed decisions read a :class:`~onnxslim_lr.timing.Timing` and nothing else, so a
statistically better rule (intervals from paired runs) replaces one function each.
"""

from __future__ import annotations

from typing import Callable, Sequence

import onnx

from .passes.base import Candidate
from .results import LayerResult, Status
from .speed import Decision, Speedup, layer_decision, model_decision
from .timing import Timing
from .verify import Fidelity, compare_outputs, verify_model


def layer_fast_enough(timing: Timing, index: int, min_speedup: float, mac_ratio: float | None
                      ) -> tuple[Decision, Speedup]:
    """Whether candidate ``index`` (1-based; 0 is the original layer) is surely ``min_speedup`` faster.

    The decision reads the lower bound of the speedup's interval (widened by the A/A
    control), never the median, and never keeps a candidate that saves under
    :data:`~onnxslim_lr.speed.MAC_MARGIN` of the MACs on timing alone (speed.layer_decision).
    """
    sp = timing.speedup(0, index)
    return layer_decision(sp, min_speedup, mac_ratio, timing.aa), sp


#: the end-to-end comparison may run this many rounds (looks at 9, 18, 36, 72, 144): it decides
#: what the user ships and times two whole models once, so it affords more rounds than a layer
E2E_MAX_ROUNDS = 144


def model_is_faster(timing: Timing, mac_ratio: float | None = None) -> tuple[Decision, Speedup]:
    """Whether the rewritten model (index 1) is surely faster than the original (index 0) end to end."""
    sp = timing.speedup(0, 1)
    return model_decision(sp, mac_ratio, timing.aa), sp


def layer_error_failure(out_error: float, max_layer_error: float | None) -> str | None:
    """Why a candidate's layer output error is too large, or None."""
    if max_layer_error is not None and not out_error <= max_layer_error:  # NaN fails
        return f"layer output error {out_error:.3g} > --max-layer-error {max_layer_error:g}"
    return None


def fidelity_failure(fid: Fidelity, min_top1: float | None, max_output_error: float | None) -> str | None:
    """Why the rewritten model's outputs are outside the user's limits, or None."""
    if min_top1 is not None and fid.top1 is not None and not fid.top1 >= min_top1:  # NaN fails
        return f"top-1 agreement {fid.top1:.4f} < --min-top1 {min_top1:g}"
    if max_output_error is not None and not fid.worst_rel_error <= max_output_error:
        return f"output error {fid.worst_rel_error:.3g} > --max-output-error {max_output_error:g}"
    return None


Apply = Callable[[Sequence[tuple[str, Candidate]]], "tuple[onnx.ModelProto, int]"]


def fidelity_backoff(
    chosen: list[tuple[str, Candidate]],
    layers: Sequence[LayerResult],
    apply: Apply,
    reference: onnx.ModelProto,
    batches: Sequence[dict],
    *,
    min_top1: float | None,
    max_output_error: float | None,
    threads: int | None,
) -> tuple[onnx.ModelProto | None, int, Fidelity | None, str | None]:
    """Apply ``chosen``; while the outputs fail the limits, drop the rewrite costing the most fidelity.

    Each rewrite's cost of keeping is its end-to-end output error when applied alone, per
    MAC it saves (a layer's own output error says little about how much the model's output
    moves); without several rewrites or limits, the layer error stands in. ``chosen`` is
    edited in place; dropped layers become KEPT with the reason. Returns ``(model, number
    of folded permutations, fidelity, failure)``; the model is None when every rewrite had
    to go (``failure`` says why).
    """
    by_node = {r.node: r for r in layers}
    guarded = min_top1 is not None or max_output_error is not None
    cost_of_keeping: dict[str, float] = {}
    if guarded and len(chosen) > 1:
        for c in chosen:
            alone, _ = apply([c])
            err = compare_outputs(reference, alone, batches, threads=threads).worst_rel_error
            r = by_node[c[0]]
            cost_of_keeping[c[0]] = err / max(r.macs_before - r.macs_after, 1)
    while True:
        new_model, n_perm = apply(chosen)
        verify_model(new_model)
        fidelity = compare_outputs(reference, new_model, batches, threads=threads)
        failing = fidelity_failure(fidelity, min_top1, max_output_error)
        if failing is None:
            return new_model, n_perm, fidelity, None
        worst = max(chosen, key=lambda c: cost_of_keeping.get(c[0], by_node[c[0]].out_error))
        chosen.remove(worst)
        r = by_node[worst[0]]
        r.status, r.reason = Status.KEPT, f"fidelity guard: dropped because the model's {failing}"
        if not chosen:
            return None, 0, fidelity, failing
