"""The ``mono`` pass (Denton 3.2.1) through onnxruntime.

Exactness: filters whose colour parts are rank 1 and share C' colours (assigned to the
filters in shuffled order) are reproduced exactly by every ``--mono-form``, at every geometry,
with dynamic batch and spatial sizes. Plus: declines with reasons, the C' rules, Table 3's
theoretical speedups through the candidate's MAC counts, the data metric, and the
permutation folding after the splice.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import conv_model, run_ort
from onnx import TensorProto, helper, numpy_helper

import onnxslim_lr as lr
from onnxslim_lr.graph import export_model, import_graph
from onnxslim_lr.passes import Budget, PassContext, get
from onnxslim_lr.passes.mono import FORMS
from onnxslim_lr.permute import fold_channel_gathers


def _conv(w: np.ndarray, b: np.ndarray | None = None, in_shape=("N", 3, "H", "W"), **attrs) -> onnx.ModelProto:
    """helpers.conv_model with a declared (symbolic) output shape."""
    m = conv_model(w, b, in_shape=in_shape, **attrs)
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[0], "Ho", "Wo"]))
    return m


def _mono_weight(F: int, C: int, cp: int, k=(3, 3), seed: int = 0) -> np.ndarray:
    """W_f = U_{c_f} v_f^T: C' shared unit colours, each used by F/C' filters in shuffled order."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((cp, C))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(cp), F // cp))
    V = rng.standard_normal((F, k[0] * k[1]))
    return np.einsum("fc,fp->fcp", U[labels], V).reshape(F, C, *k).astype(np.float32)


def _compress(model: onnx.ModelProto, **kw: object) -> lr.CompressResult:
    kw.setdefault("end_to_end", False)
    kw.setdefault("allow_slower", True)
    return lr.compress(model, method="mono", **kw)  # type: ignore[arg-type]


