"""Low-rank passes: exact at full rank over a grid of Conv attributes, through onnxruntime,
plus the cases each pass must decline, and the rank rules."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from helpers import conv_model, run_ort
from onnx import TensorProto, helper, numpy_helper

import onnxslim_lr as lr

EXACT = ["svd", "spatial", "tucker2"]

ATTR_GRID = [
    dict(pads=[1, 1, 1, 1]),
    dict(pads=[0, 2, 1, 0]),  # asymmetric
    dict(auto_pad="SAME_UPPER"),
    dict(auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(auto_pad="VALID"),
    dict(strides=[2, 1], pads=[1, 1, 1, 1]),
    dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(dilations=[1, 2], strides=[2, 2], pads=[1, 0, 0, 1]),
]


def _weights(F: int, C: int, kh: int, kw: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((F, C, kh, kw)).astype(np.float32), rng.standard_normal(F).astype(np.float32)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("attrs", ATTR_GRID, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
@pytest.mark.parametrize("kernel,bias", [((3, 3), True), ((3, 5), False)])
def test_full_rank_is_exact(method: str, attrs: dict, kernel: tuple[int, int], bias: bool) -> None:
    w, b = _weights(6, 4, *kernel)
    model = conv_model(w, b if bias else None, in_shape=("N", 4, 11, 9), **attrs)
    res = lr.compress(model, method=method, rank_ratio=1.0, allow_slower=True, input_shape=["x:2x4x11x9"])
    assert [r.status for r in res.layers] == ["rewritten"], res.layers[0].reason
    x = np.random.default_rng(1).standard_normal((2, 4, 11, 9)).astype(np.float32)
    ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert res.layers[0].out_error < 1e-5


@pytest.mark.parametrize("method", EXACT + ["cp"])
def test_dynamic_dims_survive_and_run_at_other_sizes(method: str) -> None:
    w, b = _weights(8, 3, 3, 3)
    model = conv_model(w, b, in_shape=("N", 3, "H", "W"), pads=[1, 1, 1, 1])
    res = lr.compress(model, method=method, rank_ratio=1.0, allow_slower=True, input_shape=["x:1x3x10x10"])
    dims = res.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "H", "W"]
    for shape in [(1, 3, 10, 10), (3, 3, 7, 13)]:
        x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        ref, got = run_ort(model, {"x": x})[0], run_ort(res.model, {"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_cp_recovers_a_cp_structured_kernel() -> None:
    rng = np.random.default_rng(0)
    K, F, C = 3, 8, 5
    a, bt, g = rng.standard_normal((C, K)), rng.standard_normal((9, K)), rng.standard_normal((F, K))
    w = np.einsum("ck,sk,fk->fcs", a, bt, g).reshape(F, C, 3, 3).astype(np.float32)
    model = conv_model(w, None, in_shape=(1, C, 8, 8), pads=[1, 1, 1, 1])
    # ratio giving rank exactly K: cp_full_rank = min(C*9, F*9, C*F) = 40
    res = lr.compress(model, method="cp", rank_ratio=K / 40, allow_slower=True)
    layer = res.layers[0]
    assert layer.status == "rewritten" and layer.params.startswith("rank=3")
    assert layer.rel_error < 1e-4
    x = rng.standard_normal((1, C, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(res.model, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fit", ["als", "greedy"])
def test_cp_fit_option_reaches_the_pass(fit: str) -> None:
    w, b = _weights(6, 4, 3, 3)
    res = lr.compress(conv_model(w, b, in_shape=(1, 4, 8, 8)), method="cp", rank_ratio=0.2, allow_slower=True,
                      method_options={"cp_method": fit})
    assert res.layers[0].params.endswith(f"fit={fit}")


def _fc_model(op: str, K: int = 12, F: int = 10, trans_b: int = 1, x_shape=("N", 12)) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    B = rng.standard_normal((F, K) if trans_b else (K, F)).astype(np.float32)
    inits = [numpy_helper.from_array(B, "B")]
    if op == "Gemm":
        inits.append(numpy_helper.from_array(rng.standard_normal(F).astype(np.float32), "c"))
        node = helper.make_node("Gemm", ["x", "B", "c"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0)
    else:
        node = helper.make_node("MatMul", ["x", "B"], ["y"], name="fc")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("op,trans_b,x_shape", [("Gemm", 1, ("N", 12)), ("Gemm", 0, ("N", 12)),
                                                 ("MatMul", 0, ("N", 5, 12))])
def test_fc_svd_full_rank_is_exact(op: str, trans_b: int, x_shape: tuple) -> None:
    model = _fc_model(op, trans_b=trans_b, x_shape=x_shape)
    concrete = "x" + ":" + "x".join(str(d if isinstance(d, int) else 2) for d in x_shape)
    res = lr.compress(model, method="fc-svd", rank_ratio=1.0, allow_slower=True, input_shape=[concrete])
    assert res.layers[0].status == "rewritten"
    x = np.random.default_rng(0).standard_normal(tuple(d if isinstance(d, int) else 3 for d in x_shape)).astype(np.float32)
    np.testing.assert_allclose(run_ort(res.model, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_fc_svd_without_saving_is_rejected_by_the_mac_guard() -> None:
    res = lr.compress(_fc_model("Gemm"), method="fc-svd", rank_ratio=1.0, end_to_end=False, input_shape=["x:2x12"])
    assert res.layers[0].status == "kept" and "saves no MACs" in res.layers[0].reason


# ---- declines ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", EXACT + ["cp"])
def test_grouped_and_depthwise_are_declined(method: str) -> None:
    w, b = _weights(8, 2, 3, 3)
    res = lr.compress(conv_model(w, b, in_shape=(1, 4, 8, 8), group=2), method=method, rank_ratio=0.5, allow_slower=True)
    assert res.layers[0].status == "declined" and "grouped" in res.layers[0].reason
    w, b = _weights(4, 1, 3, 3)
    res = lr.compress(conv_model(w, b, in_shape=(1, 4, 8, 8), group=4), method=method, rank_ratio=0.5, allow_slower=True)
    assert res.layers[0].status == "declined" and "depthwise" in res.layers[0].reason
    assert not res.changed


@pytest.mark.parametrize("method", EXACT + ["cp"])
def test_runtime_weight_is_declined(method: str) -> None:
    w, b = _weights(4, 3, 3, 3)
    model = conv_model(w, None, in_shape=(1, 3, 8, 8), weight_as="input")
    res = lr.compress(model, method=method, rank_ratio=0.5, allow_slower=True)
    assert res.layers[0].status == "declined" and "not a constant" in res.layers[0].reason


@pytest.mark.parametrize("method,reason", [("spatial", "separable"), ("tucker2", "1x1"), ("cp", "1x1")])
def test_kernel_shapes_a_method_cannot_help_are_declined(method: str, reason: str) -> None:
    w, b = _weights(8, 8, 1, 1)
    res = lr.compress(conv_model(w, b, in_shape=(1, 8, 6, 6)), method=method, rank_ratio=0.5, allow_slower=True)
    assert res.layers[0].status == "declined" and reason in res.layers[0].reason


def test_constant_node_weight_is_rewritten_like_an_initializer() -> None:
    w, b = _weights(6, 4, 3, 3)
    model = conv_model(w, b, in_shape=(1, 4, 8, 8), weight_as="constant", pads=[1, 1, 1, 1])
    res = lr.compress(model, method="svd", rank_ratio=1.0, allow_slower=True)
    assert res.layers[0].status == "rewritten"
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(res.model, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    assert "Constant" not in [n.op_type for n in res.model.graph.node]  # the old weight is cleaned up


# ---- rank rules -----------------------------------------------------------------------------


def test_rank_rules_pick_the_documented_ranks() -> None:
    rng = np.random.default_rng(0)
    # weight with a known spectrum: singular values 8, 4, 2, 1, 0.5, 0.25 (F=6, C*kh*kw=36)
    u, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((36, 6)))
    s = np.array([8, 4, 2, 1, 0.5, 0.25])
    w = ((u * s) @ v.T).reshape(6, 4, 3, 3).astype(np.float32)
    model = conv_model(w, None, in_shape=(1, 4, 16, 16), pads=[1, 1, 1, 1])
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    expected = int(np.searchsorted(energy, 0.95) + 1)
    res = lr.compress(model, method="svd", energy=0.95, allow_slower=True)
    assert res.layers[0].params.startswith(f"rank={expected},")
    res = lr.compress(model, method="svd", rank_ratio=0.5, allow_slower=True)
    assert res.layers[0].params.startswith("rank=3,")
    res = lr.compress(model, method="svd", target_speedup=2.0, allow_slower=True)
    layer = res.layers[0]
    assert layer.macs_before / layer.macs_after >= 2.0
    rank = int(layer.params.split(",")[0].split("=")[1])
    # one more rank would break the budget
    assert (rank + 1) * (36 + 6) * 256 > layer.macs_before / 2.0


@pytest.mark.parametrize("bad", [dict(rank_ratio=0.0), dict(rank_ratio=1.5), dict(energy=1.2),
                                 dict(target_speedup=0.5), dict(rank_ratio=0.5, energy=0.9)])
def test_invalid_budgets_raise_input_error(bad: dict) -> None:
    w, b = _weights(4, 3, 3, 3)
    with pytest.raises(lr.InputError):
        lr.compress(conv_model(w, b, in_shape=(1, 3, 8, 8)), method="svd", **bad)


def test_every_registered_pass_has_a_name_summary_and_op_types() -> None:
    from onnxslim_lr.passes import registry

    for name, cls in registry().items():
        assert cls.name == name and cls.summary and cls.op_types
    assert {"svd", "spatial", "tucker2", "cp", "fc-svd"} <= set(registry())




_DECOMPOSITIONS = [("svd", "onnxslim_lr.passes.svd", "channel_svd"),
                   ("spatial", "onnxslim_lr.passes.spatial", "spatial_svd_fitter"),
                   ("tucker2", "onnxslim_lr.passes.tucker2", "tucker2_fitter"),
                   ("cp", "onnxslim_lr.passes.cp", "cp_conv")]


@pytest.mark.parametrize("method,module,func", _DECOMPOSITIONS + [("fc-svd", "onnxslim_lr.passes.fc_svd", "fc_svd_fitter")])
def test_a_rung_without_mac_saving_is_rejected_before_decomposing(method: str, module: str, func: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the no-saving check returned a Decline whose truth value is False, so every
    rung was decomposed before the MAC guard threw it away (minutes on VGG-19's FC layers)."""
    import importlib

    calls: list[str] = []
    mod = importlib.import_module(module)
    real = getattr(mod, func)

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(func)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, func, spy)
    if method == "fc-svd":
        model, shape = _fc_model("Gemm"), "x:2x12"
    else:
        w, b = _weights(6, 4, 3, 3)
        model, shape = conv_model(w, b, in_shape=("N", 4, 9, 9), pads=[1, 1, 1, 1]), "x:1x4x9x9"
    res = lr.compress(model, method=method, rank_ratio=1.0, end_to_end=False, input_shape=[shape])
    assert res.layers[0].status == "kept"
    assert "saves no MACs" in res.layers[0].reason
    assert calls == []
    # the same rung still builds when savings are not required (full-rank exactness checks)
    res = lr.compress(model, method=method, rank_ratio=1.0, allow_slower=True, input_shape=[shape])
    assert calls and res.layers[0].status == "rewritten"
