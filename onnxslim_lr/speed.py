"""Speedups as statistics, and the keep/drop decisions made on them (pure functions).

A latency measured on a shared machine is noisy, and a single median ratio turned keep/drop
decisions into coin flips (a model timed against itself measured 1.13x). So every speedup
is an *interval*, and decisions use its bounds, never its centre.

**The per-round figure.** ``timing.time_models`` runs the models in interleaved rounds; in
a round each model runs ``inner`` times back to back (at least 5 -- as many as fit in
50 ms for a slow model -- and enough to last a few milliseconds), each run timed on its own, and the round's figure is the **fastest** of
those runs. On a shared machine the noise is mostly additive and one-sided: a neighbour
takes the core and a run waits. The round's mean carries every such wait; its minimum only
the ones that hit every run. (Measured here, VGG end to end at load 2-3, 30 rounds of 8
runs, 99 % A/A-widened intervals, two repetitions each: round means gave VGG [1.27, 2.76]
and [1.39, 2.31], ResNet [0.73, 2.64] and [1.11, 2.57]; round minima gave VGG [1.22, 2.32]
and [1.51, 2.06], ResNet [1.37, 1.91] and [1.31, 1.91]. The fake-clock test with
preemption bursts fails with round means.) Runs are kept back to back within a round on
purpose: interleaving single runs (A, B, A, B ...) was tried and shrank every ratio (VGG
1.45-1.64x against 1.68-1.76x), because the other model's weights evict this one's from
the caches, which is not how a deployed model runs.

**The estimate.** Round ``r`` gives each model one figure, so a candidate ``i`` and the
baseline give a paired observation ``d_r = log(t_base[r] / t_i[r])`` (positive = faster).
Pairing cancels whatever slows the whole round down (a neighbour's burst, frequency
scaling). The speedup is ``exp`` of the Hodges-Lehmann estimate of the centre of the
``d_r`` (median of the Walsh averages ``(d_i + d_j) / 2``, ``i <= j``), and the interval is
the matching distribution-free Wilcoxon signed-rank confidence interval: the ``k``-th
smallest and largest Walsh averages, ``k`` from the exact null distribution of the
signed-rank statistic. It assumes only that the paired log-differences are independent and
symmetric about their centre -- which rotating and reversing the order of the models from
round to round (a generalised A,B,B,A) helps make true -- and it is robust to outlier
rounds. It is deterministic (no resampling), so the same samples always give the same
interval. At least 6 rounds are needed for a 95 % interval; with fewer, the interval is the
full range of the data.

**Adaptive rounds.** With a decision threshold, rounds are added while a decision is open,
and the data are looked at after 9, 18, 36, ... rounds (doubling, up to the cap: 36 for a
layer, 144 end to end, or the time budget). Each look's interval is at the Bonferroni level
``1 - 0.05 / looks`` (98.3 % for a layer's 3 looks, 99 % for the end-to-end 5), so the chance that any look decides
wrongly stays within 5 %. Doubling keeps the looks few, so a high cap costs little level;
the earlier fixed steps of 4 rounds (9..41, 9 looks) stopped the end-to-end comparison of
VGG after about one second of its 20-second budget, at intervals like 1.48x [0.84, 2.63].

**The A/A control.** The same run also times a second session of the baseline model. Its
ratio to the baseline is pure noise plus whatever separates two sessions. That separation
is real and does not average out over rounds: four sessions of the same VGG, 24 rounds
each, had one session 1.13x [1.01, 1.32] away from another, and one end-to-end run here
measured its control at 0.88x [0.82, 0.97] after 72 rounds (a worker thread parked on the
busier core, presumably). The paired interval cannot see such a session effect, so each
candidate's interval is widened on both sides by the farthest the A/A interval reaches
from 1 (:func:`widen`): the candidate must beat everything an identical model showed in the
same run. This is the "margin" rule -- the lower bound must clear the threshold by the A/A
reach -- and it costs nothing on a quiet machine (the control within a few percent of 1).

**The noise gate.** When the control reaches beyond :data:`NOISE_GATE` (1.5x: two sessions of
one model differ by half), the run is not evidence for any speed claim: no candidate is kept
and the rewritten model is not returned, with the reason ``timing too noisy to decide: A/A
1.00x [0.65, 1.61] ...``. Rounds are first added up to the cap, since sampling noise (unlike
a session effect) shrinks with rounds. Why 1.5 and not lower: the widening already makes a
candidate beat the control's reach, so a gate adds soundness only where that model of the
noise is itself in doubt, and every run it vetoes that the widening would have accepted is
a clear win turned into a run-to-run flip. Measured in ``tools/bench_trust.py`` (30 CLI runs
at 1-minute loads 3 to 9.5 on 2 cores): the end-to-end controls reached 1.06x to 1.31x and
the ``bench`` controls up to 1.28x; a 1.25x gate vetoed one VGG run (control 0.85x
[0.76, 0.97], widened rewrite 1.56x [1.08, 2.32]) and was the only end-to-end flip of that
benchmark, and 1.2x earlier vetoed another (control 0.88x [0.82, 0.97], rewrite 1.47x
[1.12, 1.97]). At 1.5 the gate stays out of the way of ordinary load and still refuses to
claim anything on a machine where an identical model measures 1.5x away from itself.

**The decisions** (:func:`layer_decision`, :func:`model_decision`):

* a layer rewrite is kept only when the lower bound of its widened interval reaches
  ``min_speedup``;
* a rewritten model is returned only when the lower bound of its widened end-to-end
  interval is above 1;
* neither is kept when the run's control is beyond the noise gate;
* a rewrite that saves less than :data:`MAC_MARGIN` of the MACs (ratio below 1.05) is never
  kept on timing alone: nothing may "win" by noise, and a MAC-neutral change has no
  mechanism to be faster;
* an interval that straddles the threshold resolves conservatively, to the original. Only
  such candidates (and gated runs) can flip between runs, and they flip towards
  "unchanged".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

#: a rewrite must cut at least 5 % of the MACs it touches to be kept on a measurement
MAC_MARGIN = 1.05

#: default confidence of every interval
CONFIDENCE = 0.95

#: the A/A control may reach at most this far from 1 (``max(hi, 1/lo)``) for any speedup to be claimed
NOISE_GATE = 1.5

#: fewest paired rounds for which a 95 % signed-rank interval exists (2 / 2**6 < 0.05)
MIN_ROUNDS = 6


@dataclass(frozen=True)
class Speedup:
    """A speedup (>1 means faster) with its confidence interval ``[lo, hi]``."""

    ratio: float
    lo: float
    hi: float
    rounds: int = 0
    confidence: float = CONFIDENCE

    def __str__(self) -> str:
        return f"{self.ratio:.2f}x [{self.lo:.2f}, {self.hi:.2f}]"

    def contains(self, value: float) -> bool:
        return self.lo <= value <= self.hi

    def as_dict(self) -> dict[str, float]:
        return {"ratio": self.ratio, "lo": self.lo, "hi": self.hi, "rounds": self.rounds,
                "confidence": self.confidence}


@lru_cache(maxsize=256)
def _signed_rank_cdf(n: int) -> np.ndarray:
    """``cdf[w] = P(W+ <= w)`` for the Wilcoxon signed-rank statistic with ``n`` pairs, no ties."""
    counts = np.zeros(n * (n + 1) // 2 + 1, dtype=np.float64)
    counts[0] = 1.0
    for k in range(1, n + 1):
        shifted = np.zeros_like(counts)
        shifted[k:] = counts[:-k]
        counts = counts + shifted
    return np.cumsum(counts) / 2.0**n


def signed_rank_k(n: int, confidence: float = CONFIDENCE) -> int:
    """1-based rank of the Walsh average that bounds the interval (0 when none exists)."""
    if n < 1:
        return 0
    alpha = 1.0 - confidence
    cdf = _signed_rank_cdf(n)
    # largest c with P(W+ <= c) <= alpha / 2; the bound is the (c + 1)-th Walsh average
    ok = np.nonzero(cdf <= alpha / 2 + 1e-12)[0]
    return int(ok[-1]) + 1 if len(ok) else 0


def paired_interval(log_ratios: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Hodges-Lehmann estimate and signed-rank interval of the centre of ``log_ratios``.

    Returns ``(estimate, lo, hi)`` on the log scale. With too few values for the requested
    confidence, the interval is the range of the data (and says so by its width).
    """
    d = np.asarray(log_ratios, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = len(d)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2.0)
    est = float(np.median(walsh))
    k = signed_rank_k(n, confidence)
    if k == 0:
        return est, float(d.min()), float(d.max())
    return est, float(walsh[k - 1]), float(walsh[len(walsh) - k])


