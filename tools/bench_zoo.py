"""The trained model zoo end to end: accuracy against measured onnxruntime CPU speed.

For each Fashion-MNIST model trained by ``tools/train_zoo.py`` (``models/vgg_fmnist.onnx``,
``models/resnet_fmnist.onnx``, ``models/zfnet_fmnist.onnx``) this section compares, on the same
machine and in the same interleaved timing run:

* the low-rank methods of ``onnxslim_lr`` at several budgets (``svd`` and ``tucker2`` at rank
  ratio 0.5 / 0.35 / 0.25 and energy 0.95 / 0.9, in the data metric with the bundled
  calibration set AND in the Frobenius metric; every other registered method -- whatever
  ``onnxslim_lr.passes.available()`` returns -- at one or two budgets), each through
  ``onnxslim_lr.compress`` with the never-slower guard ON (the default: a layer rewrite is
  kept only if measured >= 1.1x faster, and the whole model only if faster end to end);
* the default ``onnx-lowrank MODEL --calib CALIB`` run (no method or rank options) and the
  README quick-start run (same, plus ``--metric data``);
* onnxruntime int8 static quantization (``quant_pre_process``, then ``quantize_static``: QDQ,
  per-channel, S8S8, MinMax calibration on the same 256 calibration images);
* ``onnxslim.slim`` graph simplification (the ``onnxslim`` PyPI package);
* low-rank followed by int8: the best low-rank model (largest end-to-end speedup measured by
  ``compress`` among the variants losing <= 0.5 accuracy points on the sweep set) quantized
  the same way.

Figures, per variant:

* accuracy: top-1 on labelled test images, as ``onnxslim_lr.accuracy`` computes it (argmax of
  the logits; checked equal to ``onnxslim_lr.accuracy`` on the original). The sweep uses the
  first 2000 Fashion-MNIST test images (= ``models/fmnist_test2k.npz``); the key variants
  (default, README, best low-rank, int8, low-rank + int8) are re-evaluated on the full
  10k test set when ``.cache/fmnist_test10k.npz`` exists (``python tools/train_zoo.py
  --full-test .cache/fmnist_test10k.npz``; ``--channels 3`` for the ``_rgb_`` one, used by
  zfnet) -- this section creates them if ``tools/train_zoo.py`` can;
* fidelity against the original on the same images: top-1 agreement and relative output error
  ``||y' - y|| / ||y||`` (as ``onnxslim_lr.verify.compare_outputs``);
* speedup: original median latency / variant median latency, ALL the distinct models of one
  zoo model (plus the original twice: the A/A ratio is the noise floor) timed in ONE
  interleaved ``onnxslim_lr.timing.time_models`` run per batch size (1 and 64; real test images
  as inputs), onnxruntime CPU provider, full graph optimisations, 1 intra-op thread (the
  benchmark machine is a shared 2-core VM: one thread per session keeps the runs comparable);
* parameters: elements of all initializers plus ``Constant`` node values (int8 weights count
  one each; ``bytes`` is the serialized model size); rewritten layers from the report.

Variants the guard returned unchanged are listed once ("= original") and not re-timed.

Speed-only rows for the architecture-scale models at 224x224 are in the ``arch`` section
(``tools/bench_arch.py``); they are not repeated here.

To save minutes, the data-metric statistics of each layer (``calibration.gather``)
and the PSD square roots of the data-metric SVD (``decompose.svd.psd_sqrt``) are computed once
per zoo model and reused by later variants (a memo installed only while this benchmark runs;
the numbers are those of an uncached run).

Standalone: ``python tools/bench_zoo.py [--quick] [--models vgg_fmnist,...]`` writes
``bench_results/zoo.json`` (quick: ``.cache/bench_quick/zoo.json``), the plots
``bench_results/zoo_<model>.png``, and prints the Markdown section.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from benchkit import md_table as _table  # noqa: E402

NAME = "zoo"
TITLE = "Trained model zoo (Fashion-MNIST): accuracy vs measured CPU speed, against int8 and onnxslim"
ROOT = Path(__file__).resolve().parent.parent
THREADS = 1
BATCHES = (1, 64)
SWEEP_N = 2000
ACC_BUDGET_PTS = 0.5
#: low-rank + int8 is built from the best low-rank model within each of these losses (points)
LOWRANK_INT8_BUDGETS = (0.5, 1.0)
#: always also quantized (the candidate for the README recommendation)
RECOMMENDED = "svd r0.5 data"
#: models losing at most this many points on the sweep set are re-evaluated on the full test set
FULL_EVAL_PTS = 3.0

#: zoo model -> files (paths relative to the repository root)
ZOO: dict[str, dict[str, str]] = {
    "vgg_fmnist": {"model": "models/vgg_fmnist.onnx", "calib": "models/fmnist_calib.npz",
                   "test": "models/fmnist_test2k.npz", "full": ".cache/fmnist_test10k.npz", "channels": "1"},
    "resnet_fmnist": {"model": "models/resnet_fmnist.onnx", "calib": "models/fmnist_calib.npz",
                      "test": "models/fmnist_test2k.npz", "full": ".cache/fmnist_test10k.npz", "channels": "1"},
    "zfnet_fmnist": {"model": "models/zfnet_fmnist.onnx", "calib": "models/fmnist_rgb_calib.npz",
                     "test": "models/fmnist_rgb_test2k.npz", "full": ".cache/fmnist_rgb_test10k.npz", "channels": "3"},
}
QUICK_MODEL = "zfnet_fmnist"

#: budgets of the methods other than svd/tucker2 (data metric); unknown new methods get the first
OTHER_BUDGETS: dict[str, list[dict[str, Any]]] = {
    "spatial": [{"rank_ratio": 0.5}, {"rank_ratio": 0.35}],
    "cp": [{"rank_ratio": 0.35}],
    "fc-svd": [{"rank_ratio": 0.5}],
    "mono": [{}],
    "bicluster": [{}],
    "perforate": [{"method_options": {"perforation_rate": 0.5}}],
    "perforate-svd": [{"rank_ratio": 0.5}],
    "structured": [{}],
}
DEFAULT_OTHER = [{"rank_ratio": 0.5}]
LOWRANK_BUDGETS = [{"rank_ratio": 0.5}, {"rank_ratio": 0.35}, {"rank_ratio": 0.25}, {"energy": 0.95}, {"energy": 0.9}]


def _sys_path() -> None:
    for p in (str(ROOT), str(ROOT / "tools")):
        if p not in sys.path:
            sys.path.insert(0, p)


def _log(msg: str) -> None:
    print(f"[zoo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- variants --------------------------------------------------------------------------------


def budget_label(b: Mapping[str, Any]) -> str:
    parts = []
    if b.get("rank_ratio") is not None:
        parts.append(f"r{b['rank_ratio']:g}")
    if b.get("energy") is not None:
        parts.append(f"E{b['energy']:g}")
    if b.get("target_speedup") is not None:
        parts.append(f"S{b['target_speedup']:g}")
    for k, v in (b.get("method_options") or {}).items():
        parts.append(f"{k}={v}")
    return " ".join(parts) or "default"


def lowrank_variant(method: str | Sequence[str] | None, budget: Mapping[str, Any], metric: str | None,
                    label: str | None = None, family: str | None = None) -> dict[str, Any]:
    """A compress() run: method None = no -m option (auto); budget = rank rule + method options."""
    m = method if method is None or isinstance(method, str) else list(method)
    name = label or f"{m if isinstance(m, str) else '+'.join(m or ['auto'])} {budget_label(budget)} " \
                    f"{'data' if metric == 'data' else 'frob'}"
    return {"label": name, "kind": "lowrank", "family": family or (m if isinstance(m, str) else "auto"),
            "method": m, "metric": metric, "budget": dict(budget)}


def plan(model_name: str, quick: bool, available: Sequence[str]) -> list[dict[str, Any]]:
    """The low-rank variants run on one zoo model."""
    # metric None = the tool's own default (the data metric when --calib is given)
    default = lowrank_variant(None, {}, None, label="default (onnx-lowrank --calib)", family="default")
    readme = lowrank_variant(None, {}, "data", label="README (--calib --metric data)", family="default")
    if quick:
        return [default, lowrank_variant("svd", {"rank_ratio": 0.5}, "data")]
    out = [default, readme]
    heavy = model_name == "vgg_fmnist"  # the goal model gets the full sweep
    for method in ("svd", "tucker2"):
        if method not in available:
            continue
        budgets = LOWRANK_BUDGETS if heavy else [LOWRANK_BUDGETS[i] for i in (0, 2, 4)]
        out += [lowrank_variant(method, b, "data") for b in budgets]
        fro = LOWRANK_BUDGETS if heavy else [LOWRANK_BUDGETS[i] for i in (1, 3)]
        out += [lowrank_variant(method, b, "frobenius") for b in fro]
    for method in sorted(available):
        if method in ("svd", "tucker2"):
            continue
        budgets = OTHER_BUDGETS.get(method, DEFAULT_OTHER)
        if not heavy:
            budgets = budgets[:1]
        out += [lowrank_variant(method, b, "data") for b in budgets]
    if heavy and "svd" in available:
        # closer to the 0.5-point frontier
        # (0.625: ranks 40/80/160, multiples of 8 and 16, against 0.6: 38/77/154)
        out += [lowrank_variant("svd", {"rank_ratio": 0.6}, "data"),
                lowrank_variant("svd", {"rank_ratio": 0.625}, "data"),
                lowrank_variant("svd", {"target_speedup": 2.0}, "data")]
    if heavy and "svd" in available and "tucker2" in available:
        out.append(lowrank_variant(["svd", "tucker2"], {"rank_ratio": 0.35}, "data"))
    return out


# ---- model helpers (also used by tests/test_bench_zoo_smoke.py) ------------------------------


def param_count(model: onnx.ModelProto) -> int:
    """Elements of all initializers plus Constant node values (main graph)."""
    n = sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for a in node.attribute:
            if a.name == "value":
                n += int(np.prod(a.t.dims)) if len(a.t.dims) else 1
            elif a.name in ("value_floats", "value_ints"):
                n += len(a.floats) + len(a.ints)
            elif a.name in ("value_float", "value_int"):
                n += 1
    return n


def model_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha1(model.SerializeToString()).hexdigest()[:16]


def input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def logits(model: onnx.ModelProto, x: np.ndarray, *, batch: int = 256, threads: int = THREADS) -> np.ndarray:
    from onnxslim_lr.timing import make_session

    sess = make_session(model, threads=threads)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    out = np.concatenate(outs)
    return out.reshape(out.shape[0], -1)


def scores(out: np.ndarray, y: np.ndarray, ref: np.ndarray | None) -> dict[str, float]:
    """Accuracy (as onnxslim_lr.accuracy), and fidelity against the reference logits."""
    d: dict[str, float] = {"acc": float(np.mean(np.argmax(out, axis=1) == y))}
    if ref is not None:
        a, b = ref.astype(np.float64), out.astype(np.float64)
        d["top1_agree"] = float(np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
        d["rel_err"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
    return d


class _Reader:
    """CalibrationDataReader over an array (batches of 32)."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32) -> None:
        self._items = [{name: x[i:i + batch]} for i in range(0, len(x), batch)]
        self._it = iter(self._items)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._items)


