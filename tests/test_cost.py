"""Tests of the MAC model and the speedup rank solvers.

Expected MACs are computed independently: output sizes by enumerating the window positions
that fit (brute force), and rewrite costs by adding up the stages of the graph described in
METHODS.md section 1, each stage priced as out_channels * in_channels_per_group * taps *
output positions.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from onnxslim_lr import cost
from onnxslim_lr.planning import Budget, Ladder, choose


def brute_out(size: int, k: int, stride: int = 1, dil: int = 1, pb: int = 0, pe: int = 0) -> int:
    """Count the window start positions that fit inside the padded input."""
    padded = size + pb + pe
    span = dil * (k - 1) + 1
    return sum(1 for start in range(0, padded, stride) if start + span <= padded)


def stage(out_ch: int, in_ch: int, kh: int, kw: int, H: int, W: int, stride=(1, 1), dil=(1, 1),
          pads=(0, 0, 0, 0), group: int = 1) -> tuple[int, int, int]:
    """(MACs, Ho, Wo) of one conv stage by explicit geometry."""
    ho = brute_out(H, kh, stride[0], dil[0], pads[0], pads[2])
    wo = brute_out(W, kw, stride[1], dil[1], pads[1], pads[3])
    return out_ch * (in_ch // group) * kh * kw * ho * wo, ho, wo


GEOMS = [
    # F, C, kh, kw, H, W, stride, dil, pads
    (8, 6, 3, 3, 10, 12, (1, 1), (1, 1), (1, 1, 1, 1)),
    (16, 4, 3, 5, 11, 9, (2, 1), (1, 1), (1, 2, 1, 2)),
    (12, 10, 3, 3, 13, 17, (2, 3), (2, 1), (0, 1, 2, 1)),
    (5, 7, 1, 1, 6, 6, (1, 1), (1, 1), (0, 0, 0, 0)),
]


def test_conv_out_size_hand_examples() -> None:
    # 224 input, 7x7, stride 2, pad 3: floor((224 + 6 - 6 - 1) / 2) + 1 = 112 (ResNet stem)
    assert cost.conv_out_size(224, 7, 2, 1, 3, 3) == 112
    # 5 input, k 3 dilation 2 spans 5 taps: exactly one position
    assert cost.conv_out_size(5, 3, 1, 2, 0, 0) == 1
    assert cost.conv_out_size(4, 3, 1, 1, 0, 0) == 2
    assert cost.conv_out_size(7, 3, 2, 1, 1, 0) == 3  # padded 8: starts 0, 2, 4 (6 would need 9)
    with pytest.raises(ValueError):
        cost.conv_out_size(2, 3, 1, 1, 0, 0)


@pytest.mark.parametrize("size,k,s,d,pb,pe", [(n, k, s, d, pb, pe) for n in (1, 5, 8, 13)
                                              for k in (1, 2, 3) for s in (1, 2, 3)
                                              for d in (1, 2) for pb in (0, 1) for pe in (0, 2)
                                              if n + pb + pe >= d * (k - 1) + 1])
def test_conv_out_size_matches_brute_force(size, k, s, d, pb, pe) -> None:
    assert cost.conv_out_size(size, k, s, d, pb, pe) == brute_out(size, k, s, d, pb, pe)


def test_conv_macs_hand_examples() -> None:
    assert cost.conv_macs(4, 6, 3, 3, 5, 5) == 5400  # 4*6*9*25
    assert cost.conv_macs(4, 6, 3, 3, 5, 5, group=2) == 2700
    assert cost.conv_macs(6, 6, 3, 3, 5, 5, group=6) == 6 * 9 * 25  # depthwise
    assert cost.svd_macs(4, 6, 3, 3, 5, 5, 2) == 2 * 54 * 25 + 4 * 2 * 25  # 2700 + 200
    assert cost.fc_macs(100, 10) == 1000
    assert cost.fc_svd_macs(100, 10, 3) == 330
    with pytest.raises(ValueError):
        cost.conv_macs(4, 6, 3, 3, 5, 5, group=4)


@pytest.mark.parametrize("geom", GEOMS)
def test_rewrite_costs_match_stage_sums(geom) -> None:
    F, C, kh, kw, H, W, (sh, sw), (dh, dw), (t, l, b, r) = geom
    orig, ho, wo = stage(F, C, kh, kw, H, W, (sh, sw), (dh, dw), (t, l, b, r))
    assert cost.conv_macs(F, C, kh, kw, ho, wo) == orig
    for K in (1, 3):
        # channel SVD: kh x kw C->K with the original geometry, then 1x1 K->F
        s1, h1, w1 = stage(K, C, kh, kw, H, W, (sh, sw), (dh, dw), (t, l, b, r))
        s2, _, _ = stage(F, K, 1, 1, h1, w1)
        assert cost.svd_macs(F, C, kh, kw, ho, wo, K) == s1 + s2
        # spatial: kh x 1 strided vertically only, then 1 x kw strided horizontally
        v, hv, wv = stage(K, C, kh, 1, H, W, (sh, 1), (dh, 1), (t, 0, b, 0))
        assert wv == W
        h, hh, wh = stage(F, K, 1, kw, hv, wv, (1, sw), (1, dw), (0, l, 0, r))
        assert (hh, wh) == (ho, wo)
        assert cost.spatial_macs(F, C, kh, kw, ho, W, wo, K) == v + h
        # CP: 1x1 C->K at H x W, depthwise kh x kw (group K), 1x1 K->F
        c1, _, _ = stage(K, C, 1, 1, H, W)
        c2, hc, wc = stage(K, K, kh, kw, H, W, (sh, sw), (dh, dw), (t, l, b, r), group=K)
        c3, _, _ = stage(F, K, 1, 1, hc, wc)
        assert cost.cp_macs(F, C, kh, kw, H, W, ho, wo, K) == c1 + c2 + c3
        # Tucker-2 with r_in = K, r_out = K + 1
        t1, _, _ = stage(K, C, 1, 1, H, W)
        t2, ht, wt = stage(K + 1, K, kh, kw, H, W, (sh, sw), (dh, dw), (t, l, b, r))
        t3, _, _ = stage(F, K + 1, 1, 1, ht, wt)
        assert cost.tucker2_macs(F, C, kh, kw, H, W, ho, wo, K + 1, K) == t1 + t2 + t3


def _solve(macs, full: int, orig: int, speedup: float) -> int:
    """The planner's --target-speedup rule on a rank ladder priced by ``macs(rank)``."""
    ladder = Ladder(full=(full,), rungs=[(k,) for k in range(1, full + 1)], macs_before=orig,
                    macs=lambda s: macs(s[0]), build=lambda s: s)
    return choose(ladder, Budget(target_speedup=speedup))[0]


