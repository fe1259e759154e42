"""Perforation (Figurnov et al. 2016): evaluate a conv at fewer output positions, copy the rest.

Two passes live here:

* ``perforate`` -- the conv is evaluated only at a subset of its ``Ho x Wo`` output positions
  and every other position takes the value of its nearest computed position;
* ``perforate-svd`` -- channel SVD (exactly as the ``svd`` pass: kh x kw conv C->K, 1x1 conv
  K->F, rank from the rank rule) whose *spatial* stage is grid-perforated: the 1x1 stage then
  also runs at the perforated resolution, before the upsample, which is where the two
  savings compound: ``Conv kxk (strided) -> Conv 1x1 -> Resize -> Slice``.

Grid form (``--perforation-mask grid``, the default)
---------------------------------------------------
With factors ``(rh, rw)`` the conv runs with strides ``(sh*rh, sw*rw)`` and the *original*
pads and dilations; its output ``(i, j)`` is the original position ``(rh*i, rw*j)`` and it
has exactly ``ceil(Ho/rh) x ceil(Wo/rw)`` outputs for every input size (proof in
:mod:`onnxslim_lr.decompose.perforation`). Then ``Resize`` (nearest, ``asymmetric``,
``round_prefer_floor``: true nearest neighbour, ties to the top/left, clamped at the last
computed row) upsamples by ``(rh, rw)`` and ``Slice`` crops to ``Ho x Wo``. The crop ends are
constants when the graph declares static spatial dims; otherwise they are computed in the
graph from ``Shape(x)`` as ``Ho = (H + t + b - dh*(kh-1) - 1) // sh + 1`` (the size the
original conv would produce), so one rewritten model runs at every input size. Resize with
``coordinate_transformation_mode``/``nearest_mode`` needs opset 11 (opset 10's Resize has
neither): the candidate then carries ``min_opset = 11``, and the pass manager raises the
model's opset or, with ``--no-opset-upgrade``, rejects the rewrite with that reason. On
models older than opset 11 whose spatial size is static, the same nearest copy is done by
two Gathers along H and W with :func:`~onnxslim_lr.decompose.perforation.upsample_source`
index tables (they crop too), so no opset conversion is needed; onnxruntime's Gather along
an inner axis is several times slower than its Resize, which the timing guard accounts for.
``auto_pad`` SAME_* is resolved to explicit pads when the graph's
spatial size is static and declined when it is dynamic (the pads depend on the size).

Mask form (``--perforation-mask uniform|pooling|weight|impact``, or ``grid`` with
``--perforation-form mask``)
-----------------------------------------------------------------------------------------
Arbitrary computed positions, standard ops only: ``Pad -> Reshape(N, -1) -> Gather(patch
indices (C*kh*kw, n), axis 1) -> MatMul(W (F, C*kh*kw), .) -> Add bias -> Gather(
interpolation map, axis 2) -> Reshape(N, F, Ho, Wo)``. The batch stays dynamic; the spatial
size is baked into the index tables, so the mask form is declined when the graph's spatial
dims are symbolic. Indices are int32 when they fit (half the size of int64). Masks
(:func:`onnxslim_lr.decompose.perforation.make_mask`):

* ``grid``: pseudo-random regular grid; ``uniform``: seeded random subset;
* ``pooling``: positions read by the most windows of the *following* pooling layer first
  (MaxPool / AveragePool / Global*Pool); declined when the consumer is not a pool;
* ``weight``: importance = ``window_coverage`` of the following Conv with ``tap_weight =
  sum |W_next|`` over filters and channels; declined when the consumer is not a Conv;
* ``impact``: estimated change of the consumer's output when a position is interpolated,
  from calibration data (estimator below); declined without calibration data.

"The consumer" is found by following the conv's output through a chain of single-consumer,
shape-preserving elementwise ops (Relu, Clip, LeakyRelu, BatchNormalization, Mul/Add by a
constant ...): they commute with nearest-neighbour copying, so ``Conv -> Relu -> MaxPool``
has the MaxPool as consumer.

Impact estimator. Let ``z`` be the consumer's input (the conv output after the elementwise
chain), captured with onnxruntime on the calibration batches (:func:`onnxslim_lr.calibration.
expose`). Interpolating position ``p`` from a neighbour ``q`` changes ``z[:, p]`` by
``delta = z[:, q] - z[:, p]``; with ``q`` one of the 4 direct neighbours (the interpolation
distance of a regular mask at rates up to 3/4), the expected squared change of channel
``f`` is ``D[f, p] = mean_{samples, q in N4(p)} (z[f, q] - z[f, p])^2``. A consumer Conv
``W_next`` sees it through every window covering ``p``; ignoring cross-channel terms the
consumer's output changes by ``impact(p) = sum_f sum_{taps t} E[f, t] * cover_t(p) *
D[f, p]`` with ``E[f, t] = sum_o W_next[o, f, t]^2`` and ``cover_t(p)`` the number of
windows whose tap ``t`` reads ``p``. For a pooling consumer ``E = 1`` per tap; for any
other consumer (or none) ``impact(p) = sum_f D[f, p]``. The most impactful positions are
computed. Unlike the paper's first-order loss estimate (feature x gradient), this needs no
gradient and measures interpolation, not zeroing (a point a reviewer raised).

Calibration data for ``impact`` comes only from the data service: :meth:`PerforatePass.needs`
declares a :class:`~onnxslim_lr.calibration.Request` for the consumer's input (the
4-neighbour squared differences, reduced while the manager streams ``--calib``), and the
pass reads the result from ``ctx.stats``; ``--perforation-calib PATH`` names other data for
this estimate only (a ``.npy``/``.npz``/image folder, first 128 samples; the API also
accepts a list of feed dicts). The pass itself runs no session and reads no file.

Rate (share of positions skipped), per layer: the ladder
--------------------------------------------------------
A rung is the number of output positions computed (``full`` = ``Ho*Wo``, exact), its cost
the MACs of the rewrite at that count; :func:`onnxslim_lr.planning.choose` picks it.
Grid factors are square or differ by one (1x1, 1x2, 2x2, 2x3, 3x3, ...: a 1x5 grid would copy
values across 4 positions where 2x2 copies across 1), the larger factor on the longer axis;
grid rungs are the counts ``ceil(Ho/rh) * ceil(Wo/rw)`` these grids compute (the smallest
grid stands for a count several grids share). The mask form can compute any count.

* ``--perforation-rate P`` pins the rung (a ladder of one): the grid whose
  ``1 - 1/(rh*rw)`` is closest to ``P``, ties to the larger factor (so ``P = 0.25``
  perforates 1x2 rather than not at all), or, in the mask form, ``round(P * Ho*Wo)``
  positions skipped;
* with no rule, the same at ``P = 0.5``;
* otherwise the planner's rules, as for every ladder: ``--rank-ratio R`` computes the count
  nearest ``R * Ho*Wo`` that the form can build (``R`` = the share kept), ``--target-speedup
  S`` the most positions whose MACs are ``<= 1/S`` of the conv's (the ``ceil`` of a grid on
  an odd size counts: 1x2 on a 7x7 map computes 28 of 49 positions, 1.75x, not 2x); ``--energy`` is
  declined: the error of a perforation is not known before it is measured.

``perforate-svd`` takes its grid from ``--perforation-rate`` alone (default 0.5) and its
rank from the planner, so that ``--target-speedup`` is not applied twice.

No fine-tuning is done: perforation without it costs accuracy (the paper fine-tunes), and
the mask form, a Gather-heavy graph, often loses to a dense conv on CPU. The pass manager's
timing guard keeps only what measures faster.
"""

