"""Architecture-scale test models: the onnx package's "light" models with seeded weights.

The onnx wheel ships architecture-only copies of classic CNNs in
``<onnx>/backend/test/data/light/`` (``light_vgg19.onnx``, ``light_resnet50.onnx``,
``light_bvlc_alexnet.onnx``, ``light_zfnet512.onnx``, ...). They are legacy models (IR 3,
opset 9, initializers also listed as graph inputs) whose weights are not stored: each one
is produced at run time by a ``ConstantOfShape`` node (value 0.02) from an int64 shape
initializer. Every conv would compute the same thing, so the models are useless for
measuring a low-rank rewrite as they are.

:func:`materialize` replaces every ``ConstantOfShape``-produced tensor by a seeded random
initializer whose scale depends on what consumes it:

* Conv / Gemm / MatMul weights: He initialisation, ``N(0, 2 / fan_in)`` (fan_in counted per
  group for convs, along the contracted axis for Gemm's ``transB``), so that activations
  keep roughly unit scale through the ReLU stack;
* Conv / Gemm biases: ``N(0, 0.01^2)``;
* BatchNormalization: scale ``U(0.8, 1.2)``, bias and mean ``N(0, 0.01^2)``, variance
  ``U(0.8, 1.2)`` (strictly positive). A BN whose output feeds a residual ``Sum``/``Add``
  directly at the end of a residual branch (``Conv(Relu(BN(..))) -> BN -> Sum``) gets scale
  ``U(0.2, 0.3)`` instead, so that the residual stream of a ResNet does not double its
  variance at every block (the "zero-init residual" idea, softened); projection shortcuts
  keep the normal scale.

The rest is kept as it is: IR 3, opset 9, initializers listed as graph inputs (each new
weight replaces its shape initializer at the same position in ``graph.input``), and the
float initializers the light model already carries (the first biases of VGG-19, ...), except
BatchNormalization parameters, which are redrawn (see ``resample_bn``). Every random draw uses its own generator seeded by
``(seed, crc32(tensor name))``, so a tensor's values do not depend on the others.

Command line::

    python tools/light_models.py --out DIR [names...]     # DIR defaults to .cache/light/

writes ``DIR/<name>.onnx`` for each name (default: vgg19 resnet50 bvlc_alexnet zfnet512) and
checks that onnxruntime runs it on a 1x3x224x224 input.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: the four architectures the benchmarks use
DEFAULT_NAMES = ("vgg19", "resnet50", "bvlc_alexnet", "zfnet512")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".cache" / "light"


def light_dir() -> Path:
    """Folder of the light models inside the installed onnx package."""
    return Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


def canonical(name: str) -> str:
    """``light_vgg19.onnx`` / ``light_vgg19`` / ``vgg19`` -> ``vgg19``."""
    base = Path(name).name
    if base.endswith(".onnx"):
        base = base[: -len(".onnx")]
    if base.startswith("light_"):
        base = base[len("light_"):]
    return base


def available() -> list[str]:
    """Canonical names of every light model shipped with the installed onnx."""
    return sorted(canonical(p.name) for p in light_dir().glob("light_*.onnx"))


def source_path(name: str) -> Path:
    path = light_dir() / f"light_{canonical(name)}.onnx"
    if not path.exists():
        raise FileNotFoundError(f"no light model {name!r} in {light_dir()} (have: {', '.join(available())})")
    return path


def _rng(seed: int, tensor: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(tensor.encode())])


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _value(role: str, shape: tuple[int, ...], rng: np.random.Generator, fan_in: int) -> np.ndarray:
    f32 = np.float32
    if role == "weight":
        return rng.standard_normal(shape, dtype=f32) * f32(np.sqrt(2.0 / max(fan_in, 1)))
    if role in ("bn_scale", "bn_var"):
        return f32(0.8) + f32(0.4) * rng.random(shape, dtype=f32)
    if role == "bn_scale_residual":
        return f32(0.2) + f32(0.1) * rng.random(shape, dtype=f32)
    # biases, BN shift and mean, anything else
    return rng.standard_normal(shape, dtype=f32) * f32(0.01)


def _role(consumer: onnx.NodeProto | None, index: int, shape: tuple[int, ...],
          feeds_residual: bool) -> tuple[str, int]:
    """(role, fan_in) of a tensor from its first consumer."""
    if consumer is None:
        return "other", 1
    op = consumer.op_type
    if op == "Conv" and index == 1:
        return "weight", int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if op == "Gemm" and index == 1 and len(shape) == 2:
        return "weight", shape[1] if _attr(consumer, "transB") else shape[0]
    if op == "MatMul" and index == 1 and len(shape) == 2:
        return "weight", shape[0]
    if op == "BatchNormalization":
        if index == 1:
            return ("bn_scale_residual" if feeds_residual else "bn_scale"), 1
        if index == 4:
            return "bn_var", 1
    return "other", 1


def materialize(name: str, seed: int = 0, *, resample_bn: bool = True) -> onnx.ModelProto:
    """The light model ``name`` with every ConstantOfShape-produced tensor made a seeded initializer.

    ``resample_bn``: the few BatchNormalization parameters that a light model stores for real
    (ResNet-50's conv1 and res2 blocks) are statistics of trained convs that are not there;
    with random convs they blow the residual stream up (softmax saturates at 0.999), so they
    are redrawn like the others (same names, same place).
    """
    model = onnx.load(str(source_path(name)))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for k, t in enumerate(node.input):
            consumers.setdefault(t, []).append((node, k))

    producer = {out: n for n in g.node for out in n.output}

    def feeds_residual(node: onnx.NodeProto) -> bool:
        """A BN ending a residual branch: Conv(Relu(BN(...))) -> this BN -> Sum/Add.

        The projection shortcut (Conv on the block input -> BN -> Sum) keeps the normal scale.
        """
        if not any(c.op_type in ("Sum", "Add") for out in node.output for c, _ in consumers.get(out, [])):
            return False
        conv = producer.get(node.input[0])
        if conv is None or conv.op_type != "Conv":
            return False
        act = producer.get(conv.input[0])
        before = producer.get(act.input[0]) if act is not None and act.op_type == "Relu" else None
        return before is not None and before.op_type == "BatchNormalization"

    new_nodes: list[onnx.NodeProto] = []
    replaced: dict[str, onnx.TensorProto] = {}  # shape initializer name -> new weight
    dropped_shapes: set[str] = set()
    for node in g.node:
        if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in inits:
            new_nodes.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]).reshape(-1))
        value = np.zeros(1, dtype=np.float32)
        for a in node.attribute:
            if a.name == "value":
                value = numpy_helper.to_array(a.t)
        out = node.output[0]
        users = consumers.get(out, [])
        consumer, index = users[0] if users else (None, 0)
        role, fan_in = _role(consumer, index, shape,
                             feeds_residual(consumer) if consumer is not None and consumer.op_type == "BatchNormalization" else False)
        arr = _value(role, shape, _rng(seed, out), fan_in).astype(value.dtype, copy=False)
        tensor = numpy_helper.from_array(arr, out)
        replaced[out] = tensor
        dropped_shapes.add(node.input[0])

    if resample_bn:
        for i, t in enumerate(g.initializer):
            users = consumers.get(t.name, [])
            if t.data_type != onnx.TensorProto.FLOAT or not users or users[0][0].op_type != "BatchNormalization":
                continue
            consumer, index = users[0]
            role, fan_in = _role(consumer, index, tuple(t.dims), feeds_residual(consumer))
            g.initializer[i].CopyFrom(numpy_helper.from_array(_value(role, tuple(t.dims), _rng(seed, t.name), fan_in), t.name))

    # a shape initializer may feed several ConstantOfShape nodes or other ops: keep it if still used
    still_used = {t for n in new_nodes for t in n.input}
    dropped_shapes -= still_used

    # initializers: drop the now unused shape tensors, add the weights
    kept_inits = [t for t in g.initializer if t.name not in dropped_shapes]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    g.initializer.extend(replaced.values())

    # graph inputs (IR 3 lists every initializer as an input): each weight takes the place of
    # its shape tensor when that one goes away, otherwise it is appended
    shape_to_weight: dict[str, list[str]] = {}
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.output[0] in replaced:
            shape_to_weight.setdefault(node.input[0], []).append(node.output[0])
    listed = {i.name for i in g.input}
    new_inputs: list[onnx.ValueInfoProto] = []
    placed: set[str] = set()
    for vi in g.input:
        if vi.name in shape_to_weight:
            for w in shape_to_weight[vi.name]:
                if w not in listed:
                    t = replaced[w]
                    new_inputs.append(helper.make_tensor_value_info(w, t.data_type, list(t.dims)))
                    placed.add(w)
            if vi.name in dropped_shapes:
                continue
        new_inputs.append(vi)
    if model.ir_version < 4:
        for w, t in replaced.items():
            if w not in placed and w not in listed:
                new_inputs.append(helper.make_tensor_value_info(w, t.data_type, list(t.dims)))
    del g.input[:]
    g.input.extend(new_inputs)

    del g.node[:]
    g.node.extend(new_nodes)
    model.doc_string = (model.doc_string + "\n" if model.doc_string else "") + (
        f"weights materialized by onnxslim_lr tools/light_models.py (seed={seed}): random, He-scaled; "
        "accuracy is meaningless"
    )
    onnx.checker.check_model(model)
    return model


def data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The single real (non-initializer) float input of a light model."""
    inits = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    if len(real) != 1:
        raise ValueError(f"expected one real input, found {[i.name for i in real]}")
    return real[0]


def check_runs(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, float]:
    """Run the model on onnxruntime at ``batch x 3 x 224 x 224``; summary of the output."""
    import onnxruntime as ort

    vi = data_input(model)
    x = np.random.default_rng(seed).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {vi.name: x})[0]
    if not np.all(np.isfinite(out)):
        raise RuntimeError("non-finite output")
    flat = out.reshape(out.shape[0], -1)
    return {"shape": list(out.shape), "max": float(flat.max()), "min": float(flat.min()),
            "argmax_share": float(np.max(flat, axis=1).mean())}


