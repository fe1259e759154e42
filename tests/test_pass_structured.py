"""Structured-convolution pass: exact through onnxruntime on already-structured kernels (pads,
strides, dilations, SAME, non-square kernels, channel structure, dynamic sizes), the
projection against numpy's lstsq, the parameter rules, declines, and the CLI flags."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import conv_model, run_ort

import onnxslim_lr as lr
from onnxslim_lr.cli import main
from onnxslim_lr.decompose.structured import composition_matrix, structured_pool_adds
from onnxslim_lr.passes import Budget, PassContext, get
from onnxslim_lr.passes.structured import split_pads
from onnxslim_lr.timing import make_session

C_IN, F_OUT, H, W = 4, 6, 11, 9


def _structured_weight(F: int, C: int, kh: int, kw: int, c: int, nh: int, nw: int, seed: int = 0) -> np.ndarray:
    """A kernel that is exactly structured: random beta mapped through the composition matrix."""
    beta = np.random.default_rng(seed).standard_normal((F, c * nh * nw))
    return (beta @ composition_matrix(C, kh, kw, c, nh, nw).T).reshape(F, C, kh, kw).astype(np.float32)


def _x(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _assert_same(model, res, shape) -> None:
    """Same outputs without graph optimisations, and also with onnxruntime's own fusions on."""
    x = _x(shape)
    ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    fused = make_session(res.model, threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(fused, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


ATTRS = [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 2, 1, 0]),  # asymmetric
    dict(pads=[3, 2, 3, 4]),  # pads larger than the pool window: the excess moves onto the conv
    dict(strides=[2, 1], pads=[1, 1, 1, 1]),
    dict(strides=[2, 2]),
    dict(auto_pad="SAME_UPPER"),
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(auto_pad="VALID"),
    dict(dilations=[2, 2], pads=[2, 2, 2, 2]),  # needs opset 19 (and a Pad node for n=2)
    dict(dilations=[1, 2], strides=[2, 2], pads=[1, 0, 0, 1]),
]
# (struct-n, struct-c-ratio): spatial n=2, n=1, and channel structure c = 2 of 4
STRUCTS = [(2, None), (1, None), (2, 0.5)]