def quantize_int8(model: onnx.ModelProto, calib_x: np.ndarray, *, per_channel: bool = True) -> tuple[onnx.ModelProto, str]:
    """onnxruntime static int8 quantization (QDQ, S8S8, MinMax); returns (model, note)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    note = "quant_pre_process + quantize_static(QDQ, per-channel, S8S8, MinMax)"
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = Path(tmp, "in.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "q.onnx")
        onnx.save_model(model, str(src))
        try:
            quant_pre_process(str(src), str(pre))
            qin = pre
        except Exception as exc:  # pre-processing is optional
            note = f"quantize_static(QDQ, per-channel, S8S8, MinMax); quant_pre_process failed: {type(exc).__name__}"
            qin = src
        quantize_static(str(qin), str(dst), Reader(input_name(model), calib_x), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return onnx.load_model(str(dst)), note


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    m = onnx.ModelProto()
    m.CopyFrom(model)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        return onnxslim.slim(m)


@contextlib.contextmanager
def memo_statistics() -> Iterator[None]:
    """Reuse per-layer data-metric statistics and PSD square roots across compress() calls.

    Keyed by the (folded) model bytes, the calibration batches and each site's node and conv
    geometry; a cache hit restores exactly what an uncached ``gather`` would accumulate.
    """
    from onnxslim_lr import calibration, manager
    from onnxslim_lr.decompose import svd as svd_mod

    orig_gather = manager.gather
    orig_sqrt = svd_mod.psd_sqrt
    stats_cache: dict[tuple[str, str, tuple[str, str]], tuple[np.ndarray, int]] = {}
    sqrt_cache: dict[tuple[str, Any], np.ndarray] = {}

    def gather(model: onnx.ModelProto, batches: Any, requests: Sequence[Any], *, threads: int | None = None,
               seed: int = 0, into: Any = None) -> Any:
        stats = into if into is not None else calibration.Statistics()
        own = [r for r in requests if r.source is not None or batches is None]
        shared = [r for r in requests if r not in own]
        if own:
            orig_gather(model, batches, own, threads=threads, seed=seed, into=stats)
        if not shared:
            return stats
        batches = list(batches)
        mk = hashlib.sha1(model.SerializeToString()).hexdigest()
        h = hashlib.sha1()
        for b in batches:
            for k in sorted(b):
                h.update(k.encode())
                h.update(np.ascontiguousarray(b[k]).tobytes())
        bk = h.hexdigest()
        missing = [r for r in shared if (mk, bk, r.key) not in stats_cache]
        if missing:
            fresh = orig_gather(model, batches, missing, threads=threads, seed=seed)
            for r in missing:
                if r.key in fresh._sums:
                    stats_cache[(mk, bk, r.key)] = (fresh._sums[r.key], fresh._counts[r.key])
        for r in shared:
            hit = stats_cache.get((mk, bk, r.key))
            if hit is not None:
                stats.add(r.key, hit[0].copy(), hit[1])
        return stats

    def psd_sqrt(sigma: Any, n: int | None = None) -> np.ndarray:
        arr = np.ascontiguousarray(np.asarray(sigma, dtype=np.float64))
        key = (hashlib.sha1(arr.tobytes()).hexdigest() + str(arr.shape), n)
        if key not in sqrt_cache:
            sqrt_cache[key] = orig_sqrt(sigma, n)
        return sqrt_cache[key].copy()

    manager.gather = gather  # type: ignore[assignment]
    svd_mod.psd_sqrt = psd_sqrt
    try:
        yield
    finally:
        manager.gather = orig_gather  # type: ignore[assignment]
        svd_mod.psd_sqrt = orig_sqrt


def run_variant(model: onnx.ModelProto, variant: Mapping[str, Any], calib: Any, *, threads: int = THREADS
                ) -> tuple[onnx.ModelProto | None, dict[str, Any]]:
    """Compress one variant (guard ON); returns (model or None when unchanged, record)."""
    import onnxslim_lr as lr

    b = dict(variant.get("budget") or {})
    kwargs: dict[str, Any] = {"rank_ratio": b.get("rank_ratio"), "energy": b.get("energy"),
                              "target_speedup": b.get("target_speedup"),
                              "method_options": b.get("method_options"), "metric": variant.get("metric"),
                              "calib": calib, "threads": threads, "allow_slower": bool(variant.get("allow_slower", False))}
    if variant.get("method") is not None:
        kwargs["method"] = variant["method"]
    rec: dict[str, Any] = {k: variant[k] for k in ("label", "kind", "family", "method", "metric", "budget")
                           if k in variant}
    t0 = time.perf_counter()
    try:
        res = lr.compress(model, **kwargs)
    except Exception as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                   compress_s=round(time.perf_counter() - t0, 1))
        return None, rec
    rec["compress_s"] = round(time.perf_counter() - t0, 1)
    rew = res.rewritten
    rec["layers_watched"] = len(res.layers)
    rec["layers_rewritten"] = len(rew)
    methods: dict[str, int] = {}
    for r in rew:
        methods[r.method] = methods.get(r.method, 0) + 1
    rec["methods_used"] = methods
    rec["rewritten"] = [{"node": r.node, "method": r.method, "params": r.params, "theory": r.theoretical,
                         "measured": r.measured, "out_error": r.out_error} for r in rew]
    macs_b = sum(r.macs_before for r in res.layers if r.macs_before)
    macs_a = sum((r.macs_after if r.status == "rewritten" else r.macs_before) for r in res.layers if r.macs_before)
    rec["macs_ratio"] = (macs_b / macs_a) if macs_a else None
    rec["guard_speedup"] = res.speedup
    rec["guard_batch"] = next(iter(res.feeds_shapes.values()), (None,))[0] if res.feeds_shapes else None
    rec["notes"] = list(res.notes)
    if not res.changed:
        rec["status"] = "unchanged"
        kept = [r for r in res.layers if r.status in ("kept", "declined") and r.reason]
        rec["kept_reasons"] = [{"node": r.node, "reason": r.reason} for r in kept]
        guard = next((n for n in res.notes if "end to end" in n), None)
        if guard:
            rec["why"] = guard
        else:  # the distinct per-layer reasons, shortest form
            kinds = []
            for r in kept:
                k = ("saves no MACs" if "saves no MACs" in r.reason else
                     "slower when measured" if "slower" in r.reason or "not fast enough" in r.reason else
                     r.reason.split(":")[0][:60])
                if k not in kinds:
                    kinds.append(k)
            rec["why"] = "no layer rewritten (" + "; ".join(kinds) + ")" if kinds else (res.notes[-1] if res.notes else "")
        return None, rec
    rec["status"] = "changed"
    return res.model, rec


# ---- one zoo model -----------------------------------------------------------------------------


def bench_model(name: str, model: onnx.ModelProto, calib: Any, calib_x: np.ndarray, x: np.ndarray, y: np.ndarray,
                variants: Sequence[Mapping[str, Any]], *, full: tuple[np.ndarray, np.ndarray] | None = None,
                full_label: str = "", int8: bool = True, onnxslim: bool = True, lowrank_int8: bool = True,
                batches: Sequence[int] = BATCHES, rounds: int = 25, max_total_s: float = 45.0,
                threads: int = THREADS, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Every variant of one model: compress, evaluate, then ONE interleaved timing run per batch."""
    t_start = time.perf_counter()
    ref = logits(model, x, threads=threads)
    base = scores(ref, y, None)
    out: dict[str, Any] = {"name": name, "sweep_samples": int(len(y)), "orig_acc": base["acc"],
                           "orig_params": param_count(model), "orig_bytes": len(model.SerializeToString()), "rows": []}
    try:
        import onnxslim_lr as lr

        out["orig_acc_check"] = lr.accuracy(model, x, y, threads=threads)
    except Exception as exc:  # an accuracy() bug must not lose the benchmark
        out["orig_acc_check"] = f"{type(exc).__name__}: {exc}"
    models: dict[str, onnx.ModelProto] = {}  # hash -> model (distinct changed models)
    rows: list[dict[str, Any]] = out["rows"]

    def add(m: onnx.ModelProto, rec: dict[str, Any]) -> None:
        h = model_hash(m)
        rec["hash"] = h
        dup = next((r for r in rows if r.get("hash") == h), None)
        if dup is not None:
            rec["same_as"] = dup["label"]
            for k in ("acc", "acc_delta_pts", "top1_agree", "rel_err", "params", "bytes"):
                if k in dup:
                    rec[k] = dup[k]
        else:
            sc = scores(logits(m, x, threads=threads), y, ref)
            rec.update(sc)
            rec["acc_delta_pts"] = (sc["acc"] - base["acc"]) * 100
            rec["params"] = param_count(m)
            rec["bytes"] = len(m.SerializeToString())
            models[h] = m
        rows.append(rec)

    with memo_statistics():
        for v in variants:
            m, rec = run_variant(model, v, calib, threads=threads)
            if m is not None:
                add(m, rec)
            else:
                rows.append(rec)
            d = rec.get("acc_delta_pts")
            log(f"{name}: {rec['label']}: {rec['status']}"
                + (f", {rec.get('layers_rewritten')} layers, guard {rec.get('guard_speedup') or 0:.2f}x, "
                   f"acc {d:+.2f} pts" if d is not None else f" ({rec.get('why') or rec.get('error', '')})"[:160])
                + f" [{rec.get('compress_s')} s]")

    if onnxslim:
        t0 = time.perf_counter()
        try:
            rec = {"label": "onnxslim.slim", "kind": "onnxslim", "family": "onnxslim", "status": "changed"}
            m = slim(model)
            rec["compress_s"] = round(time.perf_counter() - t0, 1)
            add(m, rec)
        except Exception as exc:
            rows.append({"label": "onnxslim.slim", "kind": "onnxslim", "family": "onnxslim", "status": "error",
                         "error": f"{type(exc).__name__}: {exc}"})
        log(f"{name}: onnxslim done")
    if int8:
        t0 = time.perf_counter()
        try:
            q, note = quantize_int8(model, calib_x)
            add(q, {"label": "int8 (ORT static)", "kind": "int8", "family": "int8", "status": "changed",
                    "note": note, "compress_s": round(time.perf_counter() - t0, 1)})
        except Exception as exc:
            rows.append({"label": "int8 (ORT static)", "kind": "int8", "family": "int8", "status": "error",
                         "error": f"{type(exc).__name__}: {exc}"})
        log(f"{name}: int8 done")
    # ---- the full test set: every model within FULL_EVAL_PTS on the sweep, and the key ones ------
    done: dict[str, dict[str, float]] = {}
    fref = None
    if full is not None:
        fx, fy = full
        fref = logits(model, fx, threads=threads)
        out["full_samples"] = int(len(fy))
        out["full_label"] = full_label
        out["orig_acc_full"] = scores(fref, fy, None)["acc"]

    def full_eval(r: dict[str, Any]) -> None:
        if full is None or fref is None or r.get("hash") not in models:
            return
        if r["hash"] not in done:
            done[r["hash"]] = scores(logits(models[r["hash"]], full[0], threads=threads), full[1], fref)
        sc = done[r["hash"]]
        r["acc_full"] = sc["acc"]
        r["acc_delta_pts_full"] = (sc["acc"] - out["orig_acc_full"]) * 100
        r["top1_agree_full"] = sc["top1_agree"]
        r["rel_err_full"] = sc["rel_err"]

    def full_eval_wanted() -> None:
        t0 = time.perf_counter()
        n0 = len(done)
        for r in rows:
            if r.get("hash") is not None and r.get("kind") != "onnxslim" and (
                    r.get("kind") in ("int8", "lowrank+int8") or r.get("family") == "default"
                    or (r.get("acc_delta_pts") is not None and r["acc_delta_pts"] >= -FULL_EVAL_PTS)):
                full_eval(r)
        if full is not None:
            log(f"{name}: {len(done) - n0} models on the {len(full[1])} full-test images [{time.perf_counter() - t0:.0f} s]")

    full_eval_wanted()

    # ---- low-rank + int8: the fastest (as measured by compress) low-rank model within each budget,
    # judged on the full test set where evaluated
    best = best_lowrank(rows, key="guard_speedup")
    bases = [(b, best_lowrank(rows, key="guard_speedup", budget_pts=b)) for b in LOWRANK_INT8_BUDGETS]
    rec_row = next((r for r in rows if r.get("label") == RECOMMENDED and r.get("hash")), None)
    if rec_row is not None:  # the README candidate, quantized whatever it loses
        bases.append((None, dict(rec_row)))
    done_bases: set[str] = set()
    for budget_pts, base_row in bases if lowrank_int8 else []:
        if base_row is None or base_row["hash"] in done_bases:
            continue
        done_bases.add(base_row["hash"])
        t0 = time.perf_counter()
        label = f"{base_row['label']} + int8"
        try:
            q, note = quantize_int8(models[base_row["hash"]], calib_x)
            add(q, {"label": label, "kind": "lowrank+int8", "family": "lowrank+int8", "status": "changed",
                    "base": base_row["label"], "base_budget_pts": budget_pts, "note": note,
                    "compress_s": round(time.perf_counter() - t0, 1)})
        except Exception as exc:
            rows.append({"label": label, "kind": "lowrank+int8", "family": "lowrank+int8", "status": "error",
                         "base": base_row["label"], "error": f"{type(exc).__name__}: {exc}"})
        log(f"{name}: {label} done")
    out["best_by_guard"] = best["label"] if best else None

    full_eval_wanted()

    # ---- timing: all distinct models + the original twice, one interleaved run per batch ---
    from onnxslim_lr.timing import time_models

    order = list(models)
    timed = [model, model] + [models[h] for h in order]
    out["timing"] = {}
    for b in batches:
        xb = x[:b] if len(x) >= b else np.concatenate([x] * (b // len(x) + 1))[:b]
        t0 = time.perf_counter()
        t = time_models(timed, {input_name(model): np.ascontiguousarray(xb)}, threads=threads,
                        rounds=rounds,
                        max_total_s=max_total_s)
        out["timing"][f"b{b}"] = {"rounds": t.rounds, "inner": t.inner, "orig_ms": t.medians[0] * 1e3,
                                  "aa": t.ratio(0, 1), "seconds": round(time.perf_counter() - t0, 1)}
        for h, med in zip(order, t.medians[2:]):
            for r in rows:
                if r.get("hash") == h:
                    r[f"ms_b{b}"] = med * 1e3
                    r[f"speedup_b{b}"] = t.medians[0] / med
        log(f"{name}: timed {len(timed)} models at batch {b}: {t.rounds} rounds, A/A {t.ratio(0, 1):.3f} "
            f"[{time.perf_counter() - t0:.0f} s]")
    for r in rows:
        if r.get("status") == "unchanged":
            r["params"] = out["orig_params"]

    # ---- the goals' picks (best within the budget, per batch) must rest on the full test set ----
    for _ in range(6):
        picks = [best_lowrank(rows, key=f"speedup_b{b}") for b in batches]
        todo = [p for p in picks if p is not None and p.get("acc_delta_pts_full") is None and full is not None]
        if not todo:
            break
        for p in todo:
            for r in rows:
                if r.get("hash") == p["hash"]:
                    full_eval(r)
    out["best_by_b1"] = (best_lowrank(rows, key="speedup_b1") or {}).get("label")
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out


def best_lowrank(rows: Sequence[Mapping[str, Any]], *, key: str, budget_pts: float = ACC_BUDGET_PTS,
                 kind: str = "lowrank") -> dict[str, Any] | None:
    """The ``kind`` row with the largest ``key`` among those losing at most budget_pts.

    The loss is the full-test-set one where measured, else the sweep one.
    """
    ok = [r for r in rows if r.get("kind") == kind and r.get("hash") and r.get(key) is not None
          and _delta(r)[0] is not None and _delta(r)[0] >= -budget_pts - 1e-9]
    return dict(max(ok, key=lambda r: r[key])) if ok else None


# ---- goals --------------------------------------------------------------------------------------


def _delta(r: Mapping[str, Any]) -> tuple[float | None, str]:
    """Best available accuracy change (full test set if measured, else the sweep set)."""
    if r.get("acc_delta_pts_full") is not None:
        return r["acc_delta_pts_full"], "10k"
    return r.get("acc_delta_pts"), "2k" if r.get("acc_delta_pts") is not None else "-"


def _brief(r: Mapping[str, Any] | None, key: str) -> dict[str, Any] | None:
    if r is None:
        return None
    d, on = _delta(r)
    return {"label": r["label"], "speedup": r.get(key), "acc_delta_pts": d, "on": on, "macs_ratio": r.get("macs_ratio"),
            "base": r.get("base")}


def goals(model_res: Mapping[str, Any]) -> dict[str, Any]:
    """Issue 6 goals, per batch size: best low-rank within the budget, int8, low-rank + int8."""
    rows = model_res["rows"]
    g: dict[str, Any] = {"budget_pts": ACC_BUDGET_PTS}
    for b in BATCHES:
        key = f"speedup_b{b}"
        aa = model_res.get("timing", {}).get(f"b{b}", {}).get("aa")
        g[f"noise_b{b}"] = max(abs(1.0 - aa), 0.03) if aa else 0.03
        g[f"best_lowrank_b{b}"] = _brief(best_lowrank(rows, key=key), key)
        q = next((r for r in rows if r.get("kind") == "int8" and r.get(key)), None)
        g[f"int8_b{b}"] = _brief(q, key)
        g[f"lowrank_int8_b{b}"] = [dict(_brief(r, key) or {}, base_speedup=next(
            (x.get(key) for x in rows if x.get("label") == r.get("base")), None), base_budget_pts=r.get("base_budget_pts"))
            for r in rows if r.get("kind") == "lowrank+int8" and r.get(key)]
        g[f"best_lowrank_int8_b{b}"] = _brief(best_lowrank(rows, key=key, kind="lowrank+int8"), key)
        if q is not None and _delta(q)[0] is not None:
            g[f"lowrank_at_int8_loss_b{b}"] = _brief(best_lowrank(rows, key=key, budget_pts=max(-_delta(q)[0], 0.0)), key)
        fast = [r for r in rows if r.get("kind") == "lowrank" and (r.get(key) or 0) >= 2.0 and _delta(r)[0] is not None]
        g[f"most_accurate_2x_b{b}"] = _brief(max(fast, key=lambda r: _delta(r)[0]) if fast else None, key)
    return g


# ---- environment --------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    _sys_path()
    env: dict[str, Any] = {}
    try:
        import bench

        env["machine"] = bench.machine()
        env["versions"] = bench.versions()
    except Exception:
        env["machine"] = {"arch": platform.machine(), "cores": os.cpu_count()}
        env["versions"] = {"python": platform.python_version()}
    for mod in ("onnxslim", "matplotlib", "onnx", "onnxruntime", "numpy"):
        try:
            env["versions"][mod] = importlib.import_module(mod).__version__
        except Exception:
            env["versions"][mod] = "not installed"
    try:
        import onnxruntime as ort

        env["ort_providers"] = ort.get_available_providers()
    except Exception:
        env["ort_providers"] = []
    env["cuda"] = "CUDAExecutionProvider" in env["ort_providers"]
    env["cuda_note"] = ("CUDA provider available" if env["cuda"] else
                        "no GPU on this machine / no CUDAExecutionProvider in this onnxruntime build: CPU only")
    try:
        env["cpu_flags"] = sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                                   if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")})
    except OSError:
        env["cpu_flags"] = []
    env["threads"] = THREADS
    env["loadavg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return env


def _ensure_full_test(spec: Mapping[str, str]) -> Path | None:
    path = ROOT / spec["full"]
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "train_zoo.py"), "--full-test", str(path),
                        "--channels", spec["channels"]], check=True, capture_output=True, timeout=300)
    except Exception as exc:
        _log(f"cannot build {spec['full']}: {type(exc).__name__}")
    return path if path.exists() else None


