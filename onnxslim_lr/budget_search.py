"""Plan to the user's accuracy budget: the fastest plan whose damage stays within the contract.

The user's contract is one of

* ``--max-accuracy-drop PTS``: top-1 accuracy may drop by at most PTS percentage points
  (needs labels);
* ``--min-agreement FRAC``: the rewritten model's top-1 must agree with the original's on at
  least FRAC of the samples (no labels needed);
* ``--max-output-error E``: the relative output error ``||y - y'|| / ||y||`` stays <= E
  (detectors, OCR, regression heads).

How a plan is found (the module docstring of :mod:`onnxslim_lr.allocate` says why):

1. **Sensitivity.** Each rung of each layer's ladder is applied *alone* and the model is run
   on the *choose* split of the calibration data. Its damage is measured with a smooth proxy
   (mean KL divergence of the softmax outputs for classifiers, squared relative output error
   otherwise): top-1 based figures move in steps of 1/N and are mostly 0 for one layer, which
   would make every rung look free. When running every rung would take longer than
   :data:`SENSITIVITY_TRIGGER_S` (VGG-19 at 224x224: about 200 rungs at several seconds
   each), only a few *anchor* rungs per layer are run (:data:`ANCHORS`) and the others are
   interpolated from the layer's own output error, which the ladder measured for every
   rung on the sample: to second order a perturbation ``e`` of one layer's output moves the
   KL of the logits by ``s_l * e^2``, so each layer's anchors fit ``log d = log a + b log e``
   (``b`` clipped to [1, 4], 2 with a single anchor) and the other rungs read their damage
   off that line. The anchors sit at a third and two thirds of the layer's range of
   ``log e``, so most rungs are interpolated rather than extrapolated. The sample count is
   cut (never below :data:`MIN_SENSITIVITY_SAMPLES`) so that the anchors take about
   :data:`SENSITIVITY_BUDGET_S`. Plans are still judged for real (steps 3 and 4), so an interpolation error
   costs speed, never the budget.
2. **Allocation.** :func:`onnxslim_lr.allocate.frontier` turns the ladders (saving, proxy
   damage) into a frontier of plans, each one layer more aggressive than the previous.
3. **Search.** The contract's own metric is not additive, so plans along the frontier are
   evaluated for real (binary search, the damage grows along the frontier) on the choose split,
   and the most saving plan within the budget is taken.
4. **Verification and back-off.** That plan is checked on the *verify* split, samples that
   played no part in choosing. While it fails, the frontier is walked back one step (the
   rung with the least saving per unit of damage is undone) and checked again. The predicted
   and verified damages both go to the report; nothing is ever reported on the samples it was
   chosen on.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import onnx

from .allocate import Option, Plan, frontier
from .errors import InputError
from .progress import SILENT, Progress

log = logging.getLogger(__name__)

#: samples each rung alone is priced on (the sensitivity proxy); plans are judged on the whole split
SENSITIVITY_SAMPLES = 256
#: wall-clock beyond which the sensitivity phase switches to anchors and interpolation (step
#: 1); the zoo models' full phases take 1-2 min and stay measured rung by rung
SENSITIVITY_TRIGGER_S = 300.0
#: wall-clock the anchors aim at once switched (their sample count is cut to fit)
SENSITIVITY_BUDGET_S = 90.0
#: rungs per layer run for real when the sensitivity is interpolated
ANCHORS = 2
#: fewest samples a rung alone is priced on, whatever the time
MIN_SENSITIVITY_SAMPLES = 8


@dataclass(frozen=True)
class Contract:
    """What the user allows the rewrite to cost. ``kind`` is accuracy, agreement or output_error."""

    kind: str
    limit: float

    @staticmethod
    def from_options(max_accuracy_drop: float | None = None, min_agreement: float | None = None,
                     max_output_error: float | None = None) -> Contract | None:
        given = [(k, v) for k, v in (("accuracy", max_accuracy_drop), ("agreement", min_agreement),
                                     ("output_error", max_output_error)) if v is not None]
        if not given:
            return None
        if len(given) > 1:
            raise InputError("give one accuracy budget: --max-accuracy-drop, --min-agreement or --max-output-error")
        kind, value = given[0]
        if not math.isfinite(value) or value < 0 or (kind == "agreement" and value > 1):
            raise InputError(f"invalid {kind} budget {value!r}")
        return Contract(kind, float(value))

    @property
    def max_damage(self) -> float:
        """The largest allowed damage, in the units :meth:`damage` returns."""
        return 1.0 - self.limit if self.kind == "agreement" else self.limit

    def damage(self, s: Scores) -> float:
        """The contract's damage of a scored model (NaN -> inf: a NaN never passes)."""
        if self.kind == "accuracy":
            if s.accuracy_drop_pts is None:
                raise InputError("--max-accuracy-drop needs labels (an --eval file with y, or labels in --calib)")
            v = s.accuracy_drop_pts
        elif self.kind == "agreement":
            v = 1.0 - s.agreement if s.agreement is not None else s.rel_error
        else:
            v = s.rel_error
        return float("inf") if v is None or not math.isfinite(v) else float(v)

    def within(self, damage: float) -> bool:
        """``damage`` meets the contract (with a rounding tolerance of 1e-9 of the limit)."""
        return damage <= self.max_damage + 1e-9 * max(1.0, abs(self.max_damage))

    def describe(self, damage: float) -> str:
        if self.kind == "accuracy":
            return f"accuracy drop {damage:.2f} pts (limit {self.limit:g})"
        if self.kind == "agreement":
            return f"top-1 agreement {100 * (1 - damage):.2f}% (limit {100 * self.limit:g}%)"
        return f"output error {damage:.3g} (limit {self.limit:g})"


