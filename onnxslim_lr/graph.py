"""Graph I/O and the one splice primitive every pass uses.

Why this module exists: onnx-graphsurgeon is a good editing API but has traps that silently
produce models the runtime refuses or that behave differently from the input:

* it writes the ``onnx`` package's current IR version unless told otherwise, and onnx 1.23
  writes IR 14, which onnxruntime 1.31 refuses;
* it drops initializers from the graph inputs, which IR < 4 models require to be listed;
* it does no shape inference and never re-checks the result.

So every model goes in through :func:`load_model` and out through :func:`export_model` /
:func:`save_model`, which keep the input's IR version, opset imports, metadata and graph
interface, and every rewrite goes through :func:`splice`, which names new tensors uniquely,
cleans up and re-sorts.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import InputError, UnsupportedModelError

log = logging.getLogger(__name__)

#: Oldest default-domain opset we accept: onnxruntime itself supports opset 7 and newer.
MIN_OPSET = 7
#: Highest IR version we ever *introduce*; a model that already has a higher one keeps it
#: (the runtime evidently read it), but we never raise past what onnxruntime 1.31 reads.
MAX_EMITTED_IR = 10


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and validate an ONNX file, turning every failure into a one-line InputError.

    External data next to the file is loaded too (weights must be in memory to be
    decomposed). The checker runs without full shape checking: exported models in the wild
    often carry slightly inconsistent value_info that the runtime tolerates.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror})") from None
    if not data:
        raise InputError(f"{p}: file is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise InputError(f"{p}: not an ONNX model (protobuf parse failed; truncated or wrong file?)") from None
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise InputError(f"{p}: not an ONNX model (no graph found)")
    if not model.opset_import:
        raise InputError(f"{p}: ONNX model has no opset_import")
    check_supported(model, str(p))
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: external data could not be loaded ({exc})") from None
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InputError(f"{p}: not a valid ONNX model ({first})") from None
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" / "ai.onnx") domain the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def check_supported(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse models whose opset the runtime cannot run, with a clear reason."""
    op = default_opset(model)
    if op and op < MIN_OPSET:
        raise UnsupportedModelError(
            f"{where}: opset {op} is older than {MIN_OPSET}, which onnxruntime cannot run; "
            "convert it first with onnx.version_converter"
        )
    newest = onnx.defs.onnx_opset_version()
    if op > newest:
        raise UnsupportedModelError(
            f"{where}: opset {op} is newer than this onnx package understands ({newest}); upgrade onnx"
        )


# --------------------------------------------------------------------------------------
# gs import / export that keeps the model's identity
# --------------------------------------------------------------------------------------


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx -> graphsurgeon, without mutating the caller's proto."""
    return gs.import_onnx(model)


def min_ir_for_opset(opset: int) -> int:
    """Lowest IR version that may carry a default-domain opset (from onnx's version table)."""
    best = None
    for _release, ir, ai_onnx, *_rest in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset and (best is None or ir < best):
            best = ir
    return best if best is not None else MAX_EMITTED_IR


def export_model(graph: gs.Graph, like: onnx.ModelProto, *, infer_shapes: bool = True) -> onnx.ModelProto:
    """graphsurgeon -> onnx, carrying over the reference model's identity.

    ``like`` is the model the graph came from: its IR version, opset imports (other domains
    included), producer and metadata are kept. The default-domain opset is raised only when
    ``graph.opset`` was raised by a pass that needed a newer op, and the IR version only as far
    as that opset requires.
    """
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)

    old_opset = default_opset(like)
    new_opset = max(old_opset, int(graph.opset or old_opset))
    del model.opset_import[:]
    for imp in like.opset_import:
        entry = model.opset_import.add()
        entry.CopyFrom(imp)
        if imp.domain in ("", "ai.onnx"):
            entry.version = new_opset
    ir = like.ir_version
    if new_opset > old_opset:
        ir = max(ir, min(min_ir_for_opset(new_opset), MAX_EMITTED_IR))
    model.ir_version = ir
    model.producer_name = like.producer_name
    model.producer_version = like.producer_version
    model.domain = like.domain
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    del model.functions[:]
    model.functions.extend(like.functions)

    if ir < 4:
        _list_initializers_as_inputs(model)
    if infer_shapes:
        model = infer(model)
    _restore_interface(model, like)
    return model


