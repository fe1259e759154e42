"""What a pass is, what it matches, and what it describes.

A pass is a small class, in the style of onnxscript's rewrite rules:

* ``match(node, ctx)`` looks at one node and returns a *site* (:mod:`onnxslim_lr.sites`:
  the node plus everything the numerics need: constant weights, attributes, real shapes) or
  a :class:`Decline` saying why not. It never changes the graph.
* ``ladder(site, ctx, settings)`` describes the candidates for the site, ordered by cost
  (:class:`onnxslim_lr.planning.Ladder`): their MACs, how to build one and its error. The
  pass does not decide: :func:`onnxslim_lr.planning.choose` applies the user's rank rule,
  and :meth:`Pass.propose` builds that rung into a :class:`Candidate` -- the sizes, the MAC
  counts, the approximation error, and a ``build`` function that creates the replacement
  nodes. Still no graph edits: the pass manager decides (by measuring) whether the candidate
  is used, and :func:`onnxslim_lr.graph.splice_all` applies it.
* ``needs(site, ctx, settings)`` declares the statistics the pass wants
  (:class:`onnxslim_lr.calibration.Request`); the manager's data service gathers them and
  hands them back in ``ctx.stats``. No pass runs a session or reads files.

Keeping ``build`` free of graph state is what lets the same code build the rewrite inside
the model and inside a one-layer model for the never-slower timing guard.
"""

from __future__ import annotations

import abc
import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration import Request, Statistics, patch_covariance_request, response_moment_request
from ..graph import BuildFn, ScopedNames, constant_value, is_runtime_input
from ..planning import Budget, Declined, Ladder, choose
from ..sites import ConvAttrs, ConvSite, FCSite, Site, conv_attrs

# --------------------------------------------------------------------------------------
# results of match / propose
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decline:
    """A pass's refusal, with the reason the report shows the user.

    ``rejected`` marks a rewrite that applies but is not worth it (no MAC saving): the layer
    is then reported as kept rather than declined.
    """

    reason: str
    rejected: bool = False

    def __bool__(self) -> bool:  # so `if not result:` reads naturally
        return False