def _solve_pairs(macs, F: int, C: int, orig: int, speedup: float) -> tuple[int, int]:
    ladder = Ladder(full=(F, C), rungs=cost.tucker2_rank_pairs(F, C), macs_before=orig, macs=macs, build=lambda s: s)
    return choose(ladder, Budget(target_speedup=speedup))  # type: ignore[return-value]


def _meets(macs: int, orig: int, speedup: float) -> bool:
    return Fraction(macs) * Fraction(speedup) <= orig


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("speedup", [1.0, 1.5, 2.0, 3.7, 10.0, 1000.0])
def test_linear_rank_solvers_meet_budget_and_are_maximal(geom, speedup) -> None:
    F, C, kh, kw, H, W, st, dl, pads = geom
    ho = brute_out(H, kh, st[0], dl[0], pads[0], pads[2])
    wo = brute_out(W, kw, st[1], dl[1], pads[1], pads[3])
    orig = F * C * kh * kw * ho * wo
    cases = [
        (_solve(lambda k: cost.svd_macs(F, C, kh, kw, ho, wo, k), min(F, C * kh * kw), orig, speedup),
         lambda k: cost.svd_macs(F, C, kh, kw, ho, wo, k), min(F, C * kh * kw)),
        (_solve(lambda k: cost.spatial_macs(F, C, kh, kw, ho, W, wo, k), min(C * kh, F * kw), orig, speedup),
         lambda k: cost.spatial_macs(F, C, kh, kw, ho, W, wo, k), min(C * kh, F * kw)),
        (_solve(lambda k: cost.cp_macs(F, C, kh, kw, H, W, ho, wo, k), min(C * kh * kw, F * kh * kw, C * F), orig, speedup),
         lambda k: cost.cp_macs(F, C, kh, kw, H, W, ho, wo, k), min(C * kh * kw, F * kh * kw, C * F)),
    ]
    for k, macs, full in cases:
        assert 1 <= k <= full
        if _meets(macs(1), orig, speedup):
            assert _meets(macs(k), orig, speedup)
            assert k == full or not _meets(macs(k + 1), orig, speedup)
        else:
            assert k == 1


