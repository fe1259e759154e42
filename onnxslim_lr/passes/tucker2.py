"""Tucker-2: 1x1 conv C->R_C, kh x kw conv R_C->R_F, 1x1 conv R_F->F (Kim et al. 2016).

The core carries the original stride/pads/dilation (the first 1x1 keeps the spatial size, so
even ``auto_pad`` SAME resolves to the same pads); the last 1x1 carries the bias. Ranks per
mode (decided by :mod:`onnxslim_lr.planning` on this pass's ladder): the energy rule reads each
mode's unfolding spectrum separately, the ratio rule scales F and C, the speedup rule walks
pairs keeping ``R_F : R_C = F : C``. HOSVD start, HOOI refinement. No data-aware form yet:
under ``--metric data`` it runs in the Frobenius metric and the report says so.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import tucker2_macs, tucker2_rank_pairs
from ..decompose.svd import channel_spectrum
from ..decompose.tucker import tucker2
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

        def macs(sizes: tuple[int, ...]) -> int:
            return tucker2_macs(F, C, kh, kw, *hw[0], *hw[1], sizes[0], sizes[1]) if hw else 0

        # rungs keep r_out : r_in ~ F : C; the ratio and energy rules may pick any pair
        return Ladder(full=(F, C), rungs=tucker2_rank_pairs(F, C), macs_before=macs_before, macs=macs,
                      build=lambda sizes: self._build(site, ctx, sizes[0], sizes[1], macs_before, macs(sizes)),
                      spectra=lambda: [[s] for s in _mode_spectra(site.weight)], unit="rank pair")

    def _build(self, site: ConvSite, ctx: PassContext, r_out: int, r_in: int, macs_before: int,
               macs_after: int) -> Candidate | Decline:
        refused = ctx.no_saving(f"ranks ({r_out}, {r_in})", macs_before, macs_after)
        if refused is not None:
            return refused
        fac = tucker2(site.weight, r_out, r_in)
        bias, attrs = site.bias, site.attrs

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/tucker2")
            a, b = n.var("in_proj"), n.var("core")
            return [
                conv_node(n, "in_proj", x, a, fac.first),
                conv_node(n, "core", a, b, fac.core, None, **spatial_attrs(attrs)),
                conv_node(n, "out_proj", b, y, fac.last, bias),
            ]

        return Candidate(self.name, {"r_out": r_out, "r_in": r_in}, macs_before, macs_after, fac.rel_error, build)
