"""What a pass works on: a matched Conv or fully connected layer (a *site*) and its geometry.

A site bundles the node with everything the numerics and the cost model need -- constant
weights, attributes with ONNX defaults filled in, and the real input/output shapes measured
on the sample run -- so passes, the planner, the cost model and the data service all read
one typed object instead of duck-typing nodes.

The one conv geometry helper is :func:`onnxslim_lr.cost.conv_out_size` (pure arithmetic, so
``decompose/`` can use it without importing onnx); :meth:`ConvAttrs.out_hw` applies it to both
axes of a site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

from .cost import conv_macs, conv_out_size

if TYPE_CHECKING:  # sites only carry the node; they never build or edit graphs
    import onnx_graphsurgeon as gs

__all__ = ["ConvAttrs", "ConvSite", "FCSite", "Site", "conv_attrs", "conv_out_size"]


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

    def out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        """Output ``(Ho, Wo)`` for an input of this size (ONNX floor convention, auto_pad resolved)."""
        t, l, b, r = self.resolved_pads(in_hw)
        return (conv_out_size(in_hw[0], self.kernel[0], self.strides[0], self.dilations[0], t, b),
                conv_out_size(in_hw[1], self.kernel[1], self.strides[1], self.dilations[1], l, r))


def conv_attrs(node: gs.Node, kernel: tuple[int, int]) -> ConvAttrs:
    """The node's Conv attributes with ONNX defaults (kernel from the weight, not the attribute)."""
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


#: what a pass matches: every site the data service, the cost model and the planner accept
Site = Union[ConvSite, FCSite]
