"""Calibration-only reconstruction at equal ranks: accuracy on the full Fashion-MNIST test set.

For the bundled trained models (``models/vgg_fmnist.onnx``, ``models/resnet_fmnist.onnx``)
and fixed rank rules (``svd`` at rank ratio 0.35 and 0.5, ``tucker2`` at 0.5), every variant
rewrites **the same layers at the same ranks** (``--allow-slower``: no timing decides, so the
MACs are equal) and differs only in how the factors are fitted:

* ``frobenius``: weights only (``--metric frobenius --reconstruct none``);
* ``data``: the data metric, each layer independently (``--metric data --reconstruct none``);
* ``independent``: the data metric, then each layer refit from its own input moments with
  bias correction (``--reconstruct independent``);
* ``sequential``: the data metric, then the asymmetric sequential refit with bias
  correction (``--reconstruct sequential``, the default with ``--calib``).

Fitting and choosing use only ``models/fmnist_calib.npz`` (256 training images: 128 fit,
128 held out for the per-layer fallback); accuracy is measured on the 10,000 test images
(``/usr/share/datasets/fashion-mnist/``, preprocessed as ``tools/train_zoo.py`` does), which
no step sees. The section is skipped when the dataset or the models are absent. ``--quick``:
VGG, svd r0.35 only, the first 2,000 test images.

Standalone: ``python tools/bench_reconstruct.py [--quick]`` writes
``bench_results/reconstruct.json`` and prints the Markdown section.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchkit  # noqa: E402
from benchkit import md_table as _table  # noqa: E402

NAME = "reconstruct"
TITLE = "Reconstruction at equal ranks: Frobenius, data metric, independent and sequential refit (10k test)"
ROOT = Path(__file__).resolve().parent.parent
MODELS = ("vgg_fmnist", "resnet_fmnist")
CONFIGS = (("svd", 0.35), ("svd", 0.5), ("tucker2", 0.5))
VARIANTS = (("frobenius", "frobenius", "none"), ("data", "data", "none"),
            ("independent", "data", "independent"), ("sequential", "data", "sequential"))


def _test_set(limit: int | None) -> tuple[np.ndarray, np.ndarray] | str:
    import train_zoo

    d = train_zoo.DATA_DIR
    files = [d / f"t10k-{k}-idx{n}-ubyte.gz" for k, n in (("images", 3), ("labels", 1))]
    if not all(f.exists() for f in files):
        return f"Fashion-MNIST test set not found in {d} (apt-get install -y dataset-fashion-mnist)"
    try:
        import PIL  # noqa: F401
    except ImportError:
        return "Pillow is not installed (needed to preprocess the test images)"
    raw, y = train_zoo.load_fmnist("t10k")
    if limit is not None:
        raw, y = raw[:limit], y[:limit]
    return train_zoo.preprocess(raw, 1), y


def run(quick: bool = False, models: tuple[str, ...] | None = None, partial: Path | None = None,
        configs: tuple[tuple[str, float], ...] | None = None, calib_n: int | None = None,
        variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The section's results; ``models``/``configs``/``variants`` restrict the runs, ``partial`` is rewritten
    after every row, ``calib_n`` fits on the first N calibration images only (the small-set check)."""
    import json

    import onnxslim_lr as lr

    data = _test_set(2000 if quick else None)
    if isinstance(data, str):
        return {"skipped": data}
    x, y = data
    calib = ROOT / "models" / "fmnist_calib.npz"
    out: dict[str, Any] = {"test_images": int(len(y)), "calib": str(calib.relative_to(ROOT)), "models": {}}
    models = models or (MODELS[:1] if quick else MODELS)
    configs = configs or (CONFIGS[:1] if quick else CONFIGS)
    if calib_n is not None:
        import tempfile

        small = Path(tempfile.mkdtemp(prefix="bench_reconstruct_")) / f"fmnist_calib{calib_n}.npz"
        np.savez(small, x=np.load(calib)["x"][:calib_n])
        calib_used = small
    else:
        calib_used = calib
    n_calib = int(len(np.load(calib_used)["x"]))
    out["calib_n"] = n_calib
    for name in models:
        path = ROOT / "models" / f"{name}.onnx"
        if not path.exists() or not calib.exists():
            out["models"][name] = {"skipped": f"{path.name} or {calib.name} not found"}
            continue
        model = lr.load_model(path)
        base = lr.accuracy(model, x, y)
        rows = []
        for method, ratio in configs:
            for label, metric, mode in VARIANTS:
                if variants and label not in variants:
                    continue
                t0 = time.perf_counter()
                res = lr.compress(model, method=method, rank_ratio=ratio, metric=metric, reconstruct=mode, calib=calib_used,
                                  allow_slower=True, end_to_end=False)
                wall = time.perf_counter() - t0
                acc = lr.accuracy(res.model, x, y)
                rewritten = res.rewritten
                note = next((n for n in res.notes if n.startswith("reconstruction")), "")
                rows.append({
                    "method": method, "ratio": ratio, "variant": label, "calib_n": n_calib, "accuracy": acc, "drop_pts": 100 * (acc - base),
                    "layers": len(rewritten), "params": [f"{r.node}:{r.params}" for r in rewritten],
                    "macs_after": sum(r.macs_after for r in rewritten), "refit": sum("refit kept" in r.reason for r in rewritten),
                    "wall_s": round(wall, 1), "note": note,
                })
                if partial is not None:
                    out["models"][name] = {"accuracy": base, "rows": rows}
                    partial.write_text(json.dumps(out, indent=1, default=float) + "\n")
                print(f"{name} {method} r{ratio} {label}: {100 * acc:.2f}% ({100 * (acc - base):+.2f} pts) "
                      f"{wall:.0f} s", flush=True)
        out["models"][name] = {"accuracy": base, "rows": rows}
    return out


