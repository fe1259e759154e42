"""Calibration-only reconstruction of the chosen rewrites (Zhang et al., TPAMI 2016; no training).

After the planner has chosen which layers to rewrite, and at which ranks, each chosen
rewrite's free linear stages are refit so that it reproduces the *original* layer's response
(:meth:`onnxslim_lr.passes.base.Pass.refit`; the closed forms are in
:mod:`onnxslim_lr.decompose.reconstruct`). The ranks, hence the MACs, do not change.

Modes (``--reconstruct``):

* ``sequential`` (the default with calibration data): the chosen layers are walked in
  topological order. For layer ``l`` the calibration batches are streamed through the
  original model (input patches ``x``) and through the model with the rewrites ``< l``
  already refit and spliced (``x^``), and only moments are accumulated: ``E[x^ x^^T]``,
  the target's ``W E[x x^^T]`` and ``W E[x x^T] W^T`` and the means
  (:class:`~.decompose.reconstruct.CrossMoments` with ``target=W``; at most
  :data:`MAX_ROWS_PER_BATCH` random patch rows per batch, the same positions in both
  models). The refit is the asymmetric fit ``min ||W x + b - (M x^ + b')||``: each layer
  corrects the drift of the layers before it instead of compounding it. The intercept
  ``b'`` is always fitted (bias correction: the mean response over the fit data is exact).
* ``independent``: the same fit with ``x^ = x`` (the data metric plus bias correction).
* ``none``: the candidates as the planner built them.

Overfitting control: every calibration batch is split by sample (even samples fit, odd
samples held out; whole batches alternate for batch-1 data). The refit is kept only when its
error on the held-out rows (both candidates' responses streamed,
:class:`~.decompose.reconstruct.HeldOutErrors`) is below the un-refit candidate's;
otherwise the planner's candidate stays. Each layer's held-out error before and after is
reported (:class:`LayerRefit`), with the total time.

Cost: the original and the partially rewritten model are each walked once through the
calibration batches (:class:`_Walk`): per split, the tensors the rest of the graph still
needs are kept at a cut that moves from layer to layer, and only the nodes between cuts
run. Memory is the moments, ``n^2 + F n + F^2`` floats per layer (``n = C kh kw``), plus
those live activations up to :data:`LIVE_BYTES` per model and split; beyond that (or with
subgraphs) each layer re-runs a prefix model (:func:`~.calibration.prefix_model`) one batch
at a time.

In the accuracy-budget path every plan the search judges is reconstructed (``cache``: a
sequential refit depends only on the layer's own choice and those before it, so plans that
share a prefix share its refits), and the refits are fitted on the choose half when the plan
is verified on calibration samples (``manager._fit_batches``).

Not done by default: the ReLU-aware refinement (Zhang et al. sec. 3.2,
:func:`~.decompose.reconstruct.relu_refine`). On the bundled VGG (tools/proto_reconstruct.py)
it showed no measurable accuracy gain over the linear sequential fit at about 3x its cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Hashable, Mapping, Protocol, Sequence

import numpy as np
import onnx

from .calibration import fingerprint, prefix_model, prunable, site_rows, submodel
from .decompose import reconstruct as rc
from .errors import InputError
from .passes import get as get_pass
from .passes.base import Candidate
from .progress import SILENT, Progress
from .sites import ConvSite, FCSite
from .timing import make_session

__all__ = ["MODES", "MAX_ROWS_PER_BATCH", "LayerRefit", "Reconstruction", "count_samples", "reconstruct",
           "split_samples"]

log = logging.getLogger(__name__)

#: the values of ``--reconstruct``
MODES = ("none", "independent", "sequential")

#: patch rows sampled per calibration batch and layer (the same positions in both models)
MAX_ROWS_PER_BATCH = 4096

Batch = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class LayerRefit:
    """One chosen layer's reconstruction: held-out relative errors of the response, and the choice."""

    node: str
    method: str
    refit: bool  # the refit was kept
    error_before: float  # held-out error of the planner's candidate (nan: no refit form)
    error_after: float  # held-out error of the refit

    def describe(self) -> str:
        if not np.isfinite(self.error_before):
            return "reconstruction: no refit form for this method"
        verdict = "refit kept" if self.refit else "refit worse on held-out data: candidate kept"
        return f"reconstruction: held-out error {self.error_before:.4f} -> {self.error_after:.4f} ({verdict})"


