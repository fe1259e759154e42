"""Channel permutations: fold ``Gather(axis=1, constant permutation)`` into neighbouring nodes.

Denton et al.'s clustering rewrites (``mono``, ``bicluster``) compute their output channels
in *cluster order*; each rewrite restores the original order itself with a ``Gather`` on the
channel axis, so that its ``Candidate.build`` computes exactly the replaced layer (the same
builder makes the one-layer timing model and the splice, and must not touch other nodes).
After the splices, :func:`fold_channel_gathers` removes those Gathers wherever the graph
allows, by moving the permutation into constant weights. It only ever rewrites a Gather
whose indices are a constant permutation of all the channels of its input, and it never
changes what the graph computes.

Notation: ``t = Gather(d, q, axis=1)`` means ``t[:, j] = d[:, q[j]]``; ``inv = argsort(q)``.

Forward (into the consumers of ``t``). Every consumer is classified:

* absorbs the permutation (the walk stops there):
  - ``Conv`` reading ``t`` as its data input with constant weights: ``W' = W[:, inv]``
    (group 1); a grouped conv only when ``q`` maps every group of input channels onto
    itself (then the columns are permuted inside each group);
  - another channel ``Gather`` with constant indices ``r``: its indices become ``q[r]``
    (two permutations compose into one; an identity result is then removed);
* commutes with it (the walk continues past the node, with its per-channel constants
  permuted ``p' = p[inv]``):
  - ``BatchNormalization`` (inference form), element-wise unary ops (Relu, LeakyRelu,
    Sigmoid, Clip with scalar bounds, ...), ``MaxPool`` / ``AveragePool`` / ``LpPool`` and
    the global pools, ``Add`` / ``Sub`` / ``Mul`` / ``Div`` / ``PRelu`` with a constant
    other operand (permuted when it varies along the channel axis);
  - a depthwise ``Conv`` (one input channel per group, any multiplier ``m``): its filters
    are permuted and the walk continues with the permutation expanded to ``m`` outputs per
    channel;
  - ``Concat`` along the channel axis: the permutation extends by the identity on the other
    inputs (their channel counts must be known);
* blocks it: anything else (LRN mixes neighbouring channels, Flatten/Reshape mix the
  channel axis into others, an ``Add`` of two activations, a graph output, a tensor used
  inside an If/Loop body ...). A ``Gather`` with the same permutation is kept right before
  each blocked use (graph output names are preserved).

A forward fold is applied when it removes the Gather (no blocked use), or when it leaves a
single Gather and either some consumer absorbed the permutation or the remaining Gather
moved past a down-sampling pool (it then moves fewer bytes). It never increases the number
of Gathers.

Backward (into the producer of ``d``), tried for every Gather the forward fold left in
place: if ``d`` is produced, through a chain of single-consumer commuting nodes (same list
as above, minus Concat), by a ``Conv`` with constant weights whose output feeds nothing
else and is not a graph output, the permutation becomes a permutation of that conv's
output channels (rows of its weight and its bias; for a grouped conv only when ``q`` maps
every output group onto itself) and of the chain's per-channel constants: ``p' = p[q]``.

Safety: the pass works on the top-level graph only; tensors read inside subgraphs are
treated like graph outputs (their values and names are kept). Any Gather it cannot prove
to be a full channel permutation (unknown channel count, non-constant or repeated indices,
another axis) is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .graph import Names, constant_value

log = logging.getLogger(__name__)

__all__ = ["fold_channel_gathers", "channel_permutation", "predict_fold", "predict_backward", "FoldReport"]

#: element-wise ops with one activation input (extra inputs must be scalar constants)
UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Gelu", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Erf", "Identity", "Dropout", "Cast", "Sin", "Cos",
    "Shrink",
})
#: spatial pools (per channel); Global* and strided pools shrink the tensor
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
#: binary element-wise ops that commute with a channel permutation when the other operand is constant
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "PRelu"})


@dataclass
class FoldReport:
    """What :func:`fold_channel_gathers` did."""

    removed: int = 0  #: Gathers that vanished (absorbed forward, folded backward, composed, identity)
    moved: int = 0  #: Gathers moved downstream (one Gather kept at a blocked use)
    details: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.removed + self.moved


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _int_dim(shape: object, axis: int) -> int | None:
    try:
        d = shape[axis]  # type: ignore[index]
    except (TypeError, IndexError):
        return None
    return int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None


def _rank(t: gs.Tensor) -> int | None:
    if t.shape is not None:
        try:
            return len(t.shape)
        except TypeError:
            return None
    if t.inputs and t.inputs[0].op == "Conv":
        w = constant_value(t.inputs[0].inputs[1]) if len(t.inputs[0].inputs) > 1 else None
        return None if w is None else int(w.ndim)
    return None


def _channels(t: gs.Tensor, depth: int = 0) -> int | None:
    """Channel count (axis 1) of a tensor: declared shape, else the producing conv's weight."""
    c = _int_dim(t.shape, 1) if t.shape is not None else None
    if c is not None or depth > 16 or not t.inputs:
        return c
    prod = t.inputs[0]
    if prod.op in ("Conv", "ConvTranspose") and len(prod.inputs) > 1:
        w = constant_value(prod.inputs[1])
        if w is not None and w.ndim >= 3:
            g = int(prod.attrs.get("group", 1))
            return int(w.shape[0]) if prod.op == "Conv" else int(w.shape[1]) * g
        return None
    if (prod.op in UNARY or prod.op in POOLS or prod.op == "BatchNormalization" or prod.op in BINARY) \
            and prod.inputs and prod.outputs and prod.outputs[0] is t:
        data = _data_input(prod)
        return None if data is None else _channels(data, depth + 1)
    if prod.op == "Gather":
        q = _gather_indices(prod)
        return None if q is None else int(q.size)
    return None


