"""Folding channel-permutation Gathers (onnxslim_lr.permute) never changes what a model computes.

Every model here is built in code with an explicit ``Gather(axis=1, permutation)``; after
``fold_channel_gathers`` the outputs must be unchanged (onnxruntime, optimisations off) at
several batch and spatial sizes, and the Gather must be gone wherever the rules say it can
fold, and kept (once) where it cannot.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper

import onnxslim_lr as lr
from onnxslim_lr.graph import export_model, import_graph
from onnxslim_lr.permute import FoldReport, fold_channel_gathers, predict_backward, predict_fold

sys.path.insert(0, str(Path(__file__).parent))

RNG = np.random.default_rng(0)


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3


def _model(nodes, inits: dict, outputs: dict, c_in: int = 3, hw=("H", "W")) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, *hw])],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _fold(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int, FoldReport]:
    graph = import_graph(model)
    rep = FoldReport()
    n = fold_channel_gathers(graph, rep)
    return export_model(graph, like=model), n, rep


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, c_in: int = 3,
                  shapes=((1, 9, 11), (3, 12, 8))) -> None:
    for n, h, w in shapes:
        x = RNG.standard_normal((n, c_in, h, w)).astype(np.float32)
        for ra, rb in zip(run_ort(a, {"x": x}), run_ort(b, {"x": x})):
            np.testing.assert_allclose(rb, ra, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ra).max())))


def _perm(n: int, seed: int = 1) -> np.ndarray:
    p = np.random.default_rng(seed).permutation(n)
    while np.array_equal(p, np.arange(n)):
        p = np.random.default_rng(seed + 1).permutation(n)
    return p.astype(np.int64)


# ---- forward folding ------------------------------------------------------------------------


def test_mono_relu_maxpool_conv_folds_away() -> None:
    """conv0 (grouped, cluster order) -> Gather -> Relu -> MaxPool -> conv1: no Gather remains."""
    q = _perm(8)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], group=1, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wg", "bg"], ["c"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w1", "b1"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = {"w0": _w(4, 3, 3, 3), "b0": _w(4), "wg": _w(8, 1, 3, 3, seed=1), "bg": _w(8, seed=2), "q": q,
             "w1": _w(5, 8, 3, 3, seed=3), "b1": _w(5, seed=4)}
    m = _model(nodes, inits, {"y": ["N", 5, "h", "w"]})
    new, n, rep = _fold(m)
    assert n == 1 and rep.removed == 1
    assert "Gather" not in _ops(new)
    _same_outputs(m, new)


def test_bn_relu_concat_conv_folds_away() -> None:
    """Gather -> BN -> Relu -> Concat(with another branch) -> Conv: BN params and conv columns permuted."""
    q = _perm(6)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], group=1),
        helper.make_node("Conv", ["a", "wd", "bd"], ["c"], group=2, pads=[1, 1, 1, 1]),  # grouped: no backward fold
        helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
        helper.make_node("BatchNormalization", ["g", "s", "bb", "mu", "var"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["x", "wo"], ["o"], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["o", "r"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w1", "b1"], ["y"]),
    ]
    inits = {"wa": _w(4, 3, 3, 3), "wd": _w(6, 2, 3, 3, seed=1), "bd": _w(6, seed=2), "q": q,
             "s": (RNG.random(6) + 0.5).astype(np.float32), "bb": _w(6, seed=3), "mu": _w(6, seed=4),
             "var": (RNG.random(6) + 0.5).astype(np.float32), "wo": _w(2, 3, 3, 3, seed=5),
             "w1": _w(4, 8, 1, 1, seed=6), "b1": _w(4, seed=7)}
    m = _model(nodes, inits, {"y": ["N", 4, "H", "W"]})
    new, n, _ = _fold(m)
    assert n == 1 and "Gather" not in _ops(new)
    _same_outputs(m, new)


def test_graph_output_keeps_one_gather() -> None:
    """grouped conv -> Gather -> Relu -> {graph output, conv}: the conv absorbs, one Gather stays for the output."""
    q = _perm(6)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wd"], ["c"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
        helper.make_node("Relu", ["g"], ["r"]),
        helper.make_node("Conv", ["r", "w1"], ["y"]),
    ]
    inits = {"wa": _w(4, 3, 3, 3), "wd": _w(6, 2, 3, 3, seed=1), "q": q, "w1": _w(3, 6, 1, 1, seed=2)}
    m = _model(nodes, inits, {"y": ["N", 3, "H", "W"], "r": ["N", 6, "H", "W"]})
    new, n, rep = _fold(m)
    assert rep.moved == 1 and _ops(new).count("Gather") == 1
    gather = next(nd for nd in new.graph.node if nd.op_type == "Gather")
    assert gather.output[0] == "r"  # the graph output keeps its name, produced by the kept Gather
    assert [o.name for o in new.graph.output] == ["y", "r"]
    _same_outputs(m, new)


@pytest.mark.parametrize("blocker", ["output", "lrn", "flatten", "add2"])
def test_blockers_keep_the_gather(blocker: str) -> None:
    """Where the permutation can go nowhere (and the producer is a grouped conv), the model is untouched."""
    q = _perm(6)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["c"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
             helper.make_node("Relu", ["g"], ["r"])]
    out = {"y": ["N", 6, "H", "W"]}
    if blocker == "output":
        nodes.append(helper.make_node("Identity", ["r"], ["y"]))
        nodes[-1] = helper.make_node("Sigmoid", ["r"], ["y"])  # unary: the walk reaches the graph output
    elif blocker == "lrn":
        nodes.append(helper.make_node("LRN", ["r"], ["y"], size=3))
    elif blocker == "flatten":
        nodes.append(helper.make_node("Flatten", ["r"], ["y"]))
        out = {"y": ["N", "F"]}
    else:
        nodes.append(helper.make_node("Add", ["r", "c"], ["y"]))  # two activations
    m = _model(nodes, {"wd": _w(6, 1, 3, 3), "q": q}, out)
    new, n, _ = _fold(m)
    assert n == 0 and _ops(new).count("Gather") == 1
    _same_outputs(m, new)


def test_gather_moves_past_a_downsampling_pool() -> None:
    q = _perm(6)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["c"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["y"])]
    m = _model(nodes, {"wd": _w(6, 1, 3, 3), "q": q}, {"y": ["N", "F"]})
    new, n, rep = _fold(m)
    assert rep.moved == 1
    ops = _ops(new)
    assert ops.count("Gather") == 1 and ops.index("Gather") > ops.index("MaxPool")
    _same_outputs(m, new)


def test_two_consumers_and_add_mul_constants() -> None:
    """Gather -> Mul(per-channel const) -> Add(per-channel const) -> {conv a, conv b}."""
    q = _perm(6)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["c"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
             helper.make_node("Mul", ["k", "g"], ["m1"]),
             helper.make_node("Add", ["m1", "k2"], ["a1"]),
             helper.make_node("Clip", ["a1", "lo", "hi"], ["cl"]),
             helper.make_node("Conv", ["cl", "wa"], ["ya"]),
             helper.make_node("Conv", ["cl", "wb"], ["yb"], pads=[1, 1, 1, 1])]
    inits = {"wd": _w(6, 1, 3, 3), "q": q, "k": _w(1, 6, 1, 1, seed=1), "k2": _w(6, 1, 1, seed=2),
             "lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32),
             "wa": _w(2, 6, 1, 1, seed=3), "wb": _w(3, 6, 3, 3, seed=4)}
    m = _model(nodes, inits, {"ya": ["N", 2, "H", "W"], "yb": ["N", 3, "H", "W"]})
    new, n, _ = _fold(m)
    assert n == 1 and "Gather" not in _ops(new)
    _same_outputs(m, new)


def test_grouped_and_depthwise_consumers() -> None:
    # a permutation inside each group of 3 folds into a group-2 conv; a depthwise conv passes it on
    q = np.array([2, 0, 1, 4, 5, 3], np.int64)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["c"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
             helper.make_node("Conv", ["g", "wdw", "bdw"], ["dw"], group=6, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["dw", "wgr"], ["y"], group=2)]
    inits = {"wd": _w(6, 1, 3, 3), "q": q, "wdw": _w(12, 1, 3, 3, seed=1), "bdw": _w(12, seed=2),
             "wgr": _w(4, 6, 1, 1, seed=3)}
    m = _model(nodes, inits, {"y": ["N", 4, "H", "W"]})
    new, n, _ = _fold(m)  # depthwise multiplier 2 expands the permutation to 12 channels, group 2 = 6+6
    assert "Gather" not in _ops(new)
    _same_outputs(m, new)
    # a permutation that crosses the groups of the consumer is blocked there
    q2 = np.array([3, 1, 2, 0, 4, 5], np.int64)
    inits2 = dict(inits, q=q2, wgr=_w(4, 3, 1, 1, seed=3))
    nodes2 = nodes[:2] + [helper.make_node("Conv", ["g", "wgr"], ["y"], group=2)]
    m2 = _model(nodes2, {k: inits2[k] for k in ("wd", "q", "wgr")}, {"y": ["N", 4, "H", "W"]})
    new2, n2, _ = _fold(m2)
    assert n2 == 0 and "Gather" in _ops(new2)
    _same_outputs(m2, new2)


def test_composition_and_identity() -> None:
    q, r = _perm(6, 3), _perm(6, 5)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["c"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
             helper.make_node("Relu", ["g"], ["r"]),
             helper.make_node("Gather", ["r", "r_idx"], ["g2"], axis=1),
             helper.make_node("LRN", ["g2"], ["y"], size=3)]
    m = _model(nodes, {"wd": _w(6, 1, 3, 3), "q": q, "r_idx": r}, {"y": ["N", 6, "H", "W"]})
    new, _, _ = _fold(m)
    assert _ops(new).count("Gather") == 1
    _same_outputs(m, new)
    inv = np.argsort(q).astype(np.int64)  # composes to the identity: both vanish
    m = _model(nodes, {"wd": _w(6, 1, 3, 3), "q": q, "r_idx": inv}, {"y": ["N", 6, "H", "W"]})
    new, _, _ = _fold(m)
    assert "Gather" not in _ops(new)
    _same_outputs(m, new)


# ---- backward folding -----------------------------------------------------------------------


def test_backward_into_producing_conv_through_relu_bn() -> None:
    """conv -> BN -> Relu -> Gather -> LRN: the Gather folds into the conv's rows (and BN's params)."""
    q = _perm(6)
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("Gather", ["r", "q"], ["g"], axis=1),
             helper.make_node("LRN", ["g"], ["y"], size=3)]
    inits = {"w0": _w(6, 3, 3, 3), "b0": _w(6, seed=1), "q": q, "s": (RNG.random(6) + 0.5).astype(np.float32),
             "bb": _w(6, seed=2), "mu": _w(6, seed=3), "var": (RNG.random(6) + 0.5).astype(np.float32)}
    m = _model(nodes, inits, {"y": ["N", 6, "H", "W"]})
    graph = import_graph(m)
    gnode = next(nd for nd in graph.nodes if nd.op == "Gather")
    assert predict_backward(graph, gnode, q)
    new, n, rep = _fold(m)
    assert n == 1 and "Gather" not in _ops(new) and "folded into the producing conv" in rep.details[0]
    _same_outputs(m, new)


def test_backward_refused_when_producer_output_is_shared() -> None:
    q = _perm(6)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
             helper.make_node("LRN", ["g"], ["y"], size=3),
             helper.make_node("Relu", ["c"], ["z"])]
    m = _model(nodes, {"w0": _w(6, 3, 3, 3), "q": q}, {"y": ["N", 6, "H", "W"], "z": ["N", 6, "H", "W"]})
    new, n, _ = _fold(m)
    assert n == 0 and "Gather" in _ops(new)
    _same_outputs(m, new)


# ---- safety ---------------------------------------------------------------------------------


def test_non_permutation_gathers_are_left_alone() -> None:
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"]),
             helper.make_node("Gather", ["c", "sel"], ["g"], axis=1),       # a subset
             helper.make_node("Gather", ["c", "dup"], ["h"], axis=1),       # repeated index
             helper.make_node("Gather", ["c", "q"], ["k"], axis=0),         # batch axis
             helper.make_node("Conv", ["g", "w1"], ["y1"]),
             helper.make_node("Conv", ["h", "w2"], ["y2"]),
             helper.make_node("Relu", ["k"], ["y3"])]
    inits = {"w0": _w(4, 3, 1, 1), "sel": np.array([2, 0], np.int64), "dup": np.array([0, 0, 1, 2], np.int64),
             "q": np.array([0], np.int64), "w1": _w(2, 2, 1, 1), "w2": _w(2, 4, 1, 1)}
    m = _model(nodes, inits, {"y1": ["N", 2, "H", "W"], "y2": ["N", 2, "H", "W"], "y3": None})
    new, n, _ = _fold(m)
    assert n == 0 and _ops(new).count("Gather") == 3
    _same_outputs(m, new)


def test_tensor_read_inside_a_subgraph_is_kept() -> None:
    q = _perm(6)
    then_g = helper.make_graph([helper.make_node("Relu", ["g"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["g"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "wd"], ["c"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Gather", ["c", "q"], ["g"], axis=1),
             helper.make_node("Conv", ["g", "w1"], ["y"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g)]
    m = _model(nodes, {"wd": _w(6, 1, 3, 3), "q": q, "w1": _w(2, 6, 1, 1), "cond": np.array(True)},
               {"y": ["N", 2, "H", "W"], "z": None})
    new, _, _ = _fold(m)
    assert "Gather" in _ops(new)  # g is still produced, under its name, for the If body
    _same_outputs(m, new)


def test_predict_fold() -> None:
    q = _perm(6)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["c"], group=3, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["y"]),
             helper.make_node("LRN", ["r"], ["z"], size=3)]
    m = _model(nodes, {"wd": _w(6, 1, 3, 3), "w1": _w(2, 6, 1, 1)}, {"y": None, "z": None})
    graph = import_graph(m)
    c = next(t for name, t in graph.tensors().items() if name == "c")
    assert not predict_fold(graph, c, q)  # the LRN blocks
    assert predict_fold(graph, c, np.arange(6))


# ---- end to end with the passes -------------------------------------------------------------


def _compress(model: onnx.ModelProto, method: str, **kw: object) -> onnx.ModelProto:
    res = lr.compress(model, method=method, allow_slower=True, end_to_end=False, **kw)  # type: ignore[arg-type]
    assert any(r.status == "rewritten" for r in res.layers), [r.reason for r in res.layers]
    return res.model


def test_mono_then_bicluster_chain_folds_every_gather() -> None:
    """x -> conv1 (mono, paper form) -> Relu -> MaxPool -> conv2 (bicluster) -> Relu -> conv3.

    conv1's output Gather folds into bicluster's input Gather (composition), which then folds
    back through MaxPool/Relu... only as far as the grouped conv: so it stays once; conv2's
    output Gather folds into conv3. Outputs are unchanged at every size.
    """
    w1 = _w(8, 3, 3, 3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    inits = {"w1": w1, "b1": _w(8, seed=1), "w2": _w(6, 8, 3, 3, seed=2), "b2": _w(6, seed=3),
             "w3": _w(4, 6, 1, 1, seed=4)}
    m = _model(nodes, inits, {"y": ["N", 4, "h", "w"]}, hw=("H", "W"))
    m1 = _compress(m, "mono", only=["conv1"], method_options={"colors": 2, "mono_form": "paper"},
                   input_shape=["x:1x3x12x10"])
    m2 = _compress(m1, "bicluster", only=["conv2"], method_options={"clusters": "2,3", "ranks": "4,2"},
                   input_shape=["x:1x3x12x10"])
    # compress() runs fold_channel_gathers after splicing: at most the one Gather that cannot
    # pass bicluster's grouped core is left, and folding again finds nothing more to do
    assert _ops(m2).count("Gather") <= 1
    new, n, rep = _fold(m2)
    assert n == 0 and _ops(new).count("Gather") == _ops(m2).count("Gather")
    # conv3 absorbed bicluster's output permutation: no Gather right before conv3
    prod = {o: nd for nd in new.graph.node for o in nd.output}
    conv3 = next(nd for nd in new.graph.node if nd.op_type == "Conv" and nd.output[0] == "y")
    assert prod[prod[conv3.input[0]].input[0]].op_type != "Gather"
    _same_outputs(m2, new, shapes=((1, 12, 10), (2, 9, 14)))
    _same_outputs(m2, new, shapes=((1, 12, 10), (2, 9, 14)))
