"""structured and perforate became ladders: the rungs they pick on a bundled model, checked
against the rules they applied themselves before (main at 7223e12, ``StructuredPass.structure``
and ``PerforatePass._rate`` / ``grid_factors_for_speedup``), re-derived here from the model's
own shapes -- not recorded from a run.

Where the old rule and the planner's uniform rule agree by construction (the default rungs,
the pinned options, the speedup rule while a structure or grid really reaches ``S`` in the MAC
model) the choice must be identical; where the old rule was off (a grid on an odd size that
misses ``S`` because of its ``ceil``), the new rung must meet ``S``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import onnx
import onnx.shape_inference
import pytest
from onnx import numpy_helper

import onnxslim_lr as lr
from onnxslim_lr.decompose.structured import structured_params_for_speedup
from onnxslim_lr.passes.perforate import grid_factors

MODEL = Path(__file__).resolve().parents[1] / "models" / "vgg_fmnist.onnx"

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason=f"{MODEL} is not present")


def _convs() -> dict[str, tuple[int, int, int, int, int, int]]:
    """Conv name -> (F, C, kh, kw, Ho, Wo), from the weights and onnx's shape inference."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(MODEL)))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    out = {}
    for n in m.graph.node:
        if n.op_type == "Conv":
            F, C, kh, kw = inits[n.input[1]].shape
            ho, wo = shapes[n.output[0]][2:]
            out[n.name] = (F, C, kh, kw, ho, wo)
    assert len(out) == 6 and all(s[4] > 0 for s in out.values())
    return out


def _run(method: str, **kw: object) -> dict[str, str]:
    res = lr.compress(str(MODEL), method=method, allow_slower=True, end_to_end=False, **kw)  # type: ignore[arg-type]
    convs = [r for r in res.layers if r.op == "Conv"]
    assert all(r.status == "rewritten" for r in convs), [(r.node, r.reason) for r in convs]
    return {r.node: r.params for r in convs}


# ---- the previous rules, as they were written in the passes -------------------------------------


def _old_structured(F: int, C: int, kh: int, kw: int, *, n: int | None = None, ratio: float | None = None,
                    speedup: float | None = None) -> tuple[int, int, int]:
    if n is not None:
        return C, min(n, kh), min(n, kw)
    if speedup is not None:
        found = structured_params_for_speedup(F, C, kh, kw, speedup)
        return found if found is not None else structured_params_for_speedup(F, C, kh, kw, speedup, channel=True)
    if ratio is not None:
        def n_for(N: int) -> int:
            return min(range(1, N + 1), key=lambda k: (abs((k / N) ** 2 - ratio), -k))
        return C, n_for(kh), n_for(kw)
    return C, max(1, kh - 1), max(1, kw - 1)


def _old_grid_for_speedup(speedup: float, out_hw: tuple[int, int]) -> tuple[int, int]:
    pairs = [(a, a + d) for a in range(1, 17) for d in (0, 1)]
    small, large = min((p for p in pairs if p[0] * p[1] >= speedup - 1e-9), key=lambda p: p[0] * p[1])
    return (large, small) if out_hw[0] > out_hw[1] else (small, large)


def _grid_params(rates: tuple[int, int], ho: int, wo: int) -> tuple[str, float]:
    kept = math.ceil(ho / rates[0]) * math.ceil(wo / rates[1])
    return f"r={rates[0]}x{rates[1]}", Fraction(ho * wo, kept)


# ---- structured ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{}, {"target_speedup": 2.0}, {"target_speedup": 5.0}, {"rank_ratio": 0.5},
                                  {"method_options": {"struct_n": 1}}], ids=str)
def test_structured_rungs_on_the_bundled_vgg_match_the_previous_rules(rule: dict) -> None:
    got = _run("structured", **rule)
    opts = rule.get("method_options", {})
    for name, (F, C, kh, kw, _, _) in _convs().items():
        c, nh, nw = _old_structured(F, C, kh, kw, n=opts.get("struct_n"), ratio=rule.get("rank_ratio"),
                                    speedup=rule.get("target_speedup"))
        assert c == C  # every old choice here is spatial: the ladder keeps c = C
        assert got[name] == f"c={c},n={nh}x{nw}", (name, rule)


# ---- perforate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [{}, {"method_options": {"perforation_rate": 0.75}},
                                  {"method_options": {"perforation_rate": 0.25}}], ids=str)
def test_perforate_rungs_on_the_bundled_vgg_match_the_previous_rules(rule: dict) -> None:
    got = _run("perforate", **rule)
    rate = rule.get("method_options", {}).get("perforation_rate", 0.5)
    for name, (*_, ho, wo) in _convs().items():
        want, _ = _grid_params(grid_factors(rate, (ho, wo)), ho, wo)
        assert want in got[name].split(","), (name, got[name])


@pytest.mark.parametrize("speedup", [3.0, 4.0, 5.0, 7.0])
def test_perforate_speedup_rung_is_the_old_grid_when_that_grid_reaches_the_target(speedup: float) -> None:
    got = _run("perforate", target_speedup=speedup)
    for name, (*_, ho, wo) in _convs().items():
        old, old_ratio = _grid_params(_old_grid_for_speedup(speedup, (ho, wo)), ho, wo)
        mine = dict(p.split("=") for p in got[name].split(","))
        rh, rw = (int(v) for v in mine["r"].split("x"))
        _, ratio = _grid_params((rh, rw), ho, wo)
        if old_ratio >= Fraction(speedup):
            assert f"r={rh}x{rw}" == old, (name, speedup)
        else:  # the ceil of a grid on an odd size: the old grid missed the target, the new one meets it
            assert ratio >= Fraction(speedup), (name, speedup)
