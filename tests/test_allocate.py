"""The budget allocator: Lagrangian frontier over per-layer ladders (allocate.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxslim_lr.allocate import Option, frontier, within


def _ladder(layer: str, points: list[tuple[float, float]]) -> list[Option]:
    return [Option(layer, i, saving=s, damage=d) for i, (d, s) in enumerate(points)]


def test_budget_goes_to_the_insensitive_layer() -> None:
    # both layers save the same latency at each rung; "robust" costs 10x less damage
    ladders = {
        "sensitive": _ladder("sensitive", [(1.0, 1.0), (3.0, 2.0)]),
        "robust": _ladder("robust", [(0.1, 1.0), (0.3, 2.0)]),
    }
    plans = frontier(ladders)
    best = plans[within(plans, 0.5)]
    assert best.keys() == {"robust": 1}
    assert best.saving == pytest.approx(2.0)
    assert best.damage == pytest.approx(0.3)
    # with more budget the sensitive layer comes next, its cheaper rung first
    nxt = plans[within(plans, 1.3)]
    assert nxt.keys() == {"robust": 1, "sensitive": 0}


def test_zero_budget_is_the_original_and_frontier_is_monotone() -> None:
    rng = np.random.default_rng(0)
    ladders = {f"l{i}": _ladder(f"l{i}", [(float(d), float(s)) for d, s in rng.uniform(0.01, 1, (4, 2))])
               for i in range(5)}
    plans = frontier(ladders)
    assert plans[0].choice == {} and plans[within(plans, 0.0)].choice == {}
    sav = [p.saving for p in plans]
    dam = [p.damage for p in plans]
    assert all(b >= a for a, b in zip(sav, sav[1:]))
    assert all(b >= a for a, b in zip(dam, dam[1:]))
    # consecutive plans differ in exactly one layer
    for a, b in zip(plans, plans[1:]):
        changed = [k for k in set(a.choice) | set(b.choice) if a.choice.get(k) != b.choice.get(k)]
        assert len(changed) == 1


def _brute(ladders: dict[str, list[Option]], max_damage: float) -> float:
    best = 0.0
    per_layer = [[None, *opts] for opts in ladders.values()]
    for combo in itertools.product(*per_layer):
        d = sum(o.damage for o in combo if o is not None)
        s = sum(o.saving for o in combo if o is not None)
        if d <= max_damage + 1e-12:
            best = max(best, s)
    return best


def test_frontier_points_are_optimal_for_their_own_damage_on_convex_ladders() -> None:
    # concave saving-vs-damage ladders: every frontier plan is an exact knapsack optimum
    rng = np.random.default_rng(1)
    ladders = {}
    for i in range(4):
        d = np.cumsum(rng.uniform(0.1, 1.0, 3))
        slopes = np.sort(rng.uniform(0.5, 3.0, 3))[::-1]
        s = np.cumsum(slopes * np.diff(np.concatenate([[0.0], d])))
        ladders[f"l{i}"] = _ladder(f"l{i}", list(zip(d.tolist(), s.tolist())))
    for p in frontier(ladders):
        assert p.saving == pytest.approx(_brute(ladders, p.damage))


def test_dominated_and_useless_options_are_never_chosen() -> None:
    ladders = {"a": _ladder("a", [(0.5, 1.0), (0.6, 0.8), (0.2, 0.0), (1.0, -1.0)])}
    plans = frontier(ladders)
    chosen = {p.choice["a"].key for p in plans if "a" in p.choice}
    assert chosen == {0}


def test_free_savings_come_first() -> None:
    ladders = {"free": _ladder("free", [(0.0, 0.5)]), "paid": _ladder("paid", [(0.1, 5.0)])}
    plans = frontier(ladders)
    assert plans[1].keys() == {"free": 0}
    assert plans[within(plans, 0.0)].keys() == {"free": 0}
