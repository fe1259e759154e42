"""Tiny numpy reference implementations of ONNX Conv and AveragePool, for tests only.

They are written for clarity, not speed, and follow the ONNX semantics exactly:

* ``conv2d``: ``y[n, f, i, j] = b[f] + sum_{c, u, v} w[f, c, u, v] *
  xpad[n, g*Cg + c, i*sh + u*dh, j*sw + v*dw]`` with ``xpad`` the input zero-padded by
  ``pads = (top, left, bottom, right)``; output size ``floor((H + t + b - dh*(kh-1) - 1)/sh) + 1``.
* ``avgpool``: any number of spatial axes (so a 3-D pool over (channel, H, W) is obtained by
  reshaping ``(N, C, H, W)`` to ``(N, 1, C, H, W)``, exactly as an ONNX graph would), floor
  mode, dilations, and ``count_include_pad`` (1: divide by the full window area, i.e. padded
  zeros count; 0: divide by the number of in-bounds elements).

No onnx / onnxruntime import, so the decompose/ numerics can be checked on their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pad_nd(x: np.ndarray, pads: Sequence[int]) -> np.ndarray:
    """Zero-pad the trailing ``len(pads)//2`` axes with ONNX pads (all begins, then all ends)."""
    k = len(pads) // 2
    width = [(0, 0)] * (x.ndim - k) + [(int(pads[i]), int(pads[i + k])) for i in range(k)]
    return np.pad(x, width)


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    strides: Sequence[int] = (1, 1),
    pads: Sequence[int] = (0, 0, 0, 0),
    dilations: Sequence[int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """ONNX Conv (2-D, NCHW, weight (F, C/group, kh, kw)) computed in float64."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, c_in, _, _ = x.shape
    f, cg, kh, kw = w.shape
    sh, sw = strides
    dh, dw = dilations
    assert c_in == cg * group and f % group == 0
    xp = _pad_nd(x, pads)
    hp, wp = xp.shape[2:]
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    assert ho >= 1 and wo >= 1, "empty output"
    fg = f // group
    y = np.zeros((n, f, ho, wo))
    for g in range(group):
        xg = xp[:, g * cg:(g + 1) * cg]
        wg = w[g * fg:(g + 1) * fg]
        for u in range(kh):
            for v in range(kw):
                patch = xg[:, :, u * dh:u * dh + sh * (ho - 1) + 1:sh,
                           v * dw:v * dw + sw * (wo - 1) + 1:sw]
                y[:, g * fg:(g + 1) * fg] += np.einsum("nchw,fc->nfhw", patch, wg[:, :, u, v])
    if b is not None:
        y += np.asarray(b, dtype=np.float64)[None, :, None, None]
    return y


def avgpool(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    count_include_pad: bool = True,
) -> np.ndarray:
    """ONNX AveragePool over the trailing ``len(kernel)`` axes (floor mode), float64."""
    x = np.asarray(x, dtype=np.float64)
    k = len(kernel)
    strides = tuple(strides) if strides is not None else (1,) * k
    pads = tuple(pads) if pads is not None else (0,) * (2 * k)
    dilations = tuple(dilations) if dilations is not None else (1,) * k
    xp = _pad_nd(x, pads)
    ones = _pad_nd(np.ones(x.shape[-k:]), pads)
    sp = xp.shape[-k:]
    out = [(sp[a] - dilations[a] * (kernel[a] - 1) - 1) // strides[a] + 1 for a in range(k)]
    assert all(o >= 1 for o in out), "empty output"
    total = np.zeros(x.shape[:-k] + tuple(out))
    count = np.zeros(tuple(out))
    for off in np.ndindex(*kernel):
        sl = tuple(
            slice(off[a] * dilations[a], off[a] * dilations[a] + strides[a] * (out[a] - 1) + 1,
                  strides[a])
            for a in range(k)
        )
        total += xp[(Ellipsis,) + sl]
        count += ones[sl]
    if count_include_pad:
        return total / float(np.prod(kernel))
    return total / count


def sumpool(x: np.ndarray, kernel: Sequence[int], **kwargs) -> np.ndarray:
    """Window sum = AveragePool(count_include_pad=1) times the window area."""
    return avgpool(x, kernel, count_include_pad=True, **kwargs) * float(np.prod(kernel))
