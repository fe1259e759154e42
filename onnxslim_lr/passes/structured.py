"""Structured convolutions (Bhalgat et al. 2020): a sum-pool followed by a smaller conv.

Each output filter ``W_f`` (``C x kh x kw``) is projected onto the kernels that are sums of
``c * nh * nw`` boxes of ones of size ``(C-c+1) x (kh-nh+1) x (kw-nw+1)``
(:func:`onnxslim_lr.decompose.structured.project`; least squares per filter, or in the data
metric ``Sigma`` with ``--metric data``). Such a conv equals a sum-pool of its padded input
followed by a ``c x nh x nw`` conv with the original stride and dilation (proof in the
decompose module's docstring). The graph:

* spatial only (``c = C``): ``AveragePool(kh-nh+1, kw-nw+1; stride 1; count_include_pad=1)``
  -> ``Conv c x nh x nw`` (the pool's window area is folded into the conv weight, bias on the
  conv);
* with channel structure (``c < C``) the box is separable, so the channel window sums are
  taken first, by prefix sums: ``Pad`` one leading zero channel -> ``CumSum`` over channels
  (``Q``) -> ``S[a] = Q[a+Pc] - Q[a]`` (two ``Slice`` and a ``Sub``) -> 2-D ``AveragePool`` ->
  ``Conv`` (weight ``beta * Ph*Pw``). That is O(1) additions per output instead of the
  ``Pc*Ph*Pw`` of a 3-D window: onnxruntime's 3-D AveragePool with a (C/2+1) x 2 x 2 window
  measured ~100x slower than this form for a 256-channel 56x56 map. Models older than opset
  11 (no CumSum) get the literal 5-D form: ``Unsqueeze(axis 1)`` ``(N,C,H,W) -> (N,1,C,H,W)``
  -> 3-D ``AveragePool`` over (channel, row, col) -> ``Squeeze(axis 1)`` -> ``Conv``
  (Unsqueeze/Squeeze axes as attributes before opset 13, as an input from 13). Every form
  keeps batch and spatial sizes dynamic.

Padding. The original pads belong on the pool (the pool reads the padded input). Rows of the
pooled map whose whole window lies in the padding are zeros, so only
``min(pad, d*(P-1))`` of each side's padding has to be pooled (``P`` the pool window on that
axis, ``d`` the dilation); the rest becomes the small conv's own zero padding, which is
equivalent and cheaper. This also keeps the pool's pads below its window, which onnxruntime
requires ("Pad should be smaller than kernel"). Only a dilated axis can still need a pooled
pad ``>= P``; the pooled padding is then applied by an explicit ``Pad`` node before the pool.
``auto_pad`` SAME_* is resolved to explicit pads from the input size, which is only valid
when the graph declares static spatial dims (declined otherwise); VALID means no padding.

Dilated convs need a dilated pool: ``AveragePool.dilations`` exists from opset 19, so the
candidate carries ``min_opset = 19``; on an older model the pass manager rejects it with that
reason (or converts the model's opset, when it is allowed to). A dilation on an axis whose
pool window is 1 needs nothing.

Structure sizes, per layer (the ladder; :func:`onnxslim_lr.planning.choose` picks the rung):

* ``c``, the input channels the small conv keeps, is fixed for the layer: all ``C`` (spatial
  structure only), or ``c = round(r*C)`` clamped to ``[1, C]`` with ``--struct-c-ratio r``;
* the rungs are the spatial structures ``(nh, nw)``, ``1 <= nh <= kh``, ``1 <= nw <= kw``
  (the full kernel only when ``c < C``), by increasing cost ``c*nh*nw`` (MACs of the small
  conv); among equal costs the shape closest to the kernel's aspect ratio, then the taller,
  comes first. A rung's error is the relative projection error (in the data metric under
  ``--metric data``);
* ``--struct-n n`` pins the rung ``(min(n, kh), min(n, kw))``; with no rule the rung is
  ``(kh-1, kw-1)``. Otherwise the planner's rules apply as to every ladder: ``--rank-ratio R``
  gives ``round(R*kh) x round(R*kw)``, ``--target-speedup S`` the largest structure at most
  ``1/S`` of the MACs (the cheapest, ``1x1``, when none is: channel structure is never
  added by the rule, only by ``--struct-c-ratio``), ``--energy E`` the cheapest structure
  whose projection error is ``<= sqrt(1-E)``.

A 1x1 kernel has nothing to pool spatially; it is declined unless channel structure is asked
for. MACs are those of the small conv; the pool's additions are reported apart
(``Candidate.extra_adds``: ``structured_pool_adds`` for the pools, the prefix sums counted as
``(C+1) + c`` additions per pixel) because they are not multiply-adds -- but they are not free on a
CPU, which is why the timing guard has the last word.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from ..decompose.structured import (
    Structured,
    project,
    structured_macs,
    structured_pool_adds,
    structured_rewrite,
)
from ..graph import Names, ScopedNames
from ..planning import Ladder
from .base import (
    Candidate,
    ConvSite,
    Decline,
    Pass,
    PassContext,
    PassOption,
    Settings,
    conv_node,
    float_in,
    int_at_least,
    match_conv,
    register,
)

#: AveragePool gained ``dilations`` in this opset
POOL_DILATION_OPSET = 19
#: CumSum (and Pad/Slice with tensor inputs) exist from this opset: channel sums by prefix sums
PREFIX_SUM_OPSET = 11


def split_pads(
    pads: tuple[int, int, int, int], window: tuple[int, int], dilations: tuple[int, int]
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(explicit Pad, pool pads, conv pads), each (top, left, bottom, right), summing to ``pads``.

    A side needs at most ``d*(P-1)`` pooled rows of padding: further out, the pooled windows
    lie entirely in the zeros, so those rows of the pooled map are zeros the small conv can
    pad for itself. onnxruntime refuses pool pads ``>= P``; that only happens on a dilated
    axis, and the pooled padding of that layer then goes to an explicit Pad node instead.
    """
    pooled = [min(int(pads[i]), dilations[i % 2] * (window[i % 2] - 1)) for i in range(4)]
    conv = tuple(int(pads[i]) - pooled[i] for i in range(4))
    if any(pooled[i] >= window[i % 2] for i in range(4) if pooled[i] > 0):
        return tuple(pooled), (0, 0, 0, 0), conv  # type: ignore[return-value]
    return (0, 0, 0, 0), tuple(pooled), conv  # type: ignore[return-value]