def test_fc_rank_solver_exact_boundary() -> None:
    fc = lambda K, F, S: _solve(lambda r: cost.fc_svd_macs(K, F, r), min(K, F), cost.fc_macs(K, F), S)  # noqa: E731
    # 100 x 100: 10000 MACs; S = 2 leaves 5000 = 25 * (100 + 100): rank 25 exactly fits
    assert fc(100, 100, 2.0) == 25
    assert fc(100, 100, 2.0000001) == 24
    assert fc(100, 10, 1.0) == 9  # 9*110 = 990 <= 1000 < 10*110
    assert fc(100, 10, 1e6) == 1  # nothing fits: at least 1
    assert fc(10, 10, 0.01) == 10  # clamped to full rank


def test_tucker2_rank_pairs_properties() -> None:
    for F, C in [(4, 6), (64, 32), (7, 7), (1, 5)]:
        pairs = cost.tucker2_rank_pairs(F, C)
        assert pairs[-1] == (F, C)
        for (a0, b0), (a1, b1) in zip(pairs, pairs[1:]):
            assert a1 >= a0 and b1 >= b0 and (a1, b1) != (a0, b0)
        for a, b in pairs:
            assert 1 <= a <= F and 1 <= b <= C
            # same fraction of F and C, up to rounding of each to the nearest integer
            if a > 1 and b > 1:
                assert abs(a / F - b / C) <= 0.5 / F + 0.5 / C + 1e-12


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("speedup", [1.2, 2.0, 4.0, 1e5])
def test_tucker2_solver_meets_budget_and_is_maximal(geom, speedup) -> None:
    F, C, kh, kw, H, W, st, dl, pads = geom
    ho = brute_out(H, kh, st[0], dl[0], pads[0], pads[2])
    wo = brute_out(W, kw, st[1], dl[1], pads[1], pads[3])
    orig = F * C * kh * kw * ho * wo
    macs = lambda p: cost.tucker2_macs(F, C, kh, kw, H, W, ho, wo, p[0], p[1])  # noqa: E731
    r_out, r_in = _solve_pairs(macs, F, C, orig, speedup)
    pairs = cost.tucker2_rank_pairs(F, C)
    assert (r_out, r_in) in pairs
    idx = pairs.index((r_out, r_in))
    if _meets(macs((r_out, r_in)), orig, speedup):
        assert all(not _meets(macs(p), orig, speedup) for p in pairs[idx + 1:])
    else:
        assert (r_out, r_in) == (1, 1)


def test_tucker2_solver_hand_example() -> None:
    # F = C = 4, 3x3, 4x4 in and out: original 4*4*9*16 = 2304, budget at S = 2 is 1152.
    # Pairs keep r_out == r_in = r: cost 4*r*16 + r*r*9*16 + r*4*16 = 128 r + 144 r^2.
    # r = 2: 256 + 576 = 832 fits; r = 3: 384 + 1296 = 1680 does not.
    macs = lambda p: cost.tucker2_macs(4, 4, 3, 3, 4, 4, 4, 4, p[0], p[1])  # noqa: E731
    assert _solve_pairs(macs, 4, 4, cost.conv_macs(4, 4, 3, 3, 4, 4), 2.0) == (2, 2)
