"""Activations and their statistics, captured with onnxruntime (no training framework).

Two uses:

* :func:`probe` runs the model once on a sample batch with chosen intermediate tensors
  exposed as outputs, giving every layer its *real* input shape (dynamic dims resolved) and a
  real input for per-layer error and timing measurements;
* :class:`PatchStats` streams calibration batches through the model and accumulates, per
  layer, the second moment ``Sigma = E[p p^T]`` of the input patches ``p`` a conv sees (the
  data metric of Denton eq. 3). Only the ``(C*kh*kw)^2`` matrix is kept, never the
  activations, so memory stays bounded however large the calibration set.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx

from .timing import make_session

log = logging.getLogger(__name__)


def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the model with extra graph outputs (element type taken from value_info)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    types: dict[str, int] = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for n in names:
        if n and n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, types.get(n, onnx.TensorProto.FLOAT), None))
            have.add(n)
    return m


def probe(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Sequence[str], *, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Values of the named tensors for one run on ``feeds`` (graph optimisations off)."""
    wanted = [n for n in dict.fromkeys(names) if n]
    sess = make_session(expose(model, wanted), threads=threads, optimize=False)
    outs = [o.name for o in sess.get_outputs()]
    values = sess.run(outs, dict(feeds))
    got = dict(zip(outs, values))
    return {n: got[n] for n in wanted if n in got}


def im2col(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
           dilations: tuple[int, int]) -> np.ndarray:
    """Patches of a (N, C, H, W) batch as rows (N*Ho*Wo, C*kh*kw), columns in (c, i, j) order.

    The column order matches ``W.reshape(F, -1)``, so ``patches @ W2d.T`` is the conv.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * kh * kw)


class PatchStats:
    """Per-layer second moments of conv input patches (and FC inputs), from calibration data.

    ``patch_covariance(site)`` is what the passes call; the stats for all sites are gathered
    in one streamed pass over the calibration batches by :meth:`collect`.
    """

    def __init__(self, max_rows_per_batch: int = 20000, seed: int = 0) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}
        self._max_rows = max_rows_per_batch
        self._rng = np.random.default_rng(seed)

    @staticmethod
    def key(site: object) -> str:
        return getattr(site, "name")

    def collect(self, model: onnx.ModelProto, batches: Iterable[Mapping[str, np.ndarray]], sites: Sequence[object],
                *, threads: int | None = None) -> None:
        """Stream batches through the model; accumulate ``sum p p^T`` for each site's input."""
        if not sites:
            return
        tensor_of = {self.key(s): s.node.inputs[0].name for s in sites}  # type: ignore[attr-defined]
        sess = make_session(expose(model, list(tensor_of.values())), threads=threads, optimize=False)
        outs = [o.name for o in sess.get_outputs()]
        for feeds in batches:
            got = dict(zip(outs, sess.run(outs, dict(feeds))))
            for s in sites:
                x = got[tensor_of[self.key(s)]].astype(np.float64)
                rows = self._rows(s, x)
                if rows.shape[0] > self._max_rows:
                    rows = rows[self._rng.choice(rows.shape[0], self._max_rows, replace=False)]
                k = self.key(s)
                self._sums[k] = self._sums.get(k, 0) + rows.T @ rows
                self._counts[k] = self._counts.get(k, 0) + rows.shape[0]

    @staticmethod
    def _rows(site: object, x: np.ndarray) -> np.ndarray:
        attrs = getattr(site, "attrs", None)
        if attrs is None:  # FC: rows are the last-axis vectors
            return x.reshape(-1, x.shape[-1])
        pads = attrs.resolved_pads((x.shape[2], x.shape[3]))
        return im2col(x, attrs.kernel, attrs.strides, pads, attrs.dilations)

    def has(self, site: object) -> bool:
        return self.key(site) in self._sums

    def patch_covariance(self, site: object) -> np.ndarray | None:
        """``E[p p^T]`` of the site's input patches, or None if the site was not calibrated."""
        k = self.key(site)
        if k not in self._sums:
            return None
        return self._sums[k] / max(self._counts[k], 1)

    def channel_covariance(self, site: object) -> np.ndarray | None:
        """``C x C`` second moment of input channels (patch moment summed over kernel taps)."""
        full = self.patch_covariance(site)
        if full is None:
            return None
        attrs = getattr(site, "attrs", None)
        if attrs is None:
            return full
        kk = attrs.kernel[0] * attrs.kernel[1]
        c = full.shape[0] // kk
        return full.reshape(c, kk, c, kk).trace(axis1=1, axis2=3) / kk