@register
class StructuredPass(Pass):
    name = "structured"
    op_types = ("Conv",)
    summary = "structured conv: sum-pool (AveragePool) then a smaller c x n x n conv"
    data_aware = True
    options = (
        PassOption("--struct-n", int_at_least(1, "the small kernel's size"), "structured: small kernel size n (< kernel size; clamped per axis for "
                   "non-square kernels). Default: from the rank rule, else kernel size - 1", None, "n"),
        PassOption("--struct-c-ratio", float_in(0.0, 1.0, what="fraction of input channels kept"), "structured: also pool over channels, keeping c = round(r*C) "
                   "channels (0 < r <= 1). Default: spatial structure only", None, "r"),
    )

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        site = match_conv(node, ctx)
        if isinstance(site, Decline):
            return site
        a = site.attrs
        if a.auto_pad.startswith("SAME"):
            shape = node.inputs[0].shape
            static = shape is not None and len(shape) == 4 and all(
                isinstance(d, (int, np.integer)) and d > 0 for d in shape[2:])
            if not static:
                return Decline(f"auto_pad {a.auto_pad} with dynamic spatial size: the pads depend on the input size")
            if site.in_hw is None:
                return Decline(f"auto_pad {a.auto_pad}: input size unknown")
        elif not a.explicit_pads and a.auto_pad != "VALID":
            return Decline(f"unknown auto_pad {a.auto_pad!r}")
        return site

    # ---- the ladder of structures ---------------------------------------------------------

    def _channels(self, site: ConvSite, settings: Settings) -> int | Decline:
        """``c``: the input channels the small conv keeps (``--struct-c-ratio``, else all)."""
        C = site.C
        r_opt = self.option(settings, "struct_c_ratio")
        if r_opt is None:
            return C
        # the API passes method options without the CLI's type check: validate again
        if not (isinstance(r_opt, (int, float)) and math.isfinite(r_opt) and r_opt > 0):
            return Decline(f"--struct-c-ratio {r_opt!r} must be in (0, 1]")
        c = max(1, int(math.floor(r_opt * C + 0.5)))
        if c > C:
            return Decline(f"--struct-c-ratio {r_opt:g} gives c = {c} > C = {C} input channels")
        return c

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder | Decline:
        """Spatial structures ``(nh, nw)`` by increasing cost, ``c`` fixed for the layer.

        Rungs of equal cost list first the one whose shape follows the kernel's aspect ratio,
        then the taller one (the planner takes the first of equal-cost rungs). The error of a
        rung is the projection's (in the data metric when statistics were handed over).
        """
        F, C, kh, kw = (int(s) for s in site.weight.shape)
        c = self._channels(site, settings)
        if isinstance(c, Decline):
            return c
        if kh * kw == 1 and c == C:
            return Decline("1x1 kernel: nothing to pool spatially (give --struct-c-ratio < 1 for channel structure)")
        a = site.attrs
        if a.auto_pad.startswith("SAME") and site.in_hw is None:
            return Decline(f"auto_pad {a.auto_pad}: input size unknown")
        fixed = None
        n_opt = self.option(settings, "struct_n")
        if n_opt is not None:
            if not isinstance(n_opt, (int, np.integer)) or n_opt < 1:
                return Decline(f"--struct-n {n_opt!r} must be an integer >= 1")
            fixed = (min(int(n_opt), kh), min(int(n_opt), kw))
            if fixed == (kh, kw) and c == C:
                return Decline(f"--struct-n {n_opt} >= kernel size {kh}x{kw}: nothing to pool")
        sigma = self.covariance(site, ctx, settings)
        cache: dict[tuple[int, int], Structured] = {}

        def fit(sizes: tuple[int, ...]) -> Structured:
            key = (int(sizes[0]), int(sizes[1]))
            if key not in cache:
                cache[key] = project(site.weight, c, key[0], key[1], sigma)
            return cache[key]

        out_hw = site.out_hw

        def macs(sizes: tuple[int, ...]) -> int:
            return structured_macs(F, C, kh, kw, *out_hw, c, sizes[0], sizes[1]) if out_hw else 0

        def build(sizes: tuple[int, ...]) -> Candidate | Decline:
            if (sizes[0], sizes[1]) == (kh, kw) and c == C:
                return Decline(f"structure {kh}x{kw} is the full kernel: nothing to pool")
            return self._build(site, ctx, c, fit(sizes), macs(sizes))

        rungs = sorted(((h, w) for h in range(1, kh + 1) for w in range(1, kw + 1) if (h, w) != (kh, kw) or c < C),
                       key=lambda s: (s[0] * s[1], abs(s[0] / kh - s[1] / kw), -s[0]))
        return Ladder(full=(kh, kw), rungs=rungs, macs_before=site.macs(), macs=macs, build=build,
                      error=lambda sizes: float(fit(sizes).rel_error), fixed=fixed,
                      # no rule: one row and one column less than the kernel
                      default=(max(1, kh - 1), max(1, kw - 1)), unit="structure")

    # ---- the rewrite ------------------------------------------------------------------------

    def _build(self, site: ConvSite, ctx: PassContext, c: int, res: Structured, macs_after: int
               ) -> Candidate | Decline:
        F, C, kh, kw = (int(s) for s in site.weight.shape)
        _, nh, nw = res.params
        a = site.attrs
        pads = a.pads if a.explicit_pads else a.resolved_pads(site.in_hw or (0, 0))
        rw = structured_rewrite(res, a.strides, pads, a.dilations)
        pc, ph, pw = res.pool
        pre_pad, pool_pads, conv_pads = split_pads(pads, (ph, pw), a.dilations)
        opset = ctx.opset
        # graph form: "spatial" (2-D AveragePool), "prefix" (channel window sums by prefix
        # sums, then a 2-D AveragePool) or "pool3d" (the 5-D AveragePool over channels).
        if not rw.channel_pool:
            form = "spatial"
        else:
            form = "prefix" if opset >= PREFIX_SUM_OPSET else "pool3d"
        spatial_pool = ph * pw > 1
        # the prefix-sum form sums channels (no averaging): fold only the spatial area
        weight = (res.beta * (ph * pw) if form == "prefix" else rw.conv_weight).astype(np.float32)
        bias = site.bias
        strides, dilations = a.strides, a.dilations
        top, left, bottom, right = pool_pads
        # A spatial-only layer with an explicit Pad pools in 5-D: onnxruntime's PadFusion would
        # otherwise fold a Pad that feeds an AveragePool into the pool's pads and then refuse
        # the fused node (pads >= window) at session creation; a Pad feeding an Unsqueeze (or,
        # in the prefix form, a CumSum) is left alone.
        five_d = form == "pool3d" or (form == "spatial" and any(pre_pad))
        if five_d:
            pool_kernel, pool_dil = ((pc if form == "pool3d" else 1), ph, pw), (1, *a.dilations)
            ppads = [0, top, left, 0, bottom, right]
        else:
            pool_kernel, pool_dil = (ph, pw), tuple(a.dilations)
            ppads = [top, left, bottom, right]
        pool_attrs: dict[str, object] = {
            "kernel_shape": list(pool_kernel),
            "strides": [1] * len(pool_kernel),
            "pads": ppads,
            "count_include_pad": 1,
        }
        if any(d != 1 and k > 1 for d, k in zip(pool_dil, pool_kernel)):
            pool_attrs["dilations"] = list(pool_dil)
        if form == "pool3d" and any(pre_pad):  # pre_pad implies a dilated pool (opset 19): unreachable
            return Decline("internal: explicit Pad with the opset < 11 channel pool")

        def axes(nm: ScopedNames, suffix: str, node_op: str, src: gs.Tensor, dst: gs.Variable) -> gs.Node:
            if opset >= 13:
                return nm.node(node_op, suffix, [src, nm.const(f"{suffix}_axes", np.array([1], np.int64))], [dst])
            return nm.node(node_op, suffix, [src], [dst], axes=[1])

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/structured")
            nodes: list[gs.Node] = []
            cur: gs.Tensor = x
            if form == "prefix":
                # S[a] = Q[a + Pc] - Q[a], Q = inclusive prefix sums of the input with one
                # leading zero channel; the same Pad applies any spatial padding the pool
                # cannot take (pre_pad)
                pt, pl, pb, pr = pre_pad
                xp, q, hi, lo, chs = n.var("padded"), n.var("prefix"), n.var("upper"), n.var("lower"), n.var("chsum")
                i64 = lambda v: np.array(v, np.int64)  # noqa: E731
                nodes += [
                    n.node("Pad", "pad", [cur, n.const("pads", i64([0, 1, pt, pl, 0, 0, pb, pr]))], [xp], mode="constant"),
                    n.node("CumSum", "cumsum", [xp, n.const("cumsum_axis", i64(1))], [q]),
                    n.node("Slice", "upper", [q, n.const("upper_starts", i64([pc])), n.const("upper_ends", i64([C + 1])),
                                              n.const("upper_axes", i64([1]))], [hi]),
                    n.node("Slice", "lower", [q, n.const("lower_starts", i64([0])), n.const("lower_ends", i64([c])),
                                              n.const("lower_axes", i64([1]))], [lo]),
                    n.node("Sub", "window", [hi, lo], [chs]),
                ]
                cur = chs
                if spatial_pool:
                    pooled = n.var("pooled")
                    nodes.append(n.node("AveragePool", "pool", [cur], [pooled], **pool_attrs))
                    cur = pooled
            else:
                if any(pre_pad):
                    pt, pl, pb, pr = pre_pad
                    padded = n.var("padded")
                    # only dilated layers get here, so opset >= 19: Pad takes its pads as an input
                    nodes.append(n.node("Pad", "pad", [cur, n.const("pads", np.array([0, 0, pt, pl, 0, 0, pb, pr], np.int64))],
                                        [padded], mode="constant"))
                    cur = padded
                pooled = n.var("pooled")
                if five_d:
                    x5, p5 = n.var("x5d"), n.var("pooled5d")
                    nodes.append(axes(n, "to5d", "Unsqueeze", cur, x5))
                    nodes.append(n.node("AveragePool", "pool", [x5], [p5], **pool_attrs))
                    nodes.append(axes(n, "to4d", "Squeeze", p5, pooled))
                else:
                    nodes.append(n.node("AveragePool", "pool", [cur], [pooled], **pool_attrs))
                cur = pooled
            nodes.append(conv_node(n, "conv", cur, y, weight, bias, strides=strides, pads=conv_pads,
                                   dilations=dilations))
            return nodes

        in_hw = site.in_hw
        pooled_pads = tuple(pre_pad[i] + pool_pads[i] for i in range(4))
        adds = 0
        if in_hw and form == "prefix":
            hp, wp = in_hw[0] + pre_pad[0] + pre_pad[2], in_hw[1] + pre_pad[1] + pre_pad[3]
            # prefix sums over C+1 channels, one subtraction per kept channel, then the
            # spatial window sums on c channels
            adds = (C + 1) * hp * wp + c * hp * wp
            adds += structured_pool_adds(c, kh, kw, *in_hw, c, nh, nw, pooled_pads, a.dilations) if spatial_pool else 0
        elif in_hw:
            adds = structured_pool_adds(C, kh, kw, *in_hw, c, nh, nw, pooled_pads, a.dilations)
        notes = []
        if rw.min_opset >= POOL_DILATION_OPSET:
            notes.append(f"dilated pool: AveragePool dilations need opset >= {POOL_DILATION_OPSET}")
        if form == "prefix":
            notes.append("channel window sums by prefix sums (CumSum/Slice/Sub)")
        return Candidate(
            method=self.name,
            params={"c": c, "n": f"{nh}x{nw}"},
            macs_before=site.macs(),
            macs_after=macs_after,
            rel_error=res.rel_error,
            build=build,
            extra_adds=adds,
            min_opset=rw.min_opset,
            note="; ".join(notes),
        )
