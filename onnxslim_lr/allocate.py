"""Global allocation of an accuracy budget across layers: one rung of each layer's ladder.

The problem. Each rewritable layer ``l`` offers a ladder of options ``j`` (the original, then
methods x ranks), each with a *saving* ``s_lj >= 0`` (measured latency saved, or MACs) and a
predicted *damage* ``d_lj >= 0`` (the model's output degradation when that option alone is
applied, measured end to end on calibration data). We want one option per layer maximising
``sum s`` subject to ``sum d <= D``. That is a multiple-choice knapsack, NP-hard in general.

Why a Lagrangian / convex-hull greedy and not an exact DP:

* the damages are *predictions*: per-layer measurements assumed additive (the usual
  first-order assumption of AIMET's and HAWQ's per-layer sensitivity allocation). The real
  model is then evaluated anyway, so an exact optimum of an approximate objective buys
  little, and the caller needs a whole *family* of plans (a frontier) to verify in order,
  not the single optimum for one D;
* for each Lagrange multiplier ``lam`` the relaxed problem ``max sum (s - lam d)`` separates by
  layer, and as ``lam`` falls from infinity to 0 the chosen plans move along the upper convex
  hull of each layer's (damage, saving) points. Merging all layers' hull segments by
  decreasing slope (saving per unit damage) gives every Lagrangian-optimal plan in
  ``O(n log n)``: step ``k`` of the frontier takes the segment that buys the most saving per
  unit of damage among those left. Each step is an optimum of the relaxed problem, and the
  frontier is monotone: walking back one step ("back-off") undoes the step with the worst
  saving per damage, which is exactly the layer whose extra aggressiveness was least worth it.

Options under the hull (dominated, or on a concave dent of a ladder) are never chosen; with
measured ladders they are either dominated or within measurement noise of the hull.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence


@dataclass(frozen=True)
class Option:
    """One rung of one layer's ladder (the original layer is implicit: saving 0, damage 0)."""

    layer: str
    key: Hashable
    saving: float
    damage: float
    #: anything the caller needs to build the option (a candidate, its parameters)
    payload: Any = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class Plan:
    """One option per layer (layers absent from ``choice`` stay original)."""

    choice: Mapping[str, Option]
    saving: float
    damage: float

    def keys(self) -> dict[str, Hashable]:
        return {layer: o.key for layer, o in self.choice.items()}


def _hull(options: Sequence[Option]) -> list[Option]:
    """Upper-left convex hull of (damage, saving) starting at the original (0, 0).

    Returned in order of increasing damage and saving, without the origin; every consecutive
    segment has a smaller slope (saving per damage) than the one before.
    """
    # the best saving for each damage; drop points that save nothing
    pts = sorted((o for o in options if o.saving > 0), key=lambda o: (max(o.damage, 0.0), -o.saving))
    # keep only points that increase saving (Pareto front)
    front: list[Option] = []
    for o in pts:
        if not front or o.saving > front[-1].saving:
            front.append(o)
    hull: list[tuple[float, float, Option | None]] = [(0.0, 0.0, None)]
    for o in front:
        d, s = max(o.damage, 0.0), o.saving
        while len(hull) >= 2:
            (d1, s1, _), (d2, s2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the chord from hull[-2] to o
            if (s2 - s1) * (d - d1) <= (s - s1) * (d2 - d1):
                hull.pop()
            else:
                break
        hull.append((d, s, o))
    return [o for _, _, o in hull[1:] if o is not None]


def frontier(ladders: Mapping[str, Sequence[Option]]) -> list[Plan]:
    """Every Lagrangian-optimal plan, from the original (first) to the most aggressive (last).

    Each plan differs from the previous one in exactly one layer, moved one hull point up.
    Ties in slope are broken by layer order in ``ladders`` (deterministic).
    """
    steps: list[tuple[float, int, int, str, Option]] = []
    for order, (layer, opts) in enumerate(ladders.items()):
        hull = _hull(opts)
        prev_d, prev_s = 0.0, 0.0
        for depth, o in enumerate(hull):
            dd, ds = max(o.damage, 0.0) - prev_d, o.saving - prev_s
            slope = float("inf") if dd <= 0 else ds / dd
            steps.append((slope, order, depth, layer, o))
            prev_d, prev_s = max(o.damage, 0.0), o.saving
    # by decreasing slope; a layer's own segments already have decreasing slopes, and the
    # depth tie-break keeps them in order when slopes are equal
    steps.sort(key=lambda t: (-t[0], t[1], t[2]))
    plans = [Plan(choice={}, saving=0.0, damage=0.0)]
    current: dict[str, Option] = {}
    for _, _, _, layer, o in steps:
        current = dict(current)
        current[layer] = o
        plans.append(Plan(choice=current, saving=sum(x.saving for x in current.values()),
                          damage=sum(max(x.damage, 0.0) for x in current.values())))
    return plans


def within(plans: Sequence[Plan], max_damage: float) -> int:
    """Index of the most saving plan of a frontier whose predicted damage is <= ``max_damage``."""
    best = 0
    for i, p in enumerate(plans):
        if p.damage <= max_damage + 1e-12:
            best = i
    return best
