"""Channel SVD: a kh x kw conv C->K followed by a 1x1 conv K->F.

``W`` reshaped to ``F x (C*kh*kw)`` is truncated to rank K (Denton 3.2 on the folded
weight; Zhang et al. 2016 with the data metric). The first conv carries the original
stride, pads and dilation; the second carries the bias. MACs go from ``F*C*kh*kw*HoWo`` to
``K*(C*kh*kw + F)*HoWo``, so it pays when ``K < F*C*kh*kw / (C*kh*kw + F)``.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..cost import svd_macs, svd_rank_for_speedup
from ..decompose.ranks import svd_full_rank
from ..decompose.svd import channel_spectrum, channel_svd
from ..graph import Names
from ..planning import choose_rank
from .base import Budget, Candidate, ConvSite, Decline, Pass, PassContext, conv_node, match_conv, register, spatial_attrs


@register
class ChannelSVDPass(Pass):
    name = "svd"
    summary = "channel SVD: kh x kw conv C->K, then 1x1 conv K->F"

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        return match_conv(node, ctx)

    def propose(self, site: ConvSite, budget: Budget, ctx: PassContext) -> Candidate | Decline:
        F, C, kh, kw = site.weight.shape
        full = svd_full_rank(F, C, kh, kw)
        sigma = ctx.stats.patch_covariance(site) if (budget.metric == "data" and ctx.stats is not None) else None
        hw = site.out_hw
        rank = choose_rank(
            budget,
            full=full,
            spectrum=lambda: channel_spectrum(site.weight, sigma),
            for_speedup=(lambda s: svd_rank_for_speedup(F, C, kh, kw, hw[0], hw[1], s)) if hw else None,
        )
        macs_before = site.macs()
        macs_after = svd_macs(F, C, kh, kw, *hw, rank) if hw else 0
        refused = ctx.no_saving(f"rank {rank} of {full}", macs_before, macs_after)
        if refused:
            return refused
        fac = channel_svd(site.weight, rank, sigma)
        bias, attrs = site.bias, site.attrs

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/svd")
            mid = n.var("mid")
            return [
                conv_node(n, "spatial", x, mid, fac.first, None, **spatial_attrs(attrs)),
                conv_node(n, "pointwise", mid, y, fac.second, bias),
            ]

        return Candidate(
            method=self.name,
            params={"rank": rank, "full": full},
            macs_before=macs_before,
            macs_after=macs_after,
            rel_error=fac.rel_error,
            build=build,
        )