@dataclass
class Candidate:
    """One proposed rewrite of one node."""

    method: str
    params: dict[str, Any]
    macs_before: int
    macs_after: int
    rel_error: float
    build: BuildFn
    #: additions that are not multiply-adds (sum-pooling), reported separately
    extra_adds: int = 0
    #: lowest default-domain opset the emitted ops need
    min_opset: int = 1
    note: str = ""
    #: the matched site and the factor arrays (ONNX weight shapes) the rewrite was built from:
    #: what :meth:`Pass.effective` and :meth:`Pass.refit` read (reconstruction.py)
    site: Any = None
    factors: Mapping[str, Any] = field(default_factory=dict)

    @property
    def theoretical_speedup(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    def describe_params(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params.items())


# --------------------------------------------------------------------------------------
# context handed to passes
# --------------------------------------------------------------------------------------


@dataclass
class PassContext:
    """What passes may read about the model as a whole (never write)."""

    opset: int
    #: concrete shapes of tensors, measured by running the model once on the sample input
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    #: the data service's accessor: every statistic the passes declared (see calibration.py)
    stats: Statistics | None = None
    #: the sample batch's values at every visited layer's input and output (the probe run),
    #: by tensor name: a real input for passes that need one
    sample: Mapping[str, np.ndarray] = field(default_factory=dict)
    graph: gs.Graph | None = None
    #: decline, before decomposing, ranks that save no MACs (off with --allow-slower, so
    #: full-rank exactness checks still build)
    require_saving: bool = False

    def no_saving(self, what: str, macs_before: int, macs_after: int) -> Decline | None:
        """A Decline when ``macs_after`` saves nothing and savings are required, else None."""
        if self.require_saving and macs_before and macs_after and macs_after >= macs_before:
            return Decline(f"{what} saves no MACs ({macs_after:,} >= {macs_before:,})", rejected=True)
        return None

    def shape(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        s = self.shapes.get(tensor.name)
        if s is not None:
            return tuple(int(d) for d in s)
        if tensor.shape is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in tensor.shape):
            return tuple(int(d) for d in tensor.shape)
        return None


# --------------------------------------------------------------------------------------
# conv sites
# --------------------------------------------------------------------------------------


_QUANT_CONVS = {"ConvInteger": "integer conv (ConvInteger)", "QLinearConv": "quantized conv (QLinearConv)"}


def match_conv(node: gs.Node, ctx: PassContext, *, allow_groups: bool = False) -> ConvSite | Decline:
    """Shared matching of a float 2-D Conv with constant weights.

    Every refusal names what the user's model has, so the report explains itself: grouped and
    depthwise convs, run-time weights, quantized convs (integer ops or QDQ), 1-D/3-D convs,
    non-float32 weights.
    """
    if node.op in _QUANT_CONVS:
        return Decline(f"{_QUANT_CONVS[node.op]}: already quantized, left as is")
    if node.op != "Conv":
        return Decline(f"{node.op} is not a Conv")
    if len(node.inputs) < 2:
        return Decline("Conv without a weight input")
    w_t = node.inputs[1]
    if w_t.inputs and w_t.inputs[0].op == "DequantizeLinear":
        return Decline("QDQ-quantized weight (DequantizeLinear): rewriting would drop the quantization")
    x_t = node.inputs[0]
    if x_t.inputs and x_t.inputs[0].op == "DequantizeLinear":
        return Decline("QDQ-quantized activation (DequantizeLinear input): left as is")
    w = constant_value(w_t)
    if w is None:
        return Decline("weight is not a constant (computed at run time)")
    if is_runtime_input(w_t, ctx.graph) or (len(node.inputs) > 2 and is_runtime_input(node.inputs[2], ctx.graph)):
        return Decline("weight or bias is a graph input (overridable at run time): not rewritten")
    if w.ndim != 4:
        return Decline(f"{w.ndim - 2}-D conv: only 2-D convs are rewritten")
    if w.dtype != np.float32:
        return Decline(f"weight dtype {w.dtype} (only float32 convs are rewritten)")
    if not np.isfinite(w).all():
        return Decline("non-finite weight values (inf/NaN): left as is")
    b = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        b = constant_value(node.inputs[2])
        if b is None:
            return Decline("bias is not a constant")
        b = b.astype(np.float32).reshape(-1)
        if not np.isfinite(b).all():
            return Decline("non-finite bias values (inf/NaN): left as is")
    attrs = conv_attrs(node, (int(w.shape[2]), int(w.shape[3])))
    if attrs.group != 1 and not allow_groups:
        if w.shape[1] == 1:  # one input channel per group (any depth multiplier)
            return Decline(f"depthwise conv (group={attrs.group}): nothing to factorize across channels")
        return Decline(f"grouped conv (group={attrs.group}) is not supported by this method")
    in_shape = ctx.shape(x_t)
    out_shape = ctx.shape(node.outputs[0])
    return ConvSite(node=node, weight=w, bias=b, attrs=attrs, in_shape=in_shape, out_shape=out_shape)


# --------------------------------------------------------------------------------------
# FC sites
# --------------------------------------------------------------------------------------


def match_fc(node: gs.Node, ctx: PassContext) -> FCSite | Decline:
    if node.op not in ("Gemm", "MatMul"):
        return Decline(f"{node.op} is not a Gemm/MatMul")
    if len(node.inputs) < 2:
        return Decline(f"{node.op} with fewer than 2 inputs")
    b_t = node.inputs[1]
    if b_t.inputs and b_t.inputs[0].op == "DequantizeLinear":
        return Decline("QDQ-quantized weight (DequantizeLinear): left as is")
    B = constant_value(b_t)
    if is_runtime_input(b_t, ctx.graph) or (len(node.inputs) > 2 and is_runtime_input(node.inputs[2], ctx.graph)):
        return Decline("weight or bias is a graph input (overridable at run time): not rewritten")
    if B is None:
        if constant_value(node.inputs[0]) is not None:
            return Decline("constant is the first operand (W @ x): not rewritten")
        return Decline("weight is not a constant (activation x activation product)")
    if B.dtype != np.float32:
        return Decline(f"weight dtype {B.dtype} (only float32 is rewritten)")
    if B.ndim != 2:
        return Decline(f"{B.ndim}-D constant operand: only 2-D weights are rewritten")
    if not np.isfinite(B).all():
        return Decline("non-finite weight values (inf/NaN): left as is")
    bias = None
    if node.op == "Gemm":
        a = node.attrs
        if int(a.get("transA", 0)):
            return Decline("Gemm with transA=1 is not rewritten")
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        B = B.T if int(a.get("transB", 0)) else B
        if alpha != 1.0:  # no full-size temporary for the usual alpha = 1 (VGG-19's FC: 411 MB)
            B = B * np.float32(alpha)
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            c = constant_value(node.inputs[2])
            if c is None:
                return Decline("Gemm bias is not a constant")
            c = np.asarray(c, dtype=np.float32) * np.float32(beta)
            if c.size not in (1, B.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
                return Decline(f"Gemm bias of shape {tuple(c.shape)} is not a per-output bias")
            bias = np.broadcast_to(c.reshape(-1), (B.shape[1],)).astype(np.float32)
    return FCSite(node=node, weight=np.ascontiguousarray(B, dtype=np.float32), bias=bias, in_shape=ctx.shape(node.inputs[0]))


# --------------------------------------------------------------------------------------
# building blocks shared by the builders
# --------------------------------------------------------------------------------------


def conv_node(
    names: ScopedNames,
    suffix: str,
    x: gs.Tensor,
    y: gs.Variable,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    auto_pad: str = "NOTSET",
    group: int = 1,
) -> gs.Node:
    """One Conv node with explicit attributes (kernel_shape taken from the weight)."""
    inputs: list[gs.Tensor] = [x, names.const(f"{suffix}_w", weight.astype(np.float32))]
    if bias is not None:
        inputs.append(names.const(f"{suffix}_b", bias.astype(np.float32).reshape(-1)))
    attrs: dict[str, Any] = {
        "kernel_shape": [int(weight.shape[2]), int(weight.shape[3])],
        "strides": list(strides),
        "dilations": list(dilations),
        "group": int(group),
    }
    if auto_pad in ("NOTSET", ""):
        attrs["pads"] = list(pads)
    else:
        attrs["auto_pad"] = auto_pad
    return names.node("Conv", suffix, inputs, [y], **attrs)


def spatial_attrs(attrs: ConvAttrs) -> dict[str, Any]:
    """The original layer's spatial attributes, for the stage that carries the kernel."""
    return {"strides": attrs.strides, "pads": attrs.pads, "dilations": attrs.dilations, "auto_pad": attrs.auto_pad}


# --------------------------------------------------------------------------------------
# the Pass base class and the registry
# --------------------------------------------------------------------------------------


def int_at_least(low: int, what: str = "") -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (bad values exit 2 with one line)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {low}{f' ({what})' if what else ''}")
        return v

    return parse


def float_in(low: float, high: float, *, low_open: bool = True, high_open: bool = False, what: str = ""
             ) -> Callable[[str], float]:
    """argparse type: a finite float in an interval, e.g. ``(0, 1]`` (the default) or ``[0, 1)``."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} must be in {span}{f' ({what})' if what else ''}")
        return v

    return parse


def one_of(*choices: str) -> Callable[[str], str]:
    """argparse type: one of fixed words (case-insensitive)."""

    def parse(text: str) -> str:
        t = str(text).strip().lower()
        if t not in choices:
            raise argparse.ArgumentTypeError(f"{text!r}: choose one of {', '.join(choices)}")
        return t

    return parse


@dataclass(frozen=True)
class PassOption:
    """A method-specific setting. The CLI adds one flag per option (deduplicated by flag), so a
    new pass brings its own options without touching cli.py; the value reaches the pass in
    ``budget.options[key]``."""

    flag: str
    type: Callable[[str], Any]
    help: str
    default: Any = None
    metavar: str | None = None
    #: the value names calibration data (a path, an array ...): the API loads it into feed
    #: dicts (at most ``data_limit`` samples) before the pass sees it
    data: bool = False
    data_limit: int | None = None

    @property
    def key(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Settings:
    """What a pass may know of the user's budget: its own options, the seed, the metric.

    The rank rules (``--rank-ratio`` / ``--energy`` / ``--target-speedup``) are deliberately
    absent: passes describe ladders, :func:`onnxslim_lr.planning.choose` applies the rules.
    """

    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    metric: str = "frobenius"

    @classmethod
    def of(cls, budget: Budget) -> "Settings":
        return cls(options=budget.options, seed=budget.seed, metric=budget.metric)


class Pass(abc.ABC):
    """Base class of every rewrite. Subclasses set ``name`` and register with @register.

    A subclass implements :meth:`match` and :meth:`ladder`; :meth:`propose` (used by the
    manager) asks the planner for the rung and builds it.
    """

    name: ClassVar[str] = ""
    op_types: ClassVar[tuple[str, ...]] = ("Conv",)
    summary: ClassVar[str] = ""
    #: method-specific options (CLI flags)
    options: ClassVar[tuple[PassOption, ...]] = ()
    #: whether the method has a data-aware form (reads the input-patch covariance under
    #: ``--metric data``); False: it runs in the Frobenius metric and the report says so
    data_aware: ClassVar[bool] = False

    def option(self, settings: Settings | Budget, key: str) -> Any:
        """The value of one of this pass's options (its default when not given)."""
        for opt in self.options:
            if opt.key == key:
                value = settings.options.get(key)
                return opt.default if value is None else value
        raise KeyError(f"{self.name} has no option {key!r}")

    def needs(self, site: Any, ctx: PassContext, settings: Settings) -> list[Request]:
        """The statistics this pass wants gathered for ``site`` (the data service streams them).

        The default: the input-patch covariance under ``--metric data`` for data-aware passes.
        """
        if self.data_aware and settings.metric == "data":
            return [patch_covariance_request(site)]
        return []

    def covariance(self, site: Any, ctx: PassContext, settings: Settings) -> np.ndarray | None:
        """The site's input-patch covariance when the data metric applies, else None (Frobenius)."""
        if settings.metric != "data" or ctx.stats is None:
            return None
        return ctx.stats.patch_covariance(site)

    def response_needs(self, site: Any, settings: Settings) -> list[Request]:
        """The response-moment request (``W Sigma W^T`` at the site's output) under ``--metric data``.

        For the passes whose data metric enters only through ``W Sigma W^T`` (channel and
        FC SVD): an ``F x F`` statistic instead of the ``n x n`` patch covariance.
        """
        return [response_moment_request(site)] if self.data_aware and settings.metric == "data" else []

    def response(self, site: Any, ctx: PassContext, settings: Settings) -> np.ndarray | None:
        """``W Sigma W^T`` measured at the site's output when the data metric applies, else None."""
        if settings.metric != "data" or ctx.stats is None:
            return None
        return ctx.stats.response_moment(site)

    def effective(self, site: Any, candidate: Candidate) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The rewrite as one map of the original layer's input patch: ``(M: F x n, bias)``.

        Reconstruction compares candidates on held-out moments through it
        (:func:`onnxslim_lr.decompose.reconstruct.expected_error`). None: the method's
        rewrite is not a linear map of the patch (or has no refit form).
        """
        return None

    def refit(self, site: Any, candidate: Candidate, moments: Any, *, intercept: bool = True) -> Candidate | None:
        """The candidate with its free linear stages refit from calibration moments, or None.

        ``moments`` is a :class:`onnxslim_lr.decompose.reconstruct.CrossMoments` of the
        original input patches ``x`` and those the partially compressed network produces,
        ``x^``; the refit reproduces the *original* response from ``x^`` (asymmetric
        reconstruction), with an intercept (bias correction) when ``intercept``. The pass
        only describes the refit; which moments, and whether the refit is kept, is
        decided by :mod:`onnxslim_lr.reconstruction`. The default: no refit form.
        """
        return None

    @abc.abstractmethod
    def match(self, node: gs.Node, ctx: PassContext) -> Any:
        """A site for :meth:`ladder`, or a Decline. Must not modify the graph."""

    def ladder(self, site: Any, ctx: PassContext, settings: Settings) -> Ladder | Decline:
        """The site's candidates ordered by cost (see :class:`onnxslim_lr.planning.Ladder`).

        Every bundled method implements this (ranks, colours, clusters, structure sizes,
        perforation rates); a method option may pin the rung (``Ladder.fixed``).
        """
        raise NotImplementedError(f"{self.name} has no ladder")

    def propose(self, site: Any, budget: Budget, ctx: PassContext) -> Candidate | Decline:
        """The planner's rung of this site's ladder, built. Must not modify the graph."""
        settings = Settings.of(budget)
        ladder = self.ladder(site, ctx, settings)
        if isinstance(ladder, Decline):
            return ladder
        try:
            sizes = choose(ladder, budget)
        except Declined as exc:
            return Decline(str(exc))
        # the cost model is cheap and the decomposition is not (a full SVD of VGG-19's
        # 4096x4096 FC took minutes): a rung that saves no MACs is rejected before building
        refused = ctx.no_saving(describe_rung(ladder, sizes), ladder.macs_before, ladder.macs(sizes))
        if refused is not None:
            return refused
        return ladder.build(sizes)


def describe_rung(ladder: Ladder, sizes: tuple[int, ...]) -> str:
    """``rank 728 of 1024`` (one axis) or ``rank pair (12, 34)``: a rung as the report names it."""
    if len(sizes) == 1:
        return f"{ladder.unit} {sizes[0]} of {ladder.full[0]}"
    return f"{ladder.unit} ({', '.join(str(s) for s in sizes)})"


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its name (CLI choices come from here)."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two passes named {cls.name!r}: {_REGISTRY[cls.name].__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    """Name -> pass class, for every registered pass (a copy: callers cannot alter it)."""
    return dict(sorted(_REGISTRY.items()))
