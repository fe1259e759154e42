"""Generated stand-ins for third-party ONNX models (nothing may be downloaded at run time).

The tool's promises must hold on models nobody here wrote. Two families keep coming up in
deployment and each stresses the rewriter differently, so this module builds small but
structurally faithful copies of them, with seeded weights:

* :func:`yolo_detector` -- a YOLOv8-style detector: **dynamic batch, height and width**
  (``images: [batch, 3, height, width]``), SiLU written as ``x * Sigmoid(x)`` (how the
  exporters emit it), C2f blocks (1x1 conv, ``Split`` in two, a chain of residual
  bottlenecks, ``Concat`` of every branch, 1x1 conv), a depthwise conv and a grouped conv,
  an SPPF-like chain of MaxPools, an FPN neck with ``Resize`` (nearest, scales from a
  ``Constant`` node) upsampling and ``Concat`` with the backbone, and two detection heads
  (box and class branches at two strides, i.e. **four outputs**). The head weights are
  stored as ``Constant`` nodes instead of initializers, as some exporters do.
* :func:`ocr_recognizer` -- a PP-OCR-recognition-like network (PP-LCNet backbone + CTC head):
  ``x: [batch, 3, 32, width]`` with **dynamic batch and width**, a stem conv + BatchNorm +
  HardSwish, depthwise-separable blocks (depthwise 3x3 + pointwise 1x1, HardSwish), strides
  ``(2, 1)`` that shrink the height only, a squeeze-excitation block (GlobalAveragePool,
  1x1 convs, HardSigmoid, Mul), a pool to height 1, ``Reshape`` to a sequence + ``Transpose``,
  a ``MatMul`` + ``Add`` encoder, a ``Gemm`` classifier on the flattened sequence and a
  ``Shape``/``Slice``/``Concat``/``Reshape`` chain that restores ``[batch, T, classes]``
  before the ``Softmax`` -- the dynamic-shape plumbing real exports carry.

Weights are He-initialised from ``numpy.random.default_rng(seed)`` (biases and BN shifts
small), so activations stay at unit scale and rewrites are exercised on non-degenerate data.
The models use opset 17 and IR version 8 (onnxruntime reads IR <= 13).

Sizes are modest (tens of thousands of parameters at the default width) so that tests and
benchmarks run in seconds at inputs like ``1x3x64x64`` (detector) and ``1x3x32x128`` (OCR);
``width`` scales every channel count for benchmarks that want heavier layers.

Command line::

    python tools/standins.py --out DIR [--seed N] [--width W]    # DIR defaults to .cache/standins/

writes ``DIR/yolo_standin.onnx`` and ``DIR/ocr_standin.onnx`` and checks each runs on
onnxruntime at two input sizes (the dynamic dims really are dynamic).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".cache" / "standins"
OPSET = 17
IR_VERSION = 8

#: example input shapes (name -> shape) at which the stand-ins are tested and benchmarked
YOLO_SHAPE = {"images": (1, 3, 64, 64)}
OCR_SHAPE = {"x": (1, 3, 32, 128)}


class _Builder:
    """Accumulates nodes/initializers with unique names and seeded weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def init(self, stem: str, arr: np.ndarray) -> str:
        n = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def const(self, stem: str, arr: np.ndarray) -> str:
        """A tensor produced by a ``Constant`` node instead of an initializer."""
        n = self.name(stem)
        self.nodes.append(helper.make_node("Constant", [], [n], name=n + "_const",
                                           value=numpy_helper.from_array(np.ascontiguousarray(arr), n + "_v")))
        return n

    def node(self, op: str, inputs: Iterable[str], n_out: int = 1, **attrs: object) -> list[str]:
        base = self.name(op.lower())
        outs = [f"{base}_o{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=base, **attrs))
        return outs

    def he(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)

    def small(self, shape: tuple[int, ...]) -> np.ndarray:
        return (self.rng.standard_normal(shape) * 0.01).astype(np.float32)

    def conv(self, x: str, cin: int, cout: int, k: int | tuple[int, int] = 3, stride: int | tuple[int, int] = 1,
             group: int = 1, *, as_constant: bool = False) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        w = self.he((cout, cin // group, kh, kw), (cin // group) * kh * kw)
        b = self.small((cout,))
        put = self.const if as_constant else self.init
        return self.node("Conv", [x, put("w", w), put("b", b)], kernel_shape=[kh, kw], strides=[sh, sw],
                         pads=[kh // 2, kw // 2, kh // 2, kw // 2], group=group)[0]

    def silu(self, x: str) -> str:
        return self.node("Mul", [x, self.node("Sigmoid", [x])[0]])[0]

    def hswish(self, x: str) -> str:
        return self.node("HardSwish", [x])[0]

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxslim_lr-standins")
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m)
        return m


# ---- YOLO-style detector ---------------------------------------------------------------------


def _c2f(b: _Builder, x: str, cin: int, cout: int, n: int) -> str:
    """C2f: cv1 (1x1) -> Split(2) -> n bottlenecks, each appended -> Concat -> cv2 (1x1)."""
    c = cout // 2
    y = b.silu(b.conv(x, cin, 2 * c, 1))
    split = b.init("split", np.array([c, c], dtype=np.int64))
    parts = b.node("Split", [y, split], n_out=2, axis=1)
    branches = list(parts)
    h = parts[1]
    for _ in range(n):
        t = b.silu(b.conv(h, c, c, 3))
        t = b.silu(b.conv(t, c, c, 3))
        h = b.node("Add", [h, t])[0]
        branches.append(h)
    cat = b.node("Concat", branches, axis=1)[0]
    return b.silu(b.conv(cat, (2 + n) * c, cout, 1))


def yolo_detector(seed: int = 0, width: int = 1, num_classes: int = 8) -> onnx.ModelProto:
    """A YOLOv8-style detector with dynamic ``[batch, 3, height, width]`` input (multiple of 16).

    Outputs: ``box_p3``/``cls_p3`` at stride 8 and ``box_p4``/``cls_p4`` at stride 16
    (``[batch, 64 or num_classes, h/s, w/s]``). ``width`` multiplies every channel count.
    """
    b = _Builder(seed)
    c1, c2, c3, c4 = 16 * width, 32 * width, 64 * width, 96 * width
    x = "images"
    s1 = b.silu(b.conv(x, 3, c1, 3, 2))                     # /2
    s2 = b.silu(b.conv(s1, c1, c2, 3, 2))                   # /4
    s2 = _c2f(b, s2, c2, c2, 1)
    dw = b.silu(b.conv(s2, c2, c2, 3, 2, group=c2))         # /8, depthwise downsample
    p3 = b.silu(b.conv(dw, c2, c3, 1))
    p3 = _c2f(b, p3, c3, c3, 2)                             # stride 8 feature
    s4 = b.silu(b.conv(p3, c3, c4, 3, 2, group=4))          # /16, grouped conv
    s4 = _c2f(b, s4, c4, c4, 1)
    # SPPF: cv1, three chained max pools, concat, cv2
    h = c4 // 2
    sp = b.silu(b.conv(s4, c4, h, 1))
    m1 = b.node("MaxPool", [sp], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])[0]
    m2 = b.node("MaxPool", [m1], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])[0]
    m3 = b.node("MaxPool", [m2], kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])[0]
    p4 = b.silu(b.conv(b.node("Concat", [sp, m1, m2, m3], axis=1)[0], 4 * h, c4, 1))
    # FPN neck: upsample p4, concat with p3
    scales = b.const("scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    up = b.node("Resize", [p4, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")[0]
    n3 = _c2f(b, b.node("Concat", [up, p3], axis=1)[0], c4 + c3, c3, 1)
    # heads (weights as Constant nodes): box branch and class branch per scale
    outs = []
    for tag, feat, cf in (("p3", n3, c3), ("p4", p4, c4)):
        bx = b.silu(b.conv(feat, cf, 32, 3, as_constant=True))
        bx = b.conv(bx, 32, 64, 1, as_constant=True)
        cl = b.silu(b.conv(feat, cf, 32, 3, as_constant=True))
        cl = b.node("Sigmoid", [b.conv(cl, 32, num_classes, 1, as_constant=True)])[0]
        for kind, t in (("box", bx), ("cls", cl)):
            name = f"{kind}_{tag}"
            b.nodes.append(helper.make_node("Identity", [t], [name], name=name + "_out"))
            ch = 64 if kind == "box" else num_classes
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", ch, f"h_{tag}", f"w_{tag}"]))
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    return b.model([inp], outs, "yolo_standin")


# ---- PP-OCR-recognition-like network ------------------------------------------------------------


def _bn(b: _Builder, x: str, c: int) -> str:
    scale = (0.8 + 0.4 * b.rng.random(c)).astype(np.float32)
    var = (0.8 + 0.4 * b.rng.random(c)).astype(np.float32)
    return b.node("BatchNormalization", [x, b.init("bn_s", scale), b.init("bn_b", b.small((c,))),
                                         b.init("bn_m", b.small((c,))), b.init("bn_v", var)], epsilon=1e-5)[0]


def _dsconv(b: _Builder, x: str, cin: int, cout: int, stride: int | tuple[int, int], se: bool = False) -> str:
    """Depthwise 3x3 (+HardSwish) then pointwise 1x1 (+HardSwish), optional squeeze-excitation."""
    y = b.hswish(b.conv(x, cin, cin, 3, stride, group=cin))
    if se:
        r = max(cin // 4, 4)
        g = b.node("GlobalAveragePool", [y])[0]
        g = b.node("Relu", [b.conv(g, cin, r, 1)])[0]
        g = b.node("HardSigmoid", [b.conv(g, r, cin, 1)], alpha=0.2, beta=0.5)[0]
        y = b.node("Mul", [y, g])[0]
    return b.hswish(b.conv(y, cin, cout, 1))


def ocr_recognizer(seed: int = 0, width: int = 1, num_classes: int = 97, hidden: int = 64) -> onnx.ModelProto:
    """A PP-OCR-rec-like CTC recogniser: ``x: [batch, 3, 32, width]`` -> ``softmax: [batch, width/4, classes]``.

    ``width`` (the keyword) multiplies channel counts; the image width is the dynamic dim.
    """
    b = _Builder(seed)
    c = [16 * width, 32 * width, 64 * width, 96 * width, 128 * width]
    y = b.hswish(_bn(b, b.conv("x", 3, c[0], 3, 2), c[0]))       # 16 x W/2
    y = _dsconv(b, y, c[0], c[1], 1)
    y = _dsconv(b, y, c[1], c[2], (2, 1))                        # 8 x W/2
    y = _dsconv(b, y, c[2], c[2], 1)
    y = _dsconv(b, y, c[2], c[3], (2, 1))                        # 4 x W/2
    y = _dsconv(b, y, c[3], c[3], 1, se=True)
    y = _dsconv(b, y, c[3], c[4], (2, 1), se=True)               # 2 x W/2
    y = b.node("AveragePool", [y], kernel_shape=[2, 2], strides=[2, 2])[0]   # 1 x W/4
    seq = b.node("Reshape", [y, b.init("shape", np.array([0, c[4], -1], dtype=np.int64))])[0]  # N, C, T
    seq = b.node("Transpose", [seq], perm=[0, 2, 1])[0]                                       # N, T, C
    enc = b.node("MatMul", [seq, b.init("enc_w", b.he((c[4], hidden), c[4]))])[0]
    enc = b.hswish(b.node("Add", [enc, b.init("enc_b", b.small((hidden,)))])[0])              # N, T, hidden
    flat = b.node("Reshape", [enc, b.init("flat", np.array([-1, hidden], dtype=np.int64))])[0]
    logits = b.node("Gemm", [flat, b.init("fc_w", b.he((num_classes, hidden), hidden)),
                             b.init("fc_b", b.small((num_classes,)))], transB=1)[0]           # N*T, classes
    nt = b.node("Slice", [b.node("Shape", [enc])[0], b.init("s0", np.array([0], dtype=np.int64)),
                          b.init("s1", np.array([2], dtype=np.int64))])[0]
    shape = b.node("Concat", [nt, b.init("ncls", np.array([num_classes], dtype=np.int64))], axis=0)[0]
    out = b.node("Reshape", [logits, shape])[0]
    b.nodes.append(helper.make_node("Softmax", [out], ["softmax"], name="softmax_out", axis=-1))
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, "width"])
    outp = helper.make_tensor_value_info("softmax", TensorProto.FLOAT, ["batch", "steps", num_classes])
    return b.model([inp], [outp], "ocr_standin")


