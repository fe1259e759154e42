"""The data service: activations and their statistics, captured with onnxruntime.

No pass runs a session or reads calibration files. Passes *declare* what they need as
:class:`Request` objects (a named, streamed reduction of one tensor: the input-patch second
moment, the output second moment, a consumer's activation statistics ...); the manager
gathers every request in **one streamed pass** over the calibration batches
(:func:`gather`) and hands the results back through one accessor, :class:`Statistics`
(``stats.get(request)``; the shortcuts :meth:`Statistics.patch_covariance` and
:meth:`Statistics.output_covariance` for sites).

* :func:`probe` runs the model once on a sample batch with chosen intermediate tensors
  exposed as outputs, giving every layer its *real* input shape (dynamic dims resolved) and a
  real input for per-layer error and timing measurements;
* :func:`gather` streams batches through a model and accumulates, per request, a sum and a
  count. For the patch covariance that is ``Sigma = E[p p^T]`` of the input patches ``p`` a
  conv sees (the data metric of Denton eq. 3): only the ``(C*kh*kw)^2`` matrix is kept, never
  the activations, so memory stays bounded however large the calibration set.

``gather`` takes the model as an argument and keys results by tensor name, so a later step
can ask for a site's statistics under a *partially rewritten* model (sequential
reconstruction: the input patches of layer ``l`` as the compressed layers ``< l`` produce
them) by gathering that site's requests on that model; the original model's statistics
are the ones the manager gathers up front.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .cost import conv_out_size
from .decompose.reconstruct import gram
from .graph import weightless
from .sites import ConvSite, FCSite, Site
from .timing import make_session

log = logging.getLogger(__name__)


def typed_outputs(model: onnx.ModelProto, names: Sequence[str], skip: Iterable[str] = ()) -> list[onnx.ValueInfoProto]:
    """Output value infos for the named tensors of ``model`` (element type taken from its
    value_info, inputs and outputs; float when unknown), leaving out ``skip`` and repeats."""
    have = set(skip)
    types: dict[str, int] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    out = []
    for n in names:
        if n and n not in have:
            out.append(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None))
            have.add(n)
    return out


def _extra_outputs(model: onnx.ModelProto, names: Sequence[str]) -> list[onnx.ValueInfoProto]:
    """Value infos for the named tensors that are not graph outputs yet."""
    return typed_outputs(model, names, skip=[o.name for o in model.graph.output])


def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model with extra graph outputs (element type taken from value_info)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(_extra_outputs(model, names))
    return m


def prunable(model: onnx.ModelProto) -> bool:
    """Whether the top-level graph can be cut into parts by node: no subgraph attributes (If,
    Loop bodies read outer-scope tensors) and no sparse initializers."""
    g = model.graph
    return not len(g.sparse_initializer) and not any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute)


def prefix_model(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A model computing only ``names``: the nodes they depend on, with those tensors as outputs.

    Why: onnxruntime runs every node of a graph whatever outputs are fetched, so reading an
    early layer's input through :func:`expose` pays for the whole network (and its weights).
    Sequential reconstruction reads each layer's input from two models per layer; a prefix
    halves that work on a chain and leaves out the classifier's weights. Graphs with
    subgraph attributes (If, Loop: outer-scope references) and sparse initializers get the
    plain :func:`expose`.
    """
    g = model.graph
    if not prunable(model):
        return expose(model, names)
    keep, needed = _backward(g.node, names, set())
    return submodel(model, keep, [i for i in g.input if i.name in needed], names)


