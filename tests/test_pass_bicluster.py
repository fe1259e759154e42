"""The ``bicluster`` pass (Denton 3.3) through onnxruntime.

Exactness at full block rank (svd) for any clustering, and for cp on weights whose blocks
have CP rank K; both shuffle forms, shuffle before and after the spatial stage; dynamic
batch and spatial sizes; equal cluster sizes; declines with reasons; the rank rules; the
data metric; the output permutation folded into the next conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import conv_model, run_ort
from onnx import TensorProto, helper, numpy_helper

import onnxslim_lr as lr
from onnxslim_lr.decompose.denton import bicluster, bicluster_svd_macs
from onnxslim_lr.graph import export_model, import_graph
from onnxslim_lr.passes import Budget, PassContext, get
from onnxslim_lr.permute import fold_channel_gathers


def _conv(w: np.ndarray, b: np.ndarray | None = None, in_shape=None, **attrs) -> onnx.ModelProto:
    """helpers.conv_model with a declared (symbolic) output shape."""
    in_shape = in_shape or ("N", w.shape[1] * int(attrs.get("group", 1)), "H", "W")
    m = conv_model(w, b, in_shape=in_shape, **attrs)
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[0], "Ho", "Wo"]))
    return m


def _compress(model: onnx.ModelProto, **kw: object) -> lr.CompressResult:
    kw.setdefault("end_to_end", False)
    kw.setdefault("allow_slower", True)
    return lr.compress(model, method="bicluster", **kw)  # type: ignore[arg-type]


def _x(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def _w(F: int, C: int, k=(3, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((F, C, *k)).astype(np.float32)


GEOMS = [
    dict(pads=[1, 1, 1, 1]),                         # shuffle before the spatial stage
    dict(strides=[2, 2], pads=[1, 0, 2, 1]),         # strided: shuffle after it
    dict(dilations=[1, 2], pads=[1, 2, 1, 2]),
    dict(auto_pad="SAME_LOWER", strides=[2, 1]),
]
_ids = lambda a: "-".join(f"{k}{v}" for k, v in a.items())  # noqa: E731


@pytest.mark.parametrize("shuffle", ["reshape", "gather"])
@pytest.mark.parametrize("attrs", GEOMS, ids=_ids)
@pytest.mark.parametrize("G,H", [(2, 3), (4, 2), (1, 3), (8, 12)])
def test_svd_full_block_rank_is_exact(G: int, H: int, attrs: dict, shuffle: str) -> None:
    F, C = 12, 8
    w, b = _w(F, C), np.random.default_rng(7).standard_normal(F).astype(np.float32)
    model = _conv(w, b, **attrs)
    res = _compress(model, method_options={"clusters": f"{G},{H}", "ranks": f"{C // G},{F // H}",
                                           "bicluster_shuffle": shuffle}, input_shape=["x:2x8x11x9"])
    layer = res.layers[0]
    assert layer.status == "rewritten", layer.reason
    assert f"G={G},H={H},mode=svd,K1={C // G},K2={F // H}" in layer.params
    assert layer.rel_error < 1e-6
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("Conv") == 3
    if G > 1 and H > 1:
        assert ("Transpose" in ops) == (shuffle == "reshape")
    for shape in [(1, 8, 11, 9), (3, 8, 14, 6)]:  # dynamic batch and spatial sizes
        x = _x(shape)
        _close(run_ort(res.model, {"x": x})[0], run_ort(model, {"x": x})[0])


def _cp_block_weight(G: int, H: int, Cg: int, Fh: int, K: int, seed: int = 0) -> np.ndarray:
    """Blocks of CP rank K under a hidden (shuffled) grouping that balanced k-means recovers."""
    rng = np.random.default_rng(seed)
    C, F = G * Cg, H * Fh
    w = np.zeros((F, C, 9))
    for g in range(G):
        for h in range(H):
            A = rng.standard_normal((Fh, K)) + 5.0 * (h + 1)
            B = rng.standard_normal((Cg, K)) + 5.0 * (g + 1)
            S = rng.standard_normal((9, K))
            w[h * Fh:(h + 1) * Fh, g * Cg:(g + 1) * Cg] = np.einsum("fk,ck,pk->fcp", A, B, S)
    w = w[rng.permutation(F)][:, rng.permutation(C)]
    return w.reshape(F, C, 3, 3).astype(np.float32)


@pytest.mark.parametrize("attrs", GEOMS[:2], ids=_ids)
@pytest.mark.parametrize("shuffle", ["reshape", "gather"])
def test_cp_exact_on_rank_k_blocks(attrs: dict, shuffle: str) -> None:
    w = _cp_block_weight(2, 2, 4, 4, 2)
    model = _conv(w, None, **attrs)
    res = _compress(model, method_options={"clusters": "2,2", "bicluster_mode": "cp", "ranks": "2",
                                           "bicluster_shuffle": shuffle}, input_shape=["x:1x8x10x10"])
    layer = res.layers[0]
    assert layer.status == "rewritten" and "mode=cp,K=2" in layer.params, layer.reason
    assert layer.rel_error < 1e-5
    depthwise = [n for n in res.model.graph.node if n.op_type == "Conv"][1]
    assert {a.name: a.i for a in depthwise.attribute}["group"] == 2 * 2 * 2
    for shape in [(2, 8, 10, 10), (1, 8, 7, 13)]:
        x = _x(shape)
        _close(run_ort(res.model, {"x": x})[0], run_ort(model, {"x": x})[0])


def test_equal_cluster_sizes() -> None:
    w = _w(12, 8).astype(np.float64)
    for G, H in [(2, 3), (4, 6), (8, 2)]:
        bc = bicluster(w, G, H, mode="svd", ranks=(1, 1))
        assert set(np.bincount(bc.in_labels)) == {8 // G}
        assert set(np.bincount(bc.out_labels)) == {12 // H}


def test_declines_with_reasons() -> None:
    model = _conv(_w(12, 8), None)
    reason = lambda **kw: _compress(model, input_shape=["x:1x8x9x9"], **kw).layers[0].reason  # noqa: E731
    assert "8 input channels do not split into G=3" in reason(method_options={"clusters": "3,2"})
    assert "12 output channels do not split into H=5" in reason(method_options={"clusters": "2,5"})
    assert "K1 <= C/G = 4" in reason(method_options={"clusters": "2,2", "ranks": "5,2"})
    assert "cp takes one rank" in reason(method_options={"clusters": "2,2", "ranks": "2,2", "bicluster_mode": "cp"})
    grouped = _conv(_w(12, 4), None, in_shape=("N", 8, 9, 9), group=2)
    res = _compress(grouped)
    assert "grouped conv (group=2)" in res.layers[0].reason


def test_cli_validates_options(tmp_path, capsys) -> None:
    from onnxslim_lr.cli import main

    src = tmp_path / "m.onnx"
    onnx.save(_conv(_w(12, 8), None, in_shape=(1, 8, 8, 8)), src)
    for bad in (["--clusters", "3"], ["--clusters", "0,2"], ["--ranks", "a,b"], ["--ranks", "1,2,3"],
                ["--bicluster-mode", "tucker"], ["--bicluster-shuffle", "nope"]):
        assert main([str(src), "-o", str(tmp_path / "o.onnx"), "-m", "bicluster", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and bad[0] in err, err


def test_rank_rules() -> None:
    w = _w(64, 32, (3, 3))
    model = _conv(w, None, in_shape=(1, 32, 16, 16), pads=[1, 1, 1, 1])
    graph = import_graph(model)
    ctx = PassContext(opset=17, shapes={"x": (1, 32, 16, 16), "y": (1, 64, 16, 16)}, graph=graph)
    p = get("bicluster")
    site = p.match(graph.nodes[0], ctx)
    opts = {"clusters": (4, 2)}
    cand = p.propose(site, Budget(rank_ratio=0.5, options=opts), ctx)
    assert cand.params["K1"] == 4 and cand.params["K2"] == 16  # round(0.5 * 8), round(0.5 * 32)
    cand = p.propose(site, Budget(rank_ratio=0.01, options=opts), ctx)
    assert cand.params["K1"] == 1 and cand.params["K2"] == 1  # clamped to >= 1
    cand = p.propose(site, Budget(target_speedup=4.0, options=opts), ctx)
    assert cand.theoretical_speedup >= 4.0
    K1, K2 = cand.params["K1"], cand.params["K2"]
    assert cand.macs_after == bicluster_svd_macs(32, 64, 3, 3, 16, 16, 16, 16, 4, 2, K1, K2)
    bigger = bicluster_svd_macs(32, 64, 3, 3, 16, 16, 16, 16, 4, 2, K1 + 1, min(32, round((K1 + 1) * 4)))
    assert bigger * 4.0 > site.macs()
    cand = p.propose(site, Budget(target_speedup=3.0, options=dict(opts, bicluster_mode="cp")), ctx)
    assert cand.theoretical_speedup >= 3.0 and cand.params["mode"] == "cp"
    cand = p.propose(site, Budget(target_speedup=1e6, options=opts), ctx)  # unreachable: the cheapest rung
    assert (cand.params["K1"], cand.params["K2"]) == (1, 4) and cand.theoretical_speedup < 1e6
    # energy: blocks of low multilinear rank get low ranks
    cand = p.propose(site, Budget(options={"clusters": (1, 1)}), ctx)  # default energy 0.98 on random weights
    assert cand.params["K1"] > 16
    # default clusters: divisors nearest to 4
    assert p.propose(site, Budget(rank_ratio=0.5), ctx).params["G"] == 4


def test_data_metric_beats_frobenius() -> None:
    rng = np.random.default_rng(2)
    C = 8
    w = _w(12, C, seed=3)
    model = _conv(w, None, in_shape=("N", C, 10, 10), pads=[1, 1, 1, 1])
    A = rng.standard_normal((C, 2)) @ np.diag([3.0, 1.0]) @ rng.standard_normal((2, C))
    A += 0.05 * rng.standard_normal((C, C))

    def data(n: int, seed: int) -> np.ndarray:
        z = np.random.default_rng(seed).standard_normal((n, C, 10, 10))
        return np.einsum("cd,ndhw->nchw", A, z).astype(np.float32)

    calib, test = data(16, 1), data(8, 2)
    ref = run_ort(model, {"x": test})[0]
    for mode, ranks in (("svd", "2,2"), ("cp", "2")):
        errs = {}
        for metric in ("frobenius", "data"):
            res = _compress(model, method_options={"clusters": "2,2", "ranks": ranks, "bicluster_mode": mode},
                            metric=metric, calib=calib)
            assert res.layers[0].status == "rewritten", res.layers[0].reason
            got = run_ort(res.model, {"x": test})[0]
            errs[metric] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert errs["data"] < 0.9 * errs["frobenius"], (mode, errs)


def test_output_permutation_folds_into_the_next_conv() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c2", "s", "bb", "mu", "var"], ["n2"]),
             helper.make_node("Relu", ["n2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    arr = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {"w1": arr(8, 3, 3, 3), "b1": arr(8), "w2": arr(12, 8, 3, 3), "b2": arr(12),
             "s": (rng.random(12) + 0.5).astype(np.float32), "bb": arr(12), "mu": arr(12),
             "var": (rng.random(12) + 0.5).astype(np.float32), "w3": arr(5, 12, 1, 1)}
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, "h", "w"])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    res = _compress(model, only=["conv2"], fold=False,
                    method_options={"clusters": "2,3", "ranks": "4,4"}, input_shape=["x:1x3x12x12"])
    layer = res.layers[0]
    assert layer.status == "rewritten", layer.reason
    assert "perm=in:folded/out:folded" in layer.params, layer.params
    graph = import_graph(res.model)
    # compress() already folded both (out: into BN + conv3; in: back through Relu into conv1)
    assert "Gather" not in [n.op_type for n in res.model.graph.node]
    assert fold_channel_gathers(graph) == 0
    folded = export_model(graph, like=res.model)
    assert "Gather" not in [n.op_type for n in folded.graph.node]
    for shape in [(1, 3, 12, 12), (2, 3, 9, 15)]:
        x = _x(shape)
        _close(run_ort(folded, {"x": x})[0], run_ort(model, {"x": x})[0])
