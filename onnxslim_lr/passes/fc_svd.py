"""SVD of fully connected layers (Denton 4.3): ``x @ B`` -> ``(x @ U_r) @ V_r``.

For ``B: K x F`` the rewrite costs ``r*(K+F)`` instead of ``K*F`` per row, so it pays only
when ``r < K*F/(K+F)`` (the manager's MAC check enforces this). Gemm keeps ``alpha``/``transB``
folded into ``B`` and its bias on the second product; MatMul with an N-D input stays N-D.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ..cost import fc_rank_for_speedup
from ..decompose.ranks import fc_full_rank
from ..decompose.svd import fc_spectrum, fc_svd
from ..graph import Names
from ..planning import choose_rank
from .base import Budget, Candidate, Decline, FCSite, Pass, PassContext, match_fc, register


@register
class FCSVDPass(Pass):
    name = "fc-svd"
    op_types = ("Gemm", "MatMul")
    summary = "SVD of a Gemm/MatMul with a constant weight: two thinner products"

    def match(self, node: gs.Node, ctx: PassContext) -> FCSite | Decline:
        return match_fc(node, ctx)

    def propose(self, site: FCSite, budget: Budget, ctx: PassContext) -> Candidate | Decline:
        K, F = site.weight.shape
        full = fc_full_rank(K, F)
        sigma = ctx.stats.patch_covariance(site) if (budget.metric == "data" and ctx.stats is not None) else None
        rank = choose_rank(
            budget,
            full=full,
            spectrum=lambda: fc_spectrum(site.weight, sigma),
            for_speedup=lambda s: fc_rank_for_speedup(K, F, s),
        )
        rows = site.macs() // (K * F) if K * F else 1
        macs_after = rows * rank * (K + F)
        refused = ctx.no_saving(f"rank {rank} of {full}", site.macs(), macs_after)
        if refused:
            return refused
        fac = fc_svd(site.weight, rank, sigma)
        bias, op = site.bias, site.node.op

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/fc_svd")
            h = n.var("h")
            first = n.node("MatMul", "left", [x, n.const("u", fac.left)], [h])
            if op == "Gemm":
                ins = [h, n.const("v", fac.right)] + ([n.const("b", bias)] if bias is not None else [])
                return [first, n.node("Gemm", "right", ins, [y])]
            return [first, n.node("MatMul", "right", [h, n.const("v", fac.right)], [y])]

        return Candidate(self.name, {"rank": rank, "full": full}, site.macs(), macs_after, fac.rel_error, build)
