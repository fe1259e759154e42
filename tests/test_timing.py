"""Timing statistics and speed decisions, proved with a fake clock (no real timing here).

A fake session advances a fake clock by a latency drawn from a seeded distribution: a
per-session speed, multiplicative per-run noise, and a shared slowly drifting "machine load"
that affects every session alike (what interleaving and pairing must cancel). Nothing here
depends on how fast the machine running the tests is.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from onnxslim_lr import speed
from onnxslim_lr.speed import (MAC_MARGIN, NOISE_GATE, Speedup, aa_reach, layer_decision, model_decision,
                               paired_interval, signed_rank_k)
from onnxslim_lr.timing import Timing, look_schedule, time_models


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Load:
    """Machine load shared by every session: a seeded random walk in log space, one step per
    ``tick`` seconds of fake time (about one round: a slow drift that pairing must cancel)."""

    def __init__(self, seed: int, drift: float = 0.05, tick: float = 0.01) -> None:
        self.rng = np.random.default_rng(seed)
        self.log_level = 0.0
        self.drift = drift
        self.tick = tick
        self.next = 0.0

    def factor(self, now: float) -> float:
        while now >= self.next:
            self.log_level = 0.9 * self.log_level + self.rng.normal(0.0, self.drift)
            self.next += self.tick
        return math.exp(self.log_level)


class FakeSession:
    """A model of fixed ``latency`` on a busy machine: shared load, per-run noise and, with
    ``burst=(p, size)``, preemptions: with probability ``p`` a run is delayed by an
    exponential time of mean ``size`` x its latency (a neighbour taking the core)."""

    def __init__(self, clock: FakeClock, load: Load, latency: float, seed: int, noise: float = 0.05,
                 providers: list[str] | None = None, burst: tuple[float, float] = (0.0, 0.0)) -> None:
        self.clock, self.load, self.latency, self.noise = clock, load, latency, noise
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.providers = providers
        self.burst = burst

    def run(self, names: object, feeds: object) -> None:
        self.calls += 1
        t = self.latency * self.load.factor(self.clock.t) * math.exp(self.rng.normal(0.0, self.noise))
        if self.burst[0] and self.rng.random() < self.burst[0]:
            t += self.rng.exponential(self.burst[1] * self.latency)
        self.clock.t += t

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="x")]

    def get_providers(self) -> list[str]:
        if self.providers is None:
            raise AttributeError
        return self.providers


def _time(latencies: list[float], seed: int, *, decide_at: float | None = 1.1, rounds: int = 9,
          max_rounds: int = 41, noise: float = 0.05, burst: tuple[float, float] = (0.0, 0.0),
          aa_latency: float | None = None, **kw: object) -> Timing:
    clock = FakeClock()
    load = Load(seed)
    sessions = [FakeSession(clock, load, lat, seed * 100 + i, noise, burst=burst) for i, lat in enumerate(latencies)]
    aa = FakeSession(clock, load, aa_latency or latencies[0], seed * 100 + 99, noise, burst=burst)
    return time_models(sessions, {"x": np.zeros(1)}, rounds=rounds, max_rounds=max_rounds, decide_at=decide_at,
                       aa=aa, clock=clock, min_round_s=0.005, max_total_s=1e9, **kw)


# ---- the statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,crit", [(6, 0), (8, 3), (10, 8), (15, 25), (20, 52), (25, 89)])
def test_signed_rank_critical_values_match_the_published_table(n: int, crit: int) -> None:
    # two-sided alpha = 0.05 critical values of Wilcoxon's T (e.g. Conover, Practical
    # Nonparametric Statistics, table A12): the interval uses the (crit + 1)-th Walsh average
    assert signed_rank_k(n) == crit + 1


def test_no_interval_below_six_rounds_is_the_data_range() -> None:
    d = [0.1, -0.2, 0.05, 0.3, 0.0]
    est, lo, hi = paired_interval(d)
    assert (lo, hi) == (-0.2, 0.3)
    assert lo <= est <= hi


def test_interval_coverage_is_close_to_nominal() -> None:
    rng = np.random.default_rng(7)
    hits = 0
    trials = 400
    for _ in range(trials):
        d = 0.2 + rng.standard_t(df=4, size=15) * 0.05  # heavy tails, centre 0.2
        _, lo, hi = paired_interval(d)
        hits += lo <= 0.2 <= hi
    assert 0.92 <= hits / trials <= 0.99


def test_speedup_formats_with_its_interval() -> None:
    assert str(Speedup(1.4213, 1.3712, 1.4791)) == "1.42x [1.37, 1.48]"
    assert speed.describe(Speedup(1.01, 0.97, 1.05)).endswith("(no measurable difference)")


# ---- the decisions ------------------------------------------------------------------------------


def test_layer_decision_uses_the_lower_bound_and_the_mac_margin() -> None:
    assert layer_decision(Speedup(1.5, 1.2, 1.8), 1.1, 2.0).keep
    straddle = layer_decision(Speedup(1.5, 1.05, 1.8), 1.1, 2.0)
    assert not straddle.keep and "straddles" in straddle.reason
    assert not layer_decision(Speedup(0.8, 0.7, 0.9), 1.1, 2.0).keep
    # a clear win on the clock is not enough when the MACs barely moved
    mac = layer_decision(Speedup(1.9, 1.7, 2.1), 1.1, MAC_MARGIN - 0.01)
    assert not mac.keep and "MAC ratio" in mac.reason


def test_model_decision_needs_the_lower_bound_above_one() -> None:
    assert model_decision(Speedup(1.3, 1.1, 1.5), 2.0).keep
    assert not model_decision(Speedup(1.13, 0.95, 1.3), 2.0).keep
    assert not model_decision(Speedup(1.19, 1.1, 1.3), 1.00006).keep  # the 0.006 % MAC cut


# ---- time_models with a fake clock ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_noise_only_candidate_is_rejected(seed: int) -> None:
    t = _time([1e-3, 1e-3], seed)
    s = t.speedup(0, 1)
    assert s.lo < 1.1
    assert not layer_decision(s, 1.1, 2.0).keep


@pytest.mark.parametrize("seed", range(10))
def test_clear_win_is_kept_and_stops_early(seed: int) -> None:
    t = _time([1e-3, 0.5e-3], seed)
    s = t.speedup(0, 1)
    assert s.contains(2.0) or abs(s.ratio - 2.0) < 0.1
    assert layer_decision(s, 1.1, 2.0).keep
    assert t.stopped == "decided" and t.rounds == 9  # no extra round was needed


@pytest.mark.parametrize("seed", range(10))
def test_straddling_candidate_resolves_to_the_original(seed: int) -> None:
    # truly 1.1x faster with --min-speedup 1.1: the interval cannot clear the threshold
    t = _time([1e-3, 1e-3 / 1.1], seed, noise=0.08)
    s = t.speedup(0, 1)
    assert not layer_decision(s, 1.1, 2.0).keep
    assert t.rounds > 9  # rounds were added before giving up


def test_adaptive_rounds_stop_at_the_cap() -> None:
    t = _time([1e-3, 1e-3 / 1.1], 3, noise=0.08, max_rounds=21)
    assert t.rounds == 21 and t.stopped in ("max rounds", "decided")


@pytest.mark.parametrize("seed", range(20))
def test_aa_is_never_reported_as_a_speedup(seed: int) -> None:
    t = _time([1e-3, 1e-3], seed, decide_at=1.0)
    aa = t.aa
    assert aa is not None and aa.contains(1.0)
    assert speed.verdict(t.speedup(0, 1), 1.0) != "above"
    # and an identical model never passes the end-to-end rule (MAC ratio 1)
    assert not model_decision(t.speedup(0, 1), 1.0).keep


def test_same_inputs_same_decision_across_noise_seeds() -> None:
    """Repeatability: with different noise each run, clear cases always decide the same way."""
    kept = set()
    for seed in range(8):
        t = _time([1e-3, 0.5e-3, 1e-3, 1.3e-3], seed)
        kept.add(tuple(layer_decision(t.speedup(0, i), 1.1, 2.0).keep for i in (1, 2, 3)))
    assert kept == {(True, False, False)}


def test_pairing_cancels_shared_load() -> None:
    """A strong shared drift makes the raw medians vary, but the paired interval stays tight."""
    t = _time([1e-3, 0.5e-3], 1, noise=0.01, decide_at=None, rounds=15)
    s = t.raw_speedup(0, 1)
    assert s.hi / s.lo < 1.1 and s.contains(2.0)


def test_without_decide_at_rounds_are_fixed_and_ratio_is_kept_for_callers() -> None:
    t = _time([1e-3, 0.5e-3], 2, decide_at=None, rounds=12)
    assert t.rounds == 12 and t.stopped == "fixed"
    assert t.ratio(0, 1) == pytest.approx(t.speedup(0, 1).ratio)
    assert len(t.samples) == 2 and len(t.aa_samples) == 12
    assert t.batch == 1


def test_time_models_never_runs_fewer_than_six_rounds() -> None:
    clock = FakeClock()
    load = Load(0)
    s = [FakeSession(clock, load, 1.0, i) for i in range(2)]
    t = time_models(s, {"x": np.zeros((4, 3))}, rounds=2, max_total_s=0.0, aa=False, clock=clock)
    assert t.rounds == 6 and t.aa is None and t.batch == 4


def test_medians_only_timing_still_gives_a_point() -> None:
    t = Timing(medians=[1.0, 0.5], rounds=3, inner=1, provider="fake", threads=1)
    assert t.ratio(0, 1) == 2.0
    assert (t.speedup(0, 1).lo, t.speedup(0, 1).hi) == (2.0, 2.0)


# ---- the noise gate and the per-round minimum -------------------------------------------------------


def test_noise_gate_vetoes_every_claim_when_the_aa_reaches_far() -> None:
    noisy = Speedup(1.02, 0.65, 1.61)
    quiet = Speedup(1.0, 0.97, 1.03)
    assert aa_reach(noisy) == pytest.approx(1.61) and aa_reach(quiet) == pytest.approx(1 / 0.97)
    win = Speedup(4.0, 3.0, 5.0)  # clears any threshold even after widening by 1.61
    for d in (layer_decision(win, 1.1, 2.0, noisy), model_decision(win, 2.0, noisy)):
        assert not d.keep and "timing too noisy to decide: A/A 1.02x [0.65, 1.61]" in d.reason
    assert layer_decision(win, 1.1, 2.0, quiet).keep and model_decision(win, 2.0, quiet).keep
    # the gate only vetoes claims: a rejection keeps its own reason
    assert "< required" in layer_decision(Speedup(0.8, 0.7, 0.9), 1.1, 2.0, noisy).reason


@pytest.mark.parametrize("seed", range(5))
def test_biased_aa_session_adds_rounds_then_claims_nothing(seed: int) -> None:
    # the control runs 1.7x slower than the baseline it copies (a session effect): even a
    # clear 4x win is no claim, after the rounds were taken to the cap in the hope of quiet
    t = _time([1e-3, 0.25e-3], seed, aa_latency=1.7e-3, max_rounds=41)
    assert aa_reach(t.aa) > NOISE_GATE
    assert t.rounds == 41 and t.stopped == "max rounds"
    d = layer_decision(t.speedup(0, 1), 1.1, 2.0, t.aa)
    assert not d.keep and "timing too noisy" in d.reason
    assert not model_decision(t.speedup(0, 1), 2.0, t.aa).keep


@pytest.mark.parametrize("seed", range(5))
def test_quiet_aa_and_clear_win_is_kept_at_the_first_look(seed: int) -> None:
    t = _time([1e-3, 0.5e-3], seed, noise=0.02)
    assert aa_reach(t.aa) < 1.1
    assert layer_decision(t.speedup(0, 1), 1.1, 2.0, t.aa).keep
    assert model_decision(t.speedup(0, 1), 2.0, t.aa).keep
    assert t.rounds == 9 and t.stopped == "decided"


@pytest.mark.parametrize("seed", range(8))
def test_round_minimum_sees_through_preemptions(seed: int) -> None:
    # a third of the runs is delayed by a neighbour (exponential, mean 3x the latency): a
    # round's mean would swing by about its own size; the fastest of the round's runs does not
    t = _time([1e-3, 1e-3 / 1.5, 1e-3], seed, burst=(0.3, 3.0), decide_at=1.1)
    assert aa_reach(t.aa) < 1.15
    assert layer_decision(t.speedup(0, 1), 1.1, 2.0, t.aa).keep and t.speedup(0, 1).contains(1.5)
    assert not layer_decision(t.speedup(0, 2), 1.1, 2.0, t.aa).keep and t.speedup(0, 2).contains(1.0)


@pytest.mark.parametrize("latency,inner", [(1e-5, (400, 600)), (1e-3, (5, 5)), (0.011, (4, 4)), (0.1, (1, 1))])
def test_runs_per_round(latency: float, inner: tuple[int, int]) -> None:
    # as many runs as last 5 ms (min_round_s), at least 5, but for a slow model only as many as
    # fit in 50 ms (the fake load moves latencies by a few percent)
    t = _time([latency, latency], 0, decide_at=None, noise=0.0)
    assert inner[0] <= t.inner <= inner[1]


def test_looks_double_and_the_level_is_bonferroni_over_them() -> None:
    assert look_schedule(9, 72) == [9, 18, 36, 72]
    assert look_schedule(9, 144) == [9, 18, 36, 72, 144]
    assert look_schedule(15, 41) == [15, 30, 41]
    assert look_schedule(9, 9) == [9]
    t = _time([1e-3, 0.5e-3], 0, max_rounds=72)
    assert t.confidence == pytest.approx(1 - 0.05 / 4)
    assert _time([1e-3, 0.5e-3], 0, decide_at=None).confidence == pytest.approx(0.95)


# ---- provider honesty -----------------------------------------------------------------------------


def test_cpu_figures_are_never_labelled_cuda() -> None:
    clock = FakeClock()
    load = Load(0)
    s = [FakeSession(clock, load, 1e-3, i, providers=["CPUExecutionProvider"]) for i in range(2)]
    t = time_models(s, {"x": np.zeros(1)}, provider="CUDAExecutionProvider", clock=clock, aa=False)
    assert t.provider == "CPUExecutionProvider"
    assert t.requested_provider == "CUDAExecutionProvider"
    assert "CUDAExecutionProvider requested, not used" in t.header()
    s = [FakeSession(clock, load, 1e-3, i, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
         for i in range(2)]
    t = time_models(s, {"x": np.zeros(1)}, provider="CUDAExecutionProvider", clock=clock, aa=False)
    assert t.provider == "CUDAExecutionProvider" and t.requested_provider is None


# ---- the pipeline uses the interval (fake Timing with per-round samples) ---------------------------


def _sampled_timing(speedups: dict[int, float], spread: float, aa_bias: float = 1.0):
    """time_models replacement: model i is `speedups[i]` times faster, per-round log noise +-spread;
    the A/A control runs `aa_bias` times slower than the baseline it copies."""

    def fake(models, feeds, **kw):
        rng = np.random.default_rng(len(models))
        n = 15
        base = np.exp(rng.uniform(-spread, spread, n)) * 1e-3
        samples = [list(base)] + [list(base / speedups.get(i, 1.0) * np.exp(rng.uniform(-spread, spread, n)))
                                  for i in range(1, len(models))]
        aa = list(base * aa_bias * np.exp(rng.uniform(-spread, spread, n)))
        return Timing(medians=[float(np.median(s)) for s in samples], rounds=n, inner=1, provider="fake", threads=1,
                      samples=samples, aa_samples=aa)

    return fake


def test_pipeline_keeps_clear_wins_and_resolves_straddlers_to_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxslim_lr as lr
    from helpers import small_cnn

    from onnxslim_lr import manager, selection

    # per-layer timing runs in selection.py, end-to-end timing in manager.py
    monkeypatch.setattr(manager, "time_models", _sampled_timing({1: 2.0}, 0.05))
    monkeypatch.setattr(selection, "time_models", _sampled_timing({1: 2.0}, 0.05))
    res = lr.compress(small_cnn(c=32), method="svd", rank_ratio=0.25, input_shape=["x:1x3x16x16"])
    convs = [r for r in res.layers if r.op == "Conv"]
    assert [r.status for r in convs] == ["rewritten", "rewritten"] and res.changed
    assert all(r.interval is not None and r.interval[0] > 1.1 for r in convs)
    assert res.timing is not None and res.timing.speedup(0, 1).lo > 1.0

    # 1.15x with +-20 % per-round noise: the interval straddles --min-speedup 1.1 -> original
    monkeypatch.setattr(manager, "time_models", _sampled_timing({1: 1.15}, 0.2))
    monkeypatch.setattr(selection, "time_models", _sampled_timing({1: 1.15}, 0.2))
    res = lr.compress(small_cnn(c=32), method="svd", rank_ratio=0.25, input_shape=["x:1x3x16x16"])
    convs = [r for r in res.layers if r.op == "Conv"]
    assert all(r.status == "kept" for r in convs) and not res.changed
    assert all("straddles" in a.reason for r in convs for a in r.attempts if a.status == "rejected")


def test_pipeline_end_to_end_needs_the_lower_bound_above_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxslim_lr as lr
    from helpers import small_cnn

    from onnxslim_lr import manager, selection

    layer_fake = _sampled_timing({1: 2.0}, 0.05)
    e2e_fake = _sampled_timing({1: 1.05}, 0.2)  # a median above 1, an interval that is not
    monkeypatch.setattr(selection, "time_models", layer_fake)
    monkeypatch.setattr(manager, "time_models", e2e_fake)
    res = lr.compress(small_cnn(c=32), method="svd", rank_ratio=0.25, input_shape=["x:1x3x16x16"])
    assert not res.changed and res.model is res.original
    assert any("not surely faster" in n and "returning the original" in n for n in res.notes)


def test_pipeline_end_to_end_claims_nothing_when_its_aa_is_too_noisy(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxslim_lr as lr
    from helpers import small_cnn

    from onnxslim_lr import manager, selection

    monkeypatch.setattr(selection, "time_models", _sampled_timing({1: 2.0}, 0.05))
    monkeypatch.setattr(manager, "time_models", _sampled_timing({1: 3.0}, 0.05, aa_bias=1.7))
    res = lr.compress(small_cnn(c=32), method="svd", rank_ratio=0.25, input_shape=["x:1x3x16x16"])
    assert not res.changed and res.model is res.original
    assert any("timing too noisy to decide: A/A" in n and "returning the original" in n for n in res.notes)
    # the same layers, a quiet end-to-end control: the rewrite is returned
    monkeypatch.setattr(manager, "time_models", _sampled_timing({1: 3.0}, 0.05))
    assert lr.compress(small_cnn(c=32), method="svd", rank_ratio=0.25, input_shape=["x:1x3x16x16"]).changed


def test_timing_batch_sets_the_sample_batch() -> None:
    import onnxslim_lr as lr
    from helpers import small_cnn

    from onnxslim_lr.errors import InputError

    res = lr.compress(small_cnn(c=8), method="svd", rank_ratio=0.5, allow_slower=True, end_to_end=False,
                      input_shape=["x:1x3x16x16"], timing_batch=4)
    assert res.feeds_shapes["x"] == (4, 3, 16, 16)
    fixed = small_cnn(c=8, dynamic=False)
    with pytest.raises(InputError, match="fixed batch of 1"):
        lr.compress(fixed, method="svd", allow_slower=True, input_shape=["x:1x3x16x16"], timing_batch=4)
