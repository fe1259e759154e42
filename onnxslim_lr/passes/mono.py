"""Monochromatic first layer (Denton et al. 2014, 3.2.1): few colours, one colour per filter.

For each filter ``W_f: C x (kh*kw)`` the rank-1 colour ``u_f`` is taken, the ``F`` colours are
clustered into ``C'`` equal clusters (sign-invariant balanced k-means) and each filter is
refitted to its cluster colour ``U_c`` (:func:`onnxslim_lr.decompose.denton.monochromatic`):
``W_f ~ U_c b_f^T``. Only convs with few input channels are matched (``C <=
--mono-max-channels``, default 4: RGB/YUV/RGBA first layers), group 1, kernel larger than 1x1.

Graph forms (``--mono-form``), all exact for the same factors, all standard ops:

* ``split`` (default): 1x1 Conv ``C -> C'`` (the colours), ``Split`` into the ``C'`` colour
  maps, one dense kh x kw Conv ``1 -> F/C'`` per colour (original stride/pads/dilations,
  bias), ``Concat`` (cluster order), ``Gather`` back to the original filter order.
* ``paper``: the paper's graph: 1x1 Conv ``C -> C'``, then ONE grouped kh x kw Conv,
  ``group = C'``, ``C' -> F`` (bias permuted into cluster order), ``Gather`` back.
* ``depthwise``: 1x1 Conv ``C -> F`` (each filter's cluster colour, in the original order),
  then a depthwise kh x kw Conv (``group = F``). No permutation at all, but the 1x1 stage
  runs at the input resolution with ``F`` outputs: ``F*C*H*W`` MACs instead of ``C'*C*H*W``.
* ``gather-depthwise``: 1x1 Conv ``C -> C'``, ``Gather`` of the ``C'`` maps to the ``F``
  filters (original order), depthwise kh x kw Conv. No output permutation.

Why ``split`` is the default: on onnxruntime's CPU provider (measured on the ZFNet/MattNet
first layer, 3 -> 96, 7x7, stride 2, see ``tools/bench_denton.py`` / BENCHMARKS.md) the
grouped and depthwise 7x7 stride-2 kernels run far below the dense conv's efficiency, and
every form that materialises an ``F``-channel map at the input resolution (``depthwise``,
``gather-depthwise``) loses to the dense conv on memory traffic alone. Splitting the grouped
conv into ``C'`` ordinary convs keeps the dense kernel; it wins only when each colour has
many filters (``F/C'`` large) -- at ``C' = 48`` it is the slowest form. The never-slower
guard decides per layer.

Output order. ``split`` and ``paper`` compute the filters in cluster order; ``build`` always
restores the original order with a ``Gather(axis=1)`` (so the one-layer timing model and the
splice compute exactly the replaced layer, and nothing outside the layer is touched). After
the splices :func:`onnxslim_lr.permute.fold_channel_gathers` pushes that permutation into the
consumers' weights where the graph allows. The candidate says which will happen, predicted
from the graph at planning time: ``perm=folded`` (the consumers absorb it), ``perm=gather``
(a Gather stays, e.g. before an LRN, a Flatten or a graph output) or ``perm=none`` (the
clusters already are contiguous blocks of filters, e.g. ``C' = F``, or the form has none).

Why the permutation cannot be folded back into the producer (the grouped conv itself):
group ``c`` of a grouped conv always produces the contiguous output block
``c*F/C' .. (c+1)*F/C'-1``. The free choices are which cluster feeds group ``c`` (rows of the
colour projection) and the order of filters inside a group; both keep each output block
inside one cluster. So the original order is reachable only when every block of ``F/C'``
consecutive original filters is one cluster -- the ``perm=none`` case, which the canonical
cluster numbering already produces. Otherwise a permutation is unavoidable in this graph.

Number of colours ``C'`` (must divide ``F``; a non-divisor is declined with the reason).
The pass describes a ladder of the divisors of ``F`` (by increasing cost) and the planner
(:mod:`onnxslim_lr.planning`) picks the rung: ``--colors C'`` wins; ``--target-speedup S``:
the largest divisor whose Table 1 MACs (of the chosen form) are ``<= original / S``;
``--rank-ratio R``: the divisor nearest to ``round(R*F)`` (ties to the larger); ``--energy
E``: the smallest divisor whose relative weight error is ``<= sqrt(1 - E)`` (declined when
even ``C' = F`` misses it); with no rule the ladder's default, the smallest divisor of ``F``
that is ``>= F/16`` (``F = 96`` gives ``C' = 6``, the paper's most aggressive Table 3 row).

Data metric (``--metric data`` with calibration data): the colour mode is whitened by the
input's channel second moment ``S = Sigma_C^{1/2}`` before the colours are taken and
clustered (``W'_f = S W_f``; the projection row becomes ``S^{-1} U'_c``), then every
filter's spatial part is refitted in the full patch metric,
``b_f = argmin_b (w_f - A b)^T Sigma (w_f - A b)`` with ``A = U_c (x) I_P``, i.e.
``b_f = (A^T Sigma A)^{-1} A^T Sigma w_f``. ``rel_error`` is then
``||(W - W_hat) Sigma^{1/2}|| / ||W Sigma^{1/2}||``.

MACs (Table 1, ``H x W`` input, ``Ho x Wo`` output): ``C'*C*H*W + kh*kw*F*Ho*Wo`` for
``split``, ``paper`` and ``gather-depthwise``; ``F*C*H*W + kh*kw*F*Ho*Wo`` for
``depthwise``. The paper's Table 3 (C=3, F=96, 7x7, stride 2, 224x224 input: 2.95x at
``C' = 6`` ... 2.39x at ``C' = 96``) is reproduced with a 110x110 output, i.e. one pixel of
padding per side.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..decompose.denton import Mono, mono_data, mono_macs, monochromatic
from ..graph import Names
from ..permute import predict_fold
from ..planning import Ladder, nearest_of
from .base import (
    Candidate,
    ConvSite,
    Decline,
    Pass,
    PassContext,
    PassOption,
    Settings,
    conv_node,
    int_at_least,
    match_conv,
    one_of,
    register,
    spatial_attrs,
)

FORMS = ("split", "paper", "depthwise", "gather-depthwise")
DEFAULT_FORM = "split"
DEFAULT_MAX_CHANNELS = 4


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@register
class MonochromaticPass(Pass):
    name = "mono"
    summary = "monochromatic first layer (Denton 3.2.1): 1x1 C->C' colours, one colour per filter"
    data_aware = True
    options = (
        PassOption("--colors", int_at_least(1, "colours"), "mono: number of intermediate colours C' (must divide the filter count F)",
                   None, "C'"),
        PassOption("--mono-form", one_of(*FORMS),
                   f"mono: graph form, one of {', '.join(FORMS)} (default {DEFAULT_FORM}: per-colour dense convs; "
                   "paper: one grouped conv)", DEFAULT_FORM, "FORM"),
        PassOption("--mono-max-channels", int_at_least(1),
                   f"mono: only convs with at most this many input channels (default {DEFAULT_MAX_CHANNELS})",
                   DEFAULT_MAX_CHANNELS, "C"),
    )

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        site = match_conv(node, ctx)
        if isinstance(site, Decline):
            return site
        if site.kh * site.kw == 1:
            return Decline("1x1 conv: the monochromatic approximation needs a spatial kernel")
        return site

    # ---- C' ---------------------------------------------------------------------------

    def _macs(self, site: ConvSite, form: str, cp: int) -> int:
        if not (site.in_hw and site.out_hw):
            return 0
        F, C, kh, kw = site.weight.shape
        colours = F if form == "depthwise" else cp
        return mono_macs(C, F, kh, kw, *site.in_hw, *site.out_hw, colours)

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder | Decline:
        F, C, kh, kw = site.weight.shape
        max_c = int(self.option(settings, "mono_max_channels"))
        if C > max_c:
            return Decline(f"{C} input channels: monochromatic is for first layers with at most {max_c} "
                           "(--mono-max-channels)")
        form = self.option(settings, "mono_form")
        form = one_of(*FORMS)(form) if isinstance(form, str) else DEFAULT_FORM
        sigma = self.covariance(site, ctx, settings)
        cache: dict[int, Mono] = {}

        def fit(cp: int) -> Mono:
            if cp not in cache:
                cache[cp] = (mono_data(site.weight, cp, sigma, seed=settings.seed) if sigma is not None
                             else monochromatic(site.weight, cp, seed=settings.seed))
            return cache[cp]

        divs = divisors(F)
        fixed = None
        given = settings.options.get("colors")
        if given is not None:
            cp = int(given)
            if cp > F or F % cp:
                return Decline(f"--colors {cp} does not divide the {F} filters into equal clusters "
                               f"(divisors of {F}: {', '.join(map(str, divs))})")
            fixed = (cp,)
        return Ladder(
            full=(F,), rungs=[(d,) for d in divs], macs_before=site.macs(),
            macs=lambda sizes: self._macs(site, form, sizes[0]),
            build=lambda sizes: self._build(site, ctx, form, fit(sizes[0])),
            error=lambda sizes: float(fit(sizes[0]).rel_error),
            snap=nearest_of([(d,) for d in divs]), fixed=fixed,
            # the paper's most aggressive Table 3 row (F = 96 -> C' = 6) when no rule is given
            default=(min(d for d in divs if d * 16 >= F),), unit="number of colours")

    def _build(self, site: ConvSite, ctx: PassContext, form: str, mono: Mono) -> Candidate:
        F = site.F
        cp = mono.n_colors
        order_is_identity = bool(np.array_equal(mono.order, np.arange(F)))
        if form in ("depthwise", "gather-depthwise") or order_is_identity:
            perm = "none"
        elif ctx.graph is not None and predict_fold(ctx.graph, site.node.outputs[0], mono.inverse):
            perm = "folded"
        else:
            perm = "gather"
        build = _builder(site, mono, form, ctx.opset, emit_gather=not order_is_identity)
        note = {"folded": "output permutation folded into the consumers after the splice",
                "gather": "a Gather restores the filter order (the consumers cannot absorb it)",
                "none": ""}[perm]
        return Candidate(
            method=self.name,
            params={"colors": cp, "form": form, "perm": perm},
            macs_before=site.macs(),
            macs_after=self._macs(site, form, cp),
            rel_error=float(mono.rel_error),
            build=build,
            min_opset=1,
            note=note,
        )


def _builder(site: ConvSite, mono: Mono, form: str, opset: int, *, emit_gather: bool):
    F, C, kh, kw = site.weight.shape
    cp = mono.n_colors
    M = F // cp
    attrs = site.attrs
    bias = site.bias
    proj = mono.projection.astype(np.float32)
    grouped = mono.grouped.astype(np.float32)  # cluster order
    order, inverse, labels = mono.order, mono.inverse, mono.labels
    bias_c = None if bias is None else bias[order]

    def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
        n = names.scoped(f"{site.name}/mono")
        nodes: list[gs.Node] = []
        if form == "depthwise":
            colf = proj[:, :, 0, 0][labels].reshape(F, C, 1, 1)
            a = n.var("colours")
            nodes.append(conv_node(n, "colour", x, a, colf))
            nodes.append(conv_node(n, "spatial", a, y, grouped[inverse], bias, group=F, **spatial_attrs(attrs)))
            return nodes
        a = n.var("colours")
        nodes.append(conv_node(n, "colour", x, a, proj))
        if form == "gather-depthwise":
            e = n.var("expanded")
            nodes.append(n.node("Gather", "expand", [a, n.const("labels", labels.astype(np.int64))], [e], axis=1))
            nodes.append(conv_node(n, "spatial", e, y, grouped[inverse], bias, group=F, **spatial_attrs(attrs)))
            return nodes
        out = n.var("cluster_order") if emit_gather else y
        if form == "paper":
            nodes.append(conv_node(n, "spatial", a, out, grouped, bias_c, group=cp, **spatial_attrs(attrs)))
        else:  # split
            if cp == 1:
                nodes.append(conv_node(n, "spatial", a, out, grouped, bias_c, **spatial_attrs(attrs)))
            else:
                parts = [n.var(f"colour{c}") for c in range(cp)]
                if opset >= 13:
                    nodes.append(n.node("Split", "split", [a, n.const("split_sizes", np.ones(cp, np.int64))], parts,
                                        axis=1))
                else:
                    nodes.append(n.node("Split", "split", [a], parts, axis=1, split=[1] * cp))
                outs = [n.var(f"spatial{c}") for c in range(cp)]
                for c in range(cp):
                    rows = slice(c * M, (c + 1) * M)
                    nodes.append(conv_node(n, f"spatial{c}", parts[c], outs[c], grouped[rows],
                                           None if bias_c is None else bias_c[rows], **spatial_attrs(attrs)))
                nodes.append(n.node("Concat", "concat", outs, [out], axis=1))
        if emit_gather:
            nodes.append(n.node("Gather", "restore_order", [out, n.const("inverse", inverse.astype(np.int64))], [y],
                                axis=1))
        return nodes

    return build