def render(results: dict[str, Any]) -> str:
    out = [f"## {TITLE}", ""]
    if "skipped" in results:
        return "\n".join(out + [f"Skipped: {results['skipped']}.", ""])
    meta = results.get("_meta", {})
    out += [f"Accuracy on {results['test_images']:,} Fashion-MNIST test images (never used to fit or choose); "
            f"fit and per-layer held-out fallback on `{results['calib']}` (256 training images, half each). "
            "Every variant of one rank rule rewrites the same layers at the same ranks (`--allow-slower`), so "
            "the MACs are equal (checked: the `MACs` column). `refit` counts layers whose refit beat the planner's "
            "candidate on the held-out calibration half. Reconstruction always includes bias correction; "
            "`sequential` is the default with `--calib`." + (" (quick run)" if meta.get("quick") else ""), ""]
    for name, r in results["models"].items():
        out.append(f"### {name}")
        out.append("")
        if "skipped" in r:
            out += [f"Skipped: {r['skipped']}.", ""]
            continue
        out.append(f"Original: {100 * r['accuracy']:.2f} %.")
        out.append("")
        def table(sel: list[dict[str, Any]]) -> str:
            rows = [[f"{x['method']} r{x['ratio']}", x["variant"], f"{100 * x['accuracy']:.2f}", f"{x['drop_pts']:+.2f}",
                     str(x["layers"]), f"{x['macs_after'] / 1e6:.1f} M", str(x["refit"]) if x["variant"] in
                     ("independent", "sequential") else "-", f"{x['wall_s']:.0f}"] for x in sel]
            return _table(["rule", "variant", "top-1 %", "vs original (pts)", "layers", "MACs (rewritten layers)",
                           "refit", "run s"], rows)

        full = [x for x in r["rows"] if x.get("calib_n", 256) == 256]
        small = [x for x in r["rows"] if x.get("calib_n", 256) != 256]
        out.append(table(full))
        out.append("")
        if small:
            n = small[0]["calib_n"]
            out += [f"Small calibration set: the first {n} of those images ({n // 2} fit, {n // 2} held out), "
                    "the same test set. The sequential refit must not do worse than the data metric alone:", "",
                    table(small), ""]
        if r.get("note"):
            out += [r["note"], ""]
    out.append("Per-layer held-out errors before/after the refit are in each run's notes and layer reasons "
               "(`bench_results/reconstruct.json`, `note`). The ReLU-aware refinement is not a default: the "
               "prototype (`tools/proto_reconstruct.py`) measured no gain over the linear refit at ~3x the cost.")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``[--quick] [--models a,b] [--configs svd:0.5,tucker2:0.5] [--variants data,sequential] [--calib-n 64]
    [--partial FILE]``: the options run part of the section (to merge into ``bench_results/reconstruct.json``)."""
    args = list(argv if argv is not None else sys.argv[1:])
    quick = "--quick" in args
    models = tuple(args[args.index("--models") + 1].split(",")) if "--models" in args else None
    partial = Path(args[args.index("--partial") + 1]) if "--partial" in args else None
    configs = tuple((c.split(":")[0], float(c.split(":")[1])) for c in args[args.index("--configs") + 1].split(",")) \
        if "--configs" in args else None
    calib_n = int(args[args.index("--calib-n") + 1]) if "--calib-n" in args else None
    variants = tuple(args[args.index("--variants") + 1].split(",")) if "--variants" in args else None
    results = run(quick, models, partial, configs, calib_n, variants)
    if partial is not None:
        return 0
    benchkit.save_results(NAME, results)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