# ---- the section --------------------------------------------------------------------------------


def run(quick: bool = False, models: Sequence[str] | None = None, plots_dir: Path | None = None) -> dict[str, Any]:
    _sys_path()
    import onnxslim_lr as lr
    from onnxslim_lr import passes

    t0 = time.perf_counter()
    available = list(passes.available())
    if models:
        names = list(models)
    elif quick:  # one model: the smallest one that exists
        names = [next((m for m in [QUICK_MODEL] + list(ZOO) if (ROOT / ZOO[m]["model"]).exists()), QUICK_MODEL)]
    else:
        names = list(ZOO)
    plots_dir = plots_dir or (ROOT / ".cache" / "bench_quick" if quick else ROOT / "bench_results")
    results: dict[str, Any] = {"quick": quick, "threads": THREADS, "batches": list(BATCHES), "sweep_n": SWEEP_N,
                               "acc_budget_pts": ACC_BUDGET_PTS, "methods": available, "environment": environment(),
                               "models": {}, "missing": []}
    for name in names:
        spec = ZOO[name]
        path = ROOT / spec["model"]
        if not path.exists():
            results["missing"].append(spec["model"])
            _log(f"{spec['model']} missing: skipped (train it with tools/train_zoo.py)")
            continue
        model = onnx.load_model(str(path))
        calib_x = np.load(ROOT / spec["calib"])["x"]
        full_path = None if quick else _ensure_full_test(spec)
        if full_path is not None:
            d = np.load(full_path)
            fx, fy = d["x"], d["y"]
            x, y = fx[:SWEEP_N], fy[:SWEEP_N]
            full: tuple[np.ndarray, np.ndarray] | None = (fx, fy)
            full_label = f"{spec['full']} (full Fashion-MNIST test set, {len(fy)} images)"
        else:
            d = np.load(ROOT / spec["test"])
            x, y = d["x"][:SWEEP_N], d["y"][:SWEEP_N]
            full, full_label = None, ""
        variants = plan(name, quick, available)
        started, load0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), (list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
        _log(f"{name}: {len(variants)} low-rank variants + onnxslim + int8 + low-rank+int8")
        res = bench_model(name, model, str(ROOT / spec["calib"]), calib_x, x, y, variants, full=full,
                          full_label=full_label, int8=True, onnxslim=True, lowrank_int8=True,
                          max_total_s=12.0 if quick else 45.0, rounds=9 if quick else 25)
        res["files"] = dict(spec)
        res["started"], res["loadavg_start"] = started, load0
        res["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        res["sweep_label"] = f"first {len(y)} Fashion-MNIST test images" + (
            "" if full is not None else f" ({spec['test']}; full 10k set not available)")
        res["goals"] = goals(res)
        try:
            png = plots_dir / f"zoo_{name}.png"
            plot_model(res, png)
            res["plot"] = _rel(png)
        except Exception as exc:
            res["plot_error"] = f"{type(exc).__name__}: {exc}"
        results["models"][name] = res
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


# ---- plot ----------------------------------------------------------------------------------------

_COLORS = {"default": "#d62728", "svd": "#1f77b4", "tucker2": "#2ca02c", "int8": "#9467bd", "onnxslim": "#7f7f7f",
           "lowrank+int8": "#e377c2", "spatial": "#ff7f0e", "structured": "#bcbd22", "perforate": "#8c564b",
           "perforate-svd": "#c49c94", "cp": "#17becf", "bicluster": "#aec7e8", "mono": "#98df8a", "fc-svd": "#ffbb78",
           "auto": "#393b79"}
_EXTRA = ("#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")


def _short(label: str) -> str:
    return (label.replace("default (onnx-lowrank --calib)", "default").replace("README (--calib --metric data)", "README")
            .replace(" data", " D").replace(" frob", " F").replace("int8 (ORT static)", "int8")
            .replace("perforation_rate=", "p=").replace("onnxslim.slim", "onnxslim"))


def plot_model(res: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 7), dpi=110)
    acc0 = res["orig_acc"] * 100
    pts = [r for r in res["rows"] if r.get("speedup_b1") is not None and r.get("acc") is not None and not r.get("same_as")]
    dups: dict[str, list[str]] = {}
    for r in res["rows"]:
        if r.get("same_as"):
            dups.setdefault(r["same_as"], []).append(_short(r["label"]))
    accs = [r["acc"] * 100 for r in pts]
    ylo = max(min(accs + [acc0 - 2.0]), acc0 - 6.0) - 0.3
    yhi = max(accs + [acc0]) + 0.5
    xs = [r["speedup_b1"] for r in pts] + [r["speedup_b64"] for r in pts if r.get("speedup_b64")] + [1.0, 2.0]
    ax.set_xlim(min(xs) * 0.9 - 0.05, max(xs) * 1.08)
    ax.set_ylim(ylo, yhi)
    ax.axhline(acc0 - ACC_BUDGET_PTS, color="0.6", ls="--", lw=0.8)
    ax.text(ax.get_xlim()[1], acc0 - ACC_BUDGET_PTS, f"-{ACC_BUDGET_PTS} pt ", va="bottom", ha="right", fontsize=7,
            color="0.4")
    ax.axvline(1.0, color="0.8", lw=0.8)
    ax.axvline(2.0, color="0.6", ls=":", lw=0.8)
    from matplotlib.lines import Line2D

    handles = ax.plot([1.0], [acc0], marker="*", ms=14, color="k", zorder=5, ls="none", label="original")
    seen: set[str] = set()
    extra: dict[str, str] = {}
    labels: list[tuple[float, float, str, Any]] = []
    below: list[str] = []
    for r in pts:
        fam = r.get("family", "")
        fam = "+".join(fam) if isinstance(fam, list) else fam
        color = _COLORS.get(fam) or extra.setdefault(fam, _EXTRA[len(extra) % len(_EXTRA)])
        if fam not in seen:
            handles.append(Line2D([], [], ls="none", marker="o", color=color, markeredgecolor="k",
                                  markeredgewidth=0.4, label=fam))
        seen.add(fam)
        acc = r["acc"] * 100
        clipped = acc < ylo
        y = ylo + 0.04 if clipped else acc
        marker = "o" if r.get("metric") != "frobenius" else "s"
        if r.get("kind") in ("int8", "lowrank+int8", "onnxslim"):
            marker = "D"
        if clipped:
            marker = "v"
        ax.scatter([r["speedup_b1"]], [y], color=color, marker=marker, s=36, zorder=4,
                   edgecolors="k", linewidths=0.4)
        if r.get("speedup_b64") is not None:
            ax.scatter([r["speedup_b64"]], [y], facecolors="none", edgecolors=color, marker=marker, s=36, zorder=3)
            ax.plot([r["speedup_b1"], r["speedup_b64"]], [y, y], color=color, lw=0.5, alpha=0.5, zorder=2)
        text = " = ".join([_short(r["label"])] + dups.get(r["label"], []))
        if clipped:
            below.append(f"{text} {acc:.1f}% at {r['speedup_b1']:.2f}x")
        else:
            labels.append((r["speedup_b1"], y, text, color))
    _place_labels(ax, fig, labels)
    unchanged = [_short(r["label"]) for r in res["rows"] if r.get("status") == "unchanged"]
    ax.set_xlabel("end-to-end speedup vs original (filled: batch 1, hollow: batch 64; onnxruntime CPU, 1 thread)")
    ax.set_ylabel(f"top-1 accuracy, % ({res.get('sweep_label', 'sweep set')})")
    ax.set_title(f"{res['name']}: accuracy vs measured speed, no fine-tuning (circle: data metric, square: Frobenius, "
                 "diamond: int8 / onnxslim; D = data metric, F = Frobenius)", fontsize=9)
    ax.grid(alpha=0.25)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    foot = []
    if below:
        foot.append("below the axis (triangles, batch-1 speedup): " + "; ".join(below))
    if unchanged:
        foot.append("returned unchanged by the never-slower guard: " + ", ".join(unchanged))
    lines = [ln for t in foot for ln in _wrap(t, 200)]
    if lines:
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=6.5, color="0.3", va="bottom")
    fig.tight_layout(rect=(0, 0.018 * len(lines), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _place_labels(ax: Any, fig: Any, labels: list[tuple[float, float, str, Any]]) -> None:
    """Greedy label placement: the first of a few offsets whose box overlaps no placed box."""
    fig.canvas.draw()
    placed: list[tuple[float, float, float, float]] = []
    char_w, h = 3.9, 8.0  # pixels at fontsize 6.5, dpi 110
    offsets = [(4, 3), (4, -10), (4, 12), (4, -19), (4, 21), (-4, 3), (-4, -10), (4, 30), (4, -28), (4, 39)]
    for x, y, text, color in sorted(labels, key=lambda t: (t[0], t[1])):
        px, py = ax.transData.transform((x, y))
        w = char_w * len(text)
        choice = offsets[0]
        for dx, dy in offsets:
            x0 = px + dx if dx > 0 else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                choice = (dx, dy)
                break
        dx, dy = choice
        x0 = px + dx if dx > 0 else px + dx - w
        placed.append((x0, py + dy, x0 + w, py + dy + h))
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset pixels", fontsize=6.5, color=color,
                    ha="left" if dx > 0 else "right", va="bottom",
                    arrowprops=None if abs(dy) < 5 else {"arrowstyle": "-", "color": color, "lw": 0.3, "alpha": 0.6})


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        if len(cur) + len(word) + 1 > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur]


