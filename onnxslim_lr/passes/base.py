"""What a pass is, what it matches, and what it proposes.

A pass is a small class with two methods, in the style of onnxscript's rewrite rules:

* ``match(node, ctx)`` looks at one node and returns a *site* (the node plus everything the
  numerics need: constant weights, attributes, real shapes) or a :class:`Decline` saying
  why not. It never changes the graph.
* ``propose(site, budget, ctx)`` runs the decomposition and returns a :class:`Candidate`:
  the chosen ranks, the MAC counts, the approximation error, and a ``build`` function that
  creates the replacement nodes. Still no graph edits: the pass manager decides (by
  measuring) whether the candidate is used, and :func:`onnxslim_lr.graph.splice` applies it.

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

from ..cost import conv_macs
from ..graph import BuildFn, ScopedNames, constant_value, is_runtime_input

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


@dataclass(frozen=True)
class Budget:
    """How aggressive a rewrite may be. At most one of the three rank rules is set.

    ``options`` holds method-specific settings (number of colours, clusters, perforation rate,
    structure sizes ...), keyed by the CLI option's name without dashes.
    """

    rank_ratio: float | None = None
    energy: float | None = None
    target_speedup: float | None = None
    metric: str = "frobenius"
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def describe(self) -> str:
        if self.rank_ratio is not None:
            return f"rank-ratio {self.rank_ratio:g}"
        if self.energy is not None:
            return f"energy {self.energy:g}"
        if self.target_speedup is not None:
            return f"target-speedup {self.target_speedup:g}"
        return "default"


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
    #: per-tensor second-moment statistics for data-aware metrics (see calibration.py)
    stats: Any = None
    graph: gs.Graph | None = None
    #: calibration batches (feed dicts) when the user gave --calib, for passes that need
    #: more than second moments (perforation's impact estimate)
    calib: Any = None
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


@dataclass(frozen=True)
class ConvAttrs:
    """A 2-D Conv's attributes with ONNX defaults filled in. Pads are (top, left, bottom, right)."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]
    auto_pad: str
    group: int

    @property
    def explicit_pads(self) -> bool:
        return self.auto_pad in ("NOTSET", "")

    def resolved_pads(self, in_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """Pads in effect for an input of this size (resolves auto_pad)."""
        if self.explicit_pads:
            return self.pads
        if self.auto_pad == "VALID":
            return (0, 0, 0, 0)
        out: list[int] = [0, 0, 0, 0]
        for ax in range(2):
            size, k, s, d = in_hw[ax], self.kernel[ax], self.strides[ax], self.dilations[ax]
            o = -(-size // s)
            total = max((o - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            if self.auto_pad == "SAME_UPPER":
                out[ax], out[ax + 2] = small, big
            else:
                out[ax], out[ax + 2] = big, small
        return tuple(out)  # type: ignore[return-value]


def conv_attrs(node: gs.Node, kernel: tuple[int, int]) -> ConvAttrs:
    a = node.attrs
    auto_pad = a.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    pads = tuple(int(p) for p in a.get("pads", [0, 0, 0, 0]))
    return ConvAttrs(
        kernel=kernel,
        strides=tuple(int(s) for s in a.get("strides", [1, 1])),  # type: ignore[arg-type]
        dilations=tuple(int(s) for s in a.get("dilations", [1, 1])),  # type: ignore[arg-type]
        pads=pads if len(pads) == 4 else (0, 0, 0, 0),  # type: ignore[arg-type]
        auto_pad=str(auto_pad),
        group=int(a.get("group", 1)),
    )


@dataclass
class ConvSite:
    """A float32 2-D Conv with constant weights, ready for decomposition."""

    node: gs.Node
    weight: np.ndarray  # (F, C/group, kh, kw)
    bias: np.ndarray | None
    attrs: ConvAttrs
    in_shape: tuple[int, ...] | None  # (N, C, H, W) measured
    out_shape: tuple[int, ...] | None  # (N, F, Ho, Wo) measured

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def F(self) -> int:
        return int(self.weight.shape[0])

    @property
    def C(self) -> int:
        return int(self.weight.shape[1]) * self.attrs.group

    @property
    def kh(self) -> int:
        return int(self.weight.shape[2])

    @property
    def kw(self) -> int:
        return int(self.weight.shape[3])

    @property
    def in_hw(self) -> tuple[int, int] | None:
        return (self.in_shape[2], self.in_shape[3]) if self.in_shape else None

    @property
    def out_hw(self) -> tuple[int, int] | None:
        return (self.out_shape[2], self.out_shape[3]) if self.out_shape else None

    def macs(self) -> int:
        """Multiply-adds per image of the original layer (0 when shapes are unknown)."""
        if not self.out_hw:
            return 0
        return conv_macs(self.F, self.C, self.kh, self.kw, *self.out_hw, group=self.attrs.group)


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


@dataclass
class FCSite:
    """A Gemm or MatMul ``y = x @ B (+ c)`` with constant ``B`` of shape (K, F)."""

    node: gs.Node
    weight: np.ndarray  # (K, F), alpha and transB folded in
    bias: np.ndarray | None  # broadcastable to (F,), beta folded in
    in_shape: tuple[int, ...] | None

    @property
    def name(self) -> str:
        return self.node.name

    def macs(self) -> int:
        rows = 1
        if self.in_shape and len(self.in_shape) > 2:
            rows = int(np.prod(self.in_shape[1:-1]))
        return rows * int(self.weight.shape[0]) * int(self.weight.shape[1])


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
        B = (B.T if int(a.get("transB", 0)) else B) * np.float32(alpha)
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

    @property
    def key(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class Pass(abc.ABC):
    """Base class of every rewrite. Subclasses set ``name`` and register with @register."""

    name: ClassVar[str] = ""
    op_types: ClassVar[tuple[str, ...]] = ("Conv",)
    summary: ClassVar[str] = ""
    #: method-specific options (CLI flags)
    options: ClassVar[tuple[PassOption, ...]] = ()

    def option(self, budget: Budget, key: str) -> Any:
        """The value of one of this pass's options (its default when not given)."""
        for opt in self.options:
            if opt.key == key:
                value = budget.options.get(key)
                return opt.default if value is None else value
        raise KeyError(f"{self.name} has no option {key!r}")

    @abc.abstractmethod
    def match(self, node: gs.Node, ctx: PassContext) -> Any:
        """A site for ``propose``, or a Decline. Must not modify the graph."""

    @abc.abstractmethod
    def propose(self, site: Any, budget: Budget, ctx: PassContext) -> Candidate | Decline:
        """Decompose and return a Candidate (or a Decline). Must not modify the graph."""


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
