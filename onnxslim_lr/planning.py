"""The planner: passes describe a ladder of candidates per site, the planner picks the rung.

A pass never reads ``--rank-ratio`` / ``--energy`` / ``--target-speedup``. For a matched
site it returns a :class:`Ladder`: the sizes at which it is exact (``full``, one number per
axis: a rank, a pair of Tucker ranks, colours, cluster ranks ...), the rungs it can build
listed by increasing cost, the MAC cost of any rung (the method's cost model, one
convention: multiply-adds per image, 0 when shapes are unknown), and how to build a rung and
measure its approximation error. :func:`choose` applies the user's rule to every ladder the
same way:

* a rung fixed by a method option (``--colors``, ``--ranks`` ...) wins;
* ``--rank-ratio R``: per axis the size nearest to ``R * full``, ties to the larger, clamped
  to ``[1, full]`` -- i.e. ``round(R * full)`` half up
  (:func:`~onnxslim_lr.decompose.ranks.rank_from_ratio`) when every size can be built, else
  the nearest rung the method can build (:attr:`Ladder.snap`);
* ``--target-speedup S``: walking the rungs by increasing cost, the most expensive one whose
  MACs are ``<= original / S`` before the first that is not (exact rational comparison; among
  rungs of equal cost the one listed first, so a ladder lists its preferred rung of each cost
  first); the cheapest rung when none is. **The one fallback**: when the layer's shapes are
  unknown (so MACs are unknown), the rule becomes ``--rank-ratio 1/S``;
* ``--energy E`` (and, with no rule, :data:`DEFAULT_ENERGY` unless the ladder names a
  default rung): for ladders with spectra, per axis the largest over the axis's spectra of
  the smallest rank keeping a share E of the squared singular values (this bounds the
  relative weight error by ``sqrt(1 - E)``, Eckart-Young); for ladders without spectra, the
  cheapest rung whose error is ``<= sqrt(1 - E)`` -- the same bound, checked directly (the
  first listed among rungs of equal cost) -- declined when none is, and declined when the
  ladder has neither (a method whose error is unknown before it is measured, such as
  perforation, has no energy rule).

Whichever rule is used, the pass manager's guards (measured speed, layer error, fidelity)
have the last word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .decompose.ranks import rank_for_energy, rank_from_ratio

#: energy kept by default (relative weight error at most sqrt(0.02) ~ 14 %)
DEFAULT_ENERGY = 0.98

#: tolerance of the error-bound check of spectrum-free ladders
ERROR_TOLERANCE = 1e-12

Sizes = tuple[int, ...]


@dataclass(frozen=True)
class Budget:
    """How aggressive a rewrite may be. At most one of the three rank rules is set.

    ``options`` holds method-specific settings (number of colours, clusters, perforation rate,
    structure sizes ...), keyed by the CLI option's name without dashes.
    """

    rank_ratio: float | None = None
    energy: float | None = None
    target_speedup: float | None = None
    metric: str = "frobenius"
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass
class Ladder:
    """The candidates a pass can build for one site, ordered by cost.

    ``rungs``: the sizes the speedup rule and the error scan walk, by increasing cost.
    ``build(sizes)`` runs the numerics and returns the Candidate (or a Decline);
    ``error(sizes)`` is the rung's relative approximation error in the metric the pass was
    given (the data metric when statistics were handed over); ``spectra()`` returns, per
    axis, the singular-value spectra the energy rule reads (None: no spectrum, the energy
    rule checks ``error`` against its bound instead).
    """

    full: Sizes
    rungs: Sequence[Sizes]
    macs_before: int
    macs: Callable[[Sizes], int]
    build: Callable[[Sizes], Any]
    error: Callable[[Sizes], float] | None = None
    spectra: Callable[[], Sequence[Sequence[np.ndarray]]] | None = None
    #: nearest buildable rung to a (possibly fractional) target, for ladders that cannot
    #: build every size (default: every size in [1, full] per axis can be built)
    snap: Callable[[tuple[float, ...]], Sizes] | None = None
    #: a rung fixed by a method option (wins over the rank rules)
    fixed: Sizes | None = None
    #: the rung used when the user gives no rule (None: the default energy rule)
    default: Sizes | None = None
    #: what one rung is called in messages ("rank", "colours" ...)
    unit: str = "rung"

    def nearest(self, target: Sizes) -> Sizes:
        if self.snap is not None:
            return self.snap(target)  # type: ignore[arg-type]
        return tuple(max(1, min(f, int(t))) for f, t in zip(self.full, target))


def nearest_of(allowed: Sequence[Sizes]) -> Callable[[tuple[float, ...]], Sizes]:
    """A ``snap`` for ladders that can build only some sizes: nearest by max axis gap, ties larger."""
    def snap(target: tuple[float, ...]) -> Sizes:
        return min(allowed, key=lambda a: (max(abs(x - t) for x, t in zip(a, target)), tuple(-x for x in a)))
    return snap


class Declined(Exception):
    """Raised inside :func:`choose` when no rung satisfies the rule; carries the reason."""


def choose(ladder: Ladder, budget: Budget) -> Sizes:
    """The rung the user's rule picks on this ladder (see the module docstring).

    Raises :class:`Declined` with the reason when the rule cannot be met (energy bound out of
    reach on a spectrum-free ladder).
    """
    if ladder.fixed is not None:
        return ladder.fixed
    if budget.rank_ratio is not None:
        return _at_ratio(ladder, budget.rank_ratio)
    if budget.target_speedup is not None:
        return _for_speedup(ladder, budget.target_speedup)
    if budget.energy is None and ladder.default is not None:
        return ladder.default
    return _for_energy(ladder, budget.energy if budget.energy is not None else DEFAULT_ENERGY)


def _at_ratio(ladder: Ladder, ratio: float) -> Sizes:
    if ladder.snap is not None:  # only some sizes buildable: the nearest to ratio * full
        return ladder.snap(tuple(ratio * f for f in ladder.full))  # type: ignore[arg-type]
    return tuple(rank_from_ratio(f, ratio) for f in ladder.full)


def _for_speedup(ladder: Ladder, speedup: float) -> Sizes:
    if not ladder.macs_before or not ladder.rungs or not ladder.macs(ladder.rungs[0]):
        return _at_ratio(ladder, 1.0 / speedup)  # the one fallback: shapes unknown
    limit = Fraction(ladder.macs_before) / Fraction(speedup)
    best, best_macs = ladder.rungs[0], ladder.macs(ladder.rungs[0])
    for sizes in ladder.rungs:
        m = ladder.macs(sizes)
        if m > limit:
            break  # rungs are listed by increasing cost
        if m > best_macs:  # strictly: of equal-cost rungs the first listed stays
            best, best_macs = sizes, m
    return best


def _for_energy(ladder: Ladder, energy: float) -> Sizes:
    if ladder.spectra is not None:
        per_axis = ladder.spectra()
        target = tuple(max(rank_for_energy(s, energy) for s in axis) for axis in per_axis)
        return ladder.nearest(target)
    if ladder.error is None:
        raise Declined(f"energy {energy:g}: this method has neither spectra nor an error estimate")
    bound = math.sqrt(max(0.0, 1.0 - energy))
    best: float | None = None
    for sizes in ladder.rungs:
        err = ladder.error(sizes)
        if err <= bound + ERROR_TOLERANCE:
            return sizes
        best = err if best is None else min(best, err)
    shown = f"{best:.3g}" if best is not None else "-"
    raise Declined(f"energy {energy:g}: no {ladder.unit} keeps the relative error <= sqrt(1 - energy) = "
                   f"{bound:.3g} (best {shown})")


def truncation_error(spectrum: np.ndarray) -> Callable[[Sizes], float]:
    """``error(sizes)`` of a truncated SVD from its spectrum: ``sqrt(sum_{i>=r} s_i^2 / sum s_i^2)``.

    Exact for the rungs of a single truncated SVD (Eckart-Young); computed once per ladder.
    """
    sq = np.sort(np.abs(np.asarray(spectrum, dtype=np.float64)))[::-1] ** 2
    total = float(sq.sum())
    tail = np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])

    def error(sizes: Sizes) -> float:
        r = min(max(int(sizes[0]), 0), sq.size)
        return float(np.sqrt(tail[r] / total)) if total > 0 else 0.0

    return error