def _data_input(node: gs.Node) -> gs.Tensor | None:
    """The single activation input of a commuting node (None when there is not exactly one)."""
    if node.op in BINARY:
        acts = [t for t in node.inputs[:2] if constant_value(t) is None]
        return acts[0] if len(acts) == 1 else None
    return node.inputs[0] if node.inputs else None


def _gather_indices(node: gs.Node) -> np.ndarray | None:
    """Indices of a Gather on axis 1 with constant 1-D integer indices (None otherwise)."""
    if node.op != "Gather" or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    axis = int(node.attrs.get("axis", 0))
    if axis != 1:
        r = _rank(node.inputs[0])
        if r is None or axis + r != 1:
            return None
    idx = constant_value(node.inputs[1])
    if idx is None or idx.ndim != 1 or idx.dtype.kind not in "iu":
        return None
    return idx.astype(np.int64)


def channel_permutation(node: gs.Node) -> np.ndarray | None:
    """``q`` if ``node`` is ``Gather(d, q, axis=1)`` with ``q`` a permutation of all of ``d``'s channels."""
    q = _gather_indices(node)
    if q is None:
        return None
    n = _channels(node.inputs[0])
    if n is None or q.size != n:
        return None
    q = np.where(q < 0, q + n, q)
    if q.min(initial=0) < 0 or q.max(initial=0) >= n or np.unique(q).size != n:
        return None
    return q


def _protected(graph: gs.Graph) -> set[str]:
    """Names whose values and names must stay: graph outputs and tensors read by subgraphs."""
    names = {t.name for t in graph.outputs}

    def walk(g: gs.Graph) -> None:
        for n in g.nodes:
            for v in n.attrs.values():
                for sub in (v if isinstance(v, list) else [v]):
                    if isinstance(sub, gs.Graph):
                        for inner in sub.nodes:
                            names.update(t.name for t in inner.inputs if t is not None)
                        names.update(t.name for t in sub.outputs)
                        walk(sub)

    walk(graph)
    return names


def _is_const(t: gs.Tensor) -> bool:
    return constant_value(t) is not None


def _consumers(t: gs.Tensor) -> list[gs.Node]:
    seen: dict[int, gs.Node] = {}
    for n in t.outputs:
        seen.setdefault(id(n), n)
    return list(seen.values())


def _used_outputs_beyond_first(node: gs.Node, protected: set[str]) -> bool:
    return any(o is not None and o.name and (o.outputs or o.name in protected) for o in node.outputs[1:])