# ---- rendering -----------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def _pts(x: Any) -> str:
    return _f(x, "{:+.2f}")


def _x(d: Mapping[str, Any] | None) -> str:
    return "-" if not d or d.get("speedup") is None else f"{d['speedup']:.2f}x"


def _cmp(a: float, b: float, noise: float) -> str:
    """a vs b as a verdict that respects the timing noise."""
    if a > b * (1 + noise):
        return "faster"
    if a < b / (1 + noise):
        return "slower"
    return "within noise"


def render_goals(results: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    vgg = results.get("models", {}).get("vgg_fmnist")
    if vgg is None:
        return ["Goals: the VGG-style model was not benchmarked in this run."]
    g = vgg.get("goals") or goals(vgg)
    budget = g.get("budget_pts", ACC_BUDGET_PTS)
    per_b = {b: {k: g.get(f"{k}_b{b}") for k in ("best_lowrank", "int8", "lowrank_int8", "best_lowrank_int8",
                                                  "lowrank_at_int8_loss", "most_accurate_2x", "noise")} for b in BATCHES}

    def desc(d: Mapping[str, Any] | None) -> str:
        if not d:
            return "none"
        return f"`{d['label']}` {_x(d)} ({_pts(d['acc_delta_pts'])} pts, {d['on']})"

    met = [b for b in BATCHES if (per_b[b]["best_lowrank"] or {}).get("speedup", 0) >= 2.0]
    out.append(f"1. **>= 2x end to end on the VGG-style model at <= {budget} pt accuracy loss, no fine-tuning: "
               f"{'met' if met else 'NOT met'}{' (batch ' + ', '.join(map(str, met)) + ')' if met else ''}.** "
               + "; ".join(f"batch {b}: best within the budget {desc(per_b[b]['best_lowrank'])}, MACs "
                           f"/{_f((per_b[b]['best_lowrank'] or {}).get('macs_ratio'))}" for b in BATCHES) + ".")
    for b in BATCHES:
        c = per_b[b]["most_accurate_2x"]
        if c and not (b in met):
            out.append(f"   - batch {b}: the most accurate low-rank variant reaching 2x is {desc(c)}, i.e. "
                       f"{-c['acc_delta_pts'] - budget:.2f} pts beyond the budget.")
    q = {b: per_b[b]["int8"] for b in BATCHES}
    if q[1]:
        verdicts = {b: _cmp((per_b[b]["best_lowrank"] or {}).get("speedup") or 0, q[b]["speedup"], per_b[b]["noise"])
                    for b in BATCHES if q[b]}
        ok = [b for b, v in verdicts.items() if v == "faster"]
        out.append(f"2. **Faster than int8 at equal accuracy loss: {'met' if len(ok) == len(verdicts) else ('partly met' if ok else 'NOT met')}.** "
                   "int8 (ORT static, QDQ per-channel): " + ", ".join(f"batch {b} {_x(q[b])} ({_pts(q[b]['acc_delta_pts'])} pts)" for b in BATCHES if q[b])
                   + f"; best low-rank within {budget} pt: " + ", ".join(f"batch {b} {_x(per_b[b]['best_lowrank'])} ({verdicts[b]} than int8)" for b in verdicts)
                   + "; low-rank losing no more than int8 does: " + ", ".join(f"batch {b} {desc(per_b[b]['lowrank_at_int8_loss'])}" for b in BATCHES) + ".")
    combos = per_b[1]["lowrank_int8"] or []
    if combos and q[1]:
        lines, good = [], []
        for c1 in combos:
            parts, fast_all = [], True
            for b in BATCHES:
                cb = next((c for c in per_b[b]["lowrank_int8"] or [] if c["label"] == c1["label"]), None)
                if not cb or not q[b]:
                    fast_all = False
                    continue
                n = per_b[b]["noise"]
                v_q, v_l = _cmp(cb["speedup"], q[b]["speedup"], n), _cmp(cb["speedup"], cb.get("base_speedup") or 0, n)
                fast_all = fast_all and v_q == v_l == "faster"
                parts.append(f"batch {b} {_x(cb)} vs int8 {_x(q[b])} ({v_q}) and vs its low-rank base "
                             f"{_f(cb.get('base_speedup'))}x ({v_l})")
            within = c1["acc_delta_pts"] is not None and c1["acc_delta_pts"] >= -budget - 1e-9
            if within and fast_all:
                good.append(c1["label"])
            lines.append(f"   - `{c1['label']}` ({_pts(c1['acc_delta_pts'])} pts, {c1['on']}; "
                         f"{'within' if within else 'outside'} the {budget} pt budget): " + "; ".join(parts) + ".")
        out.append(f"3. **Low-rank + int8 faster than either, within {budget} pt: {'met' if good else 'NOT met'}"
                   f"{' (' + ', '.join(f'`{g}`' for g in good) + ')' if good else ''}.** "
                   f"Timing noise (A/A, floor 3%): " + ", ".join(f"batch {b} {per_b[b]['noise'] * 100:.0f}%" for b in BATCHES) + ".")
        out += lines
    return out


def observations(results: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    models = results.get("models", {})
    noop = [n for n, m in models.items() if any(r.get("family") == "default" and r.get("metric") == "frobenius"
                                                 and r.get("status") == "unchanged" for r in m["rows"])]
    if noop:
        out.append(f"- The default run (`onnx-lowrank MODEL --calib ...`: auto methods, energy 0.98, Frobenius) "
                   f"returned {', '.join(noop)} unchanged: at 98% of the weight energy no trained layer here has a "
                   "rank low enough to save MACs.")
    same = []
    for n, m in models.items():
        for r in m["rows"]:
            src = next((x for x in m["rows"] if x.get("label") == r.get("same_as")), None)
            if src and {r.get("metric"), src.get("metric")} == {"data", "frobenius"} and r.get("family") == src.get("family"):
                same.append(f"{n}: `{r['label']}` = `{src['label']}`")
    if same:
        fams = sorted({s.split("`")[1].split()[0] for s in same})
        out.append(f"- `--metric data` made no difference for {', '.join(fams)}: byte-identical models to the "
                   f"Frobenius runs ({len(same)} pairs, e.g. {same[0]}); those passes do not use the calibration "
                   "statistics.")
    for n, m in models.items():
        d = {r["label"]: r for r in m["rows"]}
        a, b = d.get("svd r0.5 data"), d.get("svd r0.5 frob")
        if a and b and a.get("acc_delta_pts") is not None and b.get("acc_delta_pts") is not None:
            out.append(f"- {n}: at rank ratio 0.5, `svd` changes accuracy by {_pts(a['acc_delta_pts'])} pts in the data metric "
                       f"against {_pts(b['acc_delta_pts'])} in the Frobenius metric (sweep set).")
    for n, m in models.items():
        big = [r for r in m["rows"] if r.get("kind") == "lowrank" and r.get("acc_delta_pts_full") is not None
               and r.get("acc_delta_pts") is not None and abs(r["acc_delta_pts_full"] - r["acc_delta_pts"]) >= 0.4]
        if big:
            r = max(big, key=lambda r: abs(r["acc_delta_pts_full"] - r["acc_delta_pts"]))
            out.append(f"- {n}: the 2000-image sweep can mislead by tenths of a point: `{r['label']}` "
                       f"{_pts(r['acc_delta_pts'])} pts on it, {_pts(r['acc_delta_pts_full'])} on the full test set.")
    return out


def render(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    out = [f"## {TITLE}", ""]
    out.append(
        "The three Fashion-MNIST classifiers of `tools/train_zoo.py`, every variant produced with the never-slower "
        f"guard ON and **no fine-tuning**. Accuracy change in percentage points against the original on the first "
        f"{results.get('sweep_n', SWEEP_N)} test images (**acc Δ**), and on the full 10k test set for the key rows "
        "(**acc Δ 10k**); **agree** = top-1 agreement with the original, **rel err** = relative output (logit) error; "
        "**b1 / b64** = end-to-end speedup over the original, batch 1 / 64, ALL variants of one model (and the "
        "original twice: **A/A** = noise floor) timed in one interleaved `time_models` run, onnxruntime "
        f"{env.get('versions', {}).get('onnxruntime', '?')} CPU provider, full graph optimisations, "
        f"{results.get('threads', THREADS)} intra-op thread; **params** = initializer + Constant elements; "
        "**layers** = rewritten / watched. `D` = data metric (`--metric data --calib`), `F` = Frobenius. "
        "Rows 'unchanged' are runs the guard returned as the original (no layer was measured >= 1.1x faster, or "
        "the model was not faster end to end). `X + int8` = that low-rank model quantized like `int8`. "
        f"CUDA: {env.get('cuda_note', '-')} (providers: {', '.join(env.get('ort_providers', [])) or '-'}). "
        "Speed-only figures for the architecture-scale models at 224x224 are in the `arch` section."
        + (" **Quick (smoke) run.**" if results.get("quick") else ""))
    out.append("")
    if results.get("missing"):
        out.append(f"Missing (not benchmarked): {', '.join(results['missing'])}.")
        out.append("")
    out.append("### Goals (issue 6)")
    out.append("")
    out += render_goals(results)
    out.append("")
    obs = observations(results)
    if obs:
        out.append("Observations (derived from the rows below):")
        out.append("")
        out += obs
        out.append("")
    for name, res in results.get("models", {}).items():
        tm = res.get("timing", {})
        aa = " / ".join(f"{tm[k]['aa']:.2f}" for k in tm)
        ms = ", ".join(f"{k} {tm[k]['orig_ms']:.2f} ms" for k in tm)
        full = (f"; full test set: {res['orig_acc_full'] * 100:.2f}% on {res['full_samples']} images"
                if res.get("orig_acc_full") is not None else "; full 10k test set not available")
        out.append(f"### {name}")
        out.append("")
        out.append(f"Original: {res['orig_acc'] * 100:.2f}% on the {res.get('sweep_label', 'sweep set')}{full}; "
                   f"{res['orig_params'] / 1e3:.0f}k params; latency {ms} (A/A {aa}). "
                   f"Benchmark wall time {res.get('seconds', 0) / 60:.1f} min.")
        out.append("")
        header = ["variant", "layers", "acc Δ", "acc Δ 10k", "agree", "rel err", "b1", "b64", "params", "note"]
        table = []
        for r in res["rows"]:
            lay = f"{r.get('layers_rewritten', '-')}/{r.get('layers_watched', '-')}" if r.get("kind") == "lowrank" else "-"
            if r.get("status") == "unchanged":
                table.append([r["label"], lay, "0", "-", "100%", "0", "= original", "= original",
                              f"{r.get('params', res['orig_params']) / 1e3:.0f}k", (r.get("why") or "")[:90]])
                continue
            if r.get("status") == "error":
                table.append([r["label"], "-", "-", "-", "-", "-", "-", "-", "-", "error: " + r.get("error", "")[:90]])
                continue
            note = []
            if r.get("methods_used") and r.get("family") in ("default", "auto"):
                note.append(", ".join(f"{k} x{v}" for k, v in r["methods_used"].items()))
            if r.get("same_as"):
                note.append(f"same model as `{r['same_as']}`")
            if r.get("macs_ratio"):
                note.append(f"MACs /{r['macs_ratio']:.2f}")
            table.append([
                r["label"], lay, _pts(r.get("acc_delta_pts")), _pts(r.get("acc_delta_pts_full")),
                _f(r.get("top1_agree"), "{:.1%}"), _f(r.get("rel_err"), "{:.3f}"),
                _f(r.get("speedup_b1")) + ("x" if r.get("speedup_b1") else ""),
                _f(r.get("speedup_b64")) + ("x" if r.get("speedup_b64") else ""),
                _f(r.get("params") / 1e3 if r.get("params") else None, "{:.0f}k"), "; ".join(note)])
        out.append(_table(header, table))
        out.append("")
        if res.get("plot"):
            out.append(f"![{name}: accuracy vs speedup]({res['plot']})")
            out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke run: one model ({QUICK_MODEL} if present), two variants")
    ap.add_argument("--models", default="", help=f"comma-separated subset of {', '.join(ZOO)}")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models' results already in the JSON file (each model records when it ran)")
    args = ap.parse_args(argv)
    _sys_path()
    import bench

    models = [m.strip() for m in args.models.split(",") if m.strip()] or None
    out_dir = bench.QUICK_DIR if args.quick else bench.RESULTS
    command = "python tools/bench_zoo.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    meta = {"section": NAME, "command": command, "quick": args.quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": bench.loadavg(),
            "machine": bench.machine(), "versions": bench.versions(), "commit": bench.git_commit()}
    t0 = time.perf_counter()
    results = run(args.quick, models=models, plots_dir=out_dir)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_end"] = bench.loadavg()
    results["_meta"] = meta
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME}.json"
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        merged = dict(old.get("models", {}))
        merged.update(results["models"])
        results["models"] = {k: merged[k] for k in ZOO if k in merged}
        results["missing"] = [m for m in results["missing"] if Path(m).stem not in results["models"]]
        meta["command"] += f" (merged with the run of {old.get('_meta', {}).get('started', '?')})"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=bench._json_default) + "\n")
    os.replace(tmp, path)
    print(render(results))
    print(f"wrote {_rel(path)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
