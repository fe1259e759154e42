"""Graph import/export and the one splice primitive every pass uses.

Why this module exists: onnx-graphsurgeon is a good editing API but has traps that silently
produce models the runtime refuses or that behave differently from the input:

* it writes the ``onnx`` package's current IR version unless told otherwise, and onnx 1.23
  writes IR 14, which onnxruntime 1.31 refuses;
* it drops initializers from the graph inputs, which IR < 4 models require to be listed;
* it does no shape inference and never re-checks the result.

So every model goes in through :func:`import_graph` and out through :func:`export_model`
(file reading and writing live in :mod:`onnxslim_lr.modelio`), which keep the input's IR
version, opset imports, metadata and graph interface, and every rewrite goes through
:func:`splice_all`, which cleans up and re-sorts once per batch. A run imports the user's
model once: after an export, :func:`adopt` gives the graph what a re-import would, and
:func:`copy_graph` hands out copies to splice into (``tests/test_graph_conversions.py``
counts the conversions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape
from onnx_graphsurgeon.ir.tensor import LazyValues

log = logging.getLogger(__name__)

#: Highest IR version we ever *introduce*; a model that already has a higher one keeps it
#: (the runtime evidently read it), but we never raise past what onnxruntime 1.31 reads.
MAX_EMITTED_IR = 10


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" / "ai.onnx") domain the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


# --------------------------------------------------------------------------------------
# gs import / export that keeps the model's identity
# --------------------------------------------------------------------------------------


#: attribute of an imported gs.Graph naming its run-time-overridable initializers
_RUNTIME_INPUTS_ATTR = "_onnxslim_lr_runtime_inputs"


def runtime_initializers(model: onnx.ModelProto) -> frozenset[str]:
    """Initializers that are also graph inputs in an IR >= 4 model: weights the caller may
    override at run time (IR < 4 lists every initializer as an input, so there it means nothing)."""
    if model.ir_version < 4:
        return frozenset()
    inits = {i.name for i in model.graph.initializer}
    return frozenset(i.name for i in model.graph.input if i.name in inits)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx -> graphsurgeon, without mutating the caller's proto.

    graphsurgeon turns an initializer that is also a graph input into a plain constant and
    forgets the input; the names are kept on the graph for :func:`is_runtime_input`.
    """
    graph = gs.import_onnx(model)
    setattr(graph, _RUNTIME_INPUTS_ATTR, runtime_initializers(model))
    return graph


def adopt(graph: gs.Graph, model: onnx.ModelProto) -> gs.Graph:
    """Make ``graph``, in place, what importing ``model`` -- just exported from it -- would give.

    This replaces the re-import that used to follow every export (the pipeline converted the
    model proto <-> graphsurgeon several times per run). Variables take the dtypes and
    shapes the export declares (shape inference included), read the way ``gs.import_onnx``
    reads them (``value_info`` first, then the graph inputs and outputs; undeclared: None);
    constants that became initializers refer to them lazily, so the weights live once, in
    the proto, and a later export of a copy reuses the proto instead of serializing arrays.
    """
    g = model.graph
    declared: dict[str, onnx.ValueInfoProto] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.ByteSize() > 0:
            declared.setdefault(vi.name, vi)
    inits = {t.name: t for t in g.initializer}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant):
            if name in inits:
                t.values = LazyValues(inits[name])
            continue
        vi = declared.get(name)
        t.dtype = get_onnx_tensor_dtype(vi) if vi is not None else None
        t.shape = get_onnx_tensor_shape(vi) if vi is not None else None
    return graph


def copy_graph(graph: gs.Graph, model: onnx.ModelProto | None = None) -> gs.Graph:
    """An independent copy of ``graph`` to splice into, without a round trip through onnx.

    Nodes and tensors are new objects; weights are shared, never copied. With ``model``
    (the proto ``graph`` was exported to, see :func:`adopt`), constants that are its
    initializers refer to them lazily, so an export of the copy reuses the proto's weights
    even where a pass has read (loaded) them in ``graph``.
    """
    new = graph.copy()
    setattr(new, _RUNTIME_INPUTS_ATTR, getattr(graph, _RUNTIME_INPUTS_ATTR, frozenset()))
    if model is not None:
        inits = {t.name: t for t in model.graph.initializer}
        for name, t in new.tensors().items():
            if isinstance(t, gs.Constant) and name in inits:
                t.values = LazyValues(inits[name])
    return new


def is_runtime_input(tensor: gs.Tensor | None, graph: gs.Graph | None) -> bool:
    """True when ``tensor`` is a weight the model's caller can override (a graph input with an
    initializer as default): rewriting it as a constant would change the model's interface."""
    if tensor is None or graph is None:
        return False
    return tensor.name in getattr(graph, _RUNTIME_INPUTS_ATTR, frozenset())


def min_ir_for_opset(opset: int) -> int:
    """Lowest IR version that may carry a default-domain opset (from onnx's version table)."""
    best = None
    for _release, ir, ai_onnx, *_rest in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset and (best is None or ir < best):
            best = ir
    return best if best is not None else MAX_EMITTED_IR


