"""Perforation (Figurnov et al. 2016): measured CPU speedup against the perforation rate.

Typical 3x3 layers (pad 1, stride 1): 64->64 @112x112, 128->128 @56x56, 256->256 @56x56,
512->512 @28x28; perforation rates 0.25, 0.5, 0.75; grid form (strided Conv -> nearest
Resize -> Slice) and mask form (Pad -> Gather -> MatMul -> Gather, with the ``grid`` mask):

1. a one-Conv model with seeded He-scaled Gaussian weights and a bias (static shape, batch 1);
2. ``onnxslim_lr.compress(model, method="perforate", method_options={"perforation_rate": P,
   ...}, allow_slower=True, end_to_end=False)`` so that a rewrite is always produced. The
   grid form can only skip ``1 - 1/(rh*rw)`` of the positions with near-square integer
   factors: rates 0.25 and 0.5 both become 1x2 (skip 0.5), 0.75 becomes 2x2;
3. one interleaved ``time_models([original, rewritten, original])`` run at batch 1 with all
   cores; the second copy of the original gives the A/A ratio (noise floor of the run).
   Two checks beside it, because the machine these figures come from has 2 shared, busy
   cores: the same interleaved run with onnxruntime's intra-op spinning off ("no-spin"),
   and the single-thread CPU-time ratio (``time.thread_time``), which does not depend on
   the machine's load;
4. the theoretical ratio = original MACs / perforated MACs (Resize, Slice and Gathers do no
   multiply-adds) and the relative output error on a random input (random weights and
   inputs: not representative of trained networks, whose maps are smoother).

Also one composition row per layer (full run only): ``perforate-svd`` (channel SVD at rank
ratio 1/2, spatial stage grid-perforated 2x2, the 1x1 stage at the perforated resolution).

End to end, when ``models/vgg_fmnist.onnx`` exists (the trained zoo VGG; skipped
otherwise): every conv offered to the perforate pass at rates 0.5 and 0.75 (grid form),
guard off and on, plus the pooling and impact masks (mask form); accuracy on
``models/fmnist_test2k.npz`` via ``onnxslim_lr.accuracy`` and end-to-end latency. No
fine-tuning is done (the paper's 2-4x whole-network figures are after fine-tuning).

Standalone: ``python tools/bench_perforation.py [--quick]`` writes
``bench_results/perforation.json`` and prints the Markdown section.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import benchkit
from benchkit import LAYERS, QUICK_LAYERS, Layer, load_zoo_vgg, rel_error
from benchkit import fmt as _f
from benchkit import md_table as _table

NAME = "perforation"
TITLE = "Perforation: fewer conv positions, nearest-neighbour fill"
ROOT = Path(__file__).resolve().parent.parent

RATES = (0.25, 0.5, 0.75)
FORMS = ("grid", "mask")
#: the goal: grid form at rate 0.75 on this layer at least this much faster
GOAL_LAYER, GOAL_RATE, GOAL_SPEEDUP = "3x3_256_56", 0.75, 2.5


def conv_model(layer: Layer, seed: int = 0) -> onnx.ModelProto:
    return benchkit.conv_model(layer, seed, producer="bench_perforation")


def no_spin_session(model: onnx.ModelProto, threads: int | None = None) -> Any:
    """Like ``timing.make_session`` (full optimisations, pinned threads) with intra-op spinning off.

    onnxruntime's pool threads busy-wait after each run; with several sessions timed in
    alternation on a machine with few cores, the idle session's spinning threads steal the
    cores the running one needs (about 2x on the 2-core machine these figures come from).
    """
    import onnxruntime as ort

    from onnxslim_lr.timing import default_threads

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def cpu_time_ratio(sessions: list[Any], feeds: dict[str, np.ndarray], rounds: int = 7) -> tuple[float, list[float]]:
    """Original / rewritten CPU time of single-thread sessions (``time.thread_time``).

    With one intra-op thread onnxruntime runs on the calling thread, so its thread CPU time
    is the work done, whatever else the machine is running; wall-clock figures on a shared,
    overloaded machine favour short runs (they fit in one scheduler slice). Returns the ratio
    and the median CPU ms of each session.
    """
    times: list[list[float]] = [[] for _ in sessions]
    for s in sessions:
        s.run(None, feeds)
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            t0 = time.thread_time()
            sessions[i].run(None, feeds)
            times[i].append(time.thread_time() - t0)
    med = [float(np.median(t)) * 1e3 for t in times]
    return med[0] / med[1], med


def bench_layer(layer: Layer, model: onnx.ModelProto, method: str, opts: dict[str, Any], rounds: int,
                max_total_s: float, **budget: Any) -> dict[str, Any]:
    import onnxslim_lr as lr
    from onnxslim_lr.timing import make_session, time_models

    row: dict[str, Any] = {"layer": layer.name, "shape": layer.describe(), "method": method,
                           "rate": opts.get("perforation_rate"), "form": opts.get("perforation_form", "grid"),
                           "macs_before": layer.macs}
    t0 = time.perf_counter()
    res = lr.compress(model, method=method, method_options=opts, allow_slower=True, end_to_end=False, **budget)
    row["rewrite_s"] = round(time.perf_counter() - t0, 2)
    lres = res.layers[0]
    row.update(status=lres.status, params=lres.params, macs_after=lres.macs_after)
    if lres.status != "rewritten":
        row["reason"] = lres.reason
        return row
    row["mac_ratio"] = lres.macs_before / lres.macs_after
    row["skipped"] = 1.0 - lres.macs_after / lres.macs_before if method == "perforate" else None
    new = res.model
    row["model_mb"] = round(new.ByteSize() / 2**20, 1)
    x = np.random.default_rng(1).standard_normal((1, layer.C, layer.H, layer.H)).astype(np.float32)
    sess = [make_session(m) for m in (model, new, model)]
    ref, got = sess[0].run(None, {"x": x})[0], sess[1].run(None, {"x": x})[0]
    row["out_error"] = rel_error(ref, got)
    t = time_models(sess, {"x": x}, rounds=rounds, max_total_s=max_total_s)
    paired = [a / b for a, b in zip(t.samples[0], t.samples[1]) if b > 0] if t.samples else []
    row.update(orig_ms=t.medians[0] * 1e3, new_ms=t.medians[1] * 1e3, speedup=t.ratio(0, 1), aa_ratio=t.ratio(0, 2),
               paired=float(np.median(paired)) if paired else None, rounds=t.rounds, threads=t.threads)
    row["efficiency"] = row["speedup"] / row["mac_ratio"]
    t2 = time_models([no_spin_session(model), no_spin_session(new)], {"x": x}, rounds=rounds, max_total_s=max_total_s)
    row.update(nospin_speedup=t2.ratio(0, 1), nospin_orig_ms=t2.medians[0] * 1e3, nospin_new_ms=t2.medians[1] * 1e3)
    ratio, med = cpu_time_ratio([make_session(m, threads=1) for m in (model, new)], {"x": x})
    row.update(cpu1_speedup=ratio, cpu1_orig_ms=med[0], cpu1_new_ms=med[1])
    return row


# ---- end to end on the trained VGG --------------------------------------------------------


def bench_vgg(quick: bool) -> dict[str, Any]:
    import onnxslim_lr as lr
    from onnxslim_lr.timing import time_models

    calib = ROOT / "models" / "fmnist_calib.npz"
    loaded = load_zoo_vgg(quick)
    if isinstance(loaded, str):
        return {"skipped": loaded}
    model, x, y, base_acc = loaded
    path = ROOT / "models" / "vgg_fmnist.onnx"
    # (label, method options, allow_slower)
    configs: list[tuple[str, dict[str, Any], bool]] = [
        ("grid 0.5", {"perforation_rate": 0.5}, True),
        ("grid 0.75", {"perforation_rate": 0.75}, True),
        ("grid 0.75", {"perforation_rate": 0.75}, False),
        ("pooling mask 0.5", {"perforation_rate": 0.5, "perforation_mask": "pooling"}, True),
        ("impact mask 0.5", {"perforation_rate": 0.5, "perforation_mask": "impact",
                             "perforation_calib": str(calib)}, True),
        ("uniform mask 0.5", {"perforation_rate": 0.5, "perforation_mask": "uniform"}, True),
    ]
    if quick:
        configs = configs[1:3]
    runs = []
    for label, opts, allow_slower in configs:
        if "perforation_calib" in opts and not calib.exists():
            runs.append({"config": label, "skipped": f"{calib.relative_to(ROOT)} not found"})
            continue
        t0 = time.perf_counter()
        res = lr.compress(model, method="perforate", method_options=opts, allow_slower=allow_slower, end_to_end=False)
        wall = time.perf_counter() - t0
        row: dict[str, Any] = {"config": label, "guard": not allow_slower, "rewrite_s": round(wall, 1),
                               "rewritten": len(res.rewritten), "watched": len(res.layers)}
        row["layers"] = [{k: v for k, v in l.as_dict().items() if k != "attempts"} for l in res.layers]
        if res.changed:
            row["accuracy"] = lr.accuracy(res.model, x, y)
            for batch in (1, 32):
                t = time_models([model, res.model], {model.graph.input[0].name: x[:batch]}, rounds=9, max_total_s=6.0)
                row[f"speedup_b{batch}"] = t.ratio(0, 1)
        else:
            row["accuracy"] = base_acc
        macs_all = sum(l["macs_before"] for l in row["layers"])
        saved = sum(l["macs_before"] - l["macs_after"] for l in row["layers"] if l["status"] == "rewritten")
        row["conv_mac_ratio"] = macs_all / (macs_all - saved) if macs_all and macs_all > saved else None
        runs.append(row)
        print(f"  [perforation] vgg {label:18s} guard={not allow_slower!s:5s}: {row['rewritten']}/{row['watched']} "
              f"rewritten, acc {base_acc:.4f} -> {row['accuracy']:.4f}, speedup b1 {row.get('speedup_b1', 1.0):.2f}x "
              f"({wall:.0f} s)", flush=True)
    return {"model": str(path.relative_to(ROOT)), "samples": int(len(y)), "accuracy_original": base_acc, "runs": runs}


# ---- end to end on architecture-scale models (speed only) ---------------------------------

ARCH_MODELS = ("light_vgg19", "light_resnet50")


def bench_arch(quick: bool) -> dict[str, Any]:
    """Perforation on the onnx package's architecture-only models at 1x3x224x224 (seeded weights).

    Speed only: random weights make accuracy meaningless. The guard is on (the default), so
    only layers that measure faster are rewritten.
    """
    import onnxslim_lr as lr
    from onnxslim_lr.timing import time_models

    sys.path.insert(0, str(ROOT / "tools"))
    from light_models import data_input, materialize

    if quick:
        return {"skipped": "quick mode"}
    rows = []
    for name in ARCH_MODELS:
        model = materialize(name, seed=0)
        inp = data_input(model)
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        feeds = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        for method, opts, budget in (("perforate", {"perforation_rate": 0.75}, {}),
                                     ("perforate-svd", {"perforation_rate": 0.75}, {"rank_ratio": 0.5})):
            t0 = time.perf_counter()
            res = lr.compress(model, method=method, method_options=opts, end_to_end=False,
                              input_shape=[f"{inp.name}:{'x'.join(map(str, shape))}"], **budget)
            wall = time.perf_counter() - t0
            row: dict[str, Any] = {"model": name, "method": method, "rate": 0.75, "rewrite_s": round(wall, 1),
                                   "rewritten": len(res.rewritten), "watched": len(res.layers), **budget}
            macs_all = sum(l.macs_before for l in res.layers)
            saved = sum(l.macs_before - l.macs_after for l in res.rewritten)
            row["conv_mac_ratio"] = macs_all / (macs_all - saved) if macs_all > saved else None
            row["speedup_b1"] = time_models([model, res.model], feeds, rounds=9, max_total_s=20.0).ratio(0, 1) \
                if res.changed else 1.0
            rows.append(row)
            print(f"  [perforation] {name} {method}: {row['rewritten']}/{row['watched']} rewritten, "
                  f"e2e {row['speedup_b1']:.2f}x ({wall:.0f} s)", flush=True)
    return {"rows": rows}


def run(quick: bool = False) -> dict[str, Any]:
    layers = [l for l in LAYERS if not quick or l.name in QUICK_LAYERS]
    rates = (0.5, 0.75) if quick else RATES
    rounds, max_total_s = (5, 3.0) if quick else (9, 5.0)
    rows = []
    t_start = time.perf_counter()
    for layer in layers:
        model = conv_model(layer)
        jobs: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        for form in FORMS:
            for rate in rates:
                opts: dict[str, Any] = {"perforation_rate": rate}
                if form == "mask":
                    opts["perforation_form"] = "mask"
                jobs.append(("perforate", opts, {}))
        if not quick:
            jobs.append(("perforate-svd", {"perforation_rate": 0.75}, {"rank_ratio": 0.5}))
        for method, opts, budget in jobs:
            t0 = time.perf_counter()
            row = bench_layer(layer, model, method, opts, rounds, max_total_s, **budget)
            rows.append(row)
            print(f"  [perforation] {layer.name:11s} {method:13s} {row['form']:4s} rate {row['rate']:<4g} "
                  f"{row.get('params', ''):30s} MACx {row.get('mac_ratio') or 0:5.2f} measured "
                  f"{row.get('speedup') or 0:5.2f}x ({row.get('orig_ms') or 0:6.1f} -> {row.get('new_ms') or 0:6.1f} ms) "
                  f"A/A {row.get('aa_ratio') or 0:4.2f} no-spin {row.get('nospin_speedup') or 0:5.2f}x 1-thread CPU {row.get('cpu1_speedup') or 0:5.2f}x err {row.get('out_error') or 0:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    vgg = bench_vgg(quick)
    arch = bench_arch(quick)
    return {
        "arch": arch,
        "section": NAME,
        "quick": quick,
        "batch": 1,
        "threads": os.cpu_count(),
        "rounds": rounds,
        "layers": [dict(l.__dict__, describe=l.describe(), macs=l.macs) for l in layers],
        "rows": rows,
        "vgg": vgg,
        "goal": goal(rows),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    hit = [r for r in rows if r["layer"] == GOAL_LAYER and r["method"] == "perforate" and r["form"] == "grid"
           and r["rate"] == GOAL_RATE and r.get("speedup") is not None]
    text = f"grid form at rate {GOAL_RATE:g} on a 3x3 256->256 layer @56x56 at least {GOAL_SPEEDUP:g}x faster on CPU"
    if not hit:
        return {"goal": text, "met": None, "measured": None}
    r = hit[0]
    return {"goal": text, "met": r["speedup"] >= GOAL_SPEEDUP, "measured": r["speedup"], "mac_ratio": r["mac_ratio"],
            "orig_ms": r["orig_ms"], "new_ms": r["new_ms"], "aa_ratio": r["aa_ratio"],
            "nospin_speedup": r.get("nospin_speedup"), "cpu1_speedup": r.get("cpu1_speedup"), "cpu1_met": (r.get("cpu1_speedup") or 0) >= GOAL_SPEEDUP}


# ---- Markdown -----------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    rows = results["rows"]
    out = [f"## {TITLE}", ""]
    out.append(
        f"One-Conv models (3x3, pad 1, seeded He-scaled Gaussian weights, bias), batch 1, "
        f"{results.get('threads')} threads, onnxruntime CPU with full graph optimisations. Each row is one "
        "interleaved `time_models([original, rewritten, original])` run (median of up to "
        f"{results.get('rounds')} rounds). **rate** = requested share of positions skipped; **skipped** = what the "
        "rewrite really skips (the grid form only has near-square integer factors: 0.25 and 0.5 both become 1x2); "
        "**theory** = original MACs / perforated MACs (Resize/Slice/Gather do no multiply-adds); **measured** = "
        "original / rewritten median latency; **paired** = median over rounds of the "
        "per-round ratio (less sensitive to load that changes during the run); **no-spin** = the same "
        "interleaved measurement with onnxruntime's intra-op thread spinning off (idle sessions' spinning "
        "threads otherwise steal the 2 cores from the running one); **1-thread CPU** = original / "
        "rewritten *CPU time* of single-thread sessions (`time.thread_time`, median of 7 interleaved runs), "
        "which does not depend on what else the machine runs; **A/A** = original against itself (noise floor); **out err** = relative "
        "output error on a random input (random weights and inputs have no spatial smoothness, so this is a worst "
        "case: trained feature maps interpolate far better). The grid form computes the kept positions with a "
        "strided Conv and fills the rest with a nearest Resize + Slice; the mask form gathers the kept patches "
        "(Pad -> Reshape -> Gather) for one MatMul and gathers the result back through the interpolation map. "
        + ("**Quick (smoke) run.**" if results.get("quick") else "")
    )
    out.append("")
    table = []
    for r in rows:
        note = "" if r.get("status") == "rewritten" else f"{r.get('status')}: {r.get('reason', '')}"
        if r.get("aa_ratio") is not None and not 0.9 <= r["aa_ratio"] <= 1.1:
            note = "noisy run (A/A outside 0.9-1.1)"
        elif any((r.get(k) or 0) > 1.25 * r["mac_ratio"] for k in ("speedup", "nospin_speedup")):
            note = "above theory: wall clock on an overloaded machine (short runs fit in one scheduler slice)"
        method = r["form"] if r["method"] == "perforate" else "perforate-svd (rank 1/2) + grid"
        table.append([r["shape"], method, _f(r["rate"], "{:g}"), r.get("params") or "-", _f(r.get("skipped")),
                      _f(r.get("mac_ratio")), _f(r.get("speedup")), _f(r.get("paired")), _f(r.get("nospin_speedup")),
                      _f(r.get("cpu1_speedup")),
                      _f(r.get("orig_ms"), "{:.1f}"),
                      _f(r.get("new_ms"), "{:.1f}"), _f(r.get("aa_ratio")), _f(r.get("out_error")),
                      _f(r.get("model_mb"), "{:.1f}"), note])
    out.append(_table(["layer", "form", "rate", "params", "skipped", "theory", "measured", "paired", "no-spin",
                       "1-thread CPU",
                       "orig ms", "new ms",
                       "A/A", "out err", "model MB", "note"], table))
    out.append("")
    g = results.get("goal") or goal(rows)
    if g.get("met") is None:
        out.append(f"Goal: {g['goal']}: not measured in this run.")
    else:
        verdict = "**met**" if g["met"] else "**not met**"
        out.append(f"Goal: {g['goal']}: {verdict}, measured {g['measured']:.2f}x (theory {g['mac_ratio']:.2f}x; "
                   f"{g['orig_ms']:.1f} ms -> {g['new_ms']:.1f} ms; A/A {g['aa_ratio']:.2f}); without thread spinning {_f(g.get('nospin_speedup'))}x; single-thread CPU-time "
                   f"ratio {_f(g.get('cpu1_speedup'))}x ({'met' if g.get('cpu1_met') else 'not met'} by that measure).")
    out.append("")
    out.append(
        "Reading the figures: the grid form is a plain strided Conv, so it keeps onnxruntime's fast conv kernels "
        "and its speedup tracks the MAC ratio minus the cost of the nearest Resize (a copy of the full output "
        "map) and of the crop. The mask form replaces the conv by an explicit patch Gather (C*9 reads per kept "
        "position, no im2col reuse) and a MatMul; it usually loses to the dense conv on CPU, and its index tables "
        "make the model larger. Both are kept or dropped per layer by the never-slower guard. Wall-clock figures "
        "on this shared 2-core machine are noisy (other jobs ran at the same time; see A/A); where the three "
        "columns disagree, the 1-thread CPU ratio is the load-independent one. A measured ratio above theory is "
        "an artefact of the load: a short run can finish inside one scheduler slice while a long one is "
        "preempted.")
    out.append("")
    vgg = results.get("vgg") or {}
    out.append("### End to end: trained VGG (Fashion-MNIST), no fine-tuning")
    out.append("")
    if "skipped" in vgg:
        out.append(f"Skipped: {vgg['skipped']}.")
    else:
        out.append(f"`{vgg['model']}`, accuracy on {vgg['samples']} test images (original "
                   f"{vgg['accuracy_original'] * 100:.2f}%); every conv offered to the perforate pass; guard on = the "
                   "default never-slower timing guard (min speedup 1.1x per layer), off = `--allow-slower`. The paper "
                   "reports 2-4x whole-network speedups *after fine-tuning*; nothing here is fine-tuned, so the "
                   "accuracy column is the cost of perforation alone.")
        out.append("")
        vt = []
        for r in vgg["runs"]:
            if "skipped" in r:
                vt.append([r["config"], "-", "-", "-", "-", "-", "-", r["skipped"]])
                continue
            vt.append([r["config"], "on" if r["guard"] else "off", f"{r['rewritten']}/{r['watched']}",
                       _f(r.get("conv_mac_ratio")), _f(r["accuracy"] * 100, "{:.2f}%"),
                       _f(r.get("speedup_b1")), _f(r.get("speedup_b32")), ""])
        out.append(_table(["config", "guard", "rewritten", "MAC x (watched layers)", "accuracy", "speedup b1",
                           "speedup b32", "note"], vt))
    out.append("")
    arch = results.get("arch") or {}
    out.append("### End to end: architecture-scale models at 224x224 (seeded weights, speed only)")
    out.append("")
    if not arch.get("rows"):
        out.append(f"Not run ({arch.get('skipped', 'older results file')}).")
    else:
        out.append("Light models from the onnx package with seeded He-scaled weights, batch 1, never-slower guard on "
                   "(only layers that measure >= 1.1x faster are rewritten). Random weights make accuracy meaningless.")
        out.append("")
        out.append(_table(["model", "method", "rate", "rewritten", "MAC x (watched layers)", "e2e speedup b1",
                           "rewrite s"],
                          [[r["model"], r["method"] + (f" (rank-ratio {r['rank_ratio']:g})" if "rank_ratio" in r else ""),
                            _f(r["rate"], "{:g}"), f"{r['rewritten']}/{r['watched']}", _f(r.get("conv_mac_ratio")),
                            _f(r["speedup_b1"]), _f(r["rewrite_s"], "{:.0f}")] for r in arch["rows"]]))
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    sys.path.insert(0, str(ROOT))
    if "--arch-only" in args:  # add/refresh only the architecture-scale rows of an existing run
        results = json.loads((ROOT / "bench_results" / f"{NAME}.json").read_text())
        results["arch"] = bench_arch(quick)
    else:
        results = run(quick)
    benchkit.save_results(NAME, results, trailing_newline=False)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
