"""Exceptions raised by onnxslim_lr.

One base class so that callers (and the CLI) can catch everything the tool raises on
purpose with a single ``except`` and turn it into a one-line message, while genuine bugs
still surface as ordinary tracebacks.
"""

from __future__ import annotations


class OnnxSlimLRError(Exception):
    """Base class of every error onnxslim_lr raises deliberately."""


class InputError(OnnxSlimLRError):
    """The user's input (a path, a file, an option value) is unusable."""


class UnsupportedModelError(OnnxSlimLRError):
    """The model is valid ONNX but uses something this tool cannot handle safely."""


class VerificationError(OnnxSlimLRError):
    """A rewritten model failed its checks (checker, runtime load, numerics)."""
