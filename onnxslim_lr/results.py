"""What the pipeline reports: per-layer outcomes, per-pass attempts, and the run's result.

Statuses are an :class:`enum.StrEnum`, so the report and JSON keep their plain string values
(``"rewritten"``, ``"kept"``, ``"declined"``; attempts ``"declined"``, ``"rejected"``,
``"candidate"``, ``"chosen"``) while the code compares members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import onnx

from .timing import Timing
from .verify import Fidelity


class Status(StrEnum):
    """Outcome of a layer (REWRITTEN / KEPT / DECLINED) or of one pass's attempt on it."""

    #: the layer was rewritten
    REWRITTEN = "rewritten"
    #: a rewrite applied but was not worth it (measured, guarded, or saves nothing)
    KEPT = "kept"
    #: no pass applies to the layer (or the attempt's pass declined it)
    DECLINED = "declined"
    #: an attempt that produced a rewrite which a check refused
    REJECTED = "rejected"
    #: an attempt that passed every check and competed for the layer
    CANDIDATE = "candidate"
    #: the attempt that won the layer
    CHOSEN = "chosen"


@dataclass
class Attempt:
    """One pass's outcome on one node."""

    method: str
    status: Status  # DECLINED | REJECTED | CANDIDATE | CHOSEN
    reason: str = ""
    params: str = ""
    macs_after: int = 0
    rel_error: float = float("nan")
    out_error: float = float("nan")
    measured: float | None = None
    #: confidence interval of ``measured`` (speed.py), None when not timed
    interval: tuple[float, float] | None = None
    extra_adds: int = 0
    #: set when the rewrite was refused only because the model's opset is too old: the
    #: opset it needs (the manager may convert the model and try again)
    needs_opset: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("needs_opset")
        return d


@dataclass
class LayerResult:
    """What happened to one node, for the report."""

    node: str
    op: str
    status: Status  # REWRITTEN | KEPT | DECLINED
    method: str = ""
    params: str = ""
    macs_before: int = 0
    macs_after: int = 0
    extra_adds: int = 0
    rel_error: float = float("nan")
    out_error: float = float("nan")
    measured: float | None = None
    #: confidence interval of ``measured`` (speed.py), None when not timed
    interval: tuple[float, float] | None = None
    #: "int8" when the layer's rungs were timed quantized against the quantized original
    #: (``--quantize int8`` under an accuracy budget), "" when timed in float
    priced: str = ""
    reason: str = ""
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def theoretical(self) -> float | None:
        if self.status != Status.REWRITTEN or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "attempts"}
        d["theoretical"] = self.theoretical
        d["attempts"] = [a.as_dict() for a in self.attempts]
        return d


@dataclass
class CompressResult:
    """The rewritten model (or the original, when nothing paid off) and how it was obtained."""

    model: onnx.ModelProto
    original: onnx.ModelProto
    layers: list[LayerResult]
    changed: bool
    fidelity: Fidelity | None = None
    #: what the fidelity was measured on ("256 calibration samples", "8 synthetic inputs ...")
    fidelity_source: str = ""
    timing: Timing | None = None
    #: end-to-end timing on the CUDA provider, when onnxruntime-gpu is installed
    timing_cuda: Timing | None = None
    notes: list[str] = field(default_factory=list)
    #: the accuracy-budget plan: contract, damages predicted and measured, the frontier (JSON-able)
    budget: dict[str, Any] | None = None
    #: the result is int8-quantized (--quantize int8)
    quantized: bool = False
    folded: int = 0
    feeds_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def rewritten(self) -> list[LayerResult]:
        return [r for r in self.layers if r.status == Status.REWRITTEN]

    @property
    def speedup(self) -> float | None:
        return self.timing.ratio(0, 1) if self.timing else None
