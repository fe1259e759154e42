"""End-to-end benchmark on architecture-scale models (VGG-19, ResNet-50, AlexNet, ZFNet-512).

The models are the onnx package's light models with seeded He-scaled random weights
(``tools/light_models.py``), at 1x3x224x224. Each is rewritten three ways, with the
never-slower guard ON (the default: a layer is kept only if measured >= 1.1x faster, and the
whole model only if faster end to end):

* ``tucker2 --rank-ratio 0.25``
* ``svd --rank-ratio 0.25``
* the default run: method ``auto``, no rank option (energy 0.98 per layer)

and original and rewrite are then timed in the SAME interleaved run
(``time_models([orig, new])``), at batch 1 with all cores and with 1 thread (and at batch 8
for VGG-19 unless ``--quick``). Reported per model and run: end-to-end speedup,
rewritten / kept / declined layer counts, MAC ratio over the watched layers, output
fidelity (``result.fidelity`` on the softmax output, plus logits measured here), and the
wall time of the rewrite itself.

Random weights have flat singular-value spectra: fidelity figures show that the rewrite is
wired correctly (cosine near 1 at high rank) but say nothing about accuracy, and the energy
rule of the default run keeps almost the full rank (so it rarely saves MACs on these models).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import light_models  # noqa: E402
from benchkit import fmt as _f  # noqa: E402
from benchkit import md_table as _table  # noqa: E402
from benchkit import timing_threads  # noqa: E402

NAME = "arch"
TITLE = "End to end on architecture-scale models"

MODELS = ("vgg19", "resnet50", "bvlc_alexnet", "zfnet512")
QUICK_MODELS = ("bvlc_alexnet",)
RUNS: dict[str, dict[str, Any]] = {
    "tucker2 r=0.25": {"method": "tucker2", "rank_ratio": 0.25},
    "svd r=0.25": {"method": "svd", "rank_ratio": 0.25},
    "default (auto)": {},
}
QUICK_RUNS = ("svd r=0.25",)
#: the guard (per-layer and end-to-end timing inside compress) runs at this many threads:
#: on an oversubscribed 2-core box a 2-thread session's latency swings 4x from run to run
#: (a 0.46 GMAC conv measured 8 ms on 1 thread and 30-38 ms on 2), which would make the
#: guard's decisions random; 1 thread measures the arithmetic.
GUARD_THREADS = 1
#: default run: Gemm/MatMul layers with more weights than this are skipped. fc-svd decides
#: with two full float64 SVDs of the weight (one for the energy spectrum, one for the
#: factors): 135 s each for AlexNet's 9216x4096 fc6 here, ~4 min each for VGG's 25088x4096.
FC_SKIP_ELEMS = 4 * 1024 * 1024
BLAS_THREADS = 1
GOAL_VGG_TUCKER = 3.0


def data_name(model: onnx.ModelProto) -> str:
    return light_models.data_input(model).name


def softmax_input(model: onnx.ModelProto) -> str | None:
    """The logits: input of the final Softmax feeding a graph output, if any."""
    outs = {o.name for o in model.graph.output}
    for n in model.graph.node:
        if n.op_type == "Softmax" and n.output[0] in outs:
            return n.input[0]
    return None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    return m


def batched(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """The same model with a free batch dimension (the light models fix it to 1).

    The flattening Reshape of the classifier takes its target shape from an int64
    initializer ``[1, features]``; its first entry becomes ``-1``. Stale value_info goes.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    name = data_name(m)
    for vi in [v for v in g.input if v.name == name] + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    reshape_shapes = {n.input[1] for n in g.node if n.op_type == "Reshape" and len(n.input) > 1}
    for t in g.initializer:
        if t.name in reshape_shapes and t.data_type == onnx.TensorProto.INT64:
            a = onnx.numpy_helper.to_array(t).copy()
            if a.ndim == 1 and a.size >= 2 and a[0] == 1:
                a[0] = -1
                t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    del g.value_info[:]
    return m


