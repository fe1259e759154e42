"""Which rank each layer gets.

The three user-facing rules map onto one number per layer (two for Tucker-2):

* ``--rank-ratio R``: a fraction of the method's full rank (the rank at which it is exact);
* ``--energy E``: the smallest rank keeping a share E of the squared singular values
  (bounds the relative weight error by ``sqrt(1 - E)``, Eckart-Young);
* ``--target-speedup S``: the largest rank whose MAC count is at most 1/S of the original.

With none of them the default is :data:`DEFAULT_ENERGY`: an energy rule adapts to each
layer's spectrum, so layers that are genuinely low-rank get compressed hard and layers that
are not are left (nearly) alone, which is the safe behaviour without fine-tuning.
Whichever rule is used, the never-slower guard in the pass manager has the last word.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .decompose.ranks import rank_for_energy, rank_from_ratio
from .passes.base import Budget

#: energy kept by default (relative weight error at most sqrt(0.02) ~ 14 %)
DEFAULT_ENERGY = 0.98


def choose_rank(
    budget: Budget,
    *,
    full: int,
    spectrum: Callable[[], np.ndarray],
    for_speedup: Callable[[float], int] | None,
) -> int:
    """One rank in ``[1, full]`` from the budget's rule.

    ``spectrum`` is called only for the energy rule (it may cost an SVD); ``for_speedup``
    is the method's MAC solver, or None when the layer's shape is unknown.
    """
    if budget.rank_ratio is not None:
        return rank_from_ratio(full, budget.rank_ratio)
    if budget.target_speedup is not None:
        if for_speedup is None:
            return rank_from_ratio(full, 1.0 / budget.target_speedup)
        return max(1, min(full, for_speedup(budget.target_speedup)))
    energy = budget.energy if budget.energy is not None else DEFAULT_ENERGY
    return max(1, min(full, rank_for_energy(spectrum(), energy)))
