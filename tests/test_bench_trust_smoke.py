"""The trust benchmark's verdicts and rendering (tools/bench_trust.py), on synthetic runs; and
the per-layer table's interval columns (tools/bench_layers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_layers  # noqa: E402
import bench_trust  # noqa: E402


def _run(rc: int, kept: list[str], min_mac: float | None, model_mac: float | None) -> dict:
    return {"rc": rc, "kept": kept, "min_kept_mac_ratio": min_mac, "model_mac_ratio": model_mac,
            "timed": {n: {"measured": 1.3, "interval": [1.12, 1.5], "status": "rewritten", "mac_ratio": 1.8}
                      for n in kept}, "n_mac_neutral_timed": 0}


def _row(runs: list[dict], aa_lo: float = 0.95) -> dict:
    row = {"model": "m", "command": "-m svd", "aa": {"ratio": 1.0, "lo": aa_lo, "hi": 1.05, "aa": None,
                                                     "reported_faster": aa_lo > 1.0},
           "runs": runs, "probe": {"rc": None}}
    row.update(bench_trust.judge(row))
    return row


def test_judge_repeatable_and_mac_rules() -> None:
    good = _row([_run(0, ["a", "b"], 1.8, 1.6)] * 3)
    assert good["repeatable"] and good["mac_ok"] and good["aa_ok"] and not good["flips"]
    flip = _row([_run(0, ["a", "b"], 1.8, 1.6), _run(0, ["a"], 1.8, 1.3), _run(0, ["a", "b"], 1.8, 1.6)])
    assert not flip["repeatable"] and list(flip["flips"]) == ["b"]
    exit_flip = _row([_run(0, ["a"], 1.8, 1.3), _run(3, [], None, 1.0), _run(0, ["a"], 1.8, 1.3)])
    assert not exit_flip["repeatable"]
    neutral = _row([_run(0, ["a"], 1.02, 1.01)] * 3)
    assert not neutral["mac_ok"]
    assert not _row([_run(3, [], None, None)] * 3, aa_lo=1.02)["aa_ok"]


def test_render_trust_table() -> None:
    rows = [_row([_run(0, ["a"], 1.8, 1.3)] * 3), _row([_run(0, ["a"], 1.8, 1.3), _run(3, [], None, None),
                                                         _run(0, ["a"], 1.8, 1.3)])]
    md = bench_trust.render({"rows": rows, "runs": 3, "command": ["-m", "svd"], "probe": ["-m", "svd"], "wall_s": 1})
    assert md.startswith("## " + bench_trust.TITLE)
    assert "Repeatability: 1/2 models" in md and "**no**" in md and "`a`" in md


def test_layers_table_prints_intervals_and_aa() -> None:
    t = {"speedup": 2.0, "lo": 1.8, "hi": 2.2, "efficiency": 0.8, "eff_lo": 0.72, "eff_hi": 0.84,
         "aa_ratio": 1.01, "aa_lo": 0.97, "aa_hi": 1.04}
    row = {"layer": "l", "shape": "3x3 64->64 @56x56", "method": "svd", "rank_ratio": 0.5, "status": "rewritten",
           "params": "rank=32,full=64", "mac_ratio": 2.5, "out_error": 0.5, "rewrite_s": 1.0, "timings": {"1": t}}
    md = bench_layers.render({"rows": [row], "rounds": 21})
    assert "2.00 [1.80, 2.20]" in md and "0.80 [0.72, 0.84]" in md and "1.01 [0.97, 1.04]" in md
    assert "not credible" not in md
    assert "1 of the misses with the whole interval below the goal" in md
    assert "- below: l svd r=0.5: 2.00x [1.80, 2.20] of 2.50x" in md
