"""onnxslim_lr: rewrite the layers of a trained ONNX CNN into cheaper factorized subgraphs.

The rewritten model uses only standard ONNX ops, so it runs on any ONNX runtime; every
rewrite is kept only if it is measurably faster on onnxruntime, and the result is verified
against the original. See README.md for the command line, and :mod:`onnxslim_lr.api` for the
Python API it mirrors.

The public names below are imported on first use (PEP 562): importing the package, or the
CLI module inside it, does not load onnx, onnxruntime or numpy, so ``onnx-lowrank --help``
answers at once.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "accuracy": "api", "bench": "api", "compress": "api", "format_report": "api", "load_calibration": "api",
    "load_eval": "api", "make_budget": "api", "save": "api",
    "InputError": "errors", "OnnxSlimLRError": "errors", "UnsupportedModelError": "errors",
    "VerificationError": "errors",
    "load_model": "modelio", "save_model": "modelio",
    "CompressResult": "manager", "LayerResult": "manager", "Options": "manager",
    "Progress": "progress",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    import importlib

    mod = _LAZY.get(name)
    if mod is None:
        # a submodule (``onnxslim_lr.passes``), as after an eager ``import onnxslim_lr.api``
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'onnxslim_lr' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