from __future__ import annotations

import argparse
import os
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..calibration import Request
from ..cost import conv_out_size, svd_macs
from ..decompose.perforation import (
    RESIZE_NEAREST,
    grid_pads_symbolic,
    grid_plan,
    interpolation_map,
    kept_count,
    make_mask,
    mask_form_macs,
    patch_indices,
    perforated_macs,
    upsample_source,
    window_coverage,
)
from ..decompose.ranks import svd_full_rank
from ..decompose.svd import ChannelBasis, channel_basis, channel_svd
from ..graph import Names, ScopedNames, constant_value
from ..planning import Ladder, nearest_of
from .base import (
    Budget,
    Candidate,
    ConvAttrs,
    ConvSite,
    Decline,
    Pass,
    PassContext,
    PassOption,
    Settings,
    conv_attrs,
    conv_node,
    float_in,
    match_conv,
    one_of,
    register,
)

#: share of positions skipped when no rate rule is given
DEFAULT_RATE = 0.5
#: mask strategies (``make_mask``)
MASKS = ("grid", "uniform", "pooling", "weight", "impact")
#: calibration samples used by the impact estimator
IMPACT_SAMPLES = 128
#: Resize with coordinate_transformation_mode / nearest_mode
GRID_MIN_OPSET = 11
DYNAMIC_MASK_REASON = "mask perforation needs a fixed spatial size (give --input-shape and a static model)"

# --------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------


