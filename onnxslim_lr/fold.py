"""Pre-pass: fold inference BatchNormalization and constant per-channel Mul/Add into Convs.

Why: exporters leave ``Conv -> BatchNormalization`` (and sometimes ``Conv -> Mul -> Add``)
in the graph; the runtime fuses them at load time, so what actually executes is the conv
with the *effective* weight ``W' = W * g`` and bias ``b' = (b - mean) * g + beta`` where
``g = scale / sqrt(var + eps)``. Decomposing the unfolded ``W`` would approximate the wrong
operator (a channel with a large ``g`` would carry a large error), so every low-rank method
must see ``W'``.

A fold happens only when it cannot change results: the conv's output feeds nothing but the
BN/Mul/Add, which is in inference mode with all-constant parameters, and the graph output
names stay where they were.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Names, constant_value, is_runtime_input

log = logging.getLogger(__name__)


def fold_into_convs(graph: gs.Graph) -> int:
    """Fold every eligible BN / Mul / Add into its producing Conv. Returns how many were folded."""
    names = Names.for_graph(graph)
    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "Conv" or not node.outputs:
                continue
            consumer = _sole_consumer(graph, node)
            if consumer is None:
                continue
            if any(is_runtime_input(t, graph) for t in list(node.inputs[1:]) + list(consumer.inputs)):
                continue  # an overridable weight (graph input) is not a constant: folding would freeze it
            scale_shift = _affine_of(consumer, node)
            if scale_shift is None:
                continue
            if _apply(node, consumer, *scale_shift, names):
                folded += 1
                changed = True
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if folded:
        log.info("folded %d BatchNormalization/Mul/Add node(s) into convs", folded)
    return folded


def _sole_consumer(graph: gs.Graph, node: gs.Node) -> gs.Node | None:
    out = node.outputs[0]
    if out in graph.outputs or len(out.outputs) != 1:
        return None
    return out.outputs[0]


def _affine_of(consumer: gs.Node, conv: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-output-channel (scale, shift) the consumer applies, or None if it is not one."""
    w = constant_value(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if w is None or w.ndim < 3 or w.dtype != np.float32:
        return None
    F = w.shape[0]
    spatial = w.ndim - 2
    if consumer.op == "BatchNormalization":
        if len(consumer.outputs) != 1 or int(consumer.attrs.get("training_mode", 0)):
            return None
        vals = [constant_value(t) for t in consumer.inputs[1:5]]
        if any(v is None for v in vals) or len(vals) != 4:
            return None
        scale, beta, mean, var = (np.asarray(v, dtype=np.float64).reshape(-1) for v in vals)  # type: ignore[union-attr]
        if not all(v.size == F for v in (scale, beta, mean, var)):
            return None
        eps = float(consumer.attrs.get("epsilon", 1e-5))
        g = scale / np.sqrt(var + eps)
        return g, beta - mean * g
    if consumer.op in ("Mul", "Add") and len(consumer.inputs) == 2:
        other = consumer.inputs[1] if consumer.inputs[0] is conv.outputs[0] else consumer.inputs[0]
        c = constant_value(other)
        if c is None or not np.issubdtype(c.dtype, np.floating):
            return None
        per_channel = _per_channel(np.asarray(c, dtype=np.float64), F, spatial)
        if per_channel is None:
            return None
        if consumer.op == "Mul":
            return per_channel, np.zeros(F)
        return np.ones(F), per_channel
    return None


def _per_channel(c: np.ndarray, F: int, spatial: int) -> np.ndarray | None:
    """A constant that broadcasts against (N, F, *spatial) along the channel axis only.

    The rank is checked first, scalars included: a one-element constant of higher rank than
    the conv output (shape [1, 1, 1, 1, 1] after a 2-D conv) *raises* the rank of the result,
    so folding it away would change the shape every later op sees (a Softmax axis, a Reshape).
    """
    shape = list(c.shape)
    if len(shape) > spatial + 2:
        return None
    if c.size == 1:
        return np.full(F, float(c.reshape(-1)[0]))
    # right-align against (N, F, s1, ..., sn)
    full = [1] * (spatial + 2 - len(shape)) + shape
    if full[0] != 1 or any(d != 1 for d in full[2:]) or full[1] not in (1, F):
        return None
    return np.broadcast_to(c.reshape(-1), (F,)).astype(np.float64)


def _apply(conv: gs.Node, consumer: gs.Node, g: np.ndarray, shift: np.ndarray, names: Names) -> bool:
    w = constant_value(conv.inputs[1]).astype(np.float64)  # type: ignore[union-attr]
    F = w.shape[0]
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None and conv.inputs[2].name
    b = constant_value(conv.inputs[2]) if has_bias else np.zeros(F)
    if b is None:
        return False
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    w_new = (w * g.reshape((F,) + (1,) * (w.ndim - 1))).astype(np.float32)
    b_new = (b * g + shift).astype(np.float32)
    base = conv.name or "conv"
    w_c = gs.Constant(names.new(f"{base}/folded_w"), w_new)
    b_c = gs.Constant(names.new(f"{base}/folded_b"), b_new)
    # new constants rather than edits in place: the old weight may be shared by another node
    conv.inputs[1] = w_c
    if len(conv.inputs) > 2:
        conv.inputs[2] = b_c
    else:
        conv.inputs.append(b_c)
    out = consumer.outputs[0]
    consumer.outputs.clear()
    conv.outputs[0] = out
    return True