def logits_fidelity(orig: onnx.ModelProto, new: onnx.ModelProto, samples: int = 4) -> dict[str, Any] | None:
    """Relative error / cosine of the logits and top-1 agreement, over seeded random images."""
    from onnxslim_lr.timing import make_session

    lg = softmax_input(orig)
    if lg is None:
        return None
    name = data_name(orig)
    s0 = make_session(with_outputs(orig, [lg]), threads=1)
    s1 = make_session(with_outputs(new, [lg]), threads=1)
    rng = np.random.default_rng(123)
    rel, cos, agree = [], [], 0
    for _ in range(samples):
        x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
        a = s0.run([lg], {name: x})[0].reshape(-1).astype(np.float64)
        b = s1.run([lg], {name: x})[0].reshape(-1).astype(np.float64)
        rel.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
        cos.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        agree += int(np.argmax(a) == np.argmax(b))
    return {"tensor": lg, "samples": samples, "rel_error": max(rel), "cosine": min(cos), "top1_agree": agree / samples}


def _fc_skips(model: onnx.ModelProto) -> list[str]:
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and sizes.get(n.input[1], 0) > FC_SKIP_ELEMS]


def _counts(res: Any) -> dict[str, int]:
    c = {"rewritten": 0, "kept": 0, "declined": 0}
    for layer in res.layers:
        c[layer.status] = c.get(layer.status, 0) + 1
    return c


def _methods(res: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer in res.layers:
        if layer.status == "rewritten":
            out[layer.method] = out.get(layer.method, 0) + 1
    return out


def model_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs per image of every Conv / Gemm / MatMul with a constant weight (shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value for d in dims]
    w = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in w and n.output[0] in shapes:
            F, Cg, kh, kw = w[n.input[1]]
            ho, wo = shapes[n.output[0]][2:4]
            out[n.name] = F * Cg * kh * kw * ho * wo
        elif n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in w and len(w[n.input[1]]) == 2:
            out[n.name] = int(np.prod(w[n.input[1]]))
    return out


def _mac_ratio(res: Any, macs: dict[str, int]) -> dict[str, Any]:
    """MACs of all Conv/Gemm/MatMul layers (declined ones too) before and after the rewrite."""
    before = sum(macs.values())
    saved = sum(l.macs_before - l.macs_after for l in res.layers
                if res.changed and l.status == "rewritten" and l.macs_before and l.macs_after)
    after = before - saved
    return {"macs_before": before, "macs_after": after, "mac_ratio": before / after if after else None}


LAYER_FIELDS = ("node", "op", "status", "method", "params", "macs_before", "macs_after", "out_error", "measured", "reason")


def _layer_record(layer: Any) -> dict[str, Any]:
    """The LayerResult fields worth keeping in the committed JSON (reasons shortened)."""
    d = layer.as_dict() if hasattr(layer, "as_dict") else dict(layer)
    out = {}
    for k in LAYER_FIELDS:
        v = d.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if k == "reason" and isinstance(v, str) and len(v) > 160:
            v = v[:157] + "..."
        out[k] = v
    return out


def bench_run(model: onnx.ModelProto, name: str, label: str, kwargs: dict[str, Any], quick: bool,
              macs: dict[str, int]) -> dict[str, Any]:
    import onnxslim_lr as lr
    from onnxslim_lr.timing import time_models
    from threadpoolctl import threadpool_limits

    row: dict[str, Any] = {"model": name, "run": label, "options": dict(kwargs), "guard_threads": GUARD_THREADS}
    skip: list[str] = []
    if not kwargs:
        skip = _fc_skips(model)
        row["skipped_fc"] = skip
    t0 = time.perf_counter()
    try:
        with threadpool_limits(BLAS_THREADS):
            res = lr.compress(model, threads=GUARD_THREADS, skip=skip, **kwargs)
    except Exception as exc:  # a package bug: record it and go on
        row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                   rewrite_s=round(time.perf_counter() - t0, 1))
        return row
    row["rewrite_s"] = round(time.perf_counter() - t0, 1)
    row["changed"] = res.changed
    row["notes"] = list(res.notes)
    row["counts"] = _counts(res)
    row["methods"] = _methods(res)
    row.update(_mac_ratio(res, macs))
    row["guard_speedup"] = res.speedup  # compress's own end-to-end measurement (GUARD_THREADS)
    row["layers"] = [_layer_record(l) for l in res.layers]
    if res.fidelity is not None:
        row["fidelity"] = {"rel_error": res.fidelity.worst_rel_error, "cosine": res.fidelity.min_cosine,
                           "top1": res.fidelity.top1, "samples": res.fidelity.samples}
    new = res.model
    if res.changed:
        row["logits"] = logits_fidelity(model, new)
    feeds = {data_name(model): np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    rounds, max_s = (5, 20.0) if quick else (11, 60.0)
    row["timings"] = {}
    for th in timing_threads():
        t = time_models([model, new], feeds, threads=th, rounds=rounds, max_total_s=max_s)
        row["timings"][f"b1_t{th}"] = {"batch": 1, "threads": th, "speedup": t.ratio(0, 1), "rounds": t.rounds,
                                       "orig_ms": t.medians[0] * 1e3, "new_ms": t.medians[1] * 1e3}
    if name == "vgg19" and not quick and res.changed:
        b8 = {data_name(model): np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)}
        t = time_models([batched(model, 8), batched(new, 8)], b8, threads=os.cpu_count(), rounds=7, max_total_s=90.0)
        row["timings"][f"b8_t{os.cpu_count()}"] = {"batch": 8, "threads": os.cpu_count(), "speedup": t.ratio(0, 1),
                                                   "rounds": t.rounds, "orig_ms": t.medians[0] * 1e3,
                                                   "new_ms": t.medians[1] * 1e3}
    return row