def _calib_path(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


RATE_OPTION = PassOption(
    "--perforation-rate", float_in(0.0, 1.0, low_open=False, high_open=True, what="share of positions skipped"),
    f"perforation: share of output positions NOT computed, in [0, 1) (default: from --rank-ratio / "
    f"--target-speedup, else {DEFAULT_RATE})",
    None, "P")
MASK_OPTION = PassOption(
    "--perforation-mask", one_of(*MASKS),
    "perforation mask: grid (default; strided conv + nearest Resize), uniform, pooling, weight, impact (mask form)",
    "grid", "MASK")
FORM_OPTION = PassOption(
    "--perforation-form", one_of("grid", "mask"),
    "perforation graph: grid (strided Conv + Resize + Slice) or mask (Gather + MatMul); default: grid for the grid mask",
    None, "FORM")
CALIB_OPTION = PassOption(
    "--perforation-calib", _calib_path,
    f"calibration inputs for --perforation-mask impact (.npy/.npz/image folder; first {IMPACT_SAMPLES} samples)",
    None, "PATH", data=True, data_limit=IMPACT_SAMPLES)


# --------------------------------------------------------------------------------------
# rates and factors
# --------------------------------------------------------------------------------------


def _factor_pairs(limit: int = 16) -> list[tuple[int, int]]:
    """(small, large) factor pairs that are square or differ by one: 1x1, 1x2, 2x2, 2x3 ..."""
    out = []
    for a in range(1, limit + 1):
        out.append((a, a))
        out.append((a, a + 1))
    return out


def _orient(pair: tuple[int, int], out_hw: tuple[int, int] | None) -> tuple[int, int]:
    """Larger factor along the longer output axis (width on ties)."""
    small, large = pair
    if out_hw is not None and out_hw[0] > out_hw[1]:
        return large, small
    return small, large


def grid_factors(rate: float, out_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(rh, rw)`` whose ``1 - 1/(rh*rw)`` is closest to ``rate`` (see module docstring)."""
    best = min(_factor_pairs(), key=lambda p: (round(abs(1 - 1 / (p[0] * p[1]) - rate), 12), -p[0] * p[1]))
    return _orient(best, out_hw)


def grid_rungs(out_hw: tuple[int, int], pinned: tuple[int, int] | None = None
               ) -> dict[tuple[int, ...], tuple[int, int]]:
    """Computed positions -> grid factors, for every grid of an ``Ho x Wo`` output.

    Several grids can compute the same number of positions on a small map (``ceil``); the
    smallest grid of each count stands for it (shortest copying distance), except the
    ``pinned`` grid (a rate the user gave, or the default), which stands for its own count.
    """
    ho, wo = out_hw
    table: dict[tuple[int, ...], tuple[int, int]] = {}
    for pair in _factor_pairs():
        rh, rw = _orient(pair, out_hw)
        table.setdefault((-(-ho // rh) * -(-wo // rw),), (rh, rw))
    if pinned is not None:
        table[(-(-ho // pinned[0]) * -(-wo // pinned[1]),)] = pinned
    return table


# --------------------------------------------------------------------------------------
# graph inspection
# --------------------------------------------------------------------------------------

_UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Identity", "Dropout", "Gelu", "Mish", "ThresholdedRelu", "BatchNormalization",
}
_BINARY = {"Mul", "Add", "Sub", "Div"}


def static_hw(tensor: gs.Tensor) -> tuple[int, int] | None:
    """The spatial size the graph declares for a (N, C, H, W) tensor, or None if symbolic."""
    shape = tensor.shape
    if shape is None or len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    if isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer)) and h > 0 and w > 0:
        return int(h), int(w)
    return None


def _per_channel_const(t: gs.Tensor) -> bool:
    v = constant_value(t)
    return v is not None and (v.ndim < 2 or all(int(s) == 1 for s in v.shape[-2:]))


def find_consumer(node: gs.Node, graph: gs.Graph | None) -> tuple[gs.Node | None, gs.Tensor, str]:
    """The op that reads the conv's output, through shape-preserving elementwise ops.

    Returns ``(consumer or None, the tensor it reads, why None)``.
    """
    t = node.outputs[0]
    outputs = {o.name for o in graph.outputs} if graph is not None else set()
    for _ in range(16):
        if t.name in outputs:
            return None, t, "the conv's output is a graph output"
        users = list(t.outputs)
        if len(users) != 1:
            return None, t, f"the conv's output has {len(users)} consumers"
        c = users[0]
        passthrough = c.op in _UNARY and c.inputs and c.inputs[0] is t
        if c.op in _BINARY and len(c.inputs) == 2:
            other = c.inputs[1] if c.inputs[0] is t else c.inputs[0]
            passthrough = _per_channel_const(other)
        if not passthrough:
            return c, t, ""
        t = c.outputs[0]
    return None, t, "elementwise chain too long"


def _int_attr_list(node: gs.Node, key: str, default: Sequence[int]) -> tuple[int, ...]:
    v = node.attrs.get(key)
    return tuple(int(a) for a in v) if v is not None else tuple(default)


def _str_attr(node: gs.Node, key: str, default: str) -> str:
    v = node.attrs.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _window_geometry(consumer: gs.Node, out_hw: tuple[int, int]) -> dict[str, Any] | str:
    """Kernel/strides/pads/dilations/ceil_mode of a pooling or conv consumer, or a reason."""
    if consumer.op in ("GlobalAveragePool", "GlobalMaxPool"):
        return dict(kernel=out_hw, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), ceil_mode=False)
    if consumer.op == "Conv":
        w = constant_value(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
        if w is None or w.ndim != 4:
            return "the consumer Conv has no constant 2-D weight"
        kernel = (int(w.shape[2]), int(w.shape[3]))
        a = conv_attrs(consumer, kernel)
        return dict(kernel=kernel, strides=a.strides, pads=a.resolved_pads(out_hw), dilations=a.dilations,
                    ceil_mode=False)
    kernel = _int_attr_list(consumer, "kernel_shape", ())
    if len(kernel) != 2:
        return f"{consumer.op} is not a 2-D window op"
    a = ConvAttrs(kernel=kernel, strides=_int_attr_list(consumer, "strides", (1, 1)),  # type: ignore[arg-type]
                  dilations=_int_attr_list(consumer, "dilations", (1, 1)),  # type: ignore[arg-type]
                  pads=_int_attr_list(consumer, "pads", (0, 0, 0, 0)),  # type: ignore[arg-type]
                  auto_pad=_str_attr(consumer, "auto_pad", "NOTSET"), group=1)
    return dict(kernel=kernel, strides=a.strides, pads=a.resolved_pads(out_hw), dilations=a.dilations,
                ceil_mode=bool(int(consumer.attrs.get("ceil_mode", 0))))


_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


# --------------------------------------------------------------------------------------
# the impact estimator
# --------------------------------------------------------------------------------------


def neighbour_sq_diff(z: np.ndarray) -> np.ndarray:
    """``sum over samples`` of the mean squared difference of each position to its 4-neighbours.

    ``z`` is ``(N, F, Ho, Wo)``; the result ``(F, Ho, Wo)`` (divide by N for the mean).
    """
    z = z.astype(np.float64)
    acc = np.zeros(z.shape[1:])
    cnt = np.zeros(z.shape[2:])
    dv = (z[:, :, 1:, :] - z[:, :, :-1, :]) ** 2
    dh = (z[:, :, :, 1:] - z[:, :, :, :-1]) ** 2
    sv, sh = dv.sum(axis=0), dh.sum(axis=0)
    acc[:, 1:, :] += sv
    acc[:, :-1, :] += sv
    acc[:, :, 1:] += sh
    acc[:, :, :-1] += sh
    cnt[1:, :] += 1
    cnt[:-1, :] += 1
    cnt[:, 1:] += 1
    cnt[:, :-1] += 1
    return acc / np.maximum(cnt, 1)


def impact_scores(D: np.ndarray, consumer: gs.Node | None, out_hw: tuple[int, int]) -> np.ndarray:
    """``(Ho, Wo)`` impact from the per-channel interpolation error ``D`` (see module docstring)."""
    if consumer is None:
        return D.sum(axis=0)
    geo = _window_geometry(consumer, out_hw) if consumer.op in _POOLS + ("Conv",) else None
    if not isinstance(geo, dict):
        return D.sum(axis=0)
    kh, kw = geo["kernel"]
    taps = np.empty((kh, kw) + tuple(out_hw))
    for u in range(kh):
        for v in range(kw):
            onehot = np.zeros((kh, kw))
            onehot[u, v] = 1.0
            taps[u, v] = window_coverage(*out_hw, geo["kernel"], geo["strides"], geo["pads"], geo["dilations"],
                                         tap_weight=onehot, ceil_mode=geo["ceil_mode"])
    if consumer.op == "Conv":
        w = constant_value(consumer.inputs[1]).astype(np.float64)
        group = int(consumer.attrs.get("group", 1))
        F = D.shape[0]
        cg = w.shape[1]
        energy = np.zeros((F, kh, kw))
        fg = w.shape[0] // max(group, 1)
        for g in range(group):
            energy[g * cg:(g + 1) * cg] += (w[g * fg:(g + 1) * fg] ** 2).sum(axis=0)
        return np.einsum("fuv,uvhw,fhw->hw", energy, taps, D)
    return taps.sum(axis=(0, 1)) * D.sum(axis=0)


# --------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------


def _i64(values: Sequence[int]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


def grid_tail(n: ScopedNames, x: gs.Tensor, perforated: gs.Tensor, y: gs.Variable, rates: tuple[int, int],
              static: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None, crop_offset: tuple[int, int],
              crop_div: tuple[int, int], opset: int = GRID_MIN_OPSET) -> list[gs.Node]:
    """Nearest upsampling by ``rates`` and crop to ``Ho x Wo``.

    ``static``: ``(perforated size, upsampled size, crop)`` when the spatial size is fixed
    (constant crop, no Slice at all when nothing is cropped); None: crop ends computed from
    ``Shape(x)``. Resize needs opset 11; on older models with a fixed size the same nearest
    copy is done by two Gathers with ``upsample_source`` tables (slower than Resize, but no
    opset conversion), which also crop.
    """
    rh, rw = rates
    nodes: list[gs.Node] = []
    if opset < GRID_MIN_OPSET and static is not None:
        (hq, wq), _, (ho, wo) = static
        src: gs.Tensor = perforated
        for axis, r, n_out, n_in in ((2, rh, ho, hq), (3, rw, wo, wq)):
            if r == 1 and n_out == n_in:
                continue
            out = y if (axis == 3 or (rw == 1 and wo == wq)) else n.var(f"upsampled_axis{axis}")
            table = upsample_source(n_out, r, n_in).astype(np.int64)
            nodes.append(n.node("Gather", f"upsample_axis{axis}", [src, n.const(f"src_axis{axis}", table)], [out], axis=axis))
            src = out
        return nodes
    need_crop = static is None or static[1] != static[2]
    up = n.var("upsampled") if need_crop else y
    roi = n.const("roi", np.zeros(0, dtype=np.float32))
    scales = n.const("scales", np.array([1.0, 1.0, float(rh), float(rw)], dtype=np.float32))
    nodes.append(n.node("Resize", "resize", [perforated, roi, scales], [up], **RESIZE_NEAREST))
    if not need_crop:
        return nodes
    if static is not None:
        ends: gs.Tensor = n.const("crop_ends", _i64(static[2]))
    else:
        shape = n.var("in_shape", np.int64)
        hw = n.var("in_hw", np.int64)
        shifted = n.var("in_hw_shifted", np.int64)
        q = n.var("out_hw_minus1", np.int64)
        ends = n.var("out_hw", np.int64)
        nodes += [
            n.node("Shape", "shape", [x], [shape]),
            n.node("Slice", "hw", [shape, n.const("hw_starts", _i64([2])), n.const("hw_ends", _i64([4])),
                                   n.const("hw_axes", _i64([0]))], [hw]),
            n.node("Add", "offset", [hw, n.const("crop_offset", _i64(crop_offset))], [shifted]),
            # H + offset >= 0 for every valid input, so int64 Div (truncating) is the floor
            n.node("Div", "div", [shifted, n.const("crop_div", _i64(crop_div))], [q]),
            n.node("Add", "plus1", [q, n.const("one", _i64([1, 1]))], [ends]),
        ]
    nodes.append(n.node("Slice", "crop", [up, n.const("crop_starts", _i64([0, 0])), ends,
                                          n.const("crop_axes", _i64([2, 3]))], [y]))
    return nodes


def _tail_min_opset(rates: tuple[int, int], static: Any, opset: int) -> int:
    """Opset the upsampling needs: 11 for Resize; none for the Gather fallback or r = 1."""
    if rates == (1, 1) or (static is not None and opset < GRID_MIN_OPSET):
        return 1
    return GRID_MIN_OPSET


class _Geometry:
    """Pads/strides/sizes of one site as the rewrite sees them (auto_pad resolved)."""

    def __init__(self, site: ConvSite, ctx: PassContext) -> None:
        self.static = static_hw(site.node.inputs[0])
        a = site.attrs
        self.pads: tuple[int, int, int, int] | None
        if a.explicit_pads:
            self.pads = a.pads
        elif a.auto_pad == "VALID":
            self.pads = (0, 0, 0, 0)
        else:
            self.pads = a.resolved_pads(self.static) if self.static else None
        self.out_hw = site.out_hw
        if self.static and self.pads is not None:
            self.out_hw = (conv_out_size(self.static[0], site.kh, a.strides[0], a.dilations[0], self.pads[0], self.pads[2]),
                           conv_out_size(self.static[1], site.kw, a.strides[1], a.dilations[1], self.pads[1], self.pads[3]))

    def decline(self, site: ConvSite) -> Decline | None:
        if self.pads is None:
            return Decline(f"auto_pad {site.attrs.auto_pad} with a dynamic spatial size: the pads depend on the "
                           "input size (give a static model)")
        if self.out_hw is None:
            return Decline("output size unknown (the layer was not reached by the sample run)")
        return None


def _grid_parts(site: ConvSite, geo: _Geometry, rates: tuple[int, int]) -> tuple[
        tuple[int, int], tuple[int, int, int, int], Any, tuple[int, int], tuple[int, int]]:
    """(strides, pads, static (perforated, upsampled, crop sizes) or None, crop_offset, crop_div)."""
    a = site.attrs
    assert geo.pads is not None
    sym = grid_pads_symbolic(site.kh, site.kw, a.strides, geo.pads, a.dilations, *rates)
    if geo.static:
        plan = grid_plan(geo.static[0], geo.static[1], site.kh, site.kw, a.strides, geo.pads, a.dilations, *rates)
        return plan.strides, plan.pads, (plan.perforated_size, plan.upsampled_size, plan.crop), sym.crop_offset, sym.crop_div
    return sym.strides, sym.pads, None, sym.crop_offset, sym.crop_div


# --------------------------------------------------------------------------------------
# the passes
# --------------------------------------------------------------------------------------


class _PerforationBase(Pass):
    op_types = ("Conv",)

    def match(self, node: gs.Node, ctx: PassContext) -> ConvSite | Decline:
        site = match_conv(node, ctx)
        if isinstance(site, Decline):
            return site
        geo = _Geometry(site, ctx)
        bad = geo.decline(site)
        return bad if bad is not None else site

    def _pinned_rate(self, settings: Settings) -> float | None:
        """``--perforation-rate``, when the user gave one (it pins the rung)."""
        rate = settings.options.get("perforation_rate")
        return None if rate is None else float(rate)


@register
class PerforatePass(_PerforationBase):
    name = "perforate"
    summary = "perforation: conv at fewer positions (strided or gathered), nearest-neighbour fill (Resize / Gather)"
    options = (RATE_OPTION, MASK_OPTION, FORM_OPTION, CALIB_OPTION)

    # ---- the ladder: positions computed -----------------------------------------------------

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder | Decline:
        """Rungs: the number of output positions computed, by increasing cost (see the docstring)."""
        strategy = self.option(settings, "perforation_mask")
        form = self.option(settings, "perforation_form") or ("grid" if strategy == "grid" else "mask")
        if form == "grid" and strategy != "grid":
            return Decline(f"perforation mask {strategy!r} needs --perforation-form mask (the grid form only does grids)")
        geo = _Geometry(site, ctx)
        bad = geo.decline(site)
        if bad is not None:
            return bad
        if form == "mask" and geo.static is None:
            return Decline(DYNAMIC_MASK_REASON)
        out_hw = geo.out_hw
        assert out_hw is not None
        n = out_hw[0] * out_hw[1]
        F, C, kh, kw = site.weight.shape
        rate = self._pinned_rate(settings)
        if form == "grid":
            pinned = grid_factors(DEFAULT_RATE if rate is None else rate, out_hw)
            table = grid_rungs(out_hw, pinned)
            rungs = sorted(table)
            default = next(k for k, v in table.items() if v == pinned)

            def grid_macs(sizes: tuple[int, ...]) -> int:
                return perforated_macs(F, C, kh, kw, *out_hw, *table[sizes])

            return Ladder(full=(n,), rungs=[default] if rate is not None else rungs, macs_before=site.macs(),
                          macs=grid_macs, build=lambda sizes: self._grid(site, geo, table[sizes], ctx.opset),
                          snap=nearest_of(rungs), fixed=default if rate is not None else None, default=default,
                          unit="positions computed")
        default = (kept_count(n, DEFAULT_RATE if rate is None else rate),)
        return Ladder(full=(n,), rungs=[default] if rate is not None else [(k,) for k in range(1, n + 1)],
                      macs_before=site.macs(), macs=lambda sizes: mask_form_macs(F, C, kh, kw, sizes[0]),
                      build=lambda sizes: self._mask(site, settings, ctx, geo, strategy, 1.0 - sizes[0] / n),
                      fixed=default if rate is not None else None, default=default, unit="positions computed")

    def _grid(self, site: ConvSite, geo: _Geometry, rates: tuple[int, int], opset: int) -> Candidate:
        out_hw = geo.out_hw
        assert out_hw is not None
        strides, pads, static, off, div = _grid_parts(site, geo, rates)
        a, w, bias = site.attrs, site.weight, site.bias
        F, C, kh, kw = w.shape
        macs_after = perforated_macs(F, C, kh, kw, *out_hw, *rates)
        skipped = 1.0 - macs_after / max(site.macs(), 1)

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/perforate")
            if rates == (1, 1):
                return [conv_node(n, "conv", x, y, w, bias, strides=strides, pads=pads, dilations=a.dilations)]
            perf = n.var("perforated")
            return [conv_node(n, "conv", x, perf, w, bias, strides=strides, pads=pads, dilations=a.dilations),
                    *grid_tail(n, x, perf, y, rates, static, off, div, opset)]

        return Candidate(self.name, {"form": "grid", "r": f"{rates[0]}x{rates[1]}", "skip": f"{skipped:.2f}"},
                         site.macs(), macs_after, float("nan"), build, min_opset=_tail_min_opset(rates, static, opset),
                         note=f"grid {rates[0]}x{rates[1]} skips {skipped:.0%} of positions")

    def _mask(self, site: ConvSite, settings: Settings, ctx: PassContext, geo: _Geometry, strategy: str,
              rate: float) -> Candidate | Decline:
        mask = self.plan_mask(site, settings, ctx, strategy, rate)
        if isinstance(mask, Decline):
            return mask
        assert geo.static is not None
        H, W = geo.static
        a, w, bias = site.attrs, site.weight, site.bias
        F, C, kh, kw = w.shape
        pads = geo.pads
        assert pads is not None
        ho, wo = mask.shape
        idx = patch_indices(H, W, C, kh, kw, a.strides, pads, a.dilations, mask)  # (n, C*kh*kw)
        flat_size = C * (H + pads[0] + pads[2]) * (W + pads[1] + pads[3])
        itype = np.int32 if flat_size < 2**31 - 1 else np.int64
        idx_t = np.ascontiguousarray(idx.T.astype(itype))  # (C*kh*kw, n)
        interp = interpolation_map(mask)
        full = bool(mask.all())
        w2d = w.reshape(F, -1).astype(np.float32)
        opset = ctx.opset
        n_kept = int(mask.sum())

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/perforate")
            nodes: list[gs.Node] = []
            src = x
            if any(pads):
                xp = n.var("padded")
                onnx_pads = [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]]
                if opset >= 11:
                    nodes.append(n.node("Pad", "pad", [x, n.const("pads", _i64(onnx_pads))], [xp], mode="constant"))
                else:
                    nodes.append(n.node("Pad", "pad", [x], [xp], mode="constant", pads=onnx_pads))
                src = xp
            flat, patches, prod = n.var("flat"), n.var("patches"), n.var("computed")
            nodes += [
                n.node("Reshape", "flatten", [src, n.const("flat_shape", _i64([0, -1]))], [flat]),
                n.node("Gather", "gather_patches", [flat, n.const("patch_idx", idx_t)], [patches], axis=1),
                n.node("MatMul", "matmul", [n.const("w", w2d), patches], [prod]),
            ]
            if bias is not None:
                biased = n.var("computed_b")
                nodes.append(n.node("Add", "bias", [prod, n.const("b", bias.reshape(F, 1).astype(np.float32))], [biased]))
                prod = biased
            if not full:
                filled = n.var("filled")
                nodes.append(n.node("Gather", "interpolate", [prod, n.const("interp", interp.astype(itype))], [filled], axis=2))
                prod = filled
            nodes.append(n.node("Reshape", "unflatten", [prod, n.const("out_shape", _i64([0, F, ho, wo]))], [y]))
            return nodes

        macs_after = mask_form_macs(F, C, kh, kw, n_kept)
        skipped = 1.0 - n_kept / mask.size
        return Candidate(self.name, {"form": "mask", "mask": strategy, "kept": n_kept, "skip": f"{skipped:.2f}"},
                         site.macs(), macs_after, float("nan"), build, min_opset=7,
                         note=f"{strategy} mask computes {n_kept} of {mask.size} positions")

    # ---- masks ----------------------------------------------------------------------------

    def plan_mask(self, site: ConvSite, settings: Settings | Budget, ctx: PassContext, strategy: str,
                  rate: float) -> np.ndarray | Decline:
        """The boolean ``(Ho, Wo)`` mask (True = computed) the mask form uses for this site."""
        geo = _Geometry(site, ctx)
        out_hw = geo.out_hw
        assert out_hw is not None
        ho, wo = out_hw
        seed = settings.seed
        if strategy in ("grid", "uniform"):
            return make_mask(ho, wo, rate, strategy, seed=seed)
        consumer, z, why = find_consumer(site.node, ctx.graph)
        if strategy == "pooling":
            if consumer is None or consumer.op not in _POOLS:
                got = why or f"the conv's output feeds {consumer.op}"  # type: ignore[union-attr]
                return Decline(f"pooling mask needs a following pooling layer: {got}")
            g = _window_geometry(consumer, out_hw)
            if isinstance(g, str):
                return Decline(f"pooling mask: {g}")
            return make_mask(ho, wo, rate, "pooling", seed=seed, pool_kernel=g["kernel"], pool_stride=g["strides"],
                             pool_pads=g["pads"], pool_dilations=g["dilations"], pool_ceil_mode=g["ceil_mode"])
        if strategy == "weight":
            if consumer is None or consumer.op != "Conv":
                got = why or f"the conv's output feeds {consumer.op}"  # type: ignore[union-attr]
                return Decline(f"weight mask needs a following Conv: {got}")
            g = _window_geometry(consumer, out_hw)
            if isinstance(g, str):
                return Decline(f"weight mask: {g}")
            w_next = np.abs(constant_value(consumer.inputs[1]).astype(np.float64)).sum(axis=(0, 1))
            imp = window_coverage(ho, wo, g["kernel"], g["strides"], g["pads"], g["dilations"], tap_weight=w_next)
            return make_mask(ho, wo, rate, "weight", seed=seed, importance=imp)
        # impact: the interpolation error of the consumer's input, from the data service
        if ctx.stats is None:
            return Decline("impact mask needs calibration data: give --calib FILE")
        D = ctx.stats.get(self.impact_request(z, settings))
        if D is None:
            return Decline("impact mask needs calibration data: give --calib FILE")
        if D.ndim != 3:
            return Decline(f"impact mask: activation {z.name} is {D.ndim + 1}-D")
        if D.shape[1:] != (ho, wo):
            return Decline(f"impact mask: calibration activations are {D.shape[1:]}, the layer output {(ho, wo)}")
        return make_mask(ho, wo, rate, "impact", seed=seed, impact=impact_scores(D, consumer, out_hw))

    # ---- data ---------------------------------------------------------------------------

    @staticmethod
    def impact_request(z: gs.Tensor, settings: Settings | Budget) -> Request:
        """Mean over samples of the 4-neighbour squared differences of ``z`` (the impact estimate).

        ``--perforation-calib`` data (feed dicts; the API loads a path into them) is used for
        this statistic only; otherwise the run's calibration batches.
        """
        src = settings.options.get("perforation_calib")

        def reduce(act: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
            if act.ndim != 4:
                return np.zeros((0,) * max(act.ndim - 1, 0)), act.shape[0] if act.ndim else 1
            return neighbour_sq_diff(act), act.shape[0]

        return Request("neighbour_sq_diff", z.name, reduce, source=list(src) if src is not None else None)

    def needs(self, site: ConvSite, ctx: PassContext, settings: Settings) -> list[Request]:
        strategy = self.option(settings, "perforation_mask")
        form = self.option(settings, "perforation_form") or ("grid" if strategy == "grid" else "mask")
        if strategy != "impact" or form != "mask":
            return []
        _, z, _ = find_consumer(site.node, ctx.graph)
        return [self.impact_request(z, settings)]


@register
class PerforateSVDPass(_PerforationBase):
    name = "perforate-svd"
    summary = "channel SVD with a grid-perforated spatial stage: strided kxk C->K, 1x1 K->F, Resize, Slice"
    options = (RATE_OPTION,)

    data_aware = True

    def ladder(self, site: ConvSite, ctx: PassContext, settings: Settings) -> Ladder | Decline:
        geo = _Geometry(site, ctx)
        bad = geo.decline(site)
        if bad is not None:
            return bad
        out_hw = geo.out_hw
        assert out_hw is not None
        F, C, kh, kw = site.weight.shape
        full = svd_full_rank(F, C, kh, kw)
        sigma = self.covariance(site, ctx, settings)
        rate = self._pinned_rate(settings)
        rates = grid_factors(DEFAULT_RATE if rate is None else rate, out_hw)
        hq, wq = -(-out_hw[0] // rates[0]), -(-out_hw[1] // rates[1])
        # one cost model: a rung's MACs are those of the perforated rewrite it builds
        macs = lambda sizes: svd_macs(F, C, kh, kw, hq, wq, sizes[0])  # noqa: E731
        # one decomposition per layer, truncated per rung (as the svd pass does)
        basis = lru_cache(maxsize=1)(lambda: channel_basis(site.weight, sigma))
        return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=site.macs(), macs=macs,
                      build=lambda sizes: self._build(site, ctx, geo, basis(), sizes[0], full, rates, macs(sizes)),
                      spectra=lambda: [[basis().s]], unit="rank")

    def _build(self, site: ConvSite, ctx: PassContext, geo: _Geometry, basis: ChannelBasis, rank: int, full: int,
               rates: tuple[int, int], macs_after: int) -> Candidate:
        fac = channel_svd(site.weight, rank, basis=basis)
        strides, pads, static, off, div = _grid_parts(site, geo, rates)
        a, bias, opset = site.attrs, site.bias, ctx.opset

        def build(x: gs.Tensor, y: gs.Variable, names: Names) -> list[gs.Node]:
            n = names.scoped(f"{site.name}/perforate_svd")
            mid = n.var("mid")
            nodes = [conv_node(n, "spatial", x, mid, fac.first, None, strides=strides, pads=pads, dilations=a.dilations)]
            if rates == (1, 1):
                return nodes + [conv_node(n, "pointwise", mid, y, fac.second, bias)]
            perf = n.var("perforated")
            nodes.append(conv_node(n, "pointwise", mid, perf, fac.second, bias))
            return nodes + grid_tail(n, x, perf, y, rates, static, off, div, opset)

        return Candidate(self.name, {"rank": rank, "full": full, "r": f"{rates[0]}x{rates[1]}"}, site.macs(),
                         macs_after, fac.rel_error, build, min_opset=_tail_min_opset(rates, static, opset))
