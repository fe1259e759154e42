"""onnxslim_lr: rewrite the layers of a trained ONNX CNN into cheaper factorized subgraphs.

The rewritten model uses only standard ONNX ops, so it runs on any ONNX runtime; every
rewrite is kept only if it is measurably faster on onnxruntime, and the result is verified
against the original. See README.md for the command line, and :mod:`onnxslim_lr.api` for the
Python API it mirrors.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import accuracy, bench, compress, format_report, load_calibration, load_eval, make_budget, save  # noqa: E402
from .errors import InputError, OnnxSlimLRError, UnsupportedModelError, VerificationError  # noqa: E402
from .modelio import load_model, save_model  # noqa: E402
from .manager import CompressResult, LayerResult, Options  # noqa: E402

__all__ = [
    "CompressResult", "InputError", "LayerResult", "OnnxSlimLRError", "Options", "UnsupportedModelError",
    "VerificationError", "accuracy", "bench", "compress", "format_report", "load_calibration", "load_eval",
    "load_model", "make_budget", "save", "save_model", "__version__",
]
