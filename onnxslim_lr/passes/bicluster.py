"""Biclustering (Denton et al. 2014, 3.3): cluster inputs and outputs, approximate every block.

Input channels are clustered into ``G`` equal groups and output channels into ``H`` equal
groups (balanced k-means, independently); every ``(g, h)`` block ``F/H x C/G x kh x kw`` is
approximated by a Tucker-2 / two-SVD factorisation with ranks ``(K1, K2)``
(``--bicluster-mode svd``, default) or by an outer-product (CP) decomposition of rank ``K``
(``--bicluster-mode cp``); numerics in :func:`onnxslim_lr.decompose.denton.bicluster`.

Graph (standard ops only, METHODS.md section 2):

1. ``Gather(x, in_perm, axis=1)`` -- inputs into group order (omitted when the identity);
2. grouped 1x1 Conv, ``group = G`` (``C -> G*H*K1``);
3. channel shuffle ``(g, h, k) -> (h, g, k)``;
4. grouped kh x kw Conv with the original stride/pads/dilations, ``group = G*H`` (svd) or
   depthwise (cp);
5. grouped 1x1 Conv, ``group = H``, original bias (in cluster order), summing over ``g``;
6. ``Gather(., out_inverse, axis=1)`` -- back to the original filter order (omitted when the
   identity, e.g. ``H = 1``).

The shuffle is placed where it moves fewer values: between stages 2 and 3 (``G*H*K2*Ho*Wo``
values, the stage-2 blocks are then listed ``(g, h)``) rather than between 1 and 2
(``G*H*K1*H*W``) when the layer is strided or ``K2 < K1``; it is skipped when ``G = 1`` or
``H = 1``. ``--bicluster-shuffle reshape`` (default) emits ``Reshape(0, A, B, -1) ->
Transpose(0, 2, 1, 3) -> Reshape(Shape(t))`` (dynamic batch and spatial sizes work: the
last shape is read from the tensor itself); ``gather`` emits one ``Gather`` with the
shuffle permutation. Both were measured on ZFNet conv2 (``tools/bench_denton.py``): within
noise of each other; the reshape form is the one METHODS.md specifies.

The two Gathers keep ``build`` self-contained (it computes the replaced layer exactly and
touches nothing else). After the splices :func:`onnxslim_lr.permute.fold_channel_gathers`
folds the output permutation into the consumers (a following Conv's input channels, through
BN / ReLU / pools / Concat ...) and the input permutation into the producer of ``x`` when
that is a Conv (rows of its weight and bias, through single-consumer ReLU / BN / pools).
The candidate's ``perm`` parameter says what is predicted from the graph at planning time:
``out:folded|gather|none`` and ``in:folded|gather|none``.

Clusters: ``--clusters G,H``; default: the divisors of C and of F nearest to 4 (ties to the
smaller). ``C % G`` or ``F % H`` non-zero is declined with the reason (the groups of an ONNX
grouped conv are equal).

Ranks: the pass describes a ladder and :mod:`onnxslim_lr.planning` picks the rung.
``--ranks K1,K2`` (svd; a single ``K`` means ``K1 = K2 = K``) or ``--ranks K`` (cp) fixes it;
svd rungs are ``(K1, K2)`` with ``K2 = round(K1 * (F/H) / (C/G))`` for ``K1 = 1 .. C/G``, cp
rungs ``K = 1 .. min(C/G*F/H, C/G*kh*kw, F/H*kh*kw)`` (the generic bound on a block's CP
rank). ``--rank-ratio R``: ``K1 = round(R*C/G)``, ``K2 = round(R*F/H)`` (half up, clamped to
``>= 1``; cp: ``round(R * bound)``); ``--target-speedup S``: the largest rung whose Table 1
cost is ``<= original / S`` (the cheapest when none is); ``--energy E`` (default 0.98): the
clustering is computed once, and ``K1`` (``K2``) is the largest over blocks of the energy
rank of the block's input (output) unfolding (cp: ``K = max(K1, K2)``). The energy rule looks
at the Frobenius spectra.

Data metric (``--metric data`` with calibration data): the layer input's patch second
moment from the data service (:mod:`onnxslim_lr.calibration`) is handed to the decomposition,
which whitens each block's input mode by the channel part (``Sigma_gg^{1/2}``) and reports
``rel_error`` in the full patch metric.

MACs: Table 1 of the paper, every stage priced at the resolution it runs at
(:func:`~onnxslim_lr.decompose.denton.bicluster_svd_macs`, ``bicluster_cp_macs``); the
Gathers and the shuffle do no multiply-adds.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx_graphsurgeon as gs

from ..decompose.denton import Bicluster, bicluster, bicluster_cp_macs, bicluster_svd_macs
from ..graph import Names, ScopedNames
from ..permute import predict_backward, predict_fold
from ..planning import Budget, Ladder
from .base import (
    Candidate,
    ConvSite,
    Decline,
    Pass,
    PassContext,
    PassOption,
    Settings,
    conv_node,
    match_conv,
    one_of,
    register,
    spatial_attrs,
)

MODES = ("svd", "cp")
SHUFFLES = ("reshape", "gather")
DEFAULT_GROUPS = 4


def _clusters(text: str) -> tuple[int, int]:
    parts = [p.strip() for p in str(text).replace("x", ",").split(",")]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected G,H (input and output cluster counts), e.g. 2,4")
    try:
        g, h = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: G and H must be integers") from None
    if g < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: G and H must be >= 1")
    return g, h


def _ranks(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: expected K1,K2 (svd) or K (cp)")
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: ranks must be integers") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: ranks must be >= 1")
    return vals


def _nearest_divisor(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


def _parsed(value: object, parser):  # the API may pass raw strings
    return parser(value) if isinstance(value, str) else value


@register
class BiclusterPass(Pass):
    name = "bicluster"
    summary = "biclustering (Denton 3.3): G input x H output clusters, each block by SVD or CP"
    data_aware = True
    options = (
        PassOption("--clusters", _clusters, "bicluster: G,H = number of input and output clusters "
                   f"(default: the divisors of C and F nearest to {DEFAULT_GROUPS})", None, "G,H"),
        PassOption("--bicluster-mode", one_of(*MODES), "bicluster: block approximation, svd (ranks K1,K2) or cp (rank K)",
                   "svd", "MODE"),
        PassOption("--ranks", _ranks, "bicluster: block ranks K1,K2 (svd) or K (cp)", None, "K1,K2"),
        PassOption("--bicluster-shuffle", one_of(*SHUFFLES), "bicluster: channel shuffle as reshape (Reshape/Transpose/"
                   "Reshape, default) or gather", "reshape", "FORM"),
    )

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        return match_conv(node, ctx)

    # ---- choices ------------------------------------------------------------------------

    def clusters(self, site: ConvSite, settings: Settings | Budget) -> tuple[int, int] | Decline:
        given = _parsed(settings.options.get("clusters"), _clusters)
        if given is None:
            return _nearest_divisor(site.C, DEFAULT_GROUPS), _nearest_divisor(site.F, DEFAULT_GROUPS)
        G, H = (int(v) for v in given)
        if G > site.C or site.C % G:
            return Decline(f"--clusters {G},{H}: the {site.C} input channels do not split into G={G} equal groups "
                           f"(C % G = {site.C % G if G <= site.C else site.C})")
        if H > site.F or site.F % H:
            return Decline(f"--clusters {G},{H}: the {site.F} output channels do not split into H={H} equal groups "
                           f"(F % H = {site.F % H if H <= site.F else site.F})")
        return G, H

    def _fixed_ranks(self, settings: Settings, mode: str, Cg: int, Fh: int) -> tuple[int, ...] | Decline | None:
        """The rung ``--ranks`` fixes (validated), None when not given."""
        given = _parsed(settings.options.get("ranks"), _ranks)
        if given is None:
            return None
        vals = tuple(int(v) for v in given)
        if mode == "cp":
            if len(vals) != 1:
                got = ",".join(map(str, vals))
                return Decline(f"--bicluster-mode cp takes one rank (--ranks K), got --ranks {got}")
            return (vals[0],)
        K1, K2 = (vals[0], vals[0]) if len(vals) == 1 else vals
        if K1 > Cg or K2 > Fh:
            return Decline(f"--ranks {K1},{K2} exceeds the block size: K1 <= C/G = {Cg}, K2 <= F/H = {Fh}")
        return (K1, K2)

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder | Decline:
        """svd mode: rungs ``(K1, K2)`` with ``K1 : K2 ~ C/G : F/H``; cp mode: rungs ``K``."""
        F, C, kh, kw = site.weight.shape
        groups = self.clusters(site, settings)
        if isinstance(groups, Decline):
            return groups
        G, H = groups
        mode = _parsed(self.option(settings, "bicluster_mode"), one_of(*MODES))
        shuffle = _parsed(self.option(settings, "bicluster_shuffle"), one_of(*SHUFFLES))
        sigma = self.covariance(site, ctx, settings)
        Cg, Fh, P = C // G, F // H, kh * kw
        fixed = self._fixed_ranks(settings, mode, Cg, Fh)
        if isinstance(fixed, Decline):
            return fixed
        hw = (site.in_hw, site.out_hw) if site.in_hw and site.out_hw else None

        def spectra() -> list[list[np.ndarray]]:
            # the clustering at full ranks, once; per block the spectra of its input and
            # output unfoldings (the energy rule takes the largest rank over blocks)
            full = bicluster(site.weight, G, H, mode="svd", ranks=(Cg, Fh), seed=settings.seed)
            w = site.weight.astype(np.float64)
            cin = [np.flatnonzero(full.in_labels == g) for g in range(G)]
            fout = [np.flatnonzero(full.out_labels == h) for h in range(H)]
            s_in, s_out = [], []
            for g in range(G):
                for h in range(H):
                    T = w[np.ix_(fout[h], cin[g])].reshape(Fh, Cg, P)
                    s_in.append(np.linalg.svd(T.transpose(1, 0, 2).reshape(Cg, Fh * P), compute_uv=False))
                    s_out.append(np.linalg.svd(T.reshape(Fh, Cg * P), compute_uv=False))
            return [s_in + s_out] if mode == "cp" else [s_in, s_out]

        if mode == "cp":
            cp_full = max(1, min(Cg * Fh, Cg * P, Fh * P))
            full_sizes: tuple[int, ...] = (cp_full,)
            rungs = [(K,) for K in range(1, cp_full + 1)]
            macs = lambda sz: bicluster_cp_macs(C, F, kh, kw, *hw[0], *hw[1], G, H, sz[0]) if hw else 0  # noqa: E731
        else:
            full_sizes = (Cg, Fh)
            rungs = [(K1, min(Fh, max(1, int(round(K1 * Fh / Cg))))) for K1 in range(1, Cg + 1)]
            macs = lambda sz: (bicluster_svd_macs(C, F, kh, kw, *hw[0], *hw[1], G, H, sz[0], sz[1])  # noqa: E731
                               if hw else 0)
        return Ladder(full=full_sizes, rungs=rungs, macs_before=site.macs(), macs=macs, spectra=spectra, fixed=fixed,
                      build=lambda sz: self._build(site, ctx, G, H, mode, shuffle, sigma, sz, settings.seed),
                      unit="block rank")

    # ---- build --------------------------------------------------------------------------

    def _build(self, site: ConvSite, ctx: PassContext, G: int, H: int, mode: str, shuffle: str,
               sigma: np.ndarray | None, sizes: tuple[int, ...], seed: int) -> Candidate:
        F = site.F
        if mode == "svd":
            bc = bicluster(site.weight, G, H, mode="svd", ranks=(sizes[0], sizes[1]), sigma=sigma, seed=seed)
        else:
            bc = bicluster(site.weight, G, H, mode="cp", rank=sizes[0], sigma=sigma, seed=seed)
        K1, K2 = bc.ranks
        n2 = bc.stage2.shape[0] // (G * H)
        late = False
        if site.in_hw and site.out_hw:
            late = G * H * n2 * site.out_hw[0] * site.out_hw[1] < G * H * K1 * site.in_hw[0] * site.in_hw[1]
        out_identity = bool(np.array_equal(bc.out_order, np.arange(F)))
        in_identity = bc.in_perm_is_identity
        perm_out = perm_in = "none"
        if not out_identity:
            perm_out = "folded" if ctx.graph is not None and predict_fold(ctx.graph, site.node.outputs[0],
                                                                          bc.out_inverse) else "gather"
        if not in_identity:
            perm_in = "folded" if ctx.graph is not None and predict_backward(ctx.graph, site.node,
                                                                             bc.in_perm) else "gather"
        params: dict[str, object] = {"G": G, "H": H, "mode": mode}
        params.update({"K1": K1, "K2": K2} if mode == "svd" else {"K": K1})
        params["perm"] = f"in:{perm_in}/out:{perm_out}"
        macs_after = bc.macs(*site.in_hw, *site.out_hw) if site.in_hw and site.out_hw else 0
        return Candidate(
            method=self.name,
            params=params,
            macs_before=site.macs(),
            macs_after=macs_after,
            rel_error=float(bc.rel_error),
            build=_builder(site, bc, shuffle=shuffle, late=late),
            note=f"shuffle={shuffle}{' after the spatial stage' if late else ''}",
        )


def _shuffle_nodes(n: ScopedNames, t: gs.Tensor, out: gs.Variable, A: int, B: int, k: int, form: str,
                   tag: str) -> list[gs.Node]:
    """Channels ``(a, b, k) -> (b, a, k)`` of a ``(N, A*B*k, h, w)`` tensor."""
    if form == "gather":
        perm = np.arange(A * B * k).reshape(A, B, k).transpose(1, 0, 2).reshape(-1)
        return [n.node("Gather", f"{tag}_shuffle", [t, n.const(f"{tag}_shuffle_idx", perm.astype(np.int64))], [out],
                       axis=1)]
    r1, r2, shp = n.var(f"{tag}_split"), n.var(f"{tag}_swapped"), n.var(f"{tag}_shape", dtype=np.int64)
    return [
        n.node("Reshape", f"{tag}_split", [t, n.const(f"{tag}_split_shape", np.array([0, A, B, -1], np.int64))], [r1]),
        n.node("Transpose", f"{tag}_swap", [r1], [r2], perm=[0, 2, 1, 3]),
        n.node("Shape", f"{tag}_shape", [t], [shp]),
        n.node("Reshape", f"{tag}_merge", [r2, shp], [out]),
    ]


def _builder(site: ConvSite, bc: Bicluster, *, shuffle: str, late: bool):
    G, H = bc.n_in_groups, bc.n_out_groups
    K1 = bc.ranks[0]
    F = site.F
    n2 = bc.stage2.shape[0] // (G * H)
    stage1 = bc.stage1.astype(np.float32)
    stage2 = bc.stage2.astype(np.float32)
    stage3 = bc.stage3.astype(np.float32)
    do_shuffle = G > 1 and H > 1
    if late and do_shuffle:  # stage-2 blocks listed (g, h), matching the un-shuffled stage-1 output
        stage2 = np.concatenate([stage2[(h * G + g) * n2:(h * G + g + 1) * n2] for g in range(G) for h in range(H)])
    bias = None if site.bias is None else site.bias[bc.out_order]
    in_perm = None if bc.in_perm_is_identity else bc.in_perm.astype(np.int64)
    out_inv = None if np.array_equal(bc.out_order, np.arange(F)) else bc.out_inverse.astype(np.int64)
    attrs = site.attrs
    g2 = bc.stage2_group

    def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
        n = names.scoped(f"{site.name}/bicluster")
        nodes: list[gs.Node] = []
        cur: gs.Tensor = x
        if in_perm is not None:
            xg = n.var("in_grouped")
            nodes.append(n.node("Gather", "in_perm", [x, n.const("in_perm_idx", in_perm)], [xg], axis=1))
            cur = xg
        y1 = n.var("in_proj")
        nodes.append(conv_node(n, "in_proj", cur, y1, stage1, group=G))
        cur = y1
        if do_shuffle and not late:
            s = n.var("shuffled")
            nodes += _shuffle_nodes(n, cur, s, G, H, K1, shuffle, "s1")
            cur = s
        y2 = n.var("core")
        nodes.append(conv_node(n, "core", cur, y2, stage2, None, group=g2, **spatial_attrs(attrs)))
        cur = y2
        if do_shuffle and late:
            s = n.var("shuffled")
            nodes += _shuffle_nodes(n, cur, s, G, H, n2, shuffle, "s2")
            cur = s
        y3 = y if out_inv is None else n.var("cluster_order")
        nodes.append(conv_node(n, "out_proj", cur, y3, stage3, bias, group=H))
        if out_inv is not None:
            nodes.append(n.node("Gather", "restore_order", [y3, n.const("out_inverse", out_inv)], [y], axis=1))
        return nodes

    return build