@dataclass
class Scores:
    """How far a model's outputs are from the original's on one split."""

    samples: int
    rel_error: float
    kl: float | None = None
    agreement: float | None = None
    accuracy: float | None = None
    accuracy_drop_pts: float | None = None

    @property
    def proxy(self) -> float:
        """The smooth damage used for allocation (KL for classifiers, squared rel. error otherwise)."""
        v = self.kl if self.kl is not None else self.rel_error ** 2
        return float("inf") if not math.isfinite(v) else float(v)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class SharedModel:
    """A model to score whose large weights travel as buffers (``initializers``), not in the proto.

    Why: scoring a candidate plan of VGG-19 spent 3 s exporting and 7 s serializing and
    loading its 575 MB of weights, of which only a rewritten layer's differ. The manager
    splices plans into a copy of the model whose large initializers are external shells
    (:func:`onnxslim_lr.calibration.external_weights`); the session reads the buffers in
    place as graph inputs (:class:`onnxslim_lr.timing.FedSession`). The reference outputs
    are computed the same way, so candidate and reference run the same kernels.
    """

    model: onnx.ModelProto
    initializers: Mapping[str, np.ndarray]


def run_batches(model: onnx.ModelProto | SharedModel, batches: Sequence[Mapping[str, np.ndarray]],
                threads: int | None) -> tuple[list[np.ndarray], tuple[float, float]]:
    """Every output of ``model`` over ``batches``, concatenated along the batch axis, and the
    seconds spent loading the model and running it. Each batch is fed what the model takes
    (a batch may carry more tensors than a suffix model reads)."""
    from .timing import make_session

    t0 = time.perf_counter()
    if isinstance(model, SharedModel):
        # the shells still in the model (a rewrite drops the weights it replaces)
        present = {t.name for t in model.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        # weights as graph inputs read in place: no copy, no pre-packing (VGG-19: 2-3.5 s less
        # per scored model than shared initializers, the same run time on 8 images)
        sess = make_session(model.model, threads=threads,
                            initializers={k: v for k, v in model.initializers.items() if k in present})
    else:
        sess = make_session(model, threads=threads)
    t1 = time.perf_counter()
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    outs: list[list[np.ndarray]] = [[] for _ in names]
    for b in batches:
        for i, v in enumerate(sess.run(names, {k: x for k, x in b.items() if k in wanted})):
            outs[i].append(np.asarray(v))
    return ([np.concatenate(o) if o and o[0].ndim else np.stack(o) for o in outs],
            (t1 - t0, time.perf_counter() - t1))


class Split:
    """A fixed set of batches with the original model's outputs (and optional labels) cached."""

    def __init__(self, original: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]],
                 labels: np.ndarray | None = None, *, threads: int | None = None) -> None:
        self.batches = [dict(b) for b in batches]
        self.labels = labels
        self.threads = threads
        #: seconds the last scoring spent loading the model and running it (the sensitivity
        #: phase sizes its sample count from them)
        self.last_costs = (0.0, 0.0)
        self.reference = self._run(original)
        self.samples = int(self.reference[0].shape[0]) if self.reference else 0
        self._is_classifier = bool(self.reference) and self.reference[0].ndim == 2 and self.reference[0].shape[1] > 1
        self.base_accuracy = self._accuracy(self.reference[0]) if labels is not None and self._is_classifier else None

    def head(self, samples: int) -> "Split":
        """The leading batches holding at least ``samples`` samples, sharing the cached reference.

        Why: pricing every rung alone (the sensitivity phase) ran each candidate model on the
        whole choose split, most of a budget plan's time (345 of 809 s on the bundled VGG).
        A rung's damage alone is a proxy that only orders the rungs; the plans built from
        it are still judged on the whole split. Returns ``self`` when the split is no
        larger, or when an output has no per-sample leading axis to slice.
        """
        keep: list[dict[str, np.ndarray]] = []
        n = 0
        for b in self.batches:
            if keep and n >= samples:
                break
            keep.append(b)
            n += int(next(iter(b.values())).shape[0]) if b else 0
        if len(keep) == len(self.batches) or not all(r.ndim and r.shape[0] == self.samples for r in self.reference):
            return self
        out = object.__new__(Split)
        out.batches, out.labels, out.threads = keep, self.labels, self.threads
        out.last_costs = (0.0, 0.0)
        out.reference = [r[:n] for r in self.reference]
        out.samples = n
        out._is_classifier = self._is_classifier
        out.base_accuracy = out._accuracy(out.reference[0]) if self.base_accuracy is not None else None
        return out

    def with_feeds(self, batches: Sequence[Mapping[str, np.ndarray]]) -> "Split":
        """The same samples fed differently (one dict per batch, the same sample counts): a
        suffix of the model run from the tensors at a cut (:class:`_Suffixes`) is scored
        against the same reference outputs and labels."""
        out = object.__new__(Split)
        out.__dict__.update(self.__dict__)
        out.batches = [dict(b) for b in batches]
        out.last_costs = (0.0, 0.0)
        return out

    def _run(self, model: onnx.ModelProto | SharedModel) -> list[np.ndarray]:
        outs, self.last_costs = run_batches(model, self.batches, self.threads)
        return outs

    def _accuracy(self, logits: np.ndarray) -> float:
        assert self.labels is not None
        return float(np.mean(np.argmax(logits.reshape(logits.shape[0], -1), axis=1) == self.labels[: logits.shape[0]]))

    def score(self, model: onnx.ModelProto | SharedModel) -> Scores:
        got = self._run(model)
        num = sum(float(np.linalg.norm((r.astype(np.float64) - g.astype(np.float64)).ravel())) ** 2
                  for r, g in zip(self.reference, got))
        den = sum(float(np.linalg.norm(r.astype(np.float64).ravel())) ** 2 for r in self.reference)
        s = Scores(samples=self.samples, rel_error=math.sqrt(num / den) if den > 0 else math.sqrt(num))
        if self._is_classifier:
            ref, new = self.reference[0].astype(np.float64), got[0].astype(np.float64)
            p, q = _softmax(ref), _softmax(new)
            s.kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
            s.agreement = float(np.mean(np.argmax(ref, axis=1) == np.argmax(new, axis=1)))
            if self.base_accuracy is not None:
                s.accuracy = self._accuracy(new)
                # from the counts of correct samples: 100 * (0.913 - 0.908) is 0.5000000000000004,
                # which broke a 0.5-point budget on a plan that lost exactly 5 of 1000 samples
                n = new.shape[0]
                s.accuracy_drop_pts = 100.0 * (round(self.base_accuracy * n) - round(s.accuracy * n)) / n
        if not all(np.isfinite(g).all() for g in got if np.issubdtype(g.dtype, np.floating)):
            s.rel_error = float("inf")
            s.kl = float("inf") if s.kl is not None else None
        return s