def _backward(nodes: Sequence[onnx.NodeProto], names: Iterable[str], stop: set[str]
              ) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes ``names`` depend on, in graph order, not looking past ``stop``; and every
    tensor they read (or ``names`` are) that no kept node produces or that is in ``stop``."""
    needed = {n for n in names if n and n not in stop}
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i and i not in stop)
    keep.reverse()
    produced = {o for n in keep for o in n.output if o}
    reads = {i for n in keep for i in n.input if i} | {n for n in names if n}
    return keep, {x for x in needed | (reads & stop) if x not in produced}


def submodel(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
             outputs: Sequence[str]) -> onnx.ModelProto:
    """``nodes`` of ``model`` as a model of their own: the given graph inputs, the initializers
    and value infos they use, and ``outputs`` (typed from ``model``) as its outputs."""
    g = model.graph
    used = {x for n in nodes for x in n.input if x} | {i.name for i in inputs}
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.producer_name = model.producer_name
    m.graph.name = g.name
    m.graph.node.extend(nodes)
    m.graph.input.extend(inputs)
    m.graph.initializer.extend(t for t in g.initializer if t.name in used)
    m.graph.value_info.extend(v for v in g.value_info if v.name in used)
    m.graph.output.extend(typed_outputs(model, [n for n in outputs if n]))
    return m


def cut_before(model: onnx.ModelProto, node_name: str) -> list[str] | None:
    """The tensors live just before node ``node_name`` in graph order (None: no such cut).

    Live: a graph input or an earlier node's output that the node or a later one reads, or
    that is a graph output. Everything from the node on is computed from these alone, so
    a model that differs only from the node on can be run from them
    (:func:`suffix_model`). None when the graph cannot be cut (:func:`prunable`) or has
    no node of that name.
    """
    g = model.graph
    if not prunable(model):
        return None
    nodes = list(g.node)
    k = next((i for i, n in enumerate(nodes) if n.name == node_name), None)
    if k is None:
        return None
    inits = {t.name for t in g.initializer}
    before = {i.name for i in g.input} | {o for n in nodes[:k] for o in n.output if o}
    after = {x for n in nodes[k:] for x in n.input if x} | {o.name for o in g.output}
    return sorted((before & after) - inits)


def fingerprint(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bytes:
    """What a node computes: its proto and the bytes of its constant inputs."""
    import hashlib

    h = hashlib.blake2b(node.SerializeToString(), digest_size=16)
    for name in node.input:
        t = inits.get(name)
        if t is not None:
            h.update(t.raw_data if t.HasField("raw_data") else t.SerializeToString())
    return h.digest()


def node_prints(model: onnx.ModelProto, names: Sequence[str]) -> frozenset[bytes]:
    """Fingerprints of the nodes ``names`` depend on (:func:`fingerprint`).

    Two models with the same prints compute ``names`` the same way from the same inputs:
    how a caller checks that a rewrite left everything before a cut alone.
    """
    inits = {t.name: t for t in model.graph.initializer}
    keep, _ = _backward(model.graph.node, names, set(inits))
    return frozenset(fingerprint(n, inits) for n in keep)


def suffix_model(model: onnx.ModelProto, cut: Sequence[str],
                 sample: Mapping[str, np.ndarray]) -> onnx.ModelProto | None:
    """The nodes of ``model`` that compute its outputs from the ``cut`` tensors, as a model
    whose inputs are those tensors (typed from ``sample``). None when some output needs a
    tensor the cut does not hold (a graph input the cut left out) or the graph cannot be cut.
    """
    g = model.graph
    if not prunable(model):
        return None
    inits = {t.name for t in g.initializer}
    outputs = [o.name for o in g.output]
    kept, reads = _backward(g.node, outputs, set(cut) | inits)
    reads -= inits
    if not reads <= set(cut) or any(c not in sample for c in reads):
        return None  # a tensor the cut does not hold (a graph input it left out)
    inputs = [onnx.helper.make_tensor_value_info(c, onnx.helper.np_dtype_to_tensor_dtype(sample[c].dtype),
                                                 [None] * sample[c].ndim) for c in cut if c in reads]
    return submodel(model, kept, inputs, [o.name for o in g.output])


def exposed_bytes(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    """The serialized model with extra graph outputs, without copying the model.

    Why: :func:`expose` deep-copies the proto, which for VGG-19 (575 MB of weights) holds a
    second copy of every weight just to add a few outputs. Here the outputs are appended to
    the caller's proto for the time of one serialization and removed again (the proto is left
    exactly as it was, also when serialization fails).
    """
    extra = _extra_outputs(model, names)
    outputs = model.graph.output
    outputs.extend(extra)
    try:
        return model.SerializeToString()
    finally:
        if extra:
            del outputs[len(outputs) - len(extra):]


#: numpy kinds onnxruntime takes as shared initializer buffers (others go through the proto)
_SHAREABLE = (np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8)


def exposed_session(model: onnx.ModelProto, names: Sequence[str], *, threads: int | None = None) -> Any:
    """A session (graph optimisations off) on ``model`` with ``names`` exposed as outputs.

    Why not simply ``make_session(expose(model, names))``: for VGG-19 that held the proto,
    its deep copy, the 575 MB serialization and the runtime's own copy of every weight at
    once. Large initializers travel instead as buffers the runtime uses without copying
    (:func:`onnxslim_lr.graph.weightless`), and the proto is never copied with its weights.
    """
    shared = external_weights(model)
    if shared is not None:
        lite, values = shared
        lite.graph.output.extend(_extra_outputs(model, names))
        return make_session(lite, threads=threads, optimize=False, initializers=values)
    return make_session(exposed_bytes(model, names), threads=threads, optimize=False)


def external_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """A copy of ``model`` whose large initializers are external shells, and their values.

    The shells name no file: the values go to :func:`onnxslim_lr.timing.make_session` as
    ``initializers``, buffers the runtime reads in place of the file. A graph built on the
    copy (:func:`onnxslim_lr.graph.import_graph`) exports without touching the weights.
    None when no initializer is large, or one has a dtype the runtime cannot share.
    """
    stripped = weightless(model)
    if stripped is None:
        return None
    lite, big = stripped
    values = {t.name: numpy_helper.to_array(t) for t in big}
    if not all(v.dtype.type in _SHAREABLE for v in values.values()):
        return None
    for t in lite.graph.initializer:
        if t.name in values:  # the runtime takes the buffer in place of the external file
            t.data_location = onnx.TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", f"{t.name}.bin"
    return lite, values


def probe(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Sequence[str], *, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Values of the named tensors for one run on ``feeds`` (graph optimisations off)."""
    wanted = [n for n in dict.fromkeys(names) if n]
    sess = exposed_session(model, wanted, threads=threads)
    outs = [o.name for o in sess.get_outputs()]
    values = sess.run(outs, dict(feeds))
    got = dict(zip(outs, values))
    return {n: got[n] for n in wanted if n in got}