def _permute_const(c: np.ndarray, index: np.ndarray, act_rank: int | None, n: int) -> np.ndarray | None:
    """A broadcast constant re-indexed along the activation's channel axis; None if impossible.

    ``index`` is applied as ``take(c, index, axis=channel)``; constants that do not vary
    along the channel axis come back unchanged.
    """
    if c.ndim == 0 or c.size == 1:
        return c
    if act_rank is None or c.ndim > act_rank:
        return None
    ax = 1 - (act_rank - c.ndim)
    if ax < 0 or c.shape[ax] == 1:
        return c
    if c.shape[ax] != n:
        return None
    return np.take(c, index, axis=ax)


# --------------------------------------------------------------------------------------
# forward planning
# --------------------------------------------------------------------------------------


@dataclass
class _Edit:
    """One planned change of a node (applied only if the whole plan is accepted)."""

    kind: str  # "conv_in" | "gather_in" | "continue"
    node: gs.Node
    tensor: gs.Tensor  # the permuted tensor the node reads
    #: input index -> new constant value (weights, params)
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    out_perm: np.ndarray | None = None


@dataclass
class _Plan:
    root: gs.Tensor
    perms: dict[int, tuple[gs.Tensor, np.ndarray]] = field(default_factory=dict)  # id(T) -> (T, q)
    edits: list[_Edit] = field(default_factory=list)
    residual: list[int] = field(default_factory=list)  # id(T) needing a Gather back
    absorbed: int = 0
    shrunk: set[int] = field(default_factory=set)  # id(T) reached past a down-sampling pool
    ok: bool = True
    why: str = ""

    @property
    def residual_tensors(self) -> list[gs.Tensor]:
        return [self.perms[i][0] for i in self.residual]

    def worthwhile(self) -> bool:
        if not self.ok:
            return False
        if not self.residual:
            return True
        if len(self.residual) > 1:
            return False
        if self.residual[0] == id(self.root):
            return self.absorbed > 0
        return self.absorbed > 0 or self.residual[0] in self.shrunk


def _plan_forward(root: gs.Tensor, q: np.ndarray, rank: int | None, protected: set[str]) -> _Plan:
    plan = _Plan(root=root)
    visited_nodes: set[int] = set()

    def walk(T: gs.Tensor, q: np.ndarray, rank: int | None, shrunk: bool) -> None:
        plan.perms[id(T)] = (T, q)
        if shrunk:
            plan.shrunk.add(id(T))
        inv = np.argsort(q, kind="stable")
        blocked = T.name in protected
        for node in _consumers(T):
            if not plan.ok:
                return
            kind = _classify(node, T, q, inv, rank, protected)
            if kind is None:
                blocked = True
                continue
            if id(node) in visited_nodes:  # reached twice (a diamond): give up on this Gather
                plan.ok, plan.why = False, f"{node.name} reached twice"
                return
            visited_nodes.add(id(node))
            plan.edits.append(kind)
            if kind.kind in ("conv_in", "gather_in"):
                plan.absorbed += 1
                continue
            out = node.outputs[0]
            pool_shrinks = node.op in POOLS and (node.op.startswith("Global") or
                                                 any(int(s) > 1 for s in node.attrs.get("strides", [])))
            walk(out, kind.out_perm if kind.out_perm is not None else q, rank, shrunk or pool_shrinks)
        if blocked:
            plan.residual.append(id(T))

    walk(root, q, rank, False)
    return plan


