"""Spatial separable: a kh x 1 conv C->K, then a 1 x kw conv K->F (Jaderberg et al. scheme 2).

``W`` permuted to ``(C*kh) x (kw*F)`` is truncated to rank K. The vertical stage carries the
vertical stride/pad/dilation, the horizontal stage the horizontal ones and the bias, so
padding and striding compose to exactly the original conv (exact at K = min(C*kh, F*kw)).
``auto_pad`` carries over unchanged: along the axis where a stage has kernel 1 and stride 1,
SAME padding is zero. MACs: ``K*C*kh*Ho*W + F*K*kw*Ho*Wo``.
"""

from __future__ import annotations

from functools import lru_cache

import onnx_graphsurgeon as gs

from ..cost import spatial_macs
from ..decompose.ranks import spatial_full_rank
from ..decompose.svd import spatial_spectrum, spatial_svd
from ..graph import Names
from ..planning import Ladder, truncation_error
from .base import Candidate, ConvSite, Decline, Pass, PassContext, Settings, conv_node, match_conv, register


@register
class SpatialSeparablePass(Pass):
    name = "spatial"
    summary = "spatial separable: kh x 1 conv C->K, then 1 x kw conv K->F"

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        site = match_conv(node, ctx)
        if isinstance(site, Decline):
            return site
        if site.kh == 1 or site.kw == 1:
            return Decline(f"{site.kh}x{site.kw} kernel is already separable")
        return site

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder:
        F, C, kh, kw = site.weight.shape
        full = spatial_full_rank(F, C, kh, kw)
        out_hw, in_hw = site.out_hw, site.in_hw
        macs_before = site.macs()

        def macs(sizes: tuple[int, ...]) -> int:
            return spatial_macs(F, C, kh, kw, out_hw[0], in_hw[1], out_hw[1], sizes[0]) if out_hw and in_hw else 0

        spectrum = lru_cache(maxsize=1)(lambda: spatial_spectrum(site.weight))
        return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=macs_before, macs=macs,
                      build=lambda sizes: self._build(site, ctx, sizes[0], full, macs_before, macs(sizes)),
                      spectra=lambda: [[spectrum()]], error=lambda sizes: truncation_error(spectrum())(sizes),
                      unit="rank")

    def _build(self, site: ConvSite, ctx: PassContext, rank: int, full: int, macs_before: int,
               macs_after: int) -> Candidate | Decline:
        refused = ctx.no_saving(f"rank {rank} of {full}", macs_before, macs_after)
        if refused is not None:
            return refused
        a = site.attrs
        fac = spatial_svd(site.weight, rank)
        sh, sw = a.strides
        dh, dw = a.dilations
        top, left, bottom, right = a.pads
        bias = site.bias

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/spatial")
            mid = n.var("mid")
            return [
                conv_node(n, "vertical", x, mid, fac.vertical, None, strides=(sh, 1), dilations=(dh, 1),
                          pads=(top, 0, bottom, 0), auto_pad=a.auto_pad),
                conv_node(n, "horizontal", mid, y, fac.horizontal, bias, strides=(1, sw), dilations=(1, dw),
                          pads=(0, left, 0, right), auto_pad=a.auto_pad),
            ]

        return Candidate(self.name, {"rank": rank, "full": full}, macs_before, macs_after, fac.rel_error, build)