def im2col(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
           dilations: tuple[int, int]) -> np.ndarray:
    """Patches of a (N, C, H, W) batch as rows (N*Ho*Wo, C*kh*kw), columns in (c, i, j) order.

    The column order matches ``W.reshape(F, -1)``, so ``patches @ W2d.T`` is the conv.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = conv_out_size(h, kh, sh, dh, pads[0], pads[2])
    wo = conv_out_size(w, kw, sw, dw, pads[1], pads[3])
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


def sample_patch_rows(acts: Sequence[np.ndarray], kernel: tuple[int, int], strides: tuple[int, int],
                      dilations: tuple[int, int], pads: tuple[int, int, int, int], max_rows: int,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """The same random ``max_rows`` conv patches of each ``(N, C, H, W)`` activation, ``(c, i, j)`` columns.

    Gathers only the sampled positions (no full im2col); ``pads`` are (top, left, bottom, right).
    """
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    n, _, h, w = acts[0].shape
    t, left, b, r = pads
    ho, wo = conv_out_size(h, kh, sh, dh, t, b), conv_out_size(w, kw, sw, dw, left, r)
    total = n * ho * wo
    pick = rng.choice(total, max_rows, replace=False) if total > max_rows else np.arange(total)
    ni, rem = np.divmod(pick, ho * wo)
    oy, ox = np.divmod(rem, wo)
    yy = (oy * sh)[:, None, None] + (dh * np.arange(kh))[None, :, None]
    xx = (ox * sw)[:, None, None] + (dw * np.arange(kw))[None, None, :]
    out = []
    for a in acts:
        ap = np.pad(a, ((0, 0), (0, 0), (t, b), (left, r)))
        g = ap[ni[:, None, None], :, yy, xx]  # (M, kh, kw, C)
        out.append(np.ascontiguousarray(g.transpose(0, 3, 1, 2)).reshape(len(pick), -1))
    return out


def site_rows(site: Site, acts: Sequence[np.ndarray], max_rows: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same (at most ``max_rows``) rows of each activation the site's data metric is over.

    Conv: input patches in ``(c, i, j)`` column order; FC: input rows. When there are more
    rows than ``max_rows`` a random subset is drawn, and for a conv only the sampled
    positions are gathered: a full im2col of a 16-image batch at 224x224 with 64 channels
    is 1.8 GB, of which a 20000-row sample keeps 2.5 %.
    """
    a0 = acts[0]
    if isinstance(site, FCSite):
        flat = [a.reshape(-1, a.shape[-1]) for a in acts]
        if flat[0].shape[0] > max_rows:
            idx = rng.choice(flat[0].shape[0], max_rows, replace=False)
            flat = [f[idx] for f in flat]
        return flat
    attrs = site.attrs
    return sample_patch_rows(acts, attrs.kernel, attrs.strides, attrs.dilations,
                             attrs.resolved_pads((a0.shape[2], a0.shape[3])), max_rows, rng)


