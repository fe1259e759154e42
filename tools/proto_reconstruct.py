"""Prototype: sequential asymmetric reconstruction on the bundled trained VGG (issue 13).

Compares, at the same ranks (so the same MACs), the accuracy on held-out test images of

* ``frob``      channel SVD in the Frobenius metric (independent per layer);
* ``data``      channel SVD in the data metric (independent per layer, today's default);
* ``seq``       sequential asymmetric reconstruction, bias kept (Zhang et al. 2016);
* ``seq+b``     the same with bias correction (intercept);
* ``seq+b+relu`` the same, then the ReLU-aware refinement where a ReLU follows;
* ``t2 frob`` / ``t2 data`` / ``t2 seq+b`` the same for Tucker-2 (``--tucker2``).

Every sequential variant fits on the first ``--n-fit`` calibration images and keeps, per
layer, the reconstruction only if its error on the remaining (held-out) calibration images
is below that of the data-metric factors (the fallback rule). Activations come from
onnxruntime (graph optimisations off); the compressed model is built by replacing each
Conv/Gemm by its factor stages with ``onnx.helper``. Accuracy is measured on the test set
only (never used for fitting or choosing).

    python tools/proto_reconstruct.py --ratio 0.35 0.5 [--fc] [--tucker2] [--test10k]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from onnxslim_lr.calibration import im2col  # noqa: E402
from onnxslim_lr.decompose import reconstruct as rc  # noqa: E402
from onnxslim_lr.decompose.ranks import rank_from_ratio  # noqa: E402
from onnxslim_lr.decompose.svd import channel_svd, fc_svd  # noqa: E402
from onnxslim_lr.decompose.tucker import tucker2  # noqa: E402
from onnxslim_lr.calibration import sample_patch_rows  # noqa: E402

log = logging.getLogger("proto_reconstruct")


@dataclass
class Layer:
    name: str
    op: str  # Conv or Gemm
    inp: str
    out: str
    w: np.ndarray  # Conv: F,C,kh,kw ; Gemm: F,K (transB=1 layout)
    b: np.ndarray
    attrs: dict
    relu_after: bool

    @property
    def w2(self) -> np.ndarray:
        return self.w.reshape(self.w.shape[0], -1).astype(np.float64)


def load_layers(model: onnx.ModelProto) -> list[Layer]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        w = inits[n.input[1]]
        if n.op_type == "Gemm" and not attrs.get("transB", 0):
            w = w.T
        b = inits[n.input[2]] if len(n.input) > 2 else np.zeros(w.shape[0], np.float32)
        out.append(Layer(n.name, n.op_type, n.input[0], n.output[0], w, b, attrs,
                         consumers.get(n.output[0]) == ["Relu"]))
    return out


def build(model: onnx.ModelProto, repl: dict[str, list[tuple]]) -> onnx.ModelProto:
    """Replace nodes by stage chains: each stage is ``(op, weight, bias_or_None, attrs)``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = []
    used = set()
    for n in m.graph.node:
        if n.name not in repl:
            nodes.append(n)
            continue
        x = n.input[0]
        stages = repl[n.name]
        for si, (op, w, b, attrs) in enumerate(stages):
            y = n.output[0] if si == len(stages) - 1 else f"{n.name}/s{si}"
            wn = f"{n.name}/w{si}"
            m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), wn))
            ins = [x, wn]
            if b is not None:
                bn = f"{n.name}/b{si}"
                m.graph.initializer.append(numpy_helper.from_array(np.asarray(b, np.float32), bn))
                ins.append(bn)
            nodes.append(helper.make_node(op, ins, [y], name=f"{n.name}/n{si}", **attrs))
            x = y
        used.update(n.input[1:])
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep = [i for i in m.graph.initializer if i.name not in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def session(model: onnx.ModelProto, extra: list[str]) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for e in extra:
        if e not in have:
            m.graph.output.append(helper.make_tensor_value_info(e, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray, names: list[str], batch: int = 256) -> dict[str, np.ndarray]:
    sess = session(model, names)
    iname = sess.get_inputs()[0].name
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(x), batch):
        got = sess.run(names, {iname: x[i:i + batch]})
        for n, v in zip(names, got):
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    out = model.graph.output[0].name
    logits = run(model, x, [out], batch=500)[out]
    return float(np.mean(logits.argmax(axis=1) == y))


def rows_of(layer: Layer, act: np.ndarray) -> np.ndarray:
    if layer.op == "Gemm":
        return act.reshape(act.shape[0], -1)
    kh, kw = layer.attrs["kernel_shape"]
    return im2col(act, (kh, kw), tuple(layer.attrs.get("strides", (1, 1))), tuple(layer.attrs.get("pads", (0, 0, 0, 0))),
                  tuple(layer.attrs.get("dilations", (1, 1))))


def conv_attrs(layer: Layer) -> dict:
    a = layer.attrs
    return {"kernel_shape": list(a["kernel_shape"]), "strides": list(a.get("strides", [1, 1])),
            "pads": list(a.get("pads", [0, 0, 0, 0])), "dilations": list(a.get("dilations", [1, 1]))}


def lowrank_stages(layer: Layer, first: np.ndarray, second: np.ndarray, bias: np.ndarray) -> list[tuple]:
    """Two stages from ``first`` (K x n) and ``second`` (F x K)."""
    k = first.shape[0]
    if layer.op == "Gemm":
        return [("Gemm", first, None, {"transB": 1}), ("Gemm", second, bias, {"transB": 1})]
    F, C, kh, kw = layer.w.shape
    return [("Conv", first.reshape(k, C, kh, kw), None, conv_attrs(layer)),
            ("Conv", second.reshape(F, k, 1, 1), bias, {"kernel_shape": [1, 1]})]


def svd_rank(layer: Layer, ratio: float) -> int | None:
    F, n = layer.w2.shape
    k = rank_from_ratio(min(F, n), ratio)
    return k if k * (n + F) < F * n else None


def tucker_ranks(layer: Layer, ratio: float) -> tuple[int, int] | None:
    if layer.op != "Conv":
        return None
    F, C, kh, kw = layer.w.shape
    if kh * kw == 1:
        return None
    ro, ri = rank_from_ratio(F, ratio), rank_from_ratio(C, ratio)
    return (ro, ri) if C * ri + ri * ro * kh * kw + ro * F < F * C * kh * kw else None


def sampled_rows(layer: Layer, acts: list[np.ndarray], max_rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same random ``max_rows`` patches (positions) of each activation, without a full im2col."""
    a0 = acts[0]
    if layer.op == "Gemm":
        idx = rng.choice(a0.shape[0], min(max_rows, a0.shape[0]), replace=False)
        return [a.reshape(a.shape[0], -1)[idx] for a in acts]
    a = layer.attrs
    return sample_patch_rows(acts, tuple(a["kernel_shape"]), tuple(a.get("strides", (1, 1))),
                             tuple(a.get("dilations", (1, 1))), tuple(a.get("pads", (0, 0, 0, 0))), max_rows, rng)


class Stats:
    """Fit / held-out moments (and a row subsample) of one layer's original and compressed inputs."""

    def __init__(self, layer: Layer, x_fit, xh_fit, x_ho, xh_ho, rng, max_rows: int, relu_rows: int) -> None:
        def mom(a, b):
            if b is a:
                ra = rb = sampled_rows(layer, [a], max_rows, rng)[0]
            else:
                ra, rb = sampled_rows(layer, [a, b], max_rows, rng)
            m = rc.CrossMoments(ra.shape[1])
            m.update(ra, None if rb is ra else rb)
            return m, ra, rb
        self.fit, ra, rb = mom(x_fit, xh_fit)
        self.ho, ha, hb = mom(x_ho, xh_ho)
        hidx = rng.choice(ha.shape[0], min(relu_rows, ha.shape[0]), replace=False)
        self.ho_x, self.ho_h = ha[hidx], hb[hidx]
        idx = rng.choice(ra.shape[0], min(relu_rows, ra.shape[0]), replace=False)
        self.rows_x, self.rows_h = ra[idx], rb[idx]
        self.sigma = self.fit.s_xx  # data metric (independent): E[x x^T] of the original input


def fit_svd_variant(variant: str, layer: Layer, k: int, st: Stats, ridge: float) -> tuple[list[tuple], str]:
    w2, b = layer.w2, layer.b.astype(np.float64)
    if layer.op == "Conv":
        base = channel_svd(layer.w, k, None if variant == "frob" else st.sigma)
        bf, bs = base.first.reshape(k, -1).astype(np.float64), base.second.reshape(-1, k).astype(np.float64)
    else:
        base = fc_svd(layer.w.T, k, None if variant == "frob" else st.sigma)
        bf, bs = base.right.T.astype(np.float64), base.left.T.astype(np.float64)  # B^T ~ right^T left^T
    if variant in ("frob", "data"):
        return lowrank_stages(layer, bf, bs, b), ""
    fit = rc.lowrank_regression(w2, b, k, st.fit, ridge=ridge, intercept=variant != "seq")
    if variant == "seq+b+relu" and layer.relu_after:
        relu = rc.relu_refine(w2, b, k, st.rows_x, st.rows_h, fit, ridge=ridge)
        cands = [(bs @ bf, b), (fit.matrix, fit.bias), (relu.matrix, relu.bias)]
        ref = np.maximum(st.ho_x @ w2.T + b, 0)
        errs = [float(np.sum((ref - np.maximum(st.ho_h @ m.T + nb, 0)) ** 2)) for m, nb in cands]
        best = int(np.argmin(errs))
        note = "post-ReLU ho err " + " ".join(f"{e / max(float(np.sum(ref ** 2)), 1e-30):.4f}" for e in errs)
        chosen = [(bf, bs, b), (fit.first, fit.second, fit.bias), (relu.first, relu.second, relu.bias)][best]
        return lowrank_stages(layer, chosen[0], chosen[1], chosen[2]), note + f" -> {['data', 'lin', 'relu'][best]}"
    best, errs = rc.pick_by_holdout(w2, b, [(bs @ bf, b), (fit.matrix, fit.bias)], st.ho)
    note = f"ho err data {errs[0]:.3f} rec {errs[1]:.3f}"
    if best == 0:
        return lowrank_stages(layer, bf, bs, b), note + " -> data"
    return lowrank_stages(layer, fit.first, fit.second, fit.bias), note


def fit_tucker_variant(variant: str, layer: Layer, ranks: tuple[int, int], st: Stats, ridge: float
                       ) -> tuple[list[tuple], str]:
    F, C, kh, kw = layer.w.shape
    ro, ri = ranks
    b = layer.b.astype(np.float64)
    sigma = None if variant == "t2 frob" else st.sigma
    try:
        t = tucker2(layer.w, ro, ri, sigma=sigma)  # type: ignore[call-arg]
    except TypeError:  # before the data-aware tucker2 exists
        t = tucker2(layer.w, ro, ri)
    base = [("Conv", t.first, None, {"kernel_shape": [1, 1]}),
            ("Conv", t.core, None, conv_attrs(layer)),
            ("Conv", t.last, b, {"kernel_shape": [1, 1]})]
    if variant in ("t2 frob", "t2 data"):
        return base, ""
    pre = rc.tucker2_pre(t.first, kh, kw)
    fit = rc.lowrank_regression(layer.w2, b, ro, st.fit, pre=pre, ridge=ridge, intercept=True)
    if variant == "t2 seq+b+relu" and layer.relu_after:
        fit = rc.relu_refine(layer.w2, b, ro, st.rows_x, st.rows_h, fit, pre=pre, ridge=ridge)
    m_base = (t.last.reshape(F, ro).astype(np.float64) @ t.core.reshape(ro, -1).astype(np.float64))
    best, errs = rc.pick_by_holdout(layer.w2, b, [(m_base, b), (fit.matrix, fit.bias)], st.ho, pre=[pre, pre])
    note = f"ho err data {errs[0]:.3f} rec {errs[1]:.3f}"
    if best == 0:
        return base, note + " -> data"
    return [("Conv", t.first, None, {"kernel_shape": [1, 1]}),
            ("Conv", fit.first.reshape(ro, ri, kh, kw), None, conv_attrs(layer)),
            ("Conv", fit.second.reshape(F, ro, 1, 1), fit.bias, {"kernel_shape": [1, 1]})], note


_INDEP: dict[str, "Stats"] = {}


def compress(model: onnx.ModelProto, layers: list[Layer], variant: str, ratio: float, x_fit: np.ndarray,
             x_ho: np.ndarray, orig_acts: dict, args: argparse.Namespace) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    repl: dict[str, list[tuple]] = {}
    sequential = variant.startswith("seq") or "seq" in variant
    tucker = variant.startswith("t2")
    current = model
    for layer in layers:
        if (layer.op == "Gemm" and not args.fc) or layer.name in args.skip:
            continue
        if tucker:
            ranks = tucker_ranks(layer, ratio)
            if ranks is None and layer.op == "Conv":
                continue
            if layer.op == "Gemm":
                ranks = None
        k = svd_rank(layer, ratio)
        if (tucker and ranks is None and layer.op == "Conv") or (not tucker and k is None):
            continue
        if tucker and layer.op == "Gemm" and k is None:
            continue
        if sequential and repl:
            acts = run(current, np.concatenate([x_fit, x_ho]), [layer.inp])[layer.inp]
            xh_fit, xh_ho = acts[:len(x_fit)], acts[len(x_fit):]
        else:
            xh_fit, xh_ho = orig_acts[layer.inp][:len(x_fit)], orig_acts[layer.inp][len(x_fit):]
        if sequential and repl:
            st = Stats(layer, orig_acts[layer.inp][:len(x_fit)], xh_fit, orig_acts[layer.inp][len(x_fit):], xh_ho,
                       rng, args.max_rows, args.relu_rows)
        else:  # independent statistics: the same for every variant, computed once
            if layer.name not in _INDEP:
                _INDEP[layer.name] = Stats(layer, xh_fit, xh_fit, xh_ho, xh_ho, rng, args.max_rows, args.relu_rows)
            st = _INDEP[layer.name]
        if tucker and layer.op == "Conv":
            stages, note = fit_tucker_variant(variant, layer, ranks, st, args.ridge)
        else:
            v = {"t2 frob": "frob", "t2 data": "data"}.get(variant, "seq+b" if tucker else variant)
            stages, note = fit_svd_variant(v, layer, k, st, args.ridge)
        repl[layer.name] = stages
        log.info("  %-12s %-14s %s", variant, layer.name, note)
        if sequential:
            current = build(model, repl)
    return build(model, repl)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models/vgg_fmnist.onnx"))
    p.add_argument("--calib", default=str(REPO / "models/fmnist_calib.npz"))
    p.add_argument("--test", default=str(REPO / "models/fmnist_test2k.npz"))
    p.add_argument("--test10k", action="store_true", help="also evaluate on the full 10k test set")
    p.add_argument("--n-calib", type=int, default=256, help="calibration images used (fit + held-out)")
    p.add_argument("--n-fit", type=int, default=192, help="of which fitted on; the rest is held out")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.35, 0.5])
    p.add_argument("--variants", nargs="+", default=["frob", "data", "seq", "seq+b", "seq+b+relu"])
    p.add_argument("--tucker2", action="store_true", help="add t2 frob / t2 data / t2 seq+b")
    p.add_argument("--fc", action="store_true", help="also factorise the Gemm layers")
    p.add_argument("--skip", nargs="*", default=[], help="node names left uncompressed (e.g. /0/0.0/Conv)")
    p.add_argument("--ridge", type=float, default=rc.DEFAULT_RIDGE)
    p.add_argument("--max-rows", type=int, default=20000)
    p.add_argument("--relu-rows", type=int, default=4000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    model = onnx.load(args.model)
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        import onnx_graphsurgeon as gs  # noqa: PLC0415

        from onnxslim_lr.fold import fold_into_convs  # noqa: PLC0415

        g = gs.import_onnx(model)
        folded = fold_into_convs(g)
        g.cleanup().toposort()
        opset = {o.domain: o.version for o in model.opset_import}.get("", 17)
        ir = model.ir_version
        model = gs.export_onnx(g, do_type_check=False)
        model.ir_version = ir
        del model.opset_import[:]
        model.opset_import.extend([helper.make_opsetid("", opset)])
        log.info("folded %d BatchNormalization nodes into their convs", folded)
    layers = load_layers(model)
    xc = np.load(args.calib)["x"][: args.n_calib]
    x_fit, x_ho = xc[: args.n_fit], xc[args.n_fit:]
    te = np.load(args.test)
    tests = {"2k": (te["x"], te["y"])}
    if args.test10k:
        sys.path.insert(0, str(REPO / "tools"))
        import train_zoo  # noqa: PLC0415

        cache = REPO / ".cache" / "fmnist_test10k.npz"
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            train_zoo.write_full_test(cache, 1)
        t10 = np.load(cache)
        tests["10k"] = (t10["x"], t10["y"])
    orig_acts = run(model, xc, [l.inp for l in layers])
    base = {k: accuracy(model, *v) for k, v in tests.items()}
    print(f"original: " + "  ".join(f"{k} {100 * a:.2f}%" for k, a in base.items()))
    variants = list(args.variants) + (["t2 frob", "t2 data", "t2 seq+b", "t2 seq+b+relu"] if args.tucker2 else [])
    print(f"{'ratio':>5} {'variant':<12} " + " ".join(f"{k + ' acc':>9} {k + ' drop':>9}" for k in tests) + "  fit s")
    for ratio in args.ratio:
        for v in variants:
            t0 = time.perf_counter()
            cm = compress(model, layers, v, ratio, x_fit, x_ho, orig_acts, args)
            dt = time.perf_counter() - t0
            cells = []
            for k, (x, y) in tests.items():
                a = accuracy(cm, x, y)
                cells.append(f"{100 * a:8.2f}% {100 * (a - base[k]):+9.2f}")
            print(f"{ratio:5.2f} {v:<12} " + " ".join(cells) + f"  {dt:5.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