@dataclass(frozen=True)
class Rung:
    """One candidate of one layer: how much it saves, and how to get it."""

    layer: str
    key: Hashable
    saving: float
    payload: Any = field(default=None, compare=False, hash=False)
    #: the layer's relative output error with this rung on the sample (None: not measured);
    #: what the damages of rungs not run are interpolated from (module docstring, step 1)
    local_error: float | None = field(default=None, compare=False)


@dataclass
class FrontierPoint:
    """A plan of the frontier with what was predicted and measured about it."""

    index: int
    saving: float
    predicted: float
    choose_damage: float | None = None
    verify_damage: float | None = None
    keys: dict[str, Hashable] = field(default_factory=dict)


@dataclass
class SearchResult:
    plan: Plan
    index: int
    points: list[FrontierPoint]
    choose_damage: float
    verify_damage: float
    ok: bool
    sensitivity: dict[str, list[tuple[Hashable, float, float]]] = field(default_factory=dict)
    reason: str = ""
    choose_samples: int = 0
    verify_samples: int = 0
    #: how each rung's damage alone was obtained (measured, or anchors and interpolation)
    sensitivity_how: str = ""


def search(
    ladders: Mapping[str, Sequence[Rung]],
    apply: Callable[[Mapping[str, Any]], onnx.ModelProto],
    contract: Contract,
    choose: Split,
    verify: Split,
    *,
    progress: Progress = SILENT,
    final: Callable[[Mapping[str, Any]], onnx.ModelProto] | None = None,
    judge_original: bool = False,
    sensitivity_samples: int = SENSITIVITY_SAMPLES,
    budget_s: float = SENSITIVITY_BUDGET_S,
    trigger_s: float = SENSITIVITY_TRIGGER_S,
    damages: tuple[Mapping[tuple[str, Hashable], float], str] | None = None,
) -> SearchResult:
    """The most saving plan within ``contract`` on ``choose``, verified (and backed off) on ``verify``.

    ``apply`` builds the model for a choice ``{layer: payload}`` (layers absent stay original);
    it prices each rung alone. ``final`` (default: ``apply``) builds the model a whole plan
    is judged as -- reconstructed, and quantized with ``--quantize int8`` -- in the search
    and the verification, so the budget covers what is shipped. With ``judge_original`` the
    original itself (plan 0) is judged too: int8 alone may already break the budget. Each
    rung alone is priced on the first ``sensitivity_samples`` samples of ``choose``
    (:meth:`Split.head`); past ``trigger_s`` only anchors are, on fewer samples, in about
    ``budget_s`` (module docstring). Plans are judged on all of it.

    ``damages``: every rung's damage alone and how it was obtained, as :func:`rung_damages`
    returns them, when the caller already has them (``--quantize int8`` searches the float
    and the combined ladders, whose rungs are the same candidates, on one sensitivity phase).
    """
    judged = final or apply
    original_is_free = not judge_original
    options: dict[str, list[Option]] = {}
    sensitivity: dict[str, list[tuple[Hashable, float, float]]] = {}
    found, how = damages if damages is not None else rung_damages(ladders, apply, choose, sensitivity_samples,
                                                                   budget_s, trigger_s, progress)
    for layer, rungs in ladders.items():
        for r in rungs:
            d = found[(layer, r.key)]
            options.setdefault(layer, []).append(Option(layer, r.key, saving=r.saving, damage=d, payload=r.payload))
            sensitivity.setdefault(layer, []).append((r.key, r.saving, d))
    plans = frontier(options)
    points = [FrontierPoint(i, p.saving, p.damage, keys=p.keys()) for i, p in enumerate(plans)]
    limit = contract.max_damage
    cache: dict[int, float] = {}

    def choose_damage(i: int) -> float:
        if i not in cache:
            cache[i] = 0.0 if (i == 0 and original_is_free) else contract.damage(
                choose.score(judged({k: o.payload for k, o in plans[i].choice.items()})))
            points[i].choose_damage = cache[i]
            progress.tick(f"plan {i}/{len(plans) - 1}: {contract.describe(cache[i])}")
        return cache[i]

    progress.phase("search", f"{len(plans)} plan(s) on the frontier; {contract.describe(limit)} on {choose.samples} samples")
    lo, hi = 0, len(plans) - 1  # invariant: plan lo is within the limit (or lo == 0)
    if contract.within(choose_damage(hi)):
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if contract.within(choose_damage(mid)):
            lo = mid
        else:
            hi = mid
    progress.phase("verify", f"plan {lo} on {verify.samples} held-out samples")
    idx = lo
    while True:
        vd = 0.0 if (idx == 0 and original_is_free) else contract.damage(
            verify.score(judged({k: o.payload for k, o in plans[idx].choice.items()})))
        points[idx].verify_damage = vd
        if contract.within(vd) or idx == 0:
            break
        progress.decision("budget", f"plan {idx} fails on held-out data ({contract.describe(vd)}): backing off")
        idx -= 1
    ok = (idx > 0 or bool(plans[0].choice)) and contract.within(points[idx].verify_damage or 0.0)
    reason = "" if ok else "no rewrite fits the budget: every candidate plan breaks it on the choose or held-out data"
    return SearchResult(plan=plans[idx], index=idx, points=points, choose_damage=choose_damage(idx),
                        verify_damage=points[idx].verify_damage or 0.0, ok=ok, sensitivity=sensitivity, reason=reason,
                        choose_samples=choose.samples, verify_samples=verify.samples, sensitivity_how=how)