@dataclass
class Reconstruction:
    """The chosen rewrites after reconstruction, with what happened per layer."""

    mode: str
    chosen: list[tuple[str, Candidate]]
    layers: list[LayerRefit] = field(default_factory=list)
    seconds: float = 0.0
    fit_samples: int = 0
    held_samples: int = 0

    def note(self) -> str:
        kept = [r for r in self.layers if r.refit]
        tried = [r for r in self.layers if np.isfinite(r.error_before)]
        text = (f"reconstruction ({self.mode}, bias correction): {len(kept)} of {len(self.layers)} rewrite(s) refit "
                f"on {self.fit_samples} calibration samples, checked on {self.held_samples} held-out")
        if tried:
            before = float(np.mean([r.error_before for r in tried]))
            after = float(np.mean([min(r.error_before, r.error_after) for r in tried]))
            text += f"; mean held-out layer error {before:.4f} -> {after:.4f}"
        return text + f"; {self.seconds:.1f} s"


def split_samples(batches: Sequence[Batch]) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Disjoint fit / held-out halves of the calibration batches (even / odd samples)."""
    fit: list[dict[str, np.ndarray]] = []
    held: list[dict[str, np.ndarray]] = []
    for b in batches:
        n = int(next(iter(b.values())).shape[0])
        if n >= 2:
            fit.append({k: v[0::2] for k, v in b.items()})
            held.append({k: v[1::2] for k, v in b.items()})
        else:
            (fit if len(fit) <= len(held) else held).append(dict(b))
    return fit, held


def count_samples(batches: Sequence[Batch]) -> int:
    """Samples in a list of feed batches (the leading dimension of each batch's first input)."""
    return sum(int(next(iter(b.values())).shape[0]) for b in batches)


def _target(site: ConvSite | FCSite) -> tuple[np.ndarray, np.ndarray | None]:
    """The original layer as ``F x n`` on its patch rows, and its bias."""
    if isinstance(site, FCSite):
        return site.weight.T.astype(np.float64), site.bias
    return site.weight.reshape(site.weight.shape[0], -1).astype(np.float64), site.bias


#: live activations a walk keeps per model and split (beyond it, each layer re-runs a prefix): 512 MiB
LIVE_BYTES = 1 << 29


def _closure(nodes: Sequence[onnx.NodeProto], producer: Mapping[str, int], tensor: str, stop: set[str]) -> list[int]:
    """Indices (in graph order) of the nodes ``tensor`` depends on, not looking past ``stop``."""
    seen: set[int] = set()
    todo = [tensor]
    while todo:
        t = todo.pop()
        if t in stop or t not in producer:
            continue
        i = producer[t]
        if i in seen:
            continue
        seen.add(i)
        todo.extend(x for x in nodes[i].input if x)
    return sorted(seen)


class _Walk:
    """One model's activations at a cut that moves forward layer by layer, on fixed batches.

    Why: onnxruntime runs every node of a graph whatever is fetched, and even a prefix model
    (:func:`~.calibration.prefix_model`) re-runs everything before the layer, so reading each
    of ``L`` layers' inputs cost ``O(L)`` network passes (VGG-19, 16 layers at 224x224: most
    of a 15-minute reconstruction). A walk keeps, per batch, the tensors the rest of the
    graph still needs (the *live* set) and runs only the nodes between the last cut and the
    next layer's input: one network pass in all.

    The model may change between reads (the partially rewritten network gains one rewrite
    per layer, always after the cut). Every node run is fingerprinted (its proto and its
    constant inputs); when a later model computes anything before the cut differently (a
    channel permutation folded upstream), the walk starts over from the inputs. When the
    live set outgrows :data:`LIVE_BYTES`, or the graph has subgraphs, each read runs a
    prefix model instead (memory then stays that of one batch).
    """

    def __init__(self, batches: Sequence[Batch], threads: int | None, max_bytes: int = LIVE_BYTES) -> None:
        self.feeds = [dict(b) for b in batches]
        self.threads = threads
        self.max_bytes = max_bytes
        self.live: list[dict[str, np.ndarray]] | None = None
        self.prints: dict[tuple[str, ...], bytes] = {}
        self.walking = True
        self.passes = 0  # nodes run, in units of the graph's node count (a cost report for tests)

    def _prefix(self, model: onnx.ModelProto, tensor: str) -> list[np.ndarray]:
        sess = make_session(prefix_model(model, [tensor]), threads=self.threads, optimize=False)
        inputs = {i.name for i in sess.get_inputs()}
        self.passes += 1
        return [sess.run([tensor], {k: v for k, v in f.items() if k in inputs})[0] for f in self.feeds]

    def read(self, model: onnx.ModelProto, tensor: str) -> list[np.ndarray]:
        """``tensor`` of ``model`` for every batch, advancing the cut to it."""
        g = model.graph
        if self.walking and not prunable(model):
            self.walking = False
        if not self.walking:
            return self._prefix(model, tensor)
        nodes = list(g.node)
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        inits = {t.name: t for t in g.initializer}
        graph_inputs = {i.name for i in g.input}
        executed = _closure(nodes, producer, tensor, set(inits) | graph_inputs)
        if self.live is not None:
            # anything before the cut computed differently: start over from the inputs
            for i in executed:
                key = tuple(nodes[i].output)
                if key in self.prints and self.prints[key] != fingerprint(nodes[i], inits):
                    self.live, self.prints = None, {}
                    break
        live = self.live if self.live is not None else [dict(f) for f in self.feeds]
        avail = set(live[0]) if live else set()
        run = _closure(nodes, producer, tensor, avail | set(inits) | graph_inputs)
        done = set(executed)
        # what the nodes not yet run read: the graph's outputs are not kept for their own sake
        # (the partially rewritten models end in every chosen layer's output, which kept
        # VGG-19's 411 MB conv1_1 output live and turned the walk off for the whole run)
        later = {x for k, n in enumerate(nodes) if k not in done for x in n.input if x}
        produced = {o for i in run for o in nodes[i].output if o}
        keep = ((avail | produced) & later) | {tensor}
        fetch = sorted((produced & keep) | ({tensor} - avail))
        if fetch:
            seg = _segment(model, [nodes[i] for i in run], avail, fetch, live[0] if live else {})
            sess = make_session(seg, threads=self.threads, optimize=False)
            names = [i.name for i in sess.get_inputs()]
            outs = [o.name for o in sess.get_outputs()]
            for b in live:
                got = sess.run(outs, {k: b[k] for k in names})
                b.update(zip(outs, got))
            self.passes += len(run) / max(len(nodes), 1)
        for b in live:
            for k in [k for k in b if k not in keep]:
                del b[k]
        for i in run:
            self.prints[tuple(nodes[i].output)] = fingerprint(nodes[i], inits)
        values = [b[tensor] for b in live]
        if sum(v.nbytes for b in live for v in b.values()) > self.max_bytes:
            self.walking, self.live, self.prints = False, None, {}
        else:
            self.live = live
        return values


def _segment(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], avail: set[str], fetch: Sequence[str],
             sample: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The nodes between two cuts as a model: the live tensors they read are its inputs."""
    inits = {t.name for t in model.graph.initializer}
    reads = sorted(({x for n in nodes for x in n.input if x} & avail) - inits)
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(sample[name].dtype),
                                                 [None] * sample[name].ndim) for name in reads]
    return submodel(model, nodes, inputs, fetch)


class _Sink(Protocol):
    def update(self, x: np.ndarray, xhat: np.ndarray | None = None) -> None: ...


def _stream(site: ConvSite | FCSite, xs: Sequence[np.ndarray], xhs: Sequence[np.ndarray] | None,
            rng: np.random.Generator, max_rows: int, sink: _Sink) -> None:
    """Feed ``sink`` the same sampled patch rows of the layer's input in both models, batch by batch."""
    if not xs:
        raise InputError("reconstruction needs calibration data")
    for b, x in enumerate(xs):
        if xhs is None:
            (rows,) = site_rows(site, [x], max_rows, rng)
            sink.update(rows, None)
        else:
            rows, xh_rows = site_rows(site, [x, xhs[b]], max_rows, rng)
            sink.update(rows, xh_rows)


def reconstruct(
    original: onnx.ModelProto,
    chosen: Sequence[tuple[str, Candidate]],
    apply: Callable[[Sequence[tuple[str, Candidate]]], onnx.ModelProto],
    batches: Sequence[Batch],
    *,
    mode: str = "sequential",
    threads: int | None = None,
    seed: int = 0,
    max_rows: int = MAX_ROWS_PER_BATCH,
    ridge: float = rc.DEFAULT_RIDGE,
    progress: Progress = SILENT,
    cache: dict[Hashable, tuple[Candidate, LayerRefit]] | None = None,
) -> Reconstruction:
    """Refit ``chosen`` (``(node name, candidate)``; walked in the model's topological order) from calibration data.

    ``original``: the model the candidates were planned on (its node names are the keys of
    ``chosen``); ``apply``: builds that model with a list of rewrites spliced in (the
    manager's splice), used for the partially rewritten models of ``sequential``.

    ``cache`` (shared across calls on the same ``original`` and ``batches``) keeps each
    layer's refit under the planner's choices for that layer and every chosen layer before
    it, which is all a sequential refit depends on: the accuracy-budget search reconstructs
    many plans that share prefixes and pays only for the layers after the first difference.
    Row sampling is seeded per layer, so a cached and a recomputed refit are the same.
    """
    if mode not in MODES:
        raise InputError(f"--reconstruct {mode!r}: choose one of {', '.join(MODES)}")
    # topological order (the model's node order): a plan's choice may come in any order
    order = {n.name: i for i, n in enumerate(original.graph.node)}
    chosen = sorted(chosen, key=lambda nc: order.get(nc[0], len(order)))
    out = Reconstruction(mode=mode, chosen=list(chosen))
    if mode == "none" or not chosen:
        return out
    start = time.perf_counter()
    fit_b, held_b = split_samples(batches)
    out.fit_samples, out.held_samples = count_samples(fit_b), count_samples(held_b)
    if not fit_b or not held_b:
        raise InputError("reconstruction needs at least 2 calibration samples (fit and held-out)")
    tensor_of = {n.name: n.input[0] for n in original.graph.node}
    done: list[tuple[str, Candidate]] = []
    # (original, partially rewritten) activations at the moving cut, per split
    walks = {"fit": (_Walk(fit_b, threads), _Walk(fit_b, threads)),
             "held": (_Walk(held_b, threads), _Walk(held_b, threads))}
    prefix: tuple[Hashable, ...] = (mode, max_rows, ridge, seed)
    progress.phase("reconstruct", f"{mode}, {len(chosen)} rewrite(s), {out.fit_samples} fit samples")
    for name, cand in progress.steps(list(chosen), len(chosen), "reconstruct layer"):
        prefix = prefix + ((name, cand.method, cand.describe_params()),)
        if cache is not None and prefix in cache:
            got, rec = cache[prefix]
            out.layers.append(rec)
            done.append((name, got))
            continue
        rng = np.random.default_rng([seed, order.get(name, len(order))])
        p = get_pass(cand.method)
        site = cand.site
        effective = p.effective(site, cand) if site is not None else None
        if effective is None:
            out.layers.append(LayerRefit(name, cand.method, False, float("nan"), float("nan")))
            done.append((name, cand))
            if cache is not None:
                cache[prefix] = (cand, out.layers[-1])
            continue
        tensor = tensor_of[name]
        # sequential: the input as the network rewritten (and refit) so far produces it
        current = apply(done) if mode == "sequential" and done else None

        def inputs(split: str) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
            """The layer's input in the original and (sequential) the rewritten model, per batch."""
            orig_walk, cur_walk = walks[split]
            return orig_walk.read(original, tensor), (cur_walk.read(current, tensor) if current is not None else None)

        w2, b = _target(site)
        fit_m = rc.CrossMoments(w2.shape[1], target=w2)
        _stream(site, *inputs("fit"), rng, max_rows, fit_m)
        new = p.refit(site, cand, fit_m, intercept=True)
        if new is None:
            out.layers.append(LayerRefit(name, cand.method, False, float("nan"), float("nan")))
            done.append((name, cand))
            if cache is not None:
                cache[prefix] = (cand, out.layers[-1])
            continue
        # held-out errors of both candidates, from their responses on the held-out rows
        held = rc.HeldOutErrors(w2, b, [effective, p.effective(site, new)])
        _stream(site, *inputs("held"), rng, max_rows, held)
        errs = held.errors()
        keep = errs[1] < errs[0]  # ties keep the planner's candidate
        rec = LayerRefit(name, cand.method, keep, errs[0], errs[1])
        out.layers.append(rec)
        note = "; ".join(t for t in (cand.note, rec.describe()) if t)
        done.append((name, replace(new if keep else cand, note=note)))
        if cache is not None:
            cache[prefix] = (done[-1][1], rec)
        progress.tick(f"{name}: {rec.describe()}")
        log.debug("%s: %s", name, rec.describe())
    out.chosen = done
    out.seconds = time.perf_counter() - start
    return out
