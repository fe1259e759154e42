"""Tucker-2: 1x1 conv C->R_C, kh x kw conv R_C->R_F, 1x1 conv R_F->F (Kim et al. 2016).

The core carries the original stride/pads/dilation (the first 1x1 keeps the spatial size, so
even ``auto_pad`` SAME resolves to the same pads); the last 1x1 carries the bias. Ranks per
mode: the energy rule is applied to each mode's unfolding separately, the ratio rule to F
and C, the speedup rule keeps ``R_F : R_C = F : C``. HOSVD start, HOOI refinement.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import tucker2_macs, tucker2_ranks_for_speedup
from ..decompose.ranks import rank_for_energy, rank_from_ratio
from ..decompose.svd import channel_spectrum
from ..decompose.tucker import tucker2
from ..graph import Names
from ..planning import DEFAULT_ENERGY
from .base import Budget, Candidate, ConvSite, Decline, Pass, PassContext, conv_node, match_conv, register, spatial_attrs


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

    def ranks(self, site: ConvSite, budget: Budget) -> tuple[int, int]:
        F, C, kh, kw = site.weight.shape
        if budget.rank_ratio is not None:
            return rank_from_ratio(F, budget.rank_ratio), rank_from_ratio(C, budget.rank_ratio)
        if budget.target_speedup is not None and site.in_hw and site.out_hw:
            return tucker2_ranks_for_speedup(F, C, kh, kw, *site.in_hw, *site.out_hw, budget.target_speedup)
        if budget.target_speedup is not None:
            t = 1.0 / budget.target_speedup
            return rank_from_ratio(F, t), rank_from_ratio(C, t)
        energy = budget.energy if budget.energy is not None else DEFAULT_ENERGY
        s_out, s_in = _mode_spectra(site.weight)
        return rank_for_energy(s_out, energy), rank_for_energy(s_in, energy)

    def propose(self, site: ConvSite, budget: Budget, ctx: PassContext) -> Candidate | Decline:
        F, C, kh, kw = site.weight.shape
        r_out, r_in = self.ranks(site, budget)
        macs_after = tucker2_macs(F, C, kh, kw, *site.in_hw, *site.out_hw, r_out, r_in) if site.in_hw and site.out_hw else 0
        refused = ctx.no_saving(f"ranks ({r_out}, {r_in})", site.macs(), macs_after)
        if refused:
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

        return Candidate(self.name, {"r_out": r_out, "r_in": r_in}, site.macs(), macs_after, fac.rel_error, build)
