"""Perforation passes (``perforate``, ``perforate-svd``) through onnxruntime.

Every check is against the original conv's own output: computed positions must equal it,
and every other position must be an exact copy of its nearest computed position (the
``interpolation_map`` of the mask, ties to the top/left). Sizes are odd on purpose, the
batch is dynamic, and one grid rewrite of a model with dynamic H, W is run at several sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import conv_model, run_ort
from onnx import TensorProto, helper, numpy_helper

import onnxslim_lr as lr
from onnxslim_lr.calibration import expose, gather
from onnxslim_lr.cli import main
from onnxslim_lr.decompose.perforation import interpolation_map
from onnxslim_lr.graph import import_graph
from onnxslim_lr.passes import Budget, PassContext, get
from onnxslim_lr.passes.base import Settings
from onnxslim_lr.passes.perforate import DYNAMIC_MASK_REASON, grid_factors, grid_rungs


def compress(model: onnx.ModelProto, **kw: object) -> lr.CompressResult:
    """lr.compress without the end-to-end timing (tests check numerics, not speed)."""
    kw.setdefault("end_to_end", False)
    return lr.compress(model, **kw)  # type: ignore[arg-type]


def _weights(F: int, C: int, kh: int = 3, kw: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((F, C, kh, kw)).astype(np.float32), rng.standard_normal(F).astype(np.float32)


def _x(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _assert_perforated(ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> None:
    """Computed positions equal the original; the others copy their nearest computed one."""
    assert got.shape == ref.shape
    n, f, ho, wo = ref.shape
    assert mask.shape == (ho, wo)
    comp = np.flatnonzero(mask)
    r, g = ref.reshape(n, f, -1), got.reshape(n, f, -1)
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(g[:, :, comp], r[:, :, comp], rtol=1e-4, atol=tol)
    src = comp[interpolation_map(mask)]
    np.testing.assert_array_equal(g, g[:, :, src])  # a bit-exact copy of the computed value
    np.testing.assert_allclose(g, r[:, :, src], rtol=1e-4, atol=tol)


def _grid_mask(ho: int, wo: int, params: str) -> np.ndarray:
    r = dict(p.split("=") for p in params.split(","))["r"]
    rh, rw = (int(v) for v in r.split("x"))
    m = np.zeros((ho, wo), dtype=bool)
    m[::rh, ::rw] = True
    return m


# ---- grid form ----------------------------------------------------------------------------

GEOMS = [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 2, 1, 0]),
    dict(strides=[2, 1], pads=[1, 1, 1, 1]),
    dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(dilations=[1, 2], strides=[2, 2], pads=[1, 0, 0, 1]),
    dict(auto_pad="SAME_UPPER"),
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(auto_pad="VALID"),
]
_ids = lambda a: "-".join(f"{k}{v}" for k, v in a.items())  # noqa: E731


@pytest.mark.parametrize("attrs", GEOMS, ids=_ids)
@pytest.mark.parametrize("rate", [0.5, 0.75, 0.89])
def test_grid_form_copies_nearest_computed_position(attrs: dict, rate: float) -> None:
    w, b = _weights(6, 4, 3, 3)
    model = conv_model(w, b, in_shape=("N", 4, 13, 11), **attrs)
    res = compress(model, method="perforate", allow_slower=True, method_options={"perforation_rate": rate},
                      input_shape=["x:2x4x13x11"])
    layer = res.layers[0]
    assert layer.status == "rewritten", layer.reason
    ops = [n.op_type for n in res.model.graph.node]
    assert ops[:2] == ["Conv", "Resize"] and "Gather" not in ops
    for batch in (1, 3):  # dynamic batch
        x = _x((batch, 4, 13, 11))
        ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
        _assert_perforated(ref, got, _grid_mask(*ref.shape[2:], layer.params))


@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1]), dict(strides=[2, 2], pads=[1, 0, 2, 1]),
                                   dict(dilations=[2, 1], pads=[2, 1, 2, 1]), dict(auto_pad="VALID")], ids=_ids)
def test_grid_form_with_dynamic_hw_runs_at_every_size(attrs: dict) -> None:
    w, b = _weights(5, 3, 3, 3)
    model = conv_model(w, b, in_shape=("N", 3, "H", "W"), **attrs)
    res = compress(model, method="perforate", allow_slower=True, method_options={"perforation_rate": 0.89},
                      input_shape=["x:1x3x10x10"])
    layer = res.layers[0]
    assert layer.status == "rewritten" and "r=3x3" in layer.params, layer.reason
    assert "Shape" in [n.op_type for n in res.model.graph.node]  # crop computed in the graph
    dims = res.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]
    for shape in [(1, 3, 10, 10), (2, 3, 7, 13), (1, 3, 16, 15), (1, 3, 5, 6)]:
        x = _x(shape)
        ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
        _assert_perforated(ref, got, _grid_mask(*ref.shape[2:], layer.params))


@pytest.mark.parametrize("attrs", GEOMS[:5] + GEOMS[7:], ids=_ids)
def test_nothing_skipped_is_exact(attrs: dict) -> None:
    w, b = _weights(6, 4, 3, 5)
    model = conv_model(w, b, in_shape=("N", 4, 11, 9), **attrs)
    x = _x((2, 4, 11, 9))
    ref = run_ort(model, {"x": x})[0]
    for opts in ({"perforation_rate": 0.0}, {"perforation_rate": 0.0, "perforation_form": "mask"}):
        res = compress(model, method="perforate", allow_slower=True, method_options=opts, input_shape=["x:2x4x11x9"])
        assert res.layers[0].status == "rewritten", res.layers[0].reason
        got = run_ort(res.model, {"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert "MatMul" in [n.op_type for n in res.model.graph.node]  # the mask form ran the gather machinery


# ---- mask form ----------------------------------------------------------------------------


def _two_layer(consumer: str, hw: tuple[int, int] = (13, 11), batch: object = "N") -> onnx.ModelProto:
    """x -> conv0 (3x3, pads 1) -> Relu -> consumer ('pool': MaxPool 3x3 s2 p1, 'conv': Conv 3x3 s2,
    'relu': nothing more) -> y."""
    w0, b0 = _weights(6, 3, seed=0)
    w1, b1 = _weights(4, 6, seed=1)
    inits = [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(b0, "b0")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0")]
    if consumer == "pool":
        nodes.append(helper.make_node("MaxPool", ["r0"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                                      pads=[1, 1, 1, 1]))
    elif consumer == "conv":
        inits += [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1")]
        nodes.append(helper.make_node("Conv", ["r0", "w1", "b1"], ["y"], name="conv1", strides=[2, 2]))
    else:
        nodes.append(helper.make_node("Identity", ["r0"], ["y"], name="id"))
    ho, wo = hw
    y_shape = {"pool": [batch, 6, (ho - 1) // 2 + 1, (wo - 1) // 2 + 1], "conv": [batch, 4, (ho - 3) // 2 + 1, (wo - 3) // 2 + 1],
               "relu": [batch, 6, ho, wo]}[consumer]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, *hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _mask_of(model: onnx.ModelProto, x: np.ndarray, options: dict, strategy: str, rate: float,
             out: str = "c0") -> np.ndarray:
    """The mask the pass plans for conv0 (same budget seed as lr.compress's default)."""
    graph = import_graph(model)
    node = next(n for n in graph.nodes if n.name == "conv0")
    y = run_ort(expose(model, [out]), {"x": x})[-1]
    ctx = PassContext(opset=17, shapes={"x": x.shape, out: y.shape}, graph=graph)
    p = get("perforate")
    site = p.match(node, ctx)
    budget = Budget(options=dict(options, perforation_mask=strategy, perforation_form="mask"), seed=0)
    # what the pass declares, gathered by the data service (the pass runs no session)
    requests = p.needs(site, ctx, Settings.of(budget))
    assert bool(requests) == (strategy == "impact")
    ctx.stats = gather(model, None, requests)
    mask = p.plan_mask(site, budget, ctx, strategy, rate)
    assert isinstance(mask, np.ndarray), mask
    return mask


CALIB = [{"x": _x((8, 3, 13, 11), seed=s)} for s in (5, 6)]


@pytest.mark.parametrize("strategy,consumer", [("grid", "relu"), ("uniform", "relu"), ("pooling", "pool"),
                                               ("weight", "conv"), ("impact", "conv"), ("impact", "pool")])
def test_mask_strategies_compute_and_copy_exactly(strategy: str, consumer: str) -> None:
    model = _two_layer(consumer)
    rate = 0.6
    opts = {"perforation_rate": rate, "perforation_mask": strategy, "perforation_form": "mask"}
    if strategy == "impact":
        opts["perforation_calib"] = CALIB
    res = compress(model, method="perforate", allow_slower=True, method_options=opts, only=["conv0"],
                      input_shape=["x:2x3x13x11"])
    layer = res.layers[0]
    assert layer.status == "rewritten", layer.reason
    assert f"mask={strategy}" in layer.params
    assert "Gather" in [n.op_type for n in res.model.graph.node]
    x = _x((3, 3, 13, 11), seed=9)
    mask = _mask_of(model, x, opts, strategy, rate)
    assert abs((1 - mask.mean()) - rate) < 0.1 and not mask.all()
    ref = run_ort(expose(model, ["c0"]), {"x": x})[-1]
    got = run_ort(expose(res.model, ["c0"]), {"x": x})[-1]
    _assert_perforated(ref, got, mask)


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.89])
def test_grid_form_on_a_static_opset10_model_upsamples_with_gather(rate: float) -> None:
    w, b = _weights(5, 3)
    model = conv_model(w, b, in_shape=("N", 3, 11, 10), opset=10, pads=[1, 0, 1, 2], strides=[1, 2])
    res = compress(model, method="perforate", allow_slower=True, upgrade_opset=False,
                   method_options={"perforation_rate": rate})
    layer = res.layers[0]
    assert layer.status == "rewritten", layer.reason
    ops = [n.op_type for n in res.model.graph.node]
    assert "Resize" not in ops and "Gather" in ops
    assert [o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx")] == [10]
    x = _x((2, 3, 11, 10))
    ref = run_ort(model, {"x": x})[0]
    _assert_perforated(ref, run_ort(res.model, {"x": x})[0], _grid_mask(*ref.shape[2:], layer.params))


def test_mask_form_on_an_opset10_model_keeps_the_opset() -> None:
    # no Resize in the mask form: Pad takes its pads as an attribute before opset 11
    w, b = _weights(5, 3)
    model = conv_model(w, b, in_shape=("N", 3, 9, 7), opset=10, pads=[1, 2, 0, 1])
    res = compress(model, method="perforate", allow_slower=True, upgrade_opset=False,
                   method_options={"perforation_mask": "uniform", "perforation_rate": 0.4})
    assert res.layers[0].status == "rewritten", res.layers[0].reason
    assert [o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx")] == [10]
    x = _x((2, 3, 9, 7))
    mask = _mask_of(model, x, {"perforation_rate": 0.4}, "uniform", 0.4, out="y")
    _assert_perforated(run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0], mask)


def test_pooling_mask_prefers_overlapped_positions() -> None:
    # MaxPool 3x3 stride 2 pad 1 on 13x11: odd rows/cols are read by two windows, even ones by one
    model = _two_layer("pool")
    mask = _mask_of(model, _x((1, 3, 13, 11)), {}, "pooling", 0.7)
    assert mask[1::2, 1::2].all()


def test_impact_mask_computes_where_the_activation_varies() -> None:
    # constant input on the left, noise on the right: interpolating on the left changes nothing
    model = _two_layer("relu")
    x = np.ones((8, 3, 13, 11), dtype=np.float32)
    x[:, :, :, 6:] = _x((8, 3, 13, 5), seed=3)
    mask = _mask_of(model, x[:1], {"perforation_calib": [{"x": x}]}, "impact", 0.5)
    assert mask[1:-1, 7:].mean() > 0.9 and mask[1:-1, :4].mean() < 0.1


# ---- perforate-svd --------------------------------------------------------------------------


def test_perforate_svd_full_rank_rate0_is_exact() -> None:
    w, b = _weights(6, 4, 3, 3)
    model = conv_model(w, b, in_shape=("N", 4, 11, 9), pads=[1, 0, 1, 2], strides=[1, 2])
    res = compress(model, method="perforate-svd", rank_ratio=1.0, allow_slower=True,
                      method_options={"perforation_rate": 0.0}, input_shape=["x:2x4x11x9"])
    assert res.layers[0].status == "rewritten", res.layers[0].reason
    x = _x((3, 4, 11, 9))
    ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_perforate_svd_full_rank_is_the_perforated_conv_at_every_size() -> None:
    w, b = _weights(6, 4, 3, 3)
    model = conv_model(w, b, in_shape=("N", 4, "H", "W"), pads=[1, 1, 1, 1])
    res = compress(model, method="perforate-svd", rank_ratio=1.0, allow_slower=True,
                      method_options={"perforation_rate": 0.75}, input_shape=["x:1x4x12x12"])
    layer = res.layers[0]
    assert layer.status == "rewritten" and "r=2x2" in layer.params, layer.reason
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.index("Resize") > max(i for i, o in enumerate(ops) if o == "Conv")  # 1x1 runs before the upsample
    for shape in [(1, 4, 12, 12), (2, 4, 9, 7)]:
        x = _x(shape)
        ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
        _assert_perforated(ref, got, _grid_mask(*ref.shape[2:], layer.params))


# ---- rates ----------------------------------------------------------------------------------


def test_rate_rules() -> None:
    assert grid_factors(0.0) == (1, 1)
    assert grid_factors(0.25, (10, 10)) == (1, 2)  # tie with 1x1: perforate rather than not
    assert grid_factors(0.5, (12, 10)) == (2, 1)  # the larger factor on the longer axis
    assert grid_factors(0.75) == (2, 2)
    assert grid_factors(0.85) == (2, 3)
    assert grid_factors(0.9) == (3, 3)
    # grid rungs: positions computed -> factors; on 7x7, 4x4 and 4x5 both compute 2x2 positions
    assert grid_rungs((7, 7))[(4,)] == (4, 4) and grid_rungs((7, 7), (4, 5))[(4,)] == (4, 5)
    assert grid_rungs((12, 12))[(72,)] == (1, 2) and grid_rungs((12, 12))[(144,)] == (1, 1)
    w, b = _weights(6, 4)
    model = conv_model(w, b, in_shape=(1, 4, 12, 12), pads=[1, 1, 1, 1])
    res = compress(model, method="perforate", allow_slower=True)
    assert "skip=0.50" in res.layers[0].params  # default rate 0.5
    res = compress(model, method="perforate", allow_slower=True, rank_ratio=0.5)  # half the positions kept
    assert "r=1x2" in res.layers[0].params
    # rank-ratio 0.1: 14.4 of 144 positions; the nearest grid count is 3x3's 16 (3x4's is 12)
    res = compress(model, method="perforate", allow_slower=True, rank_ratio=0.1)
    assert "r=3x3" in res.layers[0].params
    res = compress(model, method="perforate", allow_slower=True, target_speedup=4.0)
    assert "r=2x2" in res.layers[0].params
    res = compress(model, method="perforate", allow_slower=True, target_speedup=5.0)  # 2x3: 6x, 2x2 only 4x
    assert "r=2x3" in res.layers[0].params
    # the pinned rate wins over the rule
    res = compress(model, method="perforate", allow_slower=True, target_speedup=5.0,
                   method_options={"perforation_rate": 0.75})
    assert "r=2x2" in res.layers[0].params
    # no energy rule: a perforation's error is unknown before it is measured
    res = compress(model, method="perforate", allow_slower=True, energy=0.9)
    assert res.layers[0].status == "declined" and "neither spectra nor an error estimate" in res.layers[0].reason
    res = compress(model, method="perforate", allow_slower=True, target_speedup=4.0,
                      method_options={"perforation_mask": "uniform"})
    assert "kept=36" in res.layers[0].params


# ---- declines -------------------------------------------------------------------------------


def _reason(model: onnx.ModelProto, **kw: object) -> tuple[str, str]:
    res = compress(model, method=kw.pop("method", "perforate"), allow_slower=True, **kw)  # type: ignore[arg-type]
    return res.layers[0].status, res.layers[0].reason


def test_declines_with_reasons() -> None:
    w, b = _weights(8, 2)
    assert "grouped" in _reason(conv_model(w, b, in_shape=(1, 4, 8, 8), group=2))[1]
    w, b = _weights(6, 4)
    old = conv_model(w, b, in_shape=("N", 4, "H", "W"), opset=10, pads=[1, 1, 1, 1])  # dynamic: needs Resize
    status, reason = _reason(old, upgrade_opset=False, input_shape=["x:1x4x8x8"])
    assert status == "kept" and "opset >= 11" in reason and "has 10" in reason
    res = compress(old, method="perforate", allow_slower=True, input_shape=["x:1x4x8x8"])  # default: opset raised
    assert res.layers[0].status == "rewritten" and any("opset raised from 10 to 11" in n for n in res.notes)
    x = _x((1, 4, 8, 9))
    _assert_perforated(run_ort(old, {"x": x})[0], run_ort(res.model, {"x": x})[0], _grid_mask(8, 9, res.layers[0].params))
    dyn = conv_model(w, b, in_shape=("N", 4, "H", "W"), pads=[1, 1, 1, 1])
    assert _reason(dyn, method_options={"perforation_mask": "uniform"}, input_shape=["x:1x4x9x9"]) == \
        ("declined", DYNAMIC_MASK_REASON)
    assert _reason(dyn, method_options={"perforation_form": "mask"}, input_shape=["x:1x4x9x9"])[1] == DYNAMIC_MASK_REASON
    same = conv_model(w, b, in_shape=("N", 4, "H", "W"), auto_pad="SAME_UPPER")
    assert "dynamic spatial size" in _reason(same, input_shape=["x:1x4x9x9"])[1]
    assert "needs a following pooling layer" in _reason(_two_layer("conv"), only=["conv0"],
                                                        method_options={"perforation_mask": "pooling"})[1]
    assert "needs a following Conv" in _reason(_two_layer("pool"), only=["conv0"],
                                               method_options={"perforation_mask": "weight"})[1]
    assert "needs calibration data" in _reason(_two_layer("conv"), only=["conv0"],
                                               method_options={"perforation_mask": "impact"})[1]
    assert "needs --perforation-form mask" in _reason(
        _two_layer("conv"), only=["conv0"], method_options={"perforation_mask": "uniform", "perforation_form": "grid"})[1]


def test_guard_rejects_rate0_without_saving() -> None:
    w, b = _weights(6, 4)
    res = compress(conv_model(w, b, in_shape=(1, 4, 8, 8), pads=[1, 1, 1, 1]), method="perforate",
                      method_options={"perforation_rate": 0.0}, end_to_end=False)
    assert res.layers[0].status == "kept" and "saves no MACs" in res.layers[0].reason


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_flags_reach_the_pass(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(_two_layer("pool"), str(model))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    np.savez(tmp_path / "calib.npz", x=_x((4, 3, 13, 11)))
    argv = [str(model), "-o", str(out), "-m", "perforate", "--allow-slower", "-q", "--report", str(rep), "--only", "conv0"]
    assert main(argv + ["--perforation-rate", "0.75"]) == 0
    assert "r=2x2" in json.loads(rep.read_text())["layers"][0]["params"]
    assert main(argv + ["--perforation-mask", "pooling", "--perforation-rate", "0.3"]) == 0
    assert "mask=pooling" in json.loads(rep.read_text())["layers"][0]["params"]
    assert main(argv + ["--perforation-mask", "grid", "--perforation-form", "mask"]) == 0
    assert "form=mask,mask=grid" in json.loads(rep.read_text())["layers"][0]["params"]
    assert main(argv + ["--perforation-mask", "impact", "--perforation-calib", str(tmp_path / "calib.npz")]) == 0
    assert "mask=impact" in json.loads(rep.read_text())["layers"][0]["params"]
    for bad in (["--perforation-rate", "1.0"], ["--perforation-rate", "x"], ["--perforation-mask", "random"],
                ["--perforation-form", "dense"], ["--perforation-calib", str(tmp_path / "missing.npz")]):
        try:
            code = main(argv + bad)
        except SystemExit as exc:  # older cli.main let argparse's exit through
            code = exc.code
        assert code == 2, bad


def test_impact_mask_uses_the_calibration_data_of_calib() -> None:
    """--calib reaches the impact estimate through the pass context (no extra flag needed)."""
    model = _two_layer("conv")
    shape = tuple(d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim)
    calib = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    status, reason = _reason(model, only=["conv0"], calib=calib,
                             method_options={"perforation_mask": "impact", "perforation_form": "mask"})
    assert status == "rewritten", reason