def _list_initializers_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4 requires every initializer to appear among the graph inputs."""
    listed = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name not in listed:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )


def _restore_interface(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Graph inputs/outputs keep their exact declared types (dtype and symbolic dims).

    Shape inference could otherwise replace a symbolic dimension by a number. Where the input
    declared no shape at all, the inferred one is kept: the full checker requires a shape on
    graph outputs, and adding one never narrows what the model accepts.
    """
    orig = {vi.name: vi for vi in list(like.graph.input) + list(like.graph.output)}
    for vi in list(model.graph.input) + list(model.graph.output):
        ref = orig.get(vi.name)
        if ref is None:
            continue
        if ref.type.tensor_type.HasField("shape") or not vi.type.tensor_type.HasField("shape"):
            vi.type.CopyFrom(ref.type)
        else:
            vi.type.tensor_type.elem_type = ref.type.tensor_type.elem_type


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape inference; models with ops onnx cannot infer are returned as they are."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # onnx raises several unrelated types here
        log.debug("shape inference skipped: %s", exc)
        return model


# --------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------

_PROTO_LIMIT = 1_800_000_000


def check_output_path(path: str | os.PathLike[str], input_path: str | os.PathLike[str] | None = None) -> Path:
    """Refuse, before any work, an output that would overwrite the input or cannot be written."""
    out = Path(path)
    if input_path is not None and (_same_file(out, Path(input_path)) or out.resolve() == Path(input_path).resolve()):
        raise InputError(f"{out}: output path is the input model; choose another path (the input is never overwritten)")
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise InputError(f"{out}: output path is a directory")
    if not parent.is_dir():
        raise InputError(f"{out}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: output folder {parent} is not writable")
    return out


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes atomically: a temporary file in the target folder, fsync, rename.

    A crash, a full disk or a refused write never leaves a half-written file under the final
    name, nor a temporary file behind; every OS error becomes a one-line InputError.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, input_path: str | os.PathLike[str] | None = None) -> None:
    """Write a model atomically; the input is never overwritten (the last line of defence).

    Models past protobuf's 2 GB limit are written with their weights in ``<name>.data``: both
    files are produced in a temporary folder beside the target and moved in, data first.
    """
    out = check_output_path(path, input_path)
    if model.ByteSize() <= _PROTO_LIMIT:
        write_atomic(out, model.SerializeToString())
        return
    parent = out.parent if str(out.parent) else Path(".")
    data_name = out.name + ".data"
    tmpdir: str | None = None
    try:
        tmpdir = tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent)
        onnx.save_model(copy.deepcopy(model), os.path.join(tmpdir, out.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        os.replace(os.path.join(tmpdir, data_name), parent / data_name)
        os.replace(os.path.join(tmpdir, out.name), out)
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


# --------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------


def constant_value(tensor: gs.Tensor, _depth: int = 0) -> np.ndarray | None:
    """The value of a tensor if it is a compile-time constant we can trust, else None.

    Follows the producers real exporters use for weights: initializers, ``Constant`` nodes,
    ``Identity`` chains and ``ConstantOfShape`` of a constant shape (the onnx "light" models).
    Anything else (DequantizeLinear of an int8 weight included) is *not* folded: rewriting it
    would silently change what the model computes or how it is quantised.
    """
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if _depth > 8 or len(tensor.inputs) != 1:
        return None
    prod = tensor.inputs[0]
    if prod.op == "Constant":
        attrs = prod.attrs
        if "value" in attrs:
            v = attrs["value"]
            return np.asarray(v.values if isinstance(v, gs.Constant) else v)
        for key in ("value_float", "value_int"):
            if key in attrs:
                return np.asarray(attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in attrs:
                return np.asarray(list(attrs[key]))
        return None
    if prod.op == "Identity" and prod.inputs:
        return constant_value(prod.inputs[0], _depth + 1)
    if prod.op == "ConstantOfShape" and prod.inputs:
        shape = constant_value(prod.inputs[0], _depth + 1)
        if shape is None:
            return None
        v = prod.attrs.get("value")
        fill = np.asarray(v.values if isinstance(v, gs.Constant) else (v if v is not None else np.zeros(1, np.float32)))
        return np.full(tuple(int(s) for s in shape.reshape(-1)), fill.reshape(-1)[0], dtype=fill.dtype)
    return None


# --------------------------------------------------------------------------------------
# naming and splicing
# --------------------------------------------------------------------------------------


class Names:
    """Unique names for new tensors and nodes, derived from the node being replaced.

    Names are readable (``conv3/svd/w0``) so that a user looking at the rewritten model in
    Netron can tell which original layer each new node came from.
    """

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken: set[str] = set(taken)

    @classmethod
    def for_graph(cls, graph: gs.Graph) -> "Names":
        taken = set(graph.tensors().keys())
        taken.update(n.name for n in graph.nodes if n.name)
        taken.update(t.name for t in graph.inputs + graph.outputs)
        return cls(taken)

    def new(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name

    def scoped(self, prefix: str) -> "ScopedNames":
        return ScopedNames(self, prefix)


@dataclass
class ScopedNames:
    """A view of :class:`Names` that prefixes every name (e.g. ``conv3/svd``)."""

    names: Names
    prefix: str

    def new(self, suffix: str) -> str:
        return self.names.new(f"{self.prefix}/{suffix}")

    def const(self, suffix: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.new(suffix), np.ascontiguousarray(values))

    def var(self, suffix: str, dtype: np.dtype | type = np.float32) -> gs.Variable:
        return gs.Variable(self.new(suffix), dtype=dtype)

    def node(self, op: str, suffix: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor], **attrs: object) -> gs.Node:
        return gs.Node(op=op, name=self.new(suffix), attrs=dict(attrs), inputs=list(inputs), outputs=list(outputs))


def splice(graph: gs.Graph, old: gs.Node, new_nodes: list[gs.Node]) -> None:
    """Replace ``old`` by ``new_nodes`` in place (one rewrite: :func:`splice_all` of one)."""
    splice_all(graph, [(old, new_nodes)])


def splice_all(graph: gs.Graph, replacements: Sequence[tuple[gs.Node, list[gs.Node]]]) -> None:
    """Replace each old node by its new nodes, then clean up and sort the graph once.

    The new nodes must already consume the old node's input tensor(s) and produce the old
    node's output tensor object, so that consumers and graph outputs (names included) are
    untouched. The old nodes are disconnected; orphans (their weights) are cleaned up and
    the graph re-sorted once for the whole batch (per node it would be quadratic).
    """
    for old, new_nodes in replacements:
        old.outputs.clear()
        old.inputs.clear()
        graph.nodes.extend(new_nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def single_node_graph(build: Callable[[gs.Tensor, gs.Variable, Names], list[gs.Node]], x_shape: tuple[int, ...], opset: int, dtype: type = np.float32) -> gs.Graph:
    """A graph holding only one layer (original or rewritten), for timing and checks."""
    names = Names(["x", "y"])
    x = gs.Variable("x", dtype=dtype, shape=list(x_shape))
    y = gs.Variable("y", dtype=dtype)
    nodes = build(x, y, names)
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=opset)
    g.cleanup().toposort()
    return g


#: Type of the builders passes return: (x, y, names) -> nodes computing y from x.
BuildFn = Callable[[gs.Tensor, gs.Variable, Names], list[gs.Node]]


def model_from_graph(graph: gs.Graph, ir_version: int = 8) -> onnx.ModelProto:
    """A standalone model for a graph built in code (timing, tests)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = min(ir_version, MAX_EMITTED_IR)
    return model
