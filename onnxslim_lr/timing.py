"""Latency on onnxruntime, measured the way a deployment engineer would run the model.

FLOPs lie: a factorized layer with half the MACs can be slower (more kernel launches, worse
memory traffic, a convolution algorithm that no longer applies). So every decision this tool
makes about speed rests on these measurements:

* sessions use full graph optimisations (what users deploy with) and a fixed thread count;
* every model is warmed up, then the models are run in *interleaved* rounds (A, B, A, B ...)
  so that frequency scaling or a noisy neighbour affects all of them alike; the order
  rotates and reverses from round to round, so no model keeps a favourable position;
* a round runs each model back to back enough times to last a few milliseconds, at least
  :data:`MIN_INNER` times (as many as fit in :data:`MAX_INNER_S` for a slow model, at least
  once), each run timed on its own; the round's figure is the fastest run
  (a neighbour's burst only ever delays a run: :mod:`.speed` has the measurements);
* the same run also times a second session of the first model (the A/A control), which
  sets the noise floor;
* every speedup is a paired statistic over rounds, with an interval (:mod:`.speed` has the
  method: Hodges-Lehmann estimate and Wilcoxon signed-rank interval of per-round log ratios,
  widened by the A/A noise floor), and the number of rounds adapts: after ``rounds`` rounds, if any
  interval still straddles the decision threshold (``decide_at``), or one clears it while the
  A/A control is beyond the noise gate, rounds are added (looks at doubling round counts), up
  to ``max_rounds`` or the time budget, and stop as soon as every decision is settled;
* the clock is injected (``clock=``) and a session is anything with ``run`` and
  ``get_inputs``, so the statistics and the stopping rule are tested with a fake clock;
* the provider reported is the one the session actually uses (``get_providers()``), never
  just the one requested: CPU figures are never labelled CUDA.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .speed import CONFIDENCE, MIN_ROUNDS, Speedup, speedup_from_rounds, too_noisy, verdict, widen

log = logging.getLogger(__name__)

#: fewest runs of each model per round: the round's figure is the fastest of them ...
MIN_INNER = 5
#: ... unless that would make one model's share of a round longer than this: a long run is
#: hardly moved by a preemption, and a whole-model run at batch 16 (about 0.1 s here) would
#: otherwise leave few rounds within the time budget
MAX_INNER_S = 0.05


def default_threads() -> int:
    """All cores, as a serving process would use (pinned so runs are comparable)."""
    return max(1, os.cpu_count() or 1)


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_session(
    model: onnx.ModelProto | bytes | str,
    *,
    threads: int | None = None,
    provider: str = "CPUExecutionProvider",
    optimize: bool = True,
    initializers: Mapping[str, np.ndarray] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession with pinned threads; ``optimize=False`` disables all graph rewrites.

    Tests use ``optimize=False`` so that onnxruntime's own fusions cannot hide a numeric bug
    in a rewrite; timing uses the full optimisation level, as in deployment.

    ``initializers``: values of initializers the model marks as external data (a weightless
    copy, :func:`onnxslim_lr.graph.weightless`). They become graph inputs fed from these very
    buffers on every run (:class:`FedSession`): onnxruntime copies initializers handed over as
    external buffers into its own memory (measured on VGG-19: +560 MB, plus 360 MB of
    pre-packed GEMM weights), but reads inputs in place. For sessions that run a few times
    (probe, statistics, the budget planner's scoring), never for timing: the runtime cannot
    pre-pack what it reads as inputs.
    """
    so = _options(threads, optimize)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    if initializers and isinstance(model, onnx.ModelProto):
        fed = _fed_session(model, initializers, so, providers)
        if fed is not None:
            return fed  # type: ignore[return-value]
        so = _options(threads, optimize)
    # values of initializers the model marks as external data, handed over as buffers (the
    # model then carries no copy of them); kept alive with the session
    shared = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in (initializers or {}).values()]
    if shared:
        so.add_external_initializers(list(initializers or {}), shared)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(data, sess_options=so, providers=providers)
    sess._onnxslim_lr_shared = shared  # type: ignore[attr-defined]
    return sess