# ---- saving / checking --------------------------------------------------------------------------


def build_all(seed: int = 0, width: int = 1) -> dict[str, onnx.ModelProto]:
    """``{"yolo_standin": ..., "ocr_standin": ...}``."""
    return {"yolo_standin": yolo_detector(seed, width), "ocr_standin": ocr_recognizer(seed, width)}


def save(out_dir: str | Path = DEFAULT_OUT, seed: int = 0, width: int = 1) -> dict[str, Path]:
    """Write both stand-ins to ``out_dir`` (created); returns name -> path. Writes atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, model in build_all(seed, width).items():
        path = out / f"{name}.onnx"
        tmp = path.with_suffix(".onnx.tmp")
        tmp.write_bytes(model.SerializeToString())
        tmp.replace(path)
        paths[name] = path
    return paths


def example_feeds(name: str, scale: int = 1, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for ``name`` ("yolo_standin"/"ocr_standin"); ``scale`` multiplies the dynamic spatial dims."""
    rng = np.random.default_rng(seed)
    if name.startswith("yolo"):
        _, c, h, w = YOLO_SHAPE["images"]
        return {"images": rng.standard_normal((batch, c, h * scale, w * scale)).astype(np.float32)}
    _, c, h, w = OCR_SHAPE["x"]
    return {"x": rng.standard_normal((batch, c, h, w * scale)).astype(np.float32)}


def check_runs(model: onnx.ModelProto, name: str) -> list[list[tuple[int, ...]]]:
    """Run ``model`` on onnxruntime at two input sizes; returns the output shapes of each run."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = []
    for scale, batch in ((1, 1), (2, 2)):
        outs = sess.run(None, example_feeds(name, scale, batch))
        for o in outs:
            if not np.isfinite(o).all():
                raise ValueError(f"{name}: non-finite output")
        shapes.append([tuple(o.shape) for o in outs])
    return shapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: .cache/standins/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=1, help="channel multiplier (default 1)")
    a = ap.parse_args(argv)
    for name, path in save(a.out, a.seed, a.width).items():
        shapes = check_runs(onnx.load(str(path)), name)
        sys.stdout.write(f"{path}: runs, output shapes {shapes[0]} / {shapes[1]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