def speedup_from_rounds(baseline: Sequence[float], other: Sequence[float],
                        confidence: float = CONFIDENCE) -> Speedup:
    """Speedup of ``other`` over ``baseline`` from per-round latencies measured in the same rounds."""
    b = np.asarray(baseline, dtype=np.float64)
    o = np.asarray(other, dtype=np.float64)
    n = min(len(b), len(o))
    if n == 0:
        nan = float("nan")
        return Speedup(nan, nan, nan, 0, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.log(b[:n]) - np.log(o[:n])
    est, lo, hi = paired_interval(d, confidence)
    return Speedup(math.exp(est), math.exp(lo), math.exp(hi), n, confidence)


def aa_reach(aa: Speedup | None) -> float:
    """How far the A/A interval reaches from 1, as a factor >= 1 (1.0 without a usable control)."""
    if aa is None or not (math.isfinite(aa.lo) and math.isfinite(aa.hi)) or aa.lo <= 0:
        return 1.0
    return max(aa.hi, 1.0 / aa.lo, 1.0)


def too_noisy(aa: Speedup | None, gate: float | None = None) -> bool:
    """Whether the A/A control reaches beyond ``gate`` (default :data:`NOISE_GATE`): no speed claim then."""
    return aa_reach(aa) > (NOISE_GATE if gate is None else gate)


def widen(s: Speedup, aa: Speedup | None) -> Speedup:
    """``s`` with its interval widened on both sides by the farthest the A/A interval reaches from 1."""
    bias = aa_reach(aa)
    if bias == 1.0:
        return s
    return Speedup(s.ratio, s.lo / bias, s.hi * bias, s.rounds, s.confidence)


def verdict(s: Speedup, threshold: float = 1.0) -> str:
    """``"above"``, ``"below"`` or ``"straddles"`` the threshold (bounds inclusive on the safe side)."""
    if s.lo > threshold:
        return "above"
    if s.hi < threshold:
        return "below"
    return "straddles"


def describe(s: Speedup) -> str:
    """One phrase for a user: faster / slower / no measurable difference, with the interval."""
    v = verdict(s, 1.0)
    word = {"above": "faster", "below": "slower", "straddles": "no measurable difference"}[v]
    return f"{s} ({word})"


@dataclass(frozen=True)
class Decision:
    """Keep or not, and the sentence the report shows."""

    keep: bool
    reason: str


def _noise_veto(aa: Speedup | None, s: Speedup) -> Decision | None:
    """The noise gate: a run whose A/A control reaches beyond :data:`NOISE_GATE` claims no speedup."""
    if too_noisy(aa):
        assert aa is not None
        return Decision(False, f"timing too noisy to decide: A/A {aa} reaches beyond {NOISE_GATE:g}x "
                               f"(measured {s}): kept the original")
    return None


def layer_decision(s: Speedup, min_speedup: float, mac_ratio: float | None,
                   aa: Speedup | None = None) -> Decision:
    """Keep a layer rewrite only if its MAC cut is real and its whole interval clears ``min_speedup``.

    ``s`` is the A/A-widened interval; ``aa`` the run's control, for the noise gate.
    """
    if mac_ratio is not None and mac_ratio < MAC_MARGIN:
        return Decision(False, f"MAC ratio {mac_ratio:.3f}x < {MAC_MARGIN:g}x: not kept on timing alone "
                               f"(measured {s})")
    v = verdict(s, min_speedup)
    if v == "below":
        return Decision(False, f"measured {s} < required {min_speedup:.2f}x")
    if v == "straddles" and s.lo < min_speedup:
        return Decision(False, f"measured {s} straddles the required {min_speedup:.2f}x: kept the original")
    return _noise_veto(aa, s) or Decision(True, f"measured {s} >= {min_speedup:.2f}x")


def model_decision(s: Speedup, mac_ratio: float | None = None, aa: Speedup | None = None) -> Decision:
    """Return the rewritten model only if its end-to-end interval lies above 1 and its MAC cut is real.

    ``s`` is the A/A-widened interval; ``aa`` the run's control, for the noise gate.
    """
    if mac_ratio is not None and mac_ratio < MAC_MARGIN:
        return Decision(False, f"the rewrite cuts the model's MACs by only {mac_ratio:.3f}x (< {MAC_MARGIN:g}x), "
                               f"too little to be kept on timing alone (measured {s})")
    if s.lo <= 1.0:
        return Decision(False, f"the rewritten model measured {s} end to end, not surely faster")
    veto = _noise_veto(aa, s)
    if veto is not None:
        return Decision(False, f"the rewritten model: {veto.reason}")
    return Decision(True, f"measured {s} end to end")


def best_index(speedups: Sequence[Speedup]) -> int:
    """Index of the candidate to prefer among kept ones: the highest lower bound (then the estimate)."""
    return max(range(len(speedups)), key=lambda i: (speedups[i].lo, speedups[i].ratio))