def _anchors(rungs: Sequence[Rung], k: int) -> list[Rung]:
    """The ``k`` rungs nearest a third and two thirds of the layer's range of ``log e``.

    All rungs when some lack a local error (nothing to interpolate from) or there are at
    most ``k + 1`` of them (interpolating would save at most one run).
    """
    if len(rungs) <= k + 1 or any(r.local_error is None or not r.local_error > 0 for r in rungs):
        return list(rungs)
    logs = np.log([float(r.local_error) for r in rungs])  # type: ignore[arg-type]
    lo, hi = float(logs.min()), float(logs.max())
    picked: list[int] = []
    for q in ((i + 1) / (k + 1) for i in range(k)):
        order = np.argsort(np.abs(logs - (lo + q * (hi - lo))), kind="stable")
        picked.append(next(int(i) for i in order if int(i) not in picked))
    return [rungs[i] for i in sorted(picked)]


def interpolate(anchors: Sequence[tuple[float, float]], e: float) -> float:
    """Damage at local error ``e`` from a layer's ``(local error, damage)`` anchors (module docstring).

    ``log d = log a + b log e`` through the anchors (least squares), ``b`` clipped to
    [1, 4]; one anchor (or anchors at one error) fixes ``b = 2``, the second-order slope.
    """
    pts = [(math.log(max(x, 1e-12)), math.log(max(d, 1e-15))) for x, d in anchors]
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    b = 2.0
    if len(pts) > 1 and float(np.ptp(xs)) > 1e-9:
        b = float(np.clip(np.polyfit(xs, ys, 1)[0], 1.0, 4.0))
    log_a = float(np.mean(ys - b * xs))
    return float(math.exp(log_a + b * math.log(max(e, 1e-12))))


