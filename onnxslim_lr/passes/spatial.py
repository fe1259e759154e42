"""Spatial separable: a kh x 1 conv C->K, then a 1 x kw conv K->F (Jaderberg et al. scheme 2).

``W`` permuted to ``(C*kh) x (kw*F)`` is truncated to rank K. The vertical stage carries the
vertical stride/pad/dilation, the horizontal stage the horizontal ones and the bias, so
padding and striding compose to exactly the original conv (exact at K = min(C*kh, F*kw)).
``auto_pad`` carries over unchanged: along the axis where a stage has kernel 1 and stride 1,
SAME padding is zero. MACs: ``K*C*kh*Ho*W + F*K*kw*Ho*Wo``. Under ``--metric data`` the
truncation is in the metric of the input-patch covariance (:func:`..decompose.svd.spatial_svd`);
reconstruction refits the horizontal stage (:func:`..decompose.reconstruct.refit_last_stage`
with ``pre = spatial_pre``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import spatial_macs
from ..decompose import reconstruct as rc
from ..decompose.ranks import spatial_full_rank
from ..decompose.svd import SpatialSVD, spatial_spectrum, spatial_svd, spatial_svd_fitter
from ..graph import Names
from ..planning import Ladder, truncation_error
from .base import Candidate, ConvSite, Decline, Pass, PassContext, Settings, conv_node, match_conv, register


@register
class SpatialSeparablePass(Pass):
    name = "spatial"
    summary = "spatial separable: kh x 1 conv C->K, then 1 x kw conv K->F"
    data_aware = True

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
        sigma = self.covariance(site, ctx, settings)

        def macs(sizes: tuple[int, ...]) -> int:
            return spatial_macs(F, C, kh, kw, out_hw[0], in_hw[1], out_hw[1], sizes[0]) if out_hw and in_hw else 0

        spectrum = lru_cache(maxsize=1)(lambda: spatial_spectrum(site.weight))
        # one fitter per ladder: the rank-independent work (the whitened SVD) is done once
        fitter = lru_cache(maxsize=1)(lambda: spatial_svd_fitter(site.weight, sigma=sigma))
        return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=macs_before, macs=macs,
                      build=lambda sizes: self._build(site, ctx, sigma, sizes[0], full, macs_before, macs(sizes),
                                                      fitter),
                      spectra=lambda: [[spectrum()]], error=lambda sizes: truncation_error(spectrum())(sizes),
                      unit="rank")

    def _build(self, site: ConvSite, ctx: PassContext, sigma: np.ndarray | None, rank: int, full: int,
               macs_before: int, macs_after: int,
               fitter: Callable[[], Callable[[int], SpatialSVD]] | None = None) -> Candidate | Decline:
        refused = ctx.no_saving(f"rank {rank} of {full}", macs_before, macs_after)
        if refused is not None:
            return refused
        fac = fitter()(rank) if fitter is not None else spatial_svd(site.weight, rank, sigma=sigma)
        return self._candidate(site, fac.vertical, fac.horizontal, site.bias, rank, full, macs_before, macs_after,
                               fac.rel_error)

    def _candidate(self, site: ConvSite, vertical: np.ndarray, horizontal: np.ndarray, bias: np.ndarray | None,
                   rank: int, full: int, macs_before: int, macs_after: int, rel_error: float,
                   note: str = "") -> Candidate:
        a = site.attrs
        sh, sw = a.strides
        dh, dw = a.dilations
        top, left, bottom, right = a.pads

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/spatial")
            mid = n.var("mid")
            return [
                conv_node(n, "vertical", x, mid, vertical, None, strides=(sh, 1), dilations=(dh, 1),
                          pads=(top, 0, bottom, 0), auto_pad=a.auto_pad),
                conv_node(n, "horizontal", mid, y, horizontal, bias, strides=(1, sw), dilations=(1, dw),
                          pads=(0, left, 0, right), auto_pad=a.auto_pad),
            ]

        return Candidate(self.name, {"rank": rank, "full": full}, macs_before, macs_after, rel_error, build,
                         note=note, site=site, factors={"vertical": vertical, "horizontal": horizontal, "bias": bias})

    def effective(self, site: ConvSite, candidate: Candidate) -> tuple[np.ndarray, np.ndarray | None]:
        f = candidate.factors
        h = f["horizontal"]
        return (h.reshape(h.shape[0], -1).astype(np.float64) @ rc.spatial_pre(f["vertical"], site.kw), f["bias"])

    def refit(self, site: ConvSite, candidate: Candidate, moments: rc.CrossMoments, *,
              intercept: bool = True) -> Candidate:
        """The horizontal ``1 x kw`` stage by least squares on the vertical stage's output."""
        F, C, kh, kw = site.weight.shape
        vertical = candidate.factors["vertical"]
        fit = rc.refit_last_stage(site.weight.reshape(F, -1), site.bias, rc.spatial_pre(vertical, kw), moments,
                                  intercept=intercept)
        k = vertical.shape[0]
        horizontal = fit.second.reshape(F, k, 1, kw).astype(np.float32)
        return self._candidate(site, vertical, horizontal, fit.bias.astype(np.float32), int(candidate.params["rank"]),
                               int(candidate.params["full"]), candidate.macs_before, candidate.macs_after,
                               fit.rel_error, candidate.note)
