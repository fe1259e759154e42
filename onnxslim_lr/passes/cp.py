"""Outer product / CP: 1x1 conv C->K, depthwise kh x kw (K groups), 1x1 conv K->F.

``W_S: C x (kh*kw) x F`` is approximated by K rank-1 terms (Denton eqs. 6-7; Lebedev et al.
2015). ``--cp-method als`` fits all terms jointly (CP-ALS), ``greedy`` is Denton's
sequential rank-1 fitting. The depthwise stage carries the original spatial attributes, the
last 1x1 the bias. The energy rule has no exact CP meaning; it is applied to the channel-SVD
spectrum, which upper-bounds the rank CP needs per spatial tap. Under ``--metric data`` the
fit is data-weighted ALS in the metric of the input-patch covariance
(:func:`..decompose.cp.cp_conv`); reconstruction refits the output 1x1
(:func:`..decompose.reconstruct.refit_last_stage` with ``pre = cp_pre``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import cp_macs
from ..decompose import reconstruct as rc
from ..decompose.cp import cp_conv
from ..decompose.ranks import cp_full_rank
from ..decompose.svd import channel_spectrum
from ..graph import Names
from ..planning import Ladder
from .base import Candidate, ConvSite, Decline, Pass, PassContext, PassOption, Settings, conv_node, one_of, match_conv, register, spatial_attrs


@register
class CPPass(Pass):
    name = "cp"
    summary = "CP / outer product: 1x1 C->K, depthwise kh x kw, 1x1 K->F"
    data_aware = True
    options = (PassOption("--cp-method", one_of("als", "greedy"), "CP fitting: als (joint, default) or greedy (Denton's rank-1 sequence)", "als"),)

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        site = match_conv(node, ctx)
        if isinstance(site, Decline):
            return site
        if site.kh * site.kw == 1:
            return Decline("1x1 conv: CP has no spatial factor to separate (use svd)")
        return site

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder:
        F, C, kh, kw = site.weight.shape
        full = cp_full_rank(F, C, kh, kw)
        hw_in, hw_out = site.in_hw, site.out_hw
        macs_before = site.macs()
        method = self.option(settings, "cp_method")
        sigma = self.covariance(site, ctx, settings)

        def macs(sizes: tuple[int, ...]) -> int:
            return cp_macs(F, C, kh, kw, *hw_in, *hw_out, sizes[0]) if hw_in and hw_out else 0

        # the energy rule has no exact CP meaning: the channel-SVD spectrum bounds the rank
        # CP needs per spatial tap
        return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=macs_before, macs=macs,
                      build=lambda sizes: self._build(site, ctx, settings, sigma, method, sizes[0], macs_before, macs(sizes)),
                      spectra=lambda: [[channel_spectrum(site.weight)]], unit="rank")

    def _build(self, site: ConvSite, ctx: PassContext, settings: Settings, sigma: np.ndarray | None, method: str,
               rank: int, macs_before: int, macs_after: int) -> Candidate | Decline:
        refused = ctx.no_saving(f"rank {rank}", macs_before, macs_after)
        if refused is not None:
            return refused
        fac = cp_conv(site.weight, rank, method=method, seed=settings.seed, sigma=sigma)
        return self._candidate(site, fac.first, fac.depthwise, fac.last, site.bias, rank, method, macs_before,
                               macs_after, fac.rel_error)

    def _candidate(self, site: ConvSite, first: np.ndarray, depthwise: np.ndarray, last: np.ndarray,
                   bias: np.ndarray | None, rank: int, method: str, macs_before: int, macs_after: int,
                   rel_error: float, note: str = "") -> Candidate:
        attrs = site.attrs

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/cp")
            a, b = n.var("in_proj"), n.var("depthwise")
            return [
                conv_node(n, "in_proj", x, a, first),
                conv_node(n, "depthwise", a, b, depthwise, None, group=rank, **spatial_attrs(attrs)),
                conv_node(n, "out_proj", b, y, last, bias),
            ]

        return Candidate(self.name, {"rank": rank, "fit": method}, macs_before, macs_after, rel_error, build,
                         note=note, site=site,
                         factors={"first": first, "depthwise": depthwise, "last": last, "bias": bias})

    def effective(self, site: ConvSite, candidate: Candidate) -> tuple[np.ndarray, np.ndarray | None]:
        f = candidate.factors
        last = f["last"].reshape(f["last"].shape[0], -1).astype(np.float64)
        return last @ rc.cp_pre(f["first"], f["depthwise"]), f["bias"]

    def refit(self, site: ConvSite, candidate: Candidate, moments: rc.CrossMoments, *,
              intercept: bool = True) -> Candidate:
        """The output 1x1 by least squares on the depthwise stage's output."""
        F = site.weight.shape[0]
        f = candidate.factors
        fit = rc.refit_last_stage(site.weight.reshape(F, -1), site.bias, rc.cp_pre(f["first"], f["depthwise"]),
                                  moments, intercept=intercept)
        rank = int(candidate.params["rank"])
        last = fit.second.reshape(F, rank, 1, 1).astype(np.float32)
        return self._candidate(site, f["first"], f["depthwise"], last, fit.bias.astype(np.float32), rank,
                               str(candidate.params["fit"]), candidate.macs_before, candidate.macs_after,
                               fit.rel_error, candidate.note)