def write(names: Iterable[str], out: Path, seed: int = 0, check: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == DEFAULT_OUT.resolve():
        # the cache folder never belongs in git
        gi = out.parent / ".gitignore"
        if not gi.exists():
            gi.write_text("*\n")
    paths = []
    for name in names:
        t0 = time.perf_counter()
        model = materialize(name, seed=seed)
        path = out / f"{canonical(name)}.onnx"
        onnx.save(model, str(path))
        msg = f"{path}  ({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)"
        if check:
            info = check_runs(model)
            msg += f"  onnxruntime ok, output {info['shape']}, max prob {info['argmax_share']:.3f}"
        print(msg)
        paths.append(path)
    return paths


def cached(name: str, seed: int = 0, out: Path = DEFAULT_OUT) -> onnx.ModelProto:
    """Materialized model, read from ``out`` when written there with the same seed, else built."""
    path = out / f"{canonical(name)}.onnx"
    if path.exists():
        model = onnx.load(str(path))
        if f"(seed={seed})" in model.doc_string:
            return model
    return materialize(name, seed=seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"models (default: {' '.join(DEFAULT_NAMES)}; 'all' for every one: "
                                             f"{', '.join(available())})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: .cache/light/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="do not run each model on onnxruntime")
    args = ap.parse_args(argv)
    names = args.names or list(DEFAULT_NAMES)
    if names == ["all"]:
        names = available()
    write(names, args.out, seed=args.seed, check=not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