@pytest.mark.parametrize("struct", STRUCTS, ids=lambda s: f"n{s[0]}-c{s[1]}")
@pytest.mark.parametrize("attrs", ATTRS, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
@pytest.mark.parametrize("kernel", [(3, 3), (3, 5)])
def test_structured_kernel_is_exact(struct, attrs, kernel) -> None:
    n, ratio = struct
    kh, kw = kernel
    c = C_IN if ratio is None else round(ratio * C_IN)
    w = _structured_weight(F_OUT, C_IN, kh, kw, c, min(n, kh), min(n, kw))
    b = np.random.default_rng(5).standard_normal(F_OUT).astype(np.float32)
    dilated = any(d > 1 for d in attrs.get("dilations", [1, 1]))
    static = "auto_pad" in attrs and attrs["auto_pad"].startswith("SAME")
    in_shape = (2, C_IN, H, W) if static else ("N", C_IN, H, W)
    model = conv_model(w, b, in_shape=in_shape, opset=19 if dilated else 17, **attrs)
    opts = {"struct_n": n} if ratio is None else {"struct_n": n, "struct_c_ratio": ratio}
    res = lr.compress(model, method="structured", method_options=opts, allow_slower=True, end_to_end=False,
                      input_shape=[f"x:2x{C_IN}x{H}x{W}"])
    layer = res.layers[0]
    assert layer.status == "rewritten", layer.reason
    assert layer.params == f"c={c},n={min(n, kh)}x{min(n, kw)}"
    assert layer.rel_error < 1e-5 and layer.out_error < 1e-5
    assert layer.extra_adds > 0
    _assert_same(model, res, (2, C_IN, H, W))
    ops = [nd.op_type for nd in res.model.graph.node]
    assert ops.count("Conv") == 1 and ops.count("AveragePool") == 1
    if ratio is not None:  # channel window sums by prefix sums (opset >= 11)
        assert "CumSum" in ops and "Unsqueeze" not in ops
    else:  # spatial: a 5-D pool only behind an explicit Pad (see the pass's build)
        assert ("Unsqueeze" in ops) == ("Pad" in ops)


def test_graph_shape_spatial_and_channel() -> None:
    w = _structured_weight(8, 4, 3, 3, 4, 2, 2)
    model = conv_model(w, None, in_shape=("N", 4, 8, 8), pads=[1, 1, 1, 1])
    res = lr.compress(model, method="structured", allow_slower=True, end_to_end=False)
    assert [nd.op_type for nd in res.model.graph.node] == ["AveragePool", "Conv"]
    pool = res.model.graph.node[0]
    attrs = {a.name: a for a in pool.attribute}
    assert list(attrs["kernel_shape"].ints) == [2, 2] and attrs["count_include_pad"].i == 1
    assert list(attrs["pads"].ints) == [1, 1, 1, 1]
    res = lr.compress(model, method="structured", method_options={"struct_c_ratio": 0.5}, allow_slower=True,
                      end_to_end=False)
    assert [nd.op_type for nd in res.model.graph.node] == ["Pad", "CumSum", "Slice", "Slice", "Sub", "AveragePool",
                                                           "Conv"]
    old = conv_model(w, None, in_shape=("N", 4, 8, 8), pads=[1, 1, 1, 1], opset=10)
    res = lr.compress(old, method="structured", method_options={"struct_c_ratio": 0.5}, allow_slower=True,
                      end_to_end=False)
    assert [nd.op_type for nd in res.model.graph.node] == ["Unsqueeze", "AveragePool", "Squeeze", "Conv"]
    pool = {a.name: a for a in res.model.graph.node[1].attribute}
    assert list(pool["kernel_shape"].ints) == [3, 2, 2] and list(pool["pads"].ints) == [0, 1, 1, 0, 1, 1]


@pytest.mark.parametrize("opset", [10, 11, 13])
def test_channel_structure_every_graph_form(opset: int) -> None:
    """Opset 10: 5-D AveragePool with Unsqueeze/Squeeze axes as attributes; from 11: prefix
    sums (CumSum); Unsqueeze takes its axes as an input from 13 (used behind a Pad)."""
    w = _structured_weight(5, 6, 3, 3, 3, 2, 2)
    model = conv_model(w, None, in_shape=("N", 6, 7, 7), pads=[1, 1, 1, 1], opset=opset)
    res = lr.compress(model, method="structured", method_options={"struct_c_ratio": 0.5}, allow_slower=True,
                      end_to_end=False)
    assert res.layers[0].status == "rewritten" and res.layers[0].params == "c=3,n=2x2"
    assert res.model.opset_import[0].version == opset
    _assert_same(model, res, (1, 6, 7, 7))


def test_prefix_sums_stay_accurate_on_wide_layers() -> None:
    w = _structured_weight(16, 256, 3, 3, 128, 2, 2)
    model = conv_model(w, None, in_shape=("N", 256, 6, 6), pads=[1, 1, 1, 1])
    res = lr.compress(model, method="structured", method_options={"struct_c_ratio": 0.5}, allow_slower=True,
                      end_to_end=False)
    assert res.layers[0].params == "c=128,n=2x2" and res.layers[0].out_error < 1e-5
    x = np.abs(_x((1, 256, 6, 6))) + 1.0  # post-ReLU-like: large prefix sums, window differences
    ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_dynamic_batch_and_spatial_sizes() -> None:
    w = _structured_weight(8, 4, 3, 3, 2, 2, 2)
    b = np.arange(8, dtype=np.float32)
    model = conv_model(w, b, in_shape=("N", 4, "H", "W"), pads=[1, 0, 2, 1], strides=[1, 2])
    res = lr.compress(model, method="structured", method_options={"struct_c_ratio": 0.5}, allow_slower=True,
                      end_to_end=False, input_shape=["x:1x4x10x10"])
    assert res.layers[0].status == "rewritten"
    dims = res.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]
    for shape in [(1, 4, 10, 10), (3, 4, 7, 13)]:
        _assert_same(model, res, shape)


def test_dilated_pool_needs_opset_19() -> None:
    w = _structured_weight(4, 3, 3, 3, 3, 2, 2)
    kw = dict(in_shape=("N", 3, 9, 9), dilations=[2, 2], pads=[2, 2, 2, 2])
    old = conv_model(w, None, opset=17, **kw)
    res = lr.compress(old, method="structured", allow_slower=True, end_to_end=False, upgrade_opset=False)
    layer = res.layers[0]
    assert layer.status == "kept" and "needs opset >= 19, the model has 17" in layer.reason
    assert not res.changed
    res = lr.compress(conv_model(w, None, opset=19, **kw), method="structured", allow_slower=True, end_to_end=False)
    assert res.layers[0].status == "rewritten"
    # by default the manager raises the opset for the rewrite that needs it
    res = lr.compress(old, method="structured", allow_slower=True, end_to_end=False)
    assert res.layers[0].status == "rewritten" and res.model.opset_import[0].version == 19
    _assert_same(old, res, (2, 3, 9, 9))