def _classify(node: gs.Node, T: gs.Tensor, q: np.ndarray, inv: np.ndarray, rank: int | None,
              protected: set[str]) -> _Edit | None:
    """How ``node`` (a consumer of the permuted ``T``) takes the permutation; None = blocked."""
    n = q.size
    op = node.op
    uses = [i for i, t in enumerate(node.inputs) if t is T]
    if not node.outputs or node.outputs[0] is None:
        return None
    if op == "Conv":
        if uses != [0] or len(node.inputs) < 2:
            return None
        w = constant_value(node.inputs[1])
        if w is None or w.ndim < 3:
            return None
        has_b = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name
        b = constant_value(node.inputs[2]) if has_b else None
        if has_b and b is None:
            return None
        g = int(node.attrs.get("group", 1))
        cg = int(w.shape[1])
        if cg * g != n or w.shape[0] % g:
            return None
        if g == 1:
            return _Edit("conv_in", node, T, {1: np.take(w, inv, axis=1)})
        if cg == 1:  # depthwise (multiplier m): permute the filters and continue
            m = w.shape[0] // g
            out_q = (q[:, None] * m + np.arange(m)[None, :]).reshape(-1)
            out_inv = np.argsort(out_q, kind="stable")
            consts = {1: np.take(w, out_inv, axis=0)}
            if b is not None:
                consts[2] = np.take(b.reshape(-1), out_inv, axis=0)
            return _Edit("continue", node, T, consts, out_perm=out_q)
        blocks = np.arange(n) // cg
        if not np.array_equal(q // cg, blocks):
            return None
        local = inv - blocks * cg  # new local column i' of group G reads old local column local[G*cg+i']
        fpg = w.shape[0] // g
        w2 = np.empty_like(w)
        for grp in range(g):
            rows = slice(grp * fpg, (grp + 1) * fpg)
            w2[rows] = np.take(w[rows], local[grp * cg:(grp + 1) * cg], axis=1)
        return _Edit("conv_in", node, T, {1: w2})
    if op == "Gather":
        if uses != [0]:
            return None
        r = _gather_indices(node)
        if r is None:
            return None
        r = np.where(r < 0, r + n, r)
        if r.size and (r.min() < 0 or r.max() >= n):
            return None
        idx = constant_value(node.inputs[1])
        return _Edit("gather_in", node, T, {1: q[r].astype(idx.dtype if idx is not None else np.int64)})
    if _used_outputs_beyond_first(node, protected):
        return None
    if op == "BatchNormalization":
        if uses != [0] or len(node.inputs) < 5 or int(node.attrs.get("training_mode", 0)):
            return None
        consts = {}
        for i in range(1, 5):
            v = constant_value(node.inputs[i])
            if v is None or v.reshape(-1).size != n:
                return None
            consts[i] = np.take(v.reshape(-1), inv).reshape(v.shape)
        return _Edit("continue", node, T, consts)
    if op in UNARY:
        if uses != [0]:
            return None
        for t in node.inputs[1:]:
            if t is None or not t.name:
                continue
            v = constant_value(t)
            if v is None or v.size != 1:
                return None
        return _Edit("continue", node, T)
    if op in POOLS:
        if uses != [0]:
            return None
        return _Edit("continue", node, T)
    if op in BINARY:
        if len(uses) != 1 or uses[0] > 1 or len(node.inputs) != 2:
            return None
        other = 1 - uses[0]
        c = constant_value(node.inputs[other])
        if c is None:
            return None
        c2 = _permute_const(np.asarray(c), inv, rank, n)
        if c2 is None:
            return None
        if op == "PRelu" and uses[0] != 0:
            return None
        return _Edit("continue", node, T, {other: c2} if c2 is not c else {})
    if op == "Concat":
        axis = int(node.attrs.get("axis", 0))
        if axis != 1 and (rank is None or axis + rank != 1):
            return None
        counts = []
        for t in node.inputs:
            c = n if t is T else _channels(t)
            if c is None:
                return None
            counts.append(c)
        total = sum(counts)
        out_q = np.arange(total)
        off = 0
        for t, c in zip(node.inputs, counts):
            if t is T:
                out_q[off:off + c] = off + q
            off += c
        return _Edit("continue", node, T, out_perm=out_q)
    return None


def predict_fold(graph: gs.Graph, tensor: gs.Tensor, perm: np.ndarray) -> bool:
    """Would a channel Gather with ``perm`` placed on ``tensor`` vanish into its consumers?

    Read-only (a dry run of the forward plan); used by passes to say ``perm=folded`` or
    ``perm=gather`` in their candidate. Other rewrites spliced later can change the answer.
    """
    q = np.asarray(perm, dtype=np.int64)
    if np.array_equal(q, np.arange(q.size)):
        return True
    plan = _plan_forward(tensor, q, 4, _protected(graph))
    return plan.ok and not plan.residual


def predict_backward(graph: gs.Graph, consumer: gs.Node, perm: np.ndarray) -> bool:
    """Would a channel Gather with ``perm`` on ``consumer``'s first input fold into its producer?

    ``consumer`` must be the only reader of that input (as a rewrite's input Gather will be).
    Read-only; the answer can change when the producer is itself rewritten.
    """
    q = np.asarray(perm, dtype=np.int64)
    if np.array_equal(q, np.arange(q.size)):
        return True
    return _try_backward(graph, consumer, q, _protected(graph), None, dry=True)


# --------------------------------------------------------------------------------------
# applying
# --------------------------------------------------------------------------------------


def _set_const(node: gs.Node, index: int, value: np.ndarray, names: Names) -> None:
    base = node.inputs[index].name or f"{node.name}/in{index}"
    node.inputs[index] = gs.Constant(names.new(f"{base}/perm"), np.ascontiguousarray(value))


def _gather_node(names: Names, src: gs.Tensor, dst: gs.Tensor, q: np.ndarray) -> gs.Node:
    idx = gs.Constant(names.new(f"{dst.name}/perm_idx"), q.astype(np.int64))
    return gs.Node(op="Gather", name=names.new(f"{dst.name}/perm"), attrs={"axis": 1}, inputs=[src, idx], outputs=[dst])


def _apply_forward(graph: gs.Graph, gather: gs.Node, plan: _Plan, names: Names) -> None:
    d = gather.inputs[0]
    root = plan.root
    residual = set(plan.residual)
    # tensor holding the un-permuted values of every permuted tensor
    unperm: dict[int, gs.Tensor] = {id(root): d}
    for key, (T, _q) in plan.perms.items():
        if key == id(root):
            continue
        unperm[key] = gs.Variable(names.new(f"{T.name}/unperm"), dtype=T.dtype) if key in residual else T
    for e in plan.edits:
        # the node now reads the un-permuted tensor
        for i, t in enumerate(list(e.node.inputs)):
            if t is e.tensor:
                e.node.inputs[i] = unperm[id(e.tensor)]
        for i, v in e.consts.items():
            _set_const(e.node, i, v, names)
        if e.kind == "continue":
            out = e.node.outputs[0]
            new = unperm[id(out)]
            if new is not out:
                e.node.outputs[0] = new
    for key in plan.residual:
        T, q = plan.perms[key]
        if key == id(root):
            continue  # the original Gather stays for the blocked uses
        graph.nodes.append(_gather_node(names, unperm[key], T, q))
    if id(root) not in residual:
        gather.inputs.clear()
        gather.outputs.clear()


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------


def _try_backward(graph: gs.Graph, gather: gs.Node, q: np.ndarray, protected: set[str], names: Names | None,
                  *, dry: bool = False) -> bool:
    """Fold ``Gather(d, q)`` into the conv producing ``d`` (through commuting single-consumer nodes).

    ``dry``: only say whether it would fold (``gather`` may then be any node reading ``d``,
    e.g. the conv a pass is about to replace by ``Gather -> ...``).
    """
    n = q.size
    chain: list[tuple[gs.Node, dict[int, np.ndarray]]] = []
    T = gather.inputs[0]
    nxt: gs.Node = gather
    for _ in range(64):
        if T.name in protected or len(_consumers(T)) != 1 or _consumers(T)[0] is not nxt:
            return False
        if len(T.inputs) != 1:
            return False
        prod = T.inputs[0]
        if not prod.outputs or prod.outputs[0] is not T or _used_outputs_beyond_first(prod, protected):
            return False
        if prod.op == "Conv":
            if len(prod.inputs) < 2:
                return False
            w = constant_value(prod.inputs[1])
            if w is None or w.ndim < 3 or w.shape[0] != n:
                return False
            has_b = len(prod.inputs) > 2 and prod.inputs[2] is not None and prod.inputs[2].name
            b = constant_value(prod.inputs[2]) if has_b else None
            if has_b and b is None:
                return False
            g = int(prod.attrs.get("group", 1))
            consts = {1: np.take(w, q, axis=0)}
            if b is not None:
                consts[2] = np.take(b.reshape(-1), q)
            if g == 1:
                chain.append((prod, consts))
                break
            if w.shape[1] == 1 and w.shape[0] == g:  # depthwise, multiplier 1: continue upstream
                chain.append((prod, consts))
                T, nxt = prod.inputs[0], prod
                continue
            fpg = n // g
            if not np.array_equal(q // fpg, np.arange(n) // fpg):
                return False
            chain.append((prod, consts))
            break
        rank = _rank(T) or _rank(gather.outputs[0])
        consts = {}
        if prod.op == "BatchNormalization":
            if len(prod.inputs) < 5 or int(prod.attrs.get("training_mode", 0)):
                return False
            for i in range(1, 5):
                v = constant_value(prod.inputs[i])
                if v is None or v.reshape(-1).size != n:
                    return False
                consts[i] = np.take(v.reshape(-1), q).reshape(v.shape)
        elif prod.op in UNARY:
            for t in prod.inputs[1:]:
                if t is not None and t.name:
                    v = constant_value(t)
                    if v is None or v.size != 1:
                        return False
        elif prod.op in POOLS:
            pass
        elif prod.op in BINARY:
            data = _data_input(prod)
            if data is None or len(prod.inputs) != 2:
                return False
            other = 1 - [i for i, t in enumerate(prod.inputs) if t is data][0]
            if prod.op == "PRelu" and other == 0:
                return False
            c = np.asarray(constant_value(prod.inputs[other]))
            c2 = _permute_const(c, q, rank, n)
            if c2 is None:
                return False
            if c2 is not c:
                consts[other] = c2
        else:
            return False
        chain.append((prod, consts))
        data = _data_input(prod)
        if data is None:
            return False
        T, nxt = data, prod
    else:
        return False
    if dry:
        return True
    assert names is not None
    for node, consts in chain:
        for i, v in consts.items():
            _set_const(node, i, v, names)
    t = gather.outputs[0]
    last = gather.inputs[0].inputs[0]
    gather.inputs.clear()
    gather.outputs.clear()
    last.outputs[0] = t
    return True


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


def fold_channel_gathers(graph: gs.Graph, report: FoldReport | None = None) -> int:
    """Fold every channel-permutation Gather of ``graph`` that can be folded; return how many.

    Safe on any graph (see the module docstring for the rules): the count is the number of
    Gathers removed or moved; ``report`` (optional) receives the details. The graph is
    cleaned up and re-sorted when anything changed.
    """
    rep = report if report is not None else FoldReport()
    names = Names.for_graph(graph)
    changed_any = False
    for _round in range(max(4, len(graph.nodes))):
        changed = False
        protected = _protected(graph)
        for node in list(graph.nodes):
            if node.op != "Gather" or not node.outputs or not node.inputs:
                continue
            try:  # planning is read-only: a graph it does not understand only means "leave it"
                q = channel_permutation(node)
                if q is None:
                    continue
                t, d = node.outputs[0], node.inputs[0]
                identity = bool(np.array_equal(q, np.arange(q.size)))
                plan = None if identity else _plan_forward(t, q, _rank(d) or _rank(t), protected)
                forward = plan is not None and plan.worthwhile()
                backward = not identity and not forward and _try_backward(graph, node, q, protected, None, dry=True)
            except Exception as exc:  # pragma: no cover - defensive: never fail a compression here
                log.debug("fold_channel_gathers: %s skipped (%s)", node.name, exc)
                continue
            if identity:
                if t.name in protected:
                    continue
                for c in _consumers(t):
                    for i, x in enumerate(list(c.inputs)):
                        if x is t:
                            c.inputs[i] = d
                node.inputs.clear()
                node.outputs.clear()
                rep.removed += 1
                rep.details.append(f"{node.name}: identity permutation removed")
                changed = True
                continue
            if forward:
                assert plan is not None
                _apply_forward(graph, node, plan, names)
                if plan.residual:
                    rep.moved += 1
                    rep.details.append(f"{node.name}: absorbed by {plan.absorbed} consumer(s), one Gather kept "
                                       f"before {plan.residual_tensors[0].name}")
                else:
                    rep.removed += 1
                    rep.details.append(f"{node.name}: absorbed by {plan.absorbed} consumer(s)")
            elif backward:
                _try_backward(graph, node, q, protected, names)
                rep.removed += 1
                rep.details.append(f"{node.name}: folded into the producing conv")
            else:
                continue
            changed = True
            graph.cleanup(remove_unused_graph_inputs=False)
            break  # the graph changed under the loop: start a new round
        if not changed:
            break
        changed_any = True
    if changed_any:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for line in rep.details:
        log.debug("fold_channel_gathers: %s", line)
    return rep.total
