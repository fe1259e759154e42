"""The MAC model: multiply-adds per image for a layer and for each low-rank rewrite of it.

Pure integer arithmetic (no weight arrays, no numpy, no onnx), so a pass can price a
rewrite before doing any numerics and the rank solvers can invert the price exactly.

Notation (ONNX layout, group = 1 unless stated): a Conv with weight ``F x C x kh x kw``
maps an input ``C x H x W`` to an output ``F x Ho x Wo``.

* original conv:        ``F * (C/group) * kh * kw * Ho * Wo``
* channel SVD, rank K:  ``K*C*kh*kw*Ho*Wo + F*K*Ho*Wo``
  (kh x kw conv C->K at the output resolution, then 1x1 K->F)
* spatial SVD, rank K:  ``K*C*kh*Ho*W_in + F*K*kw*Ho*Wo``
  (kh x 1 conv C->K strided only vertically, so its output is ``Ho x W_in``, then
  1 x kw conv K->F strided horizontally down to ``Ho x Wo``)
* Tucker-2, ranks (r_out, r_in):
  ``C*r_in*H*W + r_in*r_out*kh*kw*Ho*Wo + r_out*F*Ho*Wo``
  (1x1 C->r_in at the input resolution, kh x kw core, 1x1 r_out->F)
* CP / outer product, rank K: ``C*K*H*W + K*kh*kw*Ho*Wo + K*F*Ho*Wo``
  (1x1 C->K, depthwise kh x kw, 1x1 K->F)
* fully connected ``y = x @ B`` with ``B: K x F``: ``K*F``; rank-r SVD: ``r*(K + F)``

Convention: multiply-adds per image (batch 1), additions that are not multiply-adds reported
apart. The planner (:mod:`onnxslim_lr.planning`) inverts these for ``--target-speedup S`` on
every ladder the same way: the largest rung whose MACs are ``<= original / S``, compared in
exact rational arithmetic (``fractions.Fraction`` of the float ``S``) so that "meets the
budget" has one unambiguous answer at the boundary. :func:`tucker2_rank_pairs` lists the
Tucker-2 ladder.
"""

from __future__ import annotations

from fractions import Fraction

__all__ = [
    "conv_out_size",
    "conv_macs",
    "svd_macs",
    "spatial_macs",
    "tucker2_macs",
    "cp_macs",
    "fc_macs",
    "fc_svd_macs",
    "tucker2_rank_pairs",
]


def conv_out_size(size: int, k: int, stride: int = 1, dilation: int = 1,
                  pad_begin: int = 0, pad_end: int = 0) -> int:
    """Output length of a convolution along one axis (ONNX/PyTorch floor convention).

    ``floor((size + pad_begin + pad_end - dilation*(k-1) - 1) / stride) + 1``. Raises
    ``ValueError`` when the padded input is shorter than the dilated kernel, because a
    zero or negative output size means the layer description is wrong, not that it is free.
    """
    if k < 1 or stride < 1 or dilation < 1 or size < 0:
        raise ValueError(f"invalid conv geometry: size={size} k={k} stride={stride} dilation={dilation}")
    span = size + pad_begin + pad_end - dilation * (k - 1) - 1
    if span < 0:
        raise ValueError(
            f"kernel {k} (dilation {dilation}) larger than padded input {size + pad_begin + pad_end}")
    return span // stride + 1


def conv_macs(F: int, C: int, kh: int, kw: int, Ho: int, Wo: int, group: int = 1) -> int:
    """MACs of the original convolution: each of ``F*Ho*Wo`` outputs reads ``C/group*kh*kw`` inputs."""
    if group < 1 or C % group or F % group:
        raise ValueError(f"group={group} must divide C={C} and F={F}")
    return F * (C // group) * kh * kw * Ho * Wo


def svd_macs(F: int, C: int, kh: int, kw: int, Ho: int, Wo: int, K: int) -> int:
    """Channel SVD: kh x kw conv C->K (original stride, so at ``Ho x Wo``) then 1x1 K->F."""
    return K * C * kh * kw * Ho * Wo + F * K * Ho * Wo


def spatial_macs(F: int, C: int, kh: int, kw: int, Ho: int, W_in: int, Wo: int, K: int) -> int:
    """Spatial SVD: the vertical stage is not strided horizontally, so it runs at ``Ho x W_in``.

    ``W_in`` is the (unpadded) input width: the vertical stage has pads ``(top, 0, bottom, 0)``
    and horizontal stride 1, so its output width equals the input width.
    """
    return K * C * kh * Ho * W_in + F * K * kw * Ho * Wo


def tucker2_macs(F: int, C: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int,
                 r_out: int, r_in: int) -> int:
    """Tucker-2: the 1x1 input projection runs at the input resolution ``H x W`` (before stride)."""
    return C * r_in * H * W + r_in * r_out * kh * kw * Ho * Wo + r_out * F * Ho * Wo


def cp_macs(F: int, C: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int, K: int) -> int:
    """CP: 1x1 C->K at ``H x W``, depthwise kh x kw at ``Ho x Wo``, 1x1 K->F at ``Ho x Wo``."""
    return C * K * H * W + K * kh * kw * Ho * Wo + K * F * Ho * Wo


def fc_macs(K: int, F: int) -> int:
    """``y = x @ B`` with ``B: K x F``, one row of ``x``."""
    return K * F


def fc_svd_macs(K: int, F: int, r: int) -> int:
    """``y = (x @ U_r) @ V_r``: worth it only while ``r < K*F/(K+F)``."""
    return r * (K + F)


# --------------------------------------------------------------------------- rank ladders


def _round_half_up(x: Fraction) -> int:
    return int((x + Fraction(1, 2)) // 1)


def tucker2_rank_pairs(F: int, C: int) -> list[tuple[int, int]]:
    """Candidate ``(r_out, r_in)`` pairs keeping ``r_out : r_in ~ F : C``, by increasing fraction.

    Every fraction ``t`` at which one of the two rounded ranks changes is of the form ``r/F``
    or ``r/C``; at each such ``t`` the pair is ``(round(t*F), round(t*C))`` (each at least 1).
    Both ranks are non-decreasing in ``t``, so the MACs are too, which is what lets the
    solver take the last pair that fits.
    """
    fracs = sorted({Fraction(r, F) for r in range(1, F + 1)} | {Fraction(r, C) for r in range(1, C + 1)})
    pairs: list[tuple[int, int]] = []
    for t in fracs:
        pair = (max(1, min(F, _round_half_up(t * F))), max(1, min(C, _round_half_up(t * C))))
        if not pairs or pairs[-1] != pair:
            pairs.append(pair)
    return pairs