def test_dilation_on_an_unpooled_axis_runs_before_opset_19() -> None:
    """A 1 x 3 kernel dilated vertically: the pool is 1 x 2, no dilated pool needed."""
    w = _structured_weight(4, 3, 1, 3, 3, 1, 2)
    model = conv_model(w, None, in_shape=("N", 3, 9, 9), dilations=[2, 1], pads=[1, 1, 1, 1], opset=17)
    res = lr.compress(model, method="structured", allow_slower=True, end_to_end=False)
    assert res.layers[0].status == "rewritten" and res.layers[0].params == "c=3,n=1x2"
    _assert_same(model, res, (2, 3, 9, 9))


# ---- the candidate itself ------------------------------------------------------------------


def _site(model, budget: Budget, stats=None, opset: int = 17):
    graph = gs.import_onnx(model)
    node = [n for n in graph.nodes if n.op == "Conv"][0]
    shapes = {"x": (2, C_IN, H, W), "y": (2, F_OUT, H, W)}  # the models here keep the size (pads 1)
    ctx = PassContext(opset=opset, shapes=shapes, stats=stats, graph=graph)
    p = get("structured")
    site = p.match(node, ctx)
    return p, site, ctx


class _Stats:
    def __init__(self, sigma: np.ndarray) -> None:
        self.sigma = sigma

    def patch_covariance(self, site) -> np.ndarray:
        return self.sigma


@pytest.mark.parametrize("c,n", [(C_IN, 2), (C_IN, 1), (2, 2)])
def test_projection_error_is_the_lstsq_residual(c: int, n: int) -> None:
    w = np.random.default_rng(0).standard_normal((F_OUT, C_IN, 3, 3)).astype(np.float32)
    opts = {"struct_n": n, "struct_c_ratio": c / C_IN}
    p, site, ctx = _site(conv_model(w, None, in_shape=("N", C_IN, H, W), pads=[1, 1, 1, 1]), Budget(options=opts))
    cand = p.propose(site, Budget(options=opts), ctx)
    A = composition_matrix(C_IN, 3, 3, c, n, n)
    W2 = w.reshape(F_OUT, -1).astype(np.float64)
    beta = np.linalg.lstsq(A, W2.T, rcond=None)[0]
    expect = np.linalg.norm(A @ beta - W2.T) / np.linalg.norm(W2)
    assert cand.rel_error == pytest.approx(expect, rel=1e-6)
    assert 0 < cand.rel_error < 1
    assert cand.macs_after == F_OUT * c * n * n * H * W
    assert cand.macs_before == F_OUT * C_IN * 9 * H * W
    if c == C_IN:
        assert cand.extra_adds == structured_pool_adds(C_IN, 3, 3, H, W, c, n, n, (1, 1, 1, 1))
    else:  # prefix sums over C+1 channels, c subtractions, then the spatial window sums
        spatial = structured_pool_adds(c, 3, 3, H, W, c, n, n, (1, 1, 1, 1))
        assert cand.extra_adds == (C_IN + 1) * H * W + c * H * W + spatial
        assert cand.extra_adds < structured_pool_adds(C_IN, 3, 3, H, W, c, n, n, (1, 1, 1, 1))
    assert cand.min_opset < 19


def test_data_aware_projection_uses_the_patch_covariance() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((F_OUT, C_IN, 3, 3)).astype(np.float32)
    D = C_IN * 9
    L = rng.standard_normal((D, D)) * np.linspace(3, 0.1, D)
    sigma = L @ L.T / D
    model = conv_model(w, None, in_shape=("N", C_IN, H, W), pads=[1, 1, 1, 1])
    budget = Budget(metric="data", options={"struct_n": 2})
    p, site, ctx = _site(model, budget, stats=_Stats(sigma))
    cand = p.propose(site, budget, ctx)
    # weighted least squares through a Cholesky factor: min ||R (A b - w)||, sigma = R^T R
    A = composition_matrix(C_IN, 3, 3, C_IN, 2, 2)
    R = np.linalg.cholesky(sigma).T
    W2 = w.reshape(F_OUT, -1).astype(np.float64).T
    beta = np.linalg.lstsq(R @ A, R @ W2, rcond=None)[0]
    expect = np.linalg.norm(R @ (A @ beta - W2)) / np.linalg.norm(R @ W2)
    assert cand.rel_error == pytest.approx(expect, rel=1e-3)
    frob = p.propose(site, Budget(options={"struct_n": 2}), ctx).rel_error
    assert cand.rel_error != pytest.approx(frob, rel=1e-3)