def run(quick: bool = False) -> dict[str, Any]:
    import onnxslim_lr as lr

    names = QUICK_MODELS if quick else MODELS
    runs = {k: v for k, v in RUNS.items() if not quick or k in QUICK_RUNS}
    rows = []
    t_start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        path = light_models.DEFAULT_OUT / f"{name}.onnx"
        if not path.exists():
            light_models.write([name], light_models.DEFAULT_OUT, check=False)
        model = lr.load_model(path)
        macs = model_macs(model)
        print(f"  [arch] {name}: loaded in {time.perf_counter() - t0:.0f} s, {sum(macs.values()) / 1e9:.2f} GMAC", flush=True)
        for label, kwargs in runs.items():
            t0 = time.perf_counter()
            row = bench_run(model, name, label, kwargs, quick, macs)
            rows.append(row)
            ts = "  ".join(f"{k}: {v['speedup']:.2f}x" for k, v in row.get("timings", {}).items())
            print(f"  [arch] {name:13s} {label:15s} {row.get('counts')} MACx {row.get('mac_ratio') or 0:.2f} "
                  f"{ts}  rewrite {row.get('rewrite_s')} s  ({time.perf_counter() - t0:.0f} s)"
                  + (f"  ERROR {row['reason']}" if row.get("status") == "error" else ""), flush=True)
    return {"section": NAME, "quick": quick, "guard_threads": GUARD_THREADS, "rows": rows,
            "goals": goals(rows), "wall_s": round(time.perf_counter() - t_start, 1)}


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    vgg = [r for r in rows if r["model"] == "vgg19" and r["run"] == "tucker2 r=0.25" and r.get("timings")]
    if vgg:
        figs = {k: v["speedup"] for k, v in vgg[0]["timings"].items() if k.startswith("b1_")}
        out.append({"goal": f"VGG-19 end to end >= {GOAL_VGG_TUCKER:g}x with tucker2 rank-ratio 0.25 (batch 1)",
                    "met": all(v >= GOAL_VGG_TUCKER for v in figs.values()),
                    "figure": ", ".join(f"{v:.2f}x ({k.split('_t')[1]} thr)" for k, v in figs.items())})
    default = [r for r in rows if r["run"] == "default (auto)"]
    if default:
        slow = []
        figs = []
        for r in default:
            for k, v in r.get("timings", {}).items():
                figs.append(f"{r['model']} {v['speedup']:.2f}x ({k})")
                # "never slower" within the noise: a rewritten model below 1.0 by more than 3 %
                if r.get("changed") and v["speedup"] < 0.97:
                    slow.append(f"{r['model']} {v['speedup']:.2f}x ({k})")
        out.append({"goal": "the default run is never slower than the original on any model "
                            "(unchanged models are the original itself; rewritten ones must measure >= 0.97x)",
                    "met": not slow and all(r.get("status") != "error" for r in default),
                    "figure": "; ".join(figs) or "-", "slower": slow})
    return out


