"""Channel SVD: a kh x kw conv C->K followed by a 1x1 conv K->F.

``W`` reshaped to ``F x (C*kh*kw)`` is truncated to rank K (Denton 3.2 on the folded
weight; Zhang et al. 2016 with the data metric). The first conv carries the original
stride, pads and dilation; the second carries the bias. MACs go from ``F*C*kh*kw*HoWo`` to
``K*(C*kh*kw + F)*HoWo``, so it pays when ``K < F*C*kh*kw / (C*kh*kw + F)``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import svd_macs
from ..decompose import reconstruct as rc
from ..decompose.ranks import svd_full_rank
from ..decompose.svd import ChannelBasis, channel_basis, channel_spectrum, channel_svd
from ..graph import Names
from ..planning import Ladder, truncation_error
from .base import (Candidate, ConvSite, Decline, Pass, PassContext, Request, Settings, conv_node, match_conv, register,
                   spatial_attrs)


@register
class ChannelSVDPass(Pass):
    name = "svd"
    summary = "channel SVD: kh x kw conv C->K, then 1x1 conv K->F"
    data_aware = True

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        return match_conv(node, ctx)

    def needs(self, site: ConvSite, ctx: PassContext, settings: Settings) -> list[Request]:
        """``W Sigma W^T`` (``F x F``) is all the data metric of a channel SVD needs."""
        return self.response_needs(site, settings)

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder:
        F, C, kh, kw = site.weight.shape
        full = svd_full_rank(F, C, kh, kw)
        response = self.response(site, ctx, settings)
        hw = site.out_hw
        macs_before = site.macs()

        def macs(sizes: tuple[int, ...]) -> int:
            return svd_macs(F, C, kh, kw, *hw, sizes[0]) if hw else 0

        # one decomposition per layer, truncated per rung (an n x n eigh per rung was minutes per layer)
        basis = lru_cache(maxsize=1)(lambda: channel_basis(site.weight, response=response))

        def build(sizes: tuple[int, ...]) -> Candidate | Decline:
            return self._build(site, ctx, sizes[0], full, macs_before, macs(sizes), basis)

        spectrum = lru_cache(maxsize=1)(lambda: basis().s if response is not None else channel_spectrum(site.weight))
        return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=macs_before, macs=macs,
                      build=build, spectra=lambda: [[spectrum()]], unit="rank",
                      error=lambda sizes: truncation_error(spectrum())(sizes))

    def _build(self, site: ConvSite, ctx: PassContext, rank: int, full: int,
               macs_before: int, macs_after: int, basis: Callable[[], ChannelBasis]) -> Candidate | Decline:
        refused = ctx.no_saving(f"rank {rank} of {full}", macs_before, macs_after)
        if refused is not None:
            return refused
        fac = channel_svd(site.weight, rank, basis=basis())
        return self._candidate(site, fac.first, fac.second, site.bias, rank, full, macs_before, macs_after,
                               fac.rel_error)

    def _candidate(self, site: ConvSite, first: np.ndarray, second: np.ndarray, bias: np.ndarray | None, rank: int,
                   full: int, macs_before: int, macs_after: int, rel_error: float, note: str = "") -> Candidate:
        attrs = site.attrs

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/svd")
            mid = n.var("mid")
            return [
                conv_node(n, "spatial", x, mid, first, None, **spatial_attrs(attrs)),
                conv_node(n, "pointwise", mid, y, second, bias),
            ]

        return Candidate(
            method=self.name,
            params={"rank": rank, "full": full},
            macs_before=macs_before,
            macs_after=macs_after,
            rel_error=rel_error,
            build=build,
            note=note,
            site=site,
            factors={"first": first, "second": second, "bias": bias},
        )

    def effective(self, site: ConvSite, candidate: Candidate) -> tuple[np.ndarray, np.ndarray | None]:
        f = candidate.factors
        k = f["first"].shape[0]
        return (f["second"].reshape(-1, k).astype(np.float64) @ f["first"].reshape(k, -1).astype(np.float64),
                f["bias"])

    def refit(self, site: ConvSite, candidate: Candidate, moments: rc.CrossMoments, *,
              intercept: bool = True) -> Candidate:
        """Both factors by reduced-rank regression from the moments (Zhang et al. 2016)."""
        F, C, kh, kw = site.weight.shape
        rank = int(candidate.params["rank"])
        fit = rc.lowrank_regression(site.weight.reshape(F, -1), site.bias, rank, moments, intercept=intercept)
        return self._candidate(site, fit.first.reshape(rank, C, kh, kw).astype(np.float32),
                               fit.second.reshape(F, rank, 1, 1).astype(np.float32),
                               fit.bias.astype(np.float32), rank, int(candidate.params["full"]),
                               candidate.macs_before, candidate.macs_after, fit.rel_error, candidate.note)