def _x(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


GEOMS = [
    dict(pads=[1, 1, 1, 1]),
    dict(strides=[2, 2], pads=[1, 0, 2, 1]),
    dict(dilations=[2, 1], pads=[2, 1, 2, 1]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(auto_pad="VALID"),
]
_ids = lambda a: "-".join(f"{k}{v}" for k, v in a.items())  # noqa: E731


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("attrs", GEOMS, ids=_ids)
def test_exact_on_monochromatic_filters(form: str, attrs: dict) -> None:
    F, C, cp = 12, 3, 4
    w = _mono_weight(F, C, cp, (3, 3))
    b = np.random.default_rng(5).standard_normal(F).astype(np.float32)
    model = _conv(w, b, **attrs)
    res = _compress(model, method_options={"colors": cp, "mono_form": form}, input_shape=["x:2x3x11x9"])
    layer = res.layers[0]
    assert layer.status == "rewritten", layer.reason
    assert f"colors={cp}" in layer.params and f"form={form}" in layer.params
    assert layer.rel_error < 1e-6
    ops = [n.op_type for n in res.model.graph.node]
    if form == "paper":
        grouped = [n for n in res.model.graph.node if n.op_type == "Conv"][1]
        assert {a.name: a.i for a in grouped.attribute}["group"] == cp
    if form == "split":
        assert ops.count("Conv") == 1 + cp and "Split" in ops and "Concat" in ops
    if form in ("split", "paper"):
        assert "perm=gather" in layer.params and ops[-1] == "Gather"  # y is a graph output: the Gather stays
    else:
        assert "perm=none" in layer.params
    for shape in [(1, 3, 11, 9), (3, 3, 16, 7), (2, 3, 8, 13)]:  # dynamic batch and spatial sizes
        x = _x(shape)
        _close(run_ort(res.model, {"x": x})[0], run_ort(model, {"x": x})[0])


def test_paper_table3_theoretical_speedups_through_the_candidate() -> None:
    """MattNet/ZFNet first layer: 3 -> 96, 7x7, stride 2, 224x224 input.

    Table 3 is reproduced with a 110x110 output, i.e. the ONNX floor rule with pad 1
    (``floor((224 + 2 - 7) / 2) + 1 = 110``); without padding the output is 109x109.
    """
    w = np.random.default_rng(0).standard_normal((96, 3, 7, 7)).astype(np.float32)
    model = _conv(w, None, in_shape=(1, 3, 224, 224), strides=[2, 2], pads=[1, 1, 1, 1])
    graph = import_graph(model)
    node = graph.nodes[0]
    ctx = PassContext(opset=17, shapes={"x": (1, 3, 224, 224), "y": (1, 96, 110, 110)}, graph=graph)
    p = get("mono")
    site = p.match(node, ctx)
    table3 = {6: 2.95, 8: 2.94, 12: 2.91, 16: 2.88, 24: 2.82, 48: 2.66, 96: 2.39}
    for cp, expected in table3.items():
        for form in ("split", "paper", "gather-depthwise"):
            cand = p.propose(site, Budget(options={"colors": cp, "mono_form": form}), ctx)
            assert cand.macs_before == 3 * 96 * 49 * 110 * 110
            assert round(cand.theoretical_speedup, 2) == expected, (cp, form)
    # the depthwise form projects to F colours at the input resolution: fewer savings
    cand = p.propose(site, Budget(options={"colors": 6, "mono_form": "depthwise"}), ctx)
    assert cand.macs_after == 96 * 3 * 224 * 224 + 49 * 96 * 110 * 110


def _site(F: int = 96, C: int = 3, hw: int = 32):
    w = np.random.default_rng(0).standard_normal((F, C, 5, 5)).astype(np.float32)
    model = _conv(w, None, in_shape=(1, C, hw, hw), pads=[2, 2, 2, 2])
    graph = import_graph(model)
    ctx = PassContext(opset=17, shapes={"x": (1, C, hw, hw), "y": (1, F, hw, hw)}, graph=graph)
    p = get("mono")
    return p, p.match(graph.nodes[0], ctx), ctx


def test_colour_count_rules() -> None:
    p, site, ctx = _site()
    params = lambda **kw: p.propose(site, Budget(**kw), ctx).params  # noqa: E731
    assert params()["colors"] == 6  # default: smallest divisor of 96 >= 96/16
    assert params(rank_ratio=0.1)["colors"] == 8  # nearest divisor of 96 to 9.6 (8 and 12: 8 is nearer)
    assert params(rank_ratio=0.5)["colors"] == 48
    # target speedup: the largest C' meeting it (5x5, stride 1: 7200 / (2400 + 3 C') >= 2.9 -> C' <= 27)
    assert params(target_speedup=2.9)["colors"] == 24
    assert p.propose(site, Budget(target_speedup=2.9), ctx).theoretical_speedup >= 2.9
    assert p.propose(site, Budget(options={"colors": 32}), ctx).theoretical_speedup < 2.9
    # unreachable target: the planner's one rule for every ladder, the cheapest rung (C' = 1),
    # whose theoretical speedup then says it misses the target
    cand = p.propose(site, Budget(target_speedup=3.0), ctx)
    assert cand.params["colors"] == 1 and cand.theoretical_speedup < 3.0
    # energy: the smallest C' within the error bound (random weights: only one colour per filter may do)
    dec = p.propose(site, Budget(energy=0.999), ctx)
    assert not dec and "no number of colours keeps the relative error" in dec.reason


def test_energy_rule_on_structured_weights() -> None:
    w = _mono_weight(24, 3, 4)
    model = _conv(w, None, in_shape=(1, 3, 10, 10), pads=[1, 1, 1, 1])
    res = _compress(model, energy=0.999999)
    assert res.layers[0].status == "rewritten" and "colors=4" in res.layers[0].params, res.layers[0].params


def test_declines_with_reasons() -> None:
    # C' must divide F
    w = _mono_weight(12, 3, 4)
    res = _compress(_conv(w), method_options={"colors": 5}, input_shape=["x:1x3x8x8"])
    assert res.layers[0].status == "declined" and "--colors 5 does not divide the 12 filters" in res.layers[0].reason
    # too many input channels
    w8 = np.random.default_rng(0).standard_normal((12, 8, 3, 3)).astype(np.float32)
    res = _compress(_conv(w8, in_shape=("N", 8, 8, 8)))
    assert "8 input channels" in res.layers[0].reason and "--mono-max-channels" in res.layers[0].reason
    res = _compress(_conv(w8, in_shape=("N", 8, 8, 8)), method_options={"mono_max_channels": 8, "colors": 4})
    assert res.layers[0].status == "rewritten", res.layers[0].reason
    # grouped / depthwise convs, 1x1 convs
    wg = np.random.default_rng(0).standard_normal((12, 2, 3, 3)).astype(np.float32)
    res = _compress(_conv(wg, in_shape=("N", 4, 8, 8), group=2))
    assert "grouped conv (group=2)" in res.layers[0].reason
    wd = np.random.default_rng(0).standard_normal((12, 1, 3, 3)).astype(np.float32)
    res = _compress(_conv(wd, in_shape=("N", 3, 8, 8), group=3))
    assert "depthwise conv (group=3)" in res.layers[0].reason
    w1 = np.random.default_rng(0).standard_normal((12, 3, 1, 1)).astype(np.float32)
    res = _compress(_conv(w1, in_shape=("N", 3, 8, 8)))
    assert "1x1 conv" in res.layers[0].reason


def test_cli_validates_options(tmp_path, capsys) -> None:
    from onnxslim_lr.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(_conv(_mono_weight(12, 3, 4), in_shape=(1, 3, 8, 8)), src)
    for bad in (["--colors", "0"], ["--colors", "x"], ["--mono-form", "fancy"]):
        assert main([str(src), "-o", str(tmp_path / "o.onnx"), "-m", "mono", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and bad[1] in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_data_metric_beats_frobenius_on_correlated_colours() -> None:
    """Strongly correlated input channels: the whitened colours + patch-metric refit win."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 3, 3, 3)).astype(np.float32)
    model = _conv(w, None, in_shape=("N", 3, 10, 10), pads=[1, 1, 1, 1])
    A = rng.standard_normal((3, 2)) @ np.diag([3.0, 1.0]) @ rng.standard_normal((2, 3))
    A += 0.05 * rng.standard_normal((3, 3))

    def data(n: int, seed: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((n, 3, 10, 10))
        return np.einsum("cd,ndhw->nchw", A, z).astype(np.float32)

    calib, test = data(16, 1), data(8, 2)
    ref = run_ort(model, {"x": test})[0]
    errs = {}
    for metric in ("frobenius", "data"):
        res = _compress(model, method_options={"colors": 2}, metric=metric, calib=calib)
        assert res.layers[0].status == "rewritten", res.layers[0].reason
        got = run_ort(res.model, {"x": test})[0]
        errs[metric] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert errs["data"] < 0.6 * errs["frobenius"], errs


def test_permutation_folds_into_the_next_conv() -> None:
    """conv1 (mono) -> Relu -> MaxPool -> conv2: predicted perm=folded, and folding leaves no Gather."""
    rng = np.random.default_rng(0)
    w1 = _mono_weight(12, 3, 4, (5, 5), seed=2)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[2, 2, 2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(w1, "w1"),
             numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((8, 12, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "h", "w"])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])  # Split with the attribute form
    model.ir_version = 6
    for form in ("split", "paper"):
        res = _compress(model, only=["conv1"], method_options={"colors": 4, "mono_form": form},
                        input_shape=["x:1x3x23x21"])
        layer = res.layers[0]
        assert layer.status == "rewritten" and "perm=folded" in layer.params, layer.params
        graph = import_graph(res.model)
        assert "Gather" not in [n.op_type for n in res.model.graph.node]  # compress() already folded it
        assert fold_channel_gathers(graph) == 0
        folded = export_model(graph, like=res.model)
        assert "Gather" not in [n.op_type for n in folded.graph.node]
        for shape in [(1, 3, 23, 21), (2, 3, 30, 17)]:
            x = _x(shape)
            _close(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0])