# ---- Markdown -----------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    rows = results["rows"]
    keys: list[str] = []
    for r in rows:
        for k in r.get("timings", {}):
            if k not in keys:
                keys.append(k)
    out = [f"## {TITLE}", ""]
    out.append(
        "Light models from the onnx package with seeded He-scaled random weights (`tools/light_models.py`), "
        "1x3x224x224. Every rewrite runs with the never-slower guard ON (per layer >= 1.1x measured, and end to "
        f"end); the guard times at {results.get('guard_threads', GUARD_THREADS)} thread (`threads=1`: on this "
        "oversubscribed 2-core box 2-thread latencies swing several-fold between runs). **sp b1 tN** = original "
        "latency / rewritten latency in one interleaved `time_models([orig, new])` run at batch 1 and N threads "
        "(b8: batch 8, VGG-19 only); an unchanged model (the guard returned the original) measures the original "
        "against itself. **MAC x**: MACs of all Conv/Gemm layers (declined ones included) before / after. **layers** = rewritten / kept "
        "(rewrite proposed but not kept after measuring) / declined. **fidelity**: `result.fidelity` on the "
        "softmax output (1 sample; rel error, cosine) and the logits measured here (max rel error / min cosine / "
        "top-1 agreement over 4 random images). Weights are random: these figures check the wiring, **accuracy "
        "is meaningless**. **rewrite s**: wall time of `compress` (BLAS pinned to 1 thread)."
        + (" **Quick (smoke) run.**" if results.get("quick") else "")
    )
    out.append("")
    header = ["model", "run"] + [f"sp {k.replace('_', ' ')}" for k in keys] + [
        "layers r/k/d", "methods", "MAC x", "softmax rel err / cos", "logits rel err / cos / top-1", "rewrite s", "notes"]
    table = []
    for r in rows:
        if r.get("status") == "error":
            table.append([r["model"], r["run"]] + ["-"] * len(keys) + ["-", "-", "-", "-", "-", _f(r.get("rewrite_s"), "{:.0f}"),
                                                                         f"ERROR {r['reason']}"])
            continue
        c = r.get("counts", {})
        fid = r.get("fidelity")
        lg = r.get("logits")
        notes = []
        if not r.get("changed"):
            notes.append("unchanged (original returned)")
        notes += [n for n in r.get("notes", []) if "returning the original" in n]
        if r.get("skipped_fc"):
            notes.append(f"skipped FC {', '.join(r['skipped_fc'])} (> {FC_SKIP_ELEMS // 2**20}M weights)")
        if r.get("guard_speedup"):
            notes.append(f"guard e2e {r['guard_speedup']:.2f}x")
        table.append(
            [r["model"], r["run"]]
            + [_f(r.get("timings", {}).get(k, {}).get("speedup")) for k in keys]
            + [f"{c.get('rewritten', 0)}/{c.get('kept', 0)}/{c.get('declined', 0)}",
               ", ".join(f"{m} {n}" for m, n in r.get("methods", {}).items()) or "-",
               _f(r.get("mac_ratio")),
               f"{fid['rel_error']:.3f} / {fid['cosine']:.3f}" if fid else "-",
               f"{lg['rel_error']:.3f} / {lg['cosine']:.3f} / {lg['top1_agree']:.2f}" if lg else "-",
               _f(r.get("rewrite_s"), "{:.0f}"), "; ".join(notes)])
    out.append(_table(header, table))
    out.append("")
    for g in results.get("goals") or goals(rows):
        verdict = "**met**" if g["met"] else "**not met**"
        out.append(f"- Goal: {g['goal']}: {verdict} ({g['figure']}).")
    default = [r for r in rows if r["run"] == "default (auto)" and r.get("status") != "error"]
    if default and not any(r.get("changed") for r in default):
        out.append("  Trivially so: the default rank rule (energy 0.98) keeps ~90-97 % of every rank of these random, "
                   "flat-spectrum weights, so every proposal saves no MACs and is rejected before timing, and the "
                   "original is returned; the figures above are the original measured against itself (the noise "
                   "floor). This goal needs trained weights (a decaying spectrum) to say anything.")
    out.append("")
    models = {r["model"] for r in rows}
    if models & {"bvlc_alexnet", "zfnet512"}:
        out.append("Reading the table: AlexNet and ZFNet-512 end-to-end ratios stay far below their MAC ratios because "
                   "their three FC layers (58.6M / 80.7M weights: ~234 / ~323 MB streamed per image at batch 1, "
                   "memory-bound) are untouched by svd/tucker2 and dominate batch-1 latency; AlexNet's conv2/4/5 are grouped (group=2) "
                   "and declined. ResNet-50 with tucker2 only rewrites its 3x3 convs (16 + conv1 7x7); the 1x1 convs "
                   "hold most of its MACs.")
        out.append("")
    return "\n".join(out)




if __name__ == "__main__":
    import bench

    sys.exit(bench.main(["--sections", NAME] + sys.argv[1:]))