#: most bytes of cut tensors a rung alone is scored from (above: the whole model runs)
SUFFIX_BYTES = 1 << 29


class _Suffixes:
    """Scores a rung alone by running only the part of the model from its layer on.

    Why: every rung alone used to run the whole network on the sample, though everything
    before its layer computes the same tensors for every rung of that layer. The tensors
    live at the cut before the layer (:func:`~onnxslim_lr.calibration.cut_before`; on a
    chain, the layer's input; on a ResNet, the skip branch too) are computed once per layer
    from the unmodified model, and each rung's model is run from them
    (:func:`~onnxslim_lr.calibration.suffix_model`): the same numbers, without the prefix
    (on the bundled VGG, about half the network on average). A rung whose model computes
    anything before the cut differently (its fingerprints differ: a channel permutation
    folded upstream), a graph that cannot be cut, or a cut larger than
    :data:`SUFFIX_BYTES` runs whole, as before.
    """

    def __init__(self, split: "Split", base: onnx.ModelProto | SharedModel) -> None:
        self.split, self.base = split, base
        self.layer: str | None = None
        self.view: Split | None = None
        self.cut: list[str] = []
        self.prints: frozenset[bytes] = frozenset()
        #: rungs scored from a cut, and whole (for tests and the log)
        self.suffix_runs = 0
        self.full_runs = 0

    def score(self, layer: str, model: onnx.ModelProto | SharedModel) -> Scores:
        from .calibration import node_prints, suffix_model

        if layer != self.layer:
            self._prepare(layer)
        if self.view is not None:
            proto = model.model if isinstance(model, SharedModel) else model
            if node_prints(proto, self.cut) == self.prints:
                sm = suffix_model(proto, self.cut, self.view.batches[0])
                if sm is not None:
                    self.suffix_runs += 1
                    got = self.view.score(SharedModel(sm, model.initializers) if isinstance(model, SharedModel)
                                          else sm)
                    self.split.last_costs = self.view.last_costs
                    return got
        self.full_runs += 1
        return self.split.score(model)

    def _prepare(self, layer: str) -> None:
        from .calibration import cut_before, node_prints, prefix_model

        self.layer, self.view = layer, None
        base = self.base
        proto = base.model if isinstance(base, SharedModel) else base
        cut = cut_before(proto, layer)
        if not cut:
            return
        feeds = self.split.batches
        computed = [c for c in cut if not all(c in b for b in feeds)]
        per_batch = [{c: b[c] for c in cut if c not in computed} for b in feeds]
        if computed:
            pm = prefix_model(proto, computed)
            sizes = [int(next(iter(b.values())).shape[0]) for b in feeds]
            vals, _ = run_batches(SharedModel(pm, base.initializers) if isinstance(base, SharedModel) else pm,
                                  feeds, self.split.threads)
            names = [o.name for o in pm.graph.output]
            if any(v.ndim == 0 or v.shape[0] != sum(sizes) for v in vals):
                return  # a cut tensor without a per-sample leading axis: cannot be split by batch
            start = 0
            for d, n in zip(per_batch, sizes):
                d.update({k: v[start:start + n] for k, v in zip(names, vals)})
                start += n
        if sum(v.nbytes for d in per_batch for v in d.values()) > SUFFIX_BYTES:
            return
        self.view, self.cut, self.prints = self.split.with_feeds(per_batch), cut, node_prints(proto, cut)


