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

Rank solvers invert these for a target speedup ``S``: the largest rank whose MACs are
``<= original / S`` (at least 1, at most the method's full rank). The comparison is done in
exact rational arithmetic (``fractions.Fraction`` of the float ``S``) so that "meets the
budget" has one unambiguous answer at the boundary, whatever the rounding of ``orig / S``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

__all__ = [
    "conv_out_size",
    "conv_macs",
    "svd_macs",
    "spatial_macs",
    "tucker2_macs",
    "cp_macs",
    "fc_macs",
    "fc_svd_macs",
    "svd_rank_for_speedup",
    "spatial_rank_for_speedup",
    "cp_rank_for_speedup",
    "fc_rank_for_speedup",
    "tucker2_rank_pairs",
    "tucker2_ranks_for_speedup",
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


# --------------------------------------------------------------------------- rank solvers


def _budget(original: int, speedup: float) -> Fraction:
    """``original / speedup`` as an exact rational, so boundary cases are decided exactly."""
    s = Fraction(speedup)
    if s <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    return Fraction(original) / s


def _largest_linear_rank(per_rank: int, budget: Fraction, full_rank: int) -> int:
    """Largest ``K`` in ``[1, full_rank]`` with ``K * per_rank <= budget`` (1 if none)."""
    if per_rank <= 0:
        return max(1, full_rank)
    k = int(budget // per_rank)  # exact floor of a Fraction
    return max(1, min(k, full_rank))


def svd_rank_for_speedup(F: int, C: int, kh: int, kw: int, Ho: int, Wo: int,
                         speedup: float) -> int:
    """Largest channel-SVD rank meeting ``orig/speedup`` MACs, clamped to ``[1, min(F, C*kh*kw)]``."""
    budget = _budget(conv_macs(F, C, kh, kw, Ho, Wo), speedup)
    per = svd_macs(F, C, kh, kw, Ho, Wo, 1)
    return _largest_linear_rank(per, budget, min(F, C * kh * kw))


def spatial_rank_for_speedup(F: int, C: int, kh: int, kw: int, Ho: int, W_in: int, Wo: int,
                             speedup: float) -> int:
    """Largest spatial-SVD rank meeting the budget, clamped to ``[1, min(C*kh, F*kw)]``."""
    budget = _budget(conv_macs(F, C, kh, kw, Ho, Wo), speedup)
    per = spatial_macs(F, C, kh, kw, Ho, W_in, Wo, 1)
    return _largest_linear_rank(per, budget, min(C * kh, F * kw))


def cp_rank_for_speedup(F: int, C: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int,
                        speedup: float) -> int:
    """Largest CP rank meeting the budget, clamped to ``[1, min(C*kh*kw, F*kh*kw, C*F)]``.

    The upper clamp is the generic upper bound on the CP rank of a ``C x (kh*kw) x F``
    tensor; beyond it more terms cannot improve the fit.
    """
    budget = _budget(conv_macs(F, C, kh, kw, Ho, Wo), speedup)
    per = cp_macs(F, C, kh, kw, H, W, Ho, Wo, 1)
    return _largest_linear_rank(per, budget, min(C * kh * kw, F * kh * kw, C * F))


def fc_rank_for_speedup(K: int, F: int, speedup: float) -> int:
    """Largest FC-SVD rank with ``r*(K+F) <= K*F/speedup``, clamped to ``[1, min(K, F)]``."""
    budget = _budget(fc_macs(K, F), speedup)
    return _largest_linear_rank(K + F, budget, min(K, F))


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


def tucker2_ranks_for_speedup(F: int, C: int, kh: int, kw: int, H: int, W: int, Ho: int, Wo: int,
                              speedup: float) -> tuple[int, int]:
    """Largest ``(r_out, r_in)`` in the ``F : C`` ratio meeting the budget; ``(1, 1)`` if none does.

    Scaling both ranks by the same fraction of their full sizes treats the two 1x1 stages
    alike (Kim et al. pick ranks per mode too); the core is then the only place the budget is
    spent unevenly, which is the behaviour we want from a single speedup knob.
    """
    budget = _budget(conv_macs(F, C, kh, kw, Ho, Wo), speedup)
    cost: Callable[[tuple[int, int]], int] = lambda p: tucker2_macs(F, C, kh, kw, H, W, Ho, Wo, p[0], p[1])
    best = (1, 1)
    for pair in tucker2_rank_pairs(F, C):
        if cost(pair) <= budget:
            best = pair
        else:
            break  # MACs are monotone along the candidate list
    return best
