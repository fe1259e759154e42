"""SVD of fully connected layers (Denton 4.3): ``x @ B`` -> ``(x @ U_r) @ V_r``.

For ``B: K x F`` the rewrite costs ``r*(K+F)`` instead of ``K*F`` per row, so it pays only
when ``r < K*F/(K+F)`` (the manager's MAC check enforces this). Gemm keeps ``alpha``/``transB``
folded into ``B`` and its bias on the second product; MatMul with an N-D input stays N-D.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..cost import fc_svd_macs
from ..decompose import reconstruct as rc
from ..decompose.ranks import fc_full_rank
from ..decompose.svd import FCSVD, fc_spectrum, fc_svd, fc_svd_fitter
from ..graph import Names
from ..planning import Ladder, truncation_error
from .base import Candidate, Decline, FCSite, Pass, PassContext, Request, Settings, match_fc, register


@register
class FCSVDPass(Pass):
    name = "fc-svd"
    op_types = ("Gemm", "MatMul")
    summary = "SVD of a Gemm/MatMul with a constant weight: two thinner products"
    data_aware = True

    def match(self, node: gs.Node, ctx: PassContext) -> FCSite | Decline:
        return match_fc(node, ctx)

    def needs(self, site: FCSite, ctx: PassContext, settings: Settings) -> list[Request]:
        """``B^T Sigma B`` (``F x F``): VGG-19's first FC would otherwise need a 25088-square ``Sigma``."""
        return self.response_needs(site, settings)

    def ladder(self, site: FCSite, ctx: PassContext, settings: Settings) -> Ladder:
        K, F = site.weight.shape
        full = fc_full_rank(K, F)
        response = self.response(site, ctx, settings)
        macs_before = site.macs()
        rows = macs_before // (K * F) if K * F else 1

        def macs(sizes: tuple[int, ...]) -> int:
            return rows * fc_svd_macs(K, F, sizes[0])

        spectrum = lru_cache(maxsize=1)(lambda: fc_spectrum(site.weight, response=response))
        # one fitter per ladder: the decomposition (VGG-19's first FC: a 4096^2 eigh) is done once
        fitter = lru_cache(maxsize=1)(lambda: fc_svd_fitter(site.weight, response=response))
        return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=macs_before, macs=macs,
                      build=lambda sizes: self._build(site, ctx, response, sizes[0], full, macs_before, macs(sizes),
                                                      fitter),
                      spectra=lambda: [[spectrum()]], error=lambda sizes: truncation_error(spectrum())(sizes),
                      unit="rank")

    def _build(self, site: FCSite, ctx: PassContext, response: np.ndarray | None, rank: int, full: int,
               macs_before: int, macs_after: int,
               fitter: Callable[[], Callable[[int], FCSVD]] | None = None) -> Candidate | Decline:
        refused = ctx.no_saving(f"rank {rank} of {full}", macs_before, macs_after)
        if refused is not None:
            return refused
        fac = fitter()(rank) if fitter is not None else fc_svd(site.weight, rank, response=response)
        return self._candidate(site, fac.left, fac.right, site.bias, rank, full, macs_before, macs_after,
                               fac.rel_error)

    def _candidate(self, site: FCSite, left: np.ndarray, right: np.ndarray, bias: np.ndarray | None, rank: int,
                   full: int, macs_before: int, macs_after: int, rel_error: float, note: str = "") -> Candidate:
        op = site.node.op

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/fc_svd")
            h = n.var("h")
            first = n.node("MatMul", "left", [x, n.const("u", left)], [h])
            if op == "Gemm":
                ins = [h, n.const("v", right)] + ([n.const("b", bias)] if bias is not None else [])
                return [first, n.node("Gemm", "right", ins, [y])]
            if bias is None:
                return [first, n.node("MatMul", "right", [h, n.const("v", right)], [y])]
            # a MatMul refit with bias correction: the new bias needs its own Add
            z = n.var("z")
            return [first, n.node("MatMul", "right", [h, n.const("v", right)], [z]),
                    n.node("Add", "bias", [z, n.const("b", bias)], [y])]

        return Candidate(self.name, {"rank": rank, "full": full}, macs_before, macs_after, rel_error, build,
                         note=note, site=site, factors={"left": left, "right": right, "bias": bias})

    def effective(self, site: FCSite, candidate: Candidate) -> tuple[np.ndarray, np.ndarray | None]:
        f = candidate.factors
        return (f["left"].astype(np.float64) @ f["right"].astype(np.float64)).T, f["bias"]

    def refit(self, site: FCSite, candidate: Candidate, moments: rc.CrossMoments, *,
              intercept: bool = True) -> Candidate:
        """Both factors by reduced-rank regression (``W = B^T``, so ``left = first^T``, ``right = second^T``)."""
        rank = int(candidate.params["rank"])
        fit = rc.lowrank_regression(site.weight.T, site.bias, rank, moments, intercept=intercept)
        return self._candidate(site, np.ascontiguousarray(fit.first.T, dtype=np.float32),
                               np.ascontiguousarray(fit.second.T, dtype=np.float32), fit.bias.astype(np.float32),
                               rank, int(candidate.params["full"]), candidate.macs_before, candidate.macs_after,
                               fit.rel_error, candidate.note)