def rung_damages(ladders: Mapping[str, Sequence[Rung]], apply: Callable[[Mapping[str, Any]], onnx.ModelProto],
                 choose: Split, samples: int = SENSITIVITY_SAMPLES, budget_s: float = SENSITIVITY_BUDGET_S,
                 trigger_s: float = SENSITIVITY_TRIGGER_S, progress: Progress = SILENT
                 ) -> tuple[dict[tuple[str, Hashable], float], str]:
    """Every rung's damage alone (proxy), measured or interpolated (module docstring, step 1).

    Returns the damages by ``(layer, key)`` and a sentence for the report saying how.
    """
    flat = [(layer, r) for layer, rungs in ladders.items() for r in rungs]
    out: dict[tuple[str, Hashable], float] = {}
    if not flat:
        return out, "no rung to price"
    alone = choose.head(samples)
    progress.phase("sensitivity", f"{len(flat)} candidate(s) in {len(ladders)} layer(s), each alone on "
                   f"{alone.samples} samples")
    base = apply({})
    suffixes = _Suffixes(alone, base)
    t0 = time.perf_counter()
    layer0, r0 = flat[0]
    out[(layer0, r0.key)] = suffixes.score(layer0, apply({layer0: r0.payload})).proxy
    per_run = time.perf_counter() - t0
    running = alone.last_costs[1]  # the part of a run that grows with the samples
    runs: list[tuple[str, Rung]] = flat[1:]
    how = f"each of {len(flat)} rung(s) alone on {alone.samples} samples"
    if per_run * len(flat) > trigger_s:
        chosen = {(layer, r.key) for layer, rungs in ladders.items() for r in _anchors(rungs, ANCHORS)}
        if len(chosen) < len(flat):
            # the anchors must fit the time too: fewer samples; building and loading the
            # model is paid whatever the count, the run grows with it
            fixed = max(per_run - running, 0.0)
            per_sample = running / max(alone.samples, 1)
            room = budget_s / len(chosen) - fixed
            want = int(room / per_sample) if per_sample > 0 else alone.samples
            small = choose.head(max(MIN_SENSITIVITY_SAMPLES, min(alone.samples, want)))
            if small.samples < alone.samples:
                alone = small
                suffixes = _Suffixes(alone, base)
                out.clear()
                runs = flat
            runs = [(layer, r) for layer, r in runs if (layer, r.key) in chosen]
            how = (f"{len(chosen)} anchor rung(s) of {len(flat)} alone on {alone.samples} samples, the others "
                   f"interpolated from each layer's output error (one run took {per_run:.1f} s)")
            progress.decision("sensitivity", how)
    for layer, r in progress.steps(runs, len(runs), "sensitivity"):
        d = suffixes.score(layer, apply({layer: r.payload})).proxy
        out[(layer, r.key)] = d
        progress.tick(f"{layer} {r.key}: proxy {d:.3g}")
    if suffixes.suffix_runs:
        how += (f"; {suffixes.suffix_runs} of {suffixes.suffix_runs + suffixes.full_runs} run from the tensors "
                "before their layer")
    for layer, rungs in ladders.items():
        measured = [(float(r.local_error), out[(layer, r.key)]) for r in rungs
                    if (layer, r.key) in out and r.local_error is not None and math.isfinite(out[(layer, r.key)])]
        for r in rungs:
            if (layer, r.key) not in out:
                out[(layer, r.key)] = interpolate(measured, float(r.local_error)) if measured else float("inf")
    return out, how
