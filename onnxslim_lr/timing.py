"""Latency on onnxruntime, measured the way a deployment engineer would run the model.

FLOPs lie: a factorized layer with half the MACs can be slower (more kernel launches, worse
memory traffic, a convolution algorithm that no longer applies). So every decision this tool
makes about speed rests on these measurements:

* sessions use full graph optimisations (what users deploy with) and a fixed thread count;
* every model is warmed up, then the models are run in *interleaved* rounds (A, B, A, B ...)
  so that frequency scaling or a noisy neighbour affects all of them alike;
* a round runs each model enough times to last a few milliseconds (timer resolution), and
  the figure reported is the median over rounds.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)


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
) -> ort.InferenceSession:
    """An InferenceSession with pinned threads; ``optimize=False`` disables all graph rewrites.

    Tests use ``optimize=False`` so that onnxruntime's own fusions cannot hide a numeric bug
    in a rewrite; timing uses the full optimisation level, as in deployment.
    """
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
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(data, sess_options=so, providers=providers)


@dataclass
class Timing:
    """Median latency (seconds) of each model, measured in the same interleaved run."""

    medians: list[float]
    rounds: int
    inner: int
    provider: str
    threads: int
    samples: list[list[float]] = field(default_factory=list)

    def ratio(self, baseline: int = 0, other: int = 1) -> float:
        """Speedup of ``other`` over ``baseline`` (>1 means faster)."""
        return self.medians[baseline] / self.medians[other] if self.medians[other] > 0 else float("inf")


def time_models(
    models: Sequence[onnx.ModelProto | bytes | ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int | None = None,
    provider: str = "CPUExecutionProvider",
    rounds: int = 9,
    min_round_s: float = 0.005,
    warmup: int = 2,
    max_total_s: float = 20.0,
) -> Timing:
    """Interleaved median latency of several models on the same feeds."""
    threads = threads or default_threads()
    sessions = [
        m if isinstance(m, ort.InferenceSession) else make_session(m, threads=threads, provider=provider) for m in models
    ]
    per_sess_feeds = []
    for s in sessions:
        names = {i.name for i in s.get_inputs()}
        per_sess_feeds.append({k: v for k, v in feeds.items() if k in names})
    # warm-up, and calibrate how many runs make one round last min_round_s
    single = []
    for s, f in zip(sessions, per_sess_feeds):
        for _ in range(warmup):
            s.run(None, f)
        t0 = time.perf_counter()
        s.run(None, f)
        single.append(max(time.perf_counter() - t0, 1e-6))
    inner = max(1, int(min_round_s / min(single)))
    # keep the whole measurement within max_total_s
    per_round = sum(t * inner for t in single)
    rounds = max(3, min(rounds, int(max_total_s / max(per_round, 1e-9))))
    samples: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            s, f = sessions[i], per_sess_feeds[i]
            t0 = time.perf_counter()
            for _ in range(inner):
                s.run(None, f)
            samples[i].append((time.perf_counter() - t0) / inner)
    return Timing(
        medians=[statistics.median(x) for x in samples],
        rounds=rounds,
        inner=inner,
        provider=provider,
        threads=threads,
        samples=samples,
    )