#: rows of patches kept per batch and per site for a covariance (a random subset beyond it)
MAX_ROWS_PER_BATCH = 20000

#: a per-batch reduction: the activation batch -> (sum over its rows/samples, their count)
Reduce = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, int]"]


@dataclass(frozen=True)
class Request:
    """One statistic a pass needs: a streamed reduction of one tensor over calibration batches.

    ``kind`` names the statistic and ``tensor`` the activation it reduces, which together are
    the key results are stored under. ``reduce`` maps one batch of that tensor to a partial
    sum and a count (the statistic is ``sum / count``). ``source`` is other calibration data
    for this request only (a pass option such as ``--perforation-calib``); None means the
    run's calibration batches.
    """

    kind: str
    tensor: str
    reduce: Reduce
    source: Sequence[Mapping[str, np.ndarray]] | None = None
    #: what the result is stored under besides ``kind``: the site's name for per-site
    #: statistics (two convs reading one tensor see different patches), else the tensor
    owner: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.owner or self.tensor)


#: rows a second moment gathers before one Gram product over them: BLAS runs products of a
#: few thousand rows near its peak (3136-row blocks of a 4608-wide Gram took the time of one
#: 12544-row product), so fewer rows per batch are held back until there are this many
ROW_BLOCK = 4096
#: and at most this many bytes of them per request
ROW_BUFFER_BYTES = 128 << 20
#: rows all second moments together hold back before every buffer is reduced (bytes)
ROW_BUFFERS_TOTAL_BYTES = 512 << 20


