"""onnxslim_lr: rewrite the layers of a trained ONNX CNN into cheaper factorized subgraphs.

The rewritten model uses only standard ONNX ops, so it runs on any ONNX runtime; every
rewrite is kept only if it is measurably faster on onnxruntime, and the result is verified
against the original. See README.md for the command line, and :mod:`onnxslim_lr.api` for the
Python API it mirrors.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562): ``import onnxslim_lr`` and the CLI's
# start-up stay cheap, and a Ctrl-C during start-up lands inside the CLI's own handler
# rather than in an import at module level (which would print a traceback).
_LAZY = {
    "accuracy": "api", "bench": "api", "compress": "api", "format_report": "api", "load_calibration": "api",
    "load_eval": "api", "make_budget": "api", "save": "api",
    "InputError": "errors", "OnnxSlimLRError": "errors", "UnsupportedModelError": "errors", "VerificationError": "errors",
    "load_model": "modelio", "save_model": "modelio",
    "CompressResult": "manager", "LayerResult": "manager", "Options": "manager",
}


def __getattr__(name: str) -> object:
    import importlib
    import importlib.util

    module = _LAZY.get(name)
    if module is None:
        # submodules (``onnxslim_lr.passes``...) stay reachable as attributes, as with eager imports
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'onnxslim_lr' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "CompressResult", "InputError", "LayerResult", "OnnxSlimLRError", "Options", "UnsupportedModelError",
    "VerificationError", "accuracy", "bench", "compress", "format_report", "load_calibration", "load_eval",
    "load_model", "make_budget", "save", "save_model", "__version__",
]
