"""Checks on a rewritten model before anyone sees it.

A rewritten model must (1) pass ``onnx.checker`` with full checks, (2) load in onnxruntime,
and (3) compute nearly what the original computes. (1) and (2) failing is a bug in a pass,
raised as :class:`VerificationError`; (3) is reported as figures (max abs / relative error,
cosine similarity, and top-1 agreement for classifier-shaped outputs) because how much error
is acceptable is the user's call, not ours.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from .errors import VerificationError
from .timing import make_session

log = logging.getLogger(__name__)


def verify_model(model: onnx.ModelProto) -> None:
    """Full checker and a runtime load; raises VerificationError with the first problem."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # checker raises ValidationError and InferenceError
        raise VerificationError(f"rewritten model fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None
    try:
        make_session(model, threads=1)
    except Exception as exc:
        raise VerificationError(f"onnxruntime refuses the rewritten model: {str(exc).strip().splitlines()[0]}") from None


@dataclass
class OutputFidelity:
    """Agreement of one graph output between original and rewritten model."""

    name: str
    max_abs: float
    rel_error: float
    cosine: float
    top1: float | None = None  # share of rows with the same argmax (classifier-shaped outputs)

    def as_dict(self) -> dict[str, float | str | None]:
        return dict(self.__dict__)


def _worst(values: list[float], pick: Callable[[list[float]], float]) -> float:
    """max/min that returns NaN when any value is NaN (builtin max/min depend on the order)."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    return pick(values)


@dataclass
class Fidelity:
    """Agreement of every output. Any NaN makes the summary figures NaN, and NaN fails every
    guard (guards test ``not value <= limit``): a NaN must never read as "within limits"."""

    outputs: list[OutputFidelity] = field(default_factory=list)
    samples: int = 0

    @property
    def worst_rel_error(self) -> float:
        return _worst([o.rel_error for o in self.outputs], max) if self.outputs else 0.0

    @property
    def min_cosine(self) -> float:
        return _worst([o.cosine for o in self.outputs], min) if self.outputs else 1.0

    @property
    def top1(self) -> float | None:
        vals = [o.top1 for o in self.outputs if o.top1 is not None]
        return _worst(vals, min) if vals else None

    @property
    def finite(self) -> bool:
        """False when any figure is NaN (non-finite outputs): the comparison means nothing."""
        return all(not math.isnan(v) for o in self.outputs for v in (o.rel_error, o.cosine, o.max_abs))

    def as_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "outputs": [o.as_dict() for o in self.outputs]}


def _is_classifier(arr: np.ndarray) -> bool:
    return arr.ndim == 2 and arr.shape[1] > 1 and np.issubdtype(arr.dtype, np.floating)


def compare_outputs(
    original: onnx.ModelProto,
    rewritten: onnx.ModelProto,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
) -> Fidelity:
    """Run both models on the same batches and measure how far the outputs drift."""
    a = make_session(original, threads=threads)
    b = make_session(rewritten, threads=threads)
    names = [o.name for o in a.get_outputs()]
    ref: dict[str, list[np.ndarray]] = {n: [] for n in names}
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    samples = 0
    for feeds in batches:
        ra = a.run(names, dict(feeds))
        rb = b.run(names, dict(feeds))
        for n, x, y in zip(names, ra, rb):
            ref[n].append(np.asarray(x))
            got[n].append(np.asarray(y))
        samples += int(next(iter(feeds.values())).shape[0]) if feeds else 0
    fid = Fidelity(samples=samples)
    for n in names:
        x = np.concatenate([r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1) for r in ref[n]])
        y = np.concatenate([r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1) for r in got[n]])
        if not np.issubdtype(x.dtype, np.floating):
            same = float(np.mean(x == y)) if x.size else 1.0
            fid.outputs.append(OutputFidelity(n, 0.0 if same == 1.0 else float("nan"), 1.0 - same, same))
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        if not (np.isfinite(x64).all() and np.isfinite(y64).all()):
            # NaN/inf outputs: no figure is meaningful, and every guard must fail on them
            nan = float("nan")
            fid.outputs.append(OutputFidelity(n, nan, nan, nan, nan if _is_classifier(ref[n][0]) else None))
            continue
        diff = x64 - y64
        den = float(np.linalg.norm(x64))
        rel = float(np.linalg.norm(diff)) / den if den > 0 else float(np.linalg.norm(diff))
        nx, ny = float(np.linalg.norm(x64)), float(np.linalg.norm(y64))
        cos = float((x64 * y64).sum() / (nx * ny)) if nx > 0 and ny > 0 else (1.0 if nx == ny else 0.0)
        top1 = None
        first = ref[n][0]
        if _is_classifier(first):
            top1 = float(np.mean(np.argmax(x64, axis=1) == np.argmax(y64, axis=1)))
        fid.outputs.append(OutputFidelity(n, float(np.max(np.abs(diff))) if diff.size else 0.0, rel, cos, top1))
    return fid
