"""Opset handling: raise the model's opset when, and only when, a chosen rewrite needs it.

A candidate whose ops need a newer default-domain opset than the model has is rejected by
the layer selection with :attr:`~onnxslim_lr.results.Attempt.needs_opset` set (a structured
field; the reason text is for people). :func:`needed_opset` reads those fields; the manager
then converts the model with ``onnx.version_converter`` and runs again with upgrades off.
The converted model is verified against the user's original like any other output.
"""

from __future__ import annotations

import logging
from typing import Sequence

import onnx
from onnx import version_converter

from .graph import MAX_EMITTED_IR, min_ir_for_opset
from .results import LayerResult, Status

log = logging.getLogger(__name__)


def needed_opset(layers: Sequence[LayerResult]) -> int:
    """The highest opset any rejected attempt needed (0 when none was refused for its opset)."""
    return max((a.needs_opset or 0 for r in layers for a in r.attempts if a.status == Status.REJECTED), default=0)


def convert(model: onnx.ModelProto, opset: int, layers: Sequence[LayerResult]) -> onnx.ModelProto | None:
    """The model at ``opset`` (checked), or None; on failure the refused attempts say why."""
    try:
        converted = version_converter.convert_version(model, opset)
        # the converter keeps the old IR version; opsets need a minimum one
        converted.ir_version = max(converted.ir_version, min(min_ir_for_opset(opset), MAX_EMITTED_IR))
        onnx.checker.check_model(converted)
        return converted
    except Exception as exc:  # the converter raises many types; any failure means "cannot"
        log.warning("could not raise the opset to %d: %s", opset, exc)
        for r in layers:
            for a in r.attempts:
                if a.needs_opset:
                    a.reason += f" (converting the model failed: {str(exc).splitlines()[0][:80]})"
        return None