def test_data_metric_end_to_end_runs() -> None:
    w = np.random.default_rng(0).standard_normal((F_OUT, C_IN, 3, 3)).astype(np.float32)
    model = conv_model(w, None, in_shape=("N", C_IN, H, W), pads=[1, 1, 1, 1])
    calib = _x((8, C_IN, H, W), seed=4)
    res = lr.compress(model, method="structured", metric="data", calib=calib, allow_slower=True, end_to_end=False)
    assert res.layers[0].status == "rewritten" and np.isfinite(res.layers[0].rel_error)


def test_split_pads_keeps_pool_pads_below_the_window() -> None:
    assert split_pads((1, 1, 1, 1), (2, 2), (1, 1)) == ((0,) * 4, (1, 1, 1, 1), (0,) * 4)
    assert split_pads((3, 2, 3, 4), (2, 3), (1, 1)) == ((0,) * 4, (1, 2, 1, 2), (2, 0, 2, 2))
    assert split_pads((1, 1, 1, 1), (1, 2), (1, 1)) == ((0,) * 4, (0, 1, 0, 1), (1, 0, 1, 0))
    # dilated: 2 pooled rows of padding would reach the window length -> explicit Pad
    assert split_pads((2, 2, 2, 2), (2, 2), (2, 2)) == ((2, 2, 2, 2), (0,) * 4, (0,) * 4)


# ---- parameter rules -----------------------------------------------------------------------


def _params(**kwargs) -> str:
    w = np.random.default_rng(0).standard_normal((F_OUT, C_IN, 3, 3)).astype(np.float32)
    res = lr.compress(conv_model(w, None, in_shape=(1, C_IN, 8, 8), pads=[1, 1, 1, 1]), method="structured",
                      allow_slower=True, end_to_end=False, **kwargs)
    assert res.layers[0].status == "rewritten", res.layers[0].reason
    return res.layers[0].params


def test_parameter_rules() -> None:
    assert _params() == "c=4,n=2x2"  # default: n = N - 1
    assert _params(rank_ratio=0.5) == "c=4,n=2x2"  # round(0.5 * 3) = 2 per axis (the planner's rule)
    assert _params(rank_ratio=0.2) == "c=4,n=1x1"  # round(0.6) = 1
    assert _params(target_speedup=2.0) == "c=4,n=2x2"  # 9/4 >= 2
    assert _params(target_speedup=4.0) == "c=4,n=2x1"  # 9/2 >= 4; of 2x1 and 1x2 the taller is listed first
    assert _params(target_speedup=20.0) == "c=4,n=1x1"  # beyond spatial (9x): the cheapest rung, no channels
    assert _params(target_speedup=20.0, method_options={"struct_c_ratio": 0.25}) == "c=1,n=1x1"  # 36/1 >= 20
    # c fixed at 2 of 4: 36 / (2*nh*nw) >= 3 allows nh*nw = 6
    assert _params(target_speedup=3.0, method_options={"struct_c_ratio": 0.5}) in ("c=2,n=3x2", "c=2,n=2x3")
    assert _params(rank_ratio=0.2, method_options={"struct_n": 2}) == "c=4,n=2x2"  # explicit flag wins


def test_a_rule_that_keeps_the_full_kernel_pools_nothing() -> None:
    w = np.random.default_rng(0).standard_normal((F_OUT, C_IN, 3, 3)).astype(np.float32)
    model = conv_model(w, None, in_shape=(1, C_IN, 8, 8), pads=[1, 1, 1, 1])
    layer = lr.compress(model, method="structured", rank_ratio=0.9, allow_slower=True, end_to_end=False).layers[0]
    assert layer.status == "declined" and "3x3 is the full kernel: nothing to pool" in layer.reason
    layer = lr.compress(model, method="structured", rank_ratio=0.9, end_to_end=False).layers[0]
    assert layer.status == "kept" and "saves no MACs" in layer.reason


def test_energy_rule_finds_the_structure_of_a_structured_kernel() -> None:
    w = _structured_weight(F_OUT, C_IN, 3, 3, C_IN, 2, 2)
    res = lr.compress(conv_model(w, None, in_shape=(1, C_IN, 8, 8), pads=[1, 1, 1, 1]), method="structured",
                      energy=0.999, allow_slower=True, end_to_end=False)
    assert res.layers[0].params == "c=4,n=2x2" and res.layers[0].rel_error < 1e-5