class RowMoment:
    """A :data:`Reduce` that is a second moment ``sum_rows r r^T`` of rows drawn per batch.

    Called on one batch it is an ordinary reduction. :func:`gather` instead takes the rows
    (:meth:`rows`) of several batches and reduces them with one Gram product: at batch 1, a
    512-channel 3x3 conv at 28x28 gives 784 patch rows per image, and 16 products of 784
    rows took 3x the time of one of 12544 (BLAS runs short products far below its peak),
    besides adding a float64 ``n x n`` matrix per batch (4608^2: 170 MB). The rows drawn,
    and so the statistic, are the same either way.
    """

    def __init__(self, rows: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> None:
        self.rows = rows

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        r = self.rows(x, rng)
        return gram(r), r.shape[0]


def _second_moment(rows_of: Callable[[np.ndarray], np.ndarray], max_rows: int) -> RowMoment:
    def rows(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        r = rows_of(x)
        if r.shape[0] > max_rows:
            r = r[rng.choice(r.shape[0], max_rows, replace=False)]
        return r

    return RowMoment(rows)


def _patch_moment(site: Site, max_rows: int) -> RowMoment:
    """The site's patch second moment from at most ``max_rows`` rows per batch, sampled before im2col."""
    def rows(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        (r,) = site_rows(site, [x], max_rows, rng)
        return r

    return RowMoment(rows)


def patch_covariance_request(site: Site, max_rows: int = MAX_ROWS_PER_BATCH) -> Request:
    """``E[p p^T]`` of the site's input patches (conv) or input rows (FC): the data metric."""
    return Request("patch_covariance", site.node.inputs[0].name, _patch_moment(site, max_rows), owner=site.name)


def _output_rows(site: Site, y: np.ndarray) -> np.ndarray:
    """The site's output as rows of its channels: conv positions or FC rows."""
    if isinstance(site, ConvSite):
        return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def output_covariance_request(site: Site, max_rows: int = MAX_ROWS_PER_BATCH) -> Request:
    """``E[y y^T]`` of the site's output channels (the response covariance of output modes)."""
    return Request("output_covariance", site.node.outputs[0].name,
                   _second_moment(lambda y: _output_rows(site, y), max_rows), owner=site.name)


def response_moment_request(site: Site, max_rows: int = MAX_ROWS_PER_BATCH) -> Request:
    """``E[(y - b)(y - b)^T]`` of the site's output channels, which is ``W Sigma W^T``.

    Why: a channel or FC SVD in the data metric needs ``Sigma`` only through ``W Sigma W^T``
    (``F x F``; :func:`onnxslim_lr.decompose.svd.left_singular_by_gram`). Reduced from the
    layer's own output it costs ``rows x F^2`` instead of ``rows x n^2`` with ``n = C kh kw``
    (81x less for a 512-channel 3x3 layer), the same statistic on the same rows.
    """
    bias = None if site.bias is None else np.asarray(site.bias, dtype=np.float32).reshape(-1)

    def rows(y: np.ndarray) -> np.ndarray:
        r = _output_rows(site, y)
        return r if bias is None else r - bias

    return Request("response_moment", site.node.outputs[0].name, _second_moment(rows, max_rows), owner=site.name)


class Statistics:
    """The one accessor passes read data through: results of :func:`gather`, by request."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str], np.ndarray] = {}
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, key: tuple[str, str], total: np.ndarray, count: int) -> None:
        have = self._sums.get(key)
        if have is None:
            self._sums[key] = np.array(total, copy=True)
        elif have.shape == np.shape(total) and np.result_type(have, total) == have.dtype:
            np.add(have, total, out=have)  # in place: a 4608-square sum is 170 MB
        else:
            self._sums[key] = have + total
        self._counts[key] = self._counts.get(key, 0) + count

    def get(self, request: Request) -> np.ndarray | None:
        """The mean of the request's reduction, or None when it was not gathered."""
        return self._mean(request.key)

    def _mean(self, key: tuple[str, str]) -> np.ndarray | None:
        if key not in self._sums:
            return None
        return self._sums[key] / max(self._counts[key], 1)

    def patch_covariance(self, site: Site) -> np.ndarray | None:
        """``E[p p^T]`` of the site's input patches, or None if the site was not calibrated."""
        return self._mean(("patch_covariance", site.name))

    def response_moment(self, site: Site) -> np.ndarray | None:
        """``E[(y - b)(y - b)^T] = W Sigma W^T`` of the site, or None if it was not gathered."""
        return self._mean(("response_moment", site.name))

    def output_covariance(self, site: Site) -> np.ndarray | None:
        """``E[y y^T]`` of the site's output channels, or None if it was not gathered."""
        return self._mean(("output_covariance", site.name))


def gather(model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]] | None, requests: Sequence[Request], *,
           threads: int | None = None, seed: int = 0, into: Statistics | None = None) -> Statistics:
    """Every request, in one streamed pass per data source (the run's batches, or a request's own).

    Requests with the same key are gathered once. Random row subsets come from one generator
    seeded with ``seed``, drawn in request order, so results are reproducible.
    """
    stats = into if into is not None else Statistics()
    unique = list({r.key: r for r in requests}.values())
    by_source: dict[int, tuple[Iterable[Mapping[str, np.ndarray]] | None, list[Request]]] = {}
    for r in unique:
        src = r.source if r.source is not None else batches
        by_source.setdefault(id(src), (src, []))[1].append(r)
    rng = np.random.default_rng(seed)
    for src, reqs in by_source.values():
        if src is None:
            continue
        tensors = list(dict.fromkeys(r.tensor for r in reqs))
        sess = exposed_session(model, tensors, threads=threads)
        outs = [o.name for o in sess.get_outputs()]
        inputs = {i.name for i in sess.get_inputs()}
        buffers = _RowBuffers(stats)
        for feeds in src:
            got = dict(zip(outs, sess.run(outs, {k: v for k, v in feeds.items() if k in inputs})))
            for r in reqs:
                if isinstance(r.reduce, RowMoment):
                    buffers.add(r.key, r.reduce.rows(got[r.tensor], rng))
                else:
                    total, count = r.reduce(got[r.tensor], rng)
                    stats.add(r.key, total, count)
            del got
        buffers.flush()
    return stats


class _RowBuffers:
    """Rows of :class:`RowMoment` requests held back across batches, reduced in large products.

    Bounded: a request's rows are reduced once they reach :data:`ROW_BLOCK` rows or
    :data:`ROW_BUFFER_BYTES`, and all of them once the buffers together reach
    :data:`ROW_BUFFERS_TOTAL_BYTES`; a batch with enough rows alone is reduced at once.
    """

    def __init__(self, stats: Statistics) -> None:
        self._stats = stats
        self._rows: dict[tuple[str, str], list[np.ndarray]] = {}
        self._bytes: dict[tuple[str, str], int] = {}
        self._count: dict[tuple[str, str], int] = {}

    def add(self, key: tuple[str, str], rows: np.ndarray) -> None:
        if key not in self._rows and (rows.shape[0] >= ROW_BLOCK or rows.nbytes >= ROW_BUFFER_BYTES):
            self._stats.add(key, gram(rows), rows.shape[0])  # large enough alone: no buffer, no copy
            return
        # a view (an FC layer's rows are a reshape of the batch) is copied: the whole batch's
        # activation must not stay alive in the buffer
        self._rows.setdefault(key, []).append(rows if rows.base is None else rows.copy())
        self._bytes[key] = self._bytes.get(key, 0) + rows.nbytes
        self._count[key] = self._count.get(key, 0) + rows.shape[0]
        if self._count[key] >= ROW_BLOCK or self._bytes[key] >= ROW_BUFFER_BYTES:
            self._reduce(key)
        elif sum(self._bytes.values()) >= ROW_BUFFERS_TOTAL_BYTES:
            self.flush()

    def _reduce(self, key: tuple[str, str]) -> None:
        parts = self._rows.pop(key, [])
        self._bytes.pop(key, None)
        self._count.pop(key, None)
        if parts:
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            self._stats.add(key, gram(rows), rows.shape[0])

    def flush(self) -> None:
        for key in list(self._rows):
            self._reduce(key)