def export_model(graph: gs.Graph, like: onnx.ModelProto, *, infer_shapes: bool = True, clean: bool = True
                 ) -> onnx.ModelProto:
    """graphsurgeon -> onnx, carrying over the reference model's identity.

    ``like`` is the model the graph came from: its IR version, opset imports (other domains
    included), producer and metadata are kept. The default-domain opset is raised only when
    ``graph.opset`` was raised by a pass that needed a newer op, and the IR version only as far
    as that opset requires. ``clean=False`` skips the cleanup and topological sort, for a
    graph that :func:`splice_all` has just cleaned and sorted (one per batch of rewrites).
    """
    if clean:
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
    keep_annotations(model, like)
    return model


def keep_annotations(model: onnx.ModelProto, like: onnx.ModelProto) -> None:
    """Carry over what graphsurgeon drops below the model level, in place.

    Kept: the graph's doc string and metadata_props; doc strings and metadata_props of graph
    inputs and outputs (by name) and of every node left untouched (same op, inputs and
    outputs); initializers that were graph inputs in an IR >= 4 model (overridable weights)
    go back among the graph inputs, in the input's order, so the interface does not change.
    """
    def copy_notes(dst: onnx.ValueInfoProto | onnx.NodeProto | onnx.GraphProto, src: object) -> None:
        if src.doc_string and not dst.doc_string:  # type: ignore[attr-defined]
            dst.doc_string = src.doc_string  # type: ignore[attr-defined]
        if hasattr(src, "metadata_props") and len(src.metadata_props) and not len(dst.metadata_props):  # type: ignore[attr-defined]
            dst.metadata_props.extend(src.metadata_props)  # type: ignore[attr-defined]

    g, ref = model.graph, like.graph
    copy_notes(g, ref)
    runtime = runtime_initializers(like)
    if runtime and model.ir_version >= 4:
        present = {i.name for i in g.input}
        inits = {i.name for i in g.initializer}
        order = {vi.name: k for k, vi in enumerate(ref.input)}
        for vi in ref.input:
            if vi.name in runtime and vi.name in inits and vi.name not in present:
                g.input.append(vi)
        ordered = sorted(g.input, key=lambda vi: order.get(vi.name, len(order)))
        del g.input[:]
        g.input.extend(ordered)
    ref_io = {vi.name: vi for vi in list(ref.input) + list(ref.output)}
    for vi in list(g.input) + list(g.output):
        if vi.name in ref_io:
            copy_notes(vi, ref_io[vi.name])
    ref_nodes = {(n.op_type, tuple(n.input), tuple(n.output)): n for n in ref.node}
    for node in g.node:
        src = ref_nodes.get((node.op_type, tuple(node.input), tuple(node.output)))
        if src is not None:
            copy_notes(node, src)


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


#: initializers larger than this are handed to shape inference as dims and type only
INFER_STRIP_BYTES = 1 << 20


def initializer_bytes(t: onnx.TensorProto) -> int:
    """Size of a numeric initializer's values from its dims (reading ``raw_data`` would copy it);
    0 for strings and unknown types, which are never stripped."""
    if t.data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return 0
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 0
    return int(np.prod([int(d) for d in t.dims], dtype=np.int64)) * itemsize


def weightless(model: onnx.ModelProto, *, min_bytes: int = INFER_STRIP_BYTES
               ) -> tuple[onnx.ModelProto, list[onnx.TensorProto]] | None:
    """A copy of ``model`` whose top-level initializers above ``min_bytes`` carry name, dims
    and type but no values, with those initializers of ``model`` (not copies); None when
    no initializer is that large.

    Shape inference reads values only of small constant operands (a Reshape's shape ...); a
    full copy of the weights (``infer_shapes`` serializes its argument and parses the
    result) cost VGG-19 two extra copies of 575 MB and 18 s. The probe session gets the
    values separately (:func:`onnxslim_lr.calibration.probe`).
    """
    big = [t for t in model.graph.initializer if initializer_bytes(t) > min_bytes]
    if not big:
        return None
    lite = onnx.ModelProto()
    lite.ir_version = model.ir_version
    lite.opset_import.extend(model.opset_import)
    lite.functions.extend(model.functions)
    g, src = lite.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    stripped = {id(t) for t in big}
    for t in src.initializer:
        if id(t) in stripped:
            shell = g.initializer.add()
            shell.name, shell.data_type = t.name, t.data_type
            shell.dims.extend(t.dims)
        else:
            g.initializer.append(t)
    return lite, big


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Best-effort shape inference; models with ops onnx cannot infer are returned as they are.

    Large initializers are not copied through inference (see :func:`weightless`): the
    inferred value infos and output types are copied onto ``model`` itself, which is returned.
    """
    stripped = weightless(model)
    lite = stripped[0] if stripped is not None else None
    try:
        inferred = onnx.shape_inference.infer_shapes(lite if lite is not None else model, strict_mode=False)
    except Exception as exc:  # onnx raises several unrelated types here
        log.debug("shape inference skipped: %s", exc)
        return model
    if lite is None:
        return inferred
    # nodes only when they hold subgraphs (inference adds value infos inside them)
    has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for n in model.graph.node for a in n.attribute)
    for field in ("value_info", "output") + (("node",) if has_subgraphs else ()):
        dst = getattr(model.graph, field)
        del dst[:]
        dst.extend(getattr(inferred.graph, field))
    return model


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
        lazy = getattr(tensor, "_values", None)
        if isinstance(lazy, LazyValues):
            # ``tensor.values`` would cache the decoded array on the graph for good: over a
            # planning run every weight then lived twice (proto + array; +575 MB on VGG-19).
            # A fresh array is freed with the site that asked for it.
            return np.asarray(lazy.load())
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
