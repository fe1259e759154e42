"""The reconstruction section's frontier table (tools/bench_reconstruct.py): the best measured
speedup within 0.5 and 1.0 pt per variant, from rows and timed rules (no model run, no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

bench_reconstruct = pytest.importorskip("bench_reconstruct")


def _row(method: str, ratio: float, variant: str, drop: float, params: list[str]) -> dict:
    return {"method": method, "ratio": ratio, "variant": variant, "drop_pts": drop, "params": params}


def test_frontier_takes_the_fastest_rule_within_each_limit_and_skips_other_graphs() -> None:
    a, b = ["l1:rank=4"], ["l1:r_out=4,r_in=4"]
    speed = {"header": "h", "aa": None, "rules": {
        "svd r0.5": {"speedup": [1.7, 1.6, 1.8], "params": a},
        "tucker2 r0.5": {"speedup": [2.5, 2.4, 2.6], "params": b}}}
    rows = [_row("svd", 0.5, "sequential", -0.42, a), _row("tucker2", 0.5, "sequential", -0.55, b),
            _row("svd", 0.5, "data", -1.04, a), _row("tucker2", 0.5, "data", -0.97, ["l0:other"] + b)]
    table = bench_reconstruct._frontier(rows, speed)
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:]}
    # sequential: svd within half a point, the faster tucker2 only within one point
    assert "1.70x [1.60, 1.80] (svd r0.5, -0.42)" in lines["sequential"].split("|")[2]
    assert "2.50x [2.40, 2.60] (tucker2 r0.5, -0.55)" in lines["sequential"].split("|")[3]
    # data: svd is over both limits, and its tucker2 rewrote other layers than the timed model
    assert lines["data"].count("none within") == 2
    assert lines["frobenius"].count("none within") == 2  # no rows at all