def _options(threads: int | None, optimize: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    # Interleaved timing keeps several sessions alive: with spinning on, the idle sessions'
    # worker threads keep spinning and steal cores from the one being timed (measured here:
    # 41 ms instead of 8.5 ms for the same conv). Off for every session, so comparisons stay fair.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class FedSession:
    """A session whose large weights are graph inputs, fed from shared buffers on every run.

    Behaves as the wrapped ``ort.InferenceSession`` for ``run`` and ``get_inputs`` (the weight
    inputs are added to every feed and hidden from the input list); anything else is the
    session's own.
    """

    def __init__(self, session: ort.InferenceSession, weights: Mapping[str, Any]) -> None:
        self._session = session
        self._weights = dict(weights)

    def run(self, output_names: Any, input_feed: Mapping[str, Any], run_options: Any = None) -> Any:
        feeds = dict(input_feed)
        feeds.update(self._weights)
        return self._session.run(output_names, feeds, run_options)

    def get_inputs(self) -> list[Any]:
        return [i for i in self._session.get_inputs() if i.name not in self._weights]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _fed_session(model: onnx.ModelProto, initializers: Mapping[str, np.ndarray], so: ort.SessionOptions,
                 providers: list[str]) -> FedSession | None:
    """``model`` with the given initializers turned into graph inputs; None if the runtime refuses it."""
    names = set(initializers)
    fed = onnx.ModelProto()
    fed.CopyFrom(model)  # the weightless copy: small
    g = fed.graph
    shells = [t for t in g.initializer if t.name in names]
    keep = [t for t in g.initializer if t.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    listed = {i.name for i in g.input}
    for t in shells:
        if t.name not in listed:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    weights = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in initializers.items()}
    try:
        sess = ort.InferenceSession(fed.SerializeToString(), sess_options=so, providers=providers)
    except Exception as exc:  # an op that needs a constant operand: fall back to initializers
        log.info("weights as inputs refused by onnxruntime (%s); using external initializers", exc)
        return None
    return FedSession(sess, weights)


class Runner(Protocol):
    """What timing needs of a session (an ``ort.InferenceSession``, or a fake in tests)."""

    def run(self, output_names: Any, input_feed: Mapping[str, Any]) -> Any: ...

    def get_inputs(self) -> Sequence[Any]: ...


@dataclass
class Timing:
    """Latencies of several models measured in the same interleaved rounds.

    ``samples[i][r]`` is model ``i``'s mean latency (seconds) in round ``r``; ``aa_samples``
    the A/A control's (a second session of model 0). ``medians`` are per-model medians,
    for display; speedups come from the paired rounds (:meth:`speedup`).
    """

    medians: list[float]
    rounds: int
    inner: int
    provider: str
    threads: int
    samples: list[list[float]] = field(default_factory=list)
    aa_samples: list[float] = field(default_factory=list)
    #: leading dimension of the first input timed (the batch), when known
    batch: int | None = None
    #: the provider that was asked for, when it differs from the one the session used
    requested_provider: str | None = None
    confidence: float = CONFIDENCE
    #: why the rounds stopped: "decided", "max rounds", "time budget" or "fixed"
    stopped: str = "fixed"

    @property
    def aa(self) -> Speedup | None:
        """The A/A control: a second session of model 0 against model 0 (should contain 1)."""
        if not self.aa_samples or not self.samples:
            return None
        return speedup_from_rounds(self.samples[0], self.aa_samples, self.confidence)

    def raw_speedup(self, baseline: int = 0, other: int = 1) -> Speedup:
        """Paired interval of ``other`` over ``baseline``, without the A/A widening."""
        if self.samples and len(self.samples[baseline]) and len(self.samples[other]):
            return speedup_from_rounds(self.samples[baseline], self.samples[other], self.confidence)
        r = self.medians[baseline] / self.medians[other] if self.medians[other] > 0 else float("inf")
        return Speedup(r, r, r, 0, self.confidence)  # no rounds kept: a point, no interval

    def speedup(self, baseline: int = 0, other: int = 1) -> Speedup:
        """Speedup of ``other`` over ``baseline`` (>1 means faster) with its interval.

        The interval is widened by the A/A control's bias (see :func:`.speed.widen`); this is
        the figure every decision and every printed speedup uses.
        """
        return widen(self.raw_speedup(baseline, other), self.aa)

    def ratio(self, baseline: int = 0, other: int = 1) -> float:
        """Point estimate of the speedup of ``other`` over ``baseline`` (>1 means faster)."""
        return self.raw_speedup(baseline, other).ratio

    def header(self) -> str:
        """Provider, batch, threads and rounds: what every printed figure depends on."""
        prov = self.provider
        if self.requested_provider and self.requested_provider != self.provider:
            prov += f" ({self.requested_provider} requested, not used)"
        batch = f"batch {self.batch}, " if self.batch is not None else ""
        return (f"{prov}, {batch}{self.threads} threads, {self.rounds} interleaved rounds x {self.inner} runs, "
                f"{self.confidence * 100:.3g}% intervals")


class ModelSession:
    """A session that keeps the model it was built from: runs as the session, reads as the model.

    Why: the budget ladders run each rung once for its output error and then time it; one
    session serves both, and whoever inspects the timed group still sees the models.
    """

    def __init__(self, model: onnx.ModelProto, session: Any) -> None:
        self.model = model
        self.session = session

    def run(self, output_names: Any, input_feed: Mapping[str, Any], run_options: Any = None) -> Any:
        return self.session.run(output_names, input_feed, run_options)

    def get_inputs(self) -> list[Any]:
        return list(self.session.get_inputs())

    def get_providers(self) -> list[str]:
        return list(self.session.get_providers())


def session_provider(session: Any, requested: str) -> str:
    """The provider a session really runs on (its first provider), whatever was requested."""
    try:
        used = list(session.get_providers())
    except AttributeError:  # a fake runner in tests, or an object without the method
        return requested
    if requested != "CPUExecutionProvider" and (not used or used[0] != requested):
        log.warning("%s was requested but the session runs on %s: figures are labelled as such",
                    requested, used[0] if used else "no provider")
    return used[0] if used else requested


def _leading_dim(feeds: Mapping[str, np.ndarray]) -> int | None:
    for v in feeds.values():
        shape = getattr(v, "shape", ())
        return int(shape[0]) if len(shape) else None
    return None


def time_models(
    models: Sequence[onnx.ModelProto | bytes | Runner],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int | None = None,
    provider: str = "CPUExecutionProvider",
    rounds: int = 9,
    min_round_s: float = 0.005,
    warmup: int = 2,
    max_total_s: float = 20.0,
    decide_at: float | None = None,
    max_rounds: int = 36,
    aa: bool | Runner = True,
    confidence: float = CONFIDENCE,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Time several models in interleaved rounds on the same feeds; model 0 is the baseline.

    ``rounds`` is the number of rounds run first (at least 6, so that a 95 % interval
    exists, even past ``max_total_s``). With ``decide_at`` set, the data are looked at
    after ``rounds``, then twice as many, and so on up to ``max_rounds``
    (:func:`look_schedule`), and rounds are added while some model's interval (against
    model 0, A/A-widened) straddles ``decide_at`` or clears it under a noise-gated control
    (:func:`undecided`), until ``max_rounds`` or ``max_total_s``; every interval is at the
    level ``1 - (1 - confidence) / looks`` (Bonferroni over the looks; 98.3 % for the
    defaults 9..36), so the overall error stays within ``1 - confidence``. Without
    ``decide_at``, exactly ``rounds`` rounds run (fewer if the time budget is spent, never
    below 6) at ``confidence``.

    ``aa``: True adds a second session of model 0 as the A/A control (a session given as
    model 0 is reused, since it cannot be copied); a runner object is used as the control;
    False runs no control.
    """
    threads = threads or default_threads()
    rounds = max(MIN_ROUNDS, rounds)
    max_rounds = max(rounds, max_rounds) if decide_at is not None else rounds
    # adaptive stopping looks at the data several times; each look's interval is at the
    # Bonferroni-corrected level so that the chance of a wrong early decision over all the
    # looks stays within 1 - confidence (optional stopping at the nominal level would let
    # a borderline candidate be "decided" by whichever look happened to be lucky). The
    # looks are at doubling round counts, so a high cap costs few looks (9..145: 5 looks,
    # 99 % each) where fixed steps of 4 rounds spent 0.6 % of the error per 4 rounds
    schedule = look_schedule(rounds, max_rounds)
    confidence = 1.0 - (1.0 - confidence) / len(schedule)

    def as_runner(m: Any) -> Any:
        return m if hasattr(m, "run") and not isinstance(m, (bytes, onnx.ModelProto)) else \
            make_session(m, threads=threads, provider=provider)

    sessions = [as_runner(m) for m in models]
    n_models = len(sessions)
    if aa is True:
        sessions.append(as_runner(models[0]) if isinstance(models[0], (bytes, onnx.ModelProto)) else sessions[0])
    elif aa is not False:
        sessions.append(aa)
    used_provider = session_provider(sessions[0], provider)
    per_sess_feeds = []
    for s in sessions:
        names = {i.name for i in s.get_inputs()}
        per_sess_feeds.append({k: v for k, v in feeds.items() if k in names})
    # warm-up, and calibrate how many runs make one round last min_round_s
    start = clock()
    single = []
    for s, f in zip(sessions, per_sess_feeds):
        for _ in range(warmup):
            s.run(None, f)
        t0 = clock()
        s.run(None, f)
        single.append(max(clock() - t0, 1e-6))
    inner = max(1, int(min_round_s / min(single)), min(MIN_INNER, int(MAX_INNER_S / max(single))))
    samples: list[list[float]] = [[] for _ in sessions]

    k = len(sessions)

    def one_round(r: int) -> None:
        # every session takes every position in turn (rotation), both directions (reversal):
        # a position effect (running after a given session, at a round boundary) is spread
        # over all sessions instead of biasing one pair
        rot = [(j + r // 2) % k for j in range(k)]
        order = rot if r % 2 == 0 else rot[::-1]
        for i in order:
            s, f = sessions[i], per_sess_feeds[i]
            best = math.inf
            for _ in range(inner):
                t0 = clock()
                s.run(None, f)
                best = min(best, clock() - t0)
            samples[i].append(best)

    def timing(stopped: str) -> Timing:
        return Timing(
            medians=[statistics.median(x) for x in samples[:n_models]],
            rounds=len(samples[0]),
            inner=inner,
            provider=used_provider,
            threads=threads,
            samples=samples[:n_models],
            aa_samples=samples[n_models] if len(sessions) > n_models else [],
            batch=_leading_dim(feeds),
            requested_provider=provider if provider != used_provider else None,
            confidence=confidence,
            stopped=stopped,
        )

    r = 0
    while r < rounds:
        one_round(r)
        r += 1
        if r >= MIN_ROUNDS and clock() - start > max_total_s:
            return timing("time budget")
    if decide_at is None:
        return timing("fixed")
    for target in schedule[1:] + [None]:
        t = timing("decided")
        if not undecided(t, decide_at, n_models):
            return t
        if target is None:
            t.stopped = "max rounds"
            return t
        while r < target:
            if clock() - start > max_total_s:
                t = timing("time budget")
                return t
            one_round(r)
            r += 1
    raise AssertionError("unreachable")  # pragma: no cover


def look_schedule(rounds: int, max_rounds: int) -> list[int]:
    """Round counts at which the adaptive rule looks: ``rounds``, then doubling, up to ``max_rounds``."""
    out = [rounds]
    while out[-1] < max_rounds:
        out.append(min(max_rounds, 2 * out[-1]))
    return out


def undecided(t: Timing, decide_at: float, n_models: int) -> bool:
    """Whether more rounds could change a decision.

    Some model's interval straddles ``decide_at``, or one is above it while the A/A control
    is too noisy for any claim (:func:`.speed.too_noisy`): more rounds may quiet the control.
    """
    noisy = too_noisy(t.aa)
    for i in range(1, n_models):
        v = verdict(t.speedup(0, i), decide_at)
        if v == "straddles" or (v == "above" and noisy):
            return True
    return False