def test_non_square_kernel_clamps_n_per_axis() -> None:
    w = _structured_weight(F_OUT, C_IN, 3, 5, C_IN, 3, 3)
    model = conv_model(w, None, in_shape=("N", C_IN, H, W), pads=[1, 2, 1, 2])
    res = lr.compress(model, method="structured", method_options={"struct_n": 3}, allow_slower=True, end_to_end=False)
    assert res.layers[0].params == "c=4,n=3x3" and res.layers[0].rel_error < 1e-5
    _assert_same(model, res, (2, C_IN, H, W))


# ---- declines ------------------------------------------------------------------------------


def _reason(w, opts=None, **attrs) -> str:
    C = w.shape[1] * attrs.get("group", 1)
    res = lr.compress(conv_model(w, None, in_shape=attrs.pop("in_shape", (1, C, 8, 8)), **attrs), method="structured",
                      method_options=opts or {}, allow_slower=True, end_to_end=False, input_shape=[f"x:1x{C}x8x8"])
    assert res.layers[0].status == "declined", res.layers[0]
    return res.layers[0].reason


def test_declines() -> None:
    rng = np.random.default_rng(0)
    w33 = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    assert "grouped" in _reason(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), group=2)
    assert "depthwise" in _reason(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), group=4)
    assert "nothing to pool" in _reason(rng.standard_normal((4, 4, 1, 1)).astype(np.float32))
    r = _reason(w33, {"struct_n": 3})
    assert "nothing to pool" in r and ">=" in r
    assert "nothing to pool" in _reason(w33, {"struct_n": 7})
    # the API applies the options' declared types like the CLI (one option schema, issue 12)
    with pytest.raises(lr.InputError, match="--struct-c-ratio"):
        _reason(w33, {"struct_c_ratio": 1.5})
    with pytest.raises(lr.InputError, match="--struct-n"):
        _reason(w33, {"struct_n": 0})
    assert "dynamic spatial size" in _reason(w33, in_shape=("N", 4, "H", "W"), auto_pad="SAME_UPPER")
    assert "not a constant" in lr.compress(conv_model(w33, None, in_shape=(1, 4, 8, 8), weight_as="input"),
                                           method="structured", allow_slower=True).layers[0].reason


def test_one_by_one_with_channel_structure_is_exact() -> None:
    w = _structured_weight(5, 6, 1, 1, 2, 1, 1)
    model = conv_model(w, None, in_shape=("N", 6, 5, 5))
    res = lr.compress(model, method="structured", method_options={"struct_c_ratio": 1 / 3}, allow_slower=True,
                      end_to_end=False)
    assert res.layers[0].status == "rewritten" and res.layers[0].params == "c=2,n=1x1"
    _assert_same(model, res, (2, 6, 5, 5))


# ---- CLI -----------------------------------------------------------------------------------


def _with_output_shape(model: onnx.ModelProto) -> onnx.ModelProto:
    """conv_model leaves the output's type without a shape, which the loader's checker refuses."""
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    return model


def test_cli_flags_reach_the_pass(tmp_path, capsys) -> None:
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save_model(_with_output_shape(conv_model(w, None, in_shape=(1, 4, 10, 10), pads=[1, 1, 1, 1])), str(src))
    rc = main([str(src), "-o", str(out), "-m", "structured", "--struct-n", "1", "--struct-c-ratio", "0.5",
               "--allow-slower", "-q", "--report", str(rep)])
    assert rc == 0 and out.exists()
    layer = json.loads(rep.read_text())["layers"][0]
    assert layer["method"] == "structured" and layer["params"] == "c=2,n=1x1"
    assert layer["extra_adds"] > 0
    rc = main([str(src), "-o", str(out), "-m", "structured", "--struct-n", "2", "--allow-slower", "-q",
               "--report", str(rep)])
    assert rc == 0 and json.loads(rep.read_text())["layers"][0]["params"] == "c=4,n=2x2"


@pytest.mark.parametrize("flag,value", [("--struct-n", "0"), ("--struct-n", "two"), ("--struct-c-ratio", "1.5"),
                                        ("--struct-c-ratio", "0"), ("--struct-c-ratio", "nan")])
def test_bad_flag_value_exits_2(tmp_path, capsys, flag: str, value: str) -> None:
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    src = tmp_path / "m.onnx"
    onnx.save_model(_with_output_shape(conv_model(w, None, in_shape=(1, 4, 10, 10))), str(src))
    try:  # main() returns the usage code (older versions let argparse's SystemExit(2) through)
        rc = main([str(src), "-o", str(tmp_path / "o.onnx"), "-m", "structured", flag, value])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err
    assert not (tmp_path / "o.onnx").exists()
