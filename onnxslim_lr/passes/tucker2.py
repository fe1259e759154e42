"""Tucker-2: 1x1 conv C->R_C, kh x kw conv R_C->R_F, 1x1 conv R_F->F (Kim et al. 2016).

The core carries the original stride/pads/dilation (the first 1x1 keeps the spatial size, so
even ``auto_pad`` SAME resolves to the same pads); the last 1x1 carries the bias. Ranks per
mode (decided by :mod:`onnxslim_lr.planning` on this pass's ladder): the energy rule reads each
mode's unfolding spectrum separately, the ratio rule scales F and C, the speedup rule walks
pairs keeping ``R_F : R_C = F : C``. HOSVD start, HOOI refinement; under ``--metric data``
the fit is in the metric of the input-patch covariance (:func:`..decompose.tucker.tucker2`).
Reconstruction refits the core and the output projection together (a rank-``R_F`` map of
the projected patch, :func:`..decompose.reconstruct.lowrank_regression` with
``pre = tucker2_pre``); the input projection stays.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import tucker2_macs, tucker2_rank_pairs
from ..decompose import reconstruct as rc
from ..decompose.svd import channel_spectrum
from ..decompose.tucker import Tucker2, tucker2, tucker2_fitter
from ..graph import Names
from ..planning import Ladder
from .base import Candidate, ConvSite, Decline, Pass, PassContext, Settings, conv_node, match_conv, register, spatial_attrs


def _mode_spectra(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of the mode-F and mode-C unfoldings (the HOSVD spectra)."""
    return channel_spectrum(w), channel_spectrum(w.transpose(1, 0, 2, 3))


@register
class Tucker2Pass(Pass):
    name = "tucker2"
    summary = "Tucker-2: 1x1 C->R_C, kh x kw R_C->R_F, 1x1 R_F->F"
    data_aware = True

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        site = match_conv(node, ctx)
        if isinstance(site, Decline):
            return site
        if site.kh * site.kw == 1:
            return Decline("1x1 conv: Tucker-2 would only add stages (use svd)")
        return site

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder:
        F, C, kh, kw = site.weight.shape
        macs_before = site.macs()
        hw = (site.in_hw, site.out_hw) if site.in_hw and site.out_hw else None
        sigma = self.covariance(site, ctx, settings)

        def macs(sizes: tuple[int, ...]) -> int:
            return tucker2_macs(F, C, kh, kw, *hw[0], *hw[1], sizes[0], sizes[1]) if hw else 0

        # rungs keep r_out : r_in ~ F : C; the ratio and energy rules may pick any pair
        # one fitter per ladder: the rank-independent work (whitening, tr(W Sigma W^T)) is done once
        fitter = lru_cache(maxsize=1)(lambda: tucker2_fitter(site.weight, sigma=sigma))
        return Ladder(full=(F, C), rungs=tucker2_rank_pairs(F, C), macs_before=macs_before, macs=macs,
                      build=lambda sizes: self._build(site, ctx, sigma, sizes[0], sizes[1], macs_before, macs(sizes),
                                                      fitter),
                      spectra=lambda: [[s] for s in _mode_spectra(site.weight)], unit="rank pair")

    def _build(self, site: ConvSite, ctx: PassContext, sigma: np.ndarray | None, r_out: int, r_in: int,
               macs_before: int, macs_after: int,
               fitter: Callable[[], Callable[[int, int], Tucker2]] | None = None) -> Candidate | Decline:
        refused = ctx.no_saving(f"ranks ({r_out}, {r_in})", macs_before, macs_after)
        if refused is not None:
            return refused
        fac = fitter()(r_out, r_in) if fitter is not None else tucker2(site.weight, r_out, r_in, sigma=sigma)
        return self._candidate(site, fac.first, fac.core, fac.last, site.bias, r_out, r_in, macs_before, macs_after,
                               fac.rel_error)

    def _candidate(self, site: ConvSite, first: np.ndarray, core: np.ndarray, last: np.ndarray,
                   bias: np.ndarray | None, r_out: int, r_in: int, macs_before: int, macs_after: int,
                   rel_error: float, note: str = "") -> Candidate:
        attrs = site.attrs

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/tucker2")
            a, b = n.var("in_proj"), n.var("core")
            return [
                conv_node(n, "in_proj", x, a, first),
                conv_node(n, "core", a, b, core, None, **spatial_attrs(attrs)),
                conv_node(n, "out_proj", b, y, last, bias),
            ]

        return Candidate(self.name, {"r_out": r_out, "r_in": r_in}, macs_before, macs_after, rel_error, build,
                         note=note, site=site, factors={"first": first, "core": core, "last": last, "bias": bias})

    def effective(self, site: ConvSite, candidate: Candidate) -> tuple[np.ndarray, np.ndarray | None]:
        f = candidate.factors
        kh, kw = site.kh, site.kw
        core = f["core"].reshape(f["core"].shape[0], -1).astype(np.float64)
        last = f["last"].reshape(f["last"].shape[0], -1).astype(np.float64)
        return last @ core @ rc.tucker2_pre(f["first"], kh, kw), f["bias"]

    def refit(self, site: ConvSite, candidate: Candidate, moments: rc.CrossMoments, *,
              intercept: bool = True) -> Candidate:
        """Core and output projection as a rank-``R_F`` regression of the projected patch."""
        F, C, kh, kw = site.weight.shape
        r_out, r_in = int(candidate.params["r_out"]), int(candidate.params["r_in"])
        first = candidate.factors["first"]
        pre = rc.tucker2_pre(first, kh, kw)
        rank = min(r_out, F, pre.shape[0])
        fit = rc.lowrank_regression(site.weight.reshape(F, -1), site.bias, rank, moments, pre=pre,
                                    intercept=intercept)
        core = fit.first.reshape(rank, r_in, kh, kw).astype(np.float32)
        last = fit.second.reshape(F, rank, 1, 1).astype(np.float32)
        return self._candidate(site, first, core, last, fit.bias.astype(np.float32), r_out, r_in,
                               candidate.macs_before, candidate.macs_after, fit.rel_error, candidate.note)
