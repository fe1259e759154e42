"""What should the rank rule be when the user gives no calibration data?

Without ``--calib`` the ranks can only come from the weights (Frobenius metric). This script
runs the default pipeline (auto methods, never-slower guard, end-to-end guard) on every model
of the bundled trained zoo for several ``--energy`` values, without calibration data, and
reports what each costs on the held-out labelled data (``*_test2k.npz``) and what it buys
(MACs, measured end-to-end speedup at batch 1). The chosen default is
:data:`onnxslim_lr.planning.DEFAULT_ENERGY`; README "Without calibration data" quotes this.

    python tools/bench_nodata.py [--energies 0.98,0.95,0.9] [--out bench_results/nodata.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import onnxslim_lr as lr

ROOT = Path(__file__).resolve().parent.parent
ZOO = {
    "vgg_fmnist": "fmnist_test2k.npz",
    "resnet_fmnist": "fmnist_test2k.npz",
    "zfnet_fmnist": "fmnist_rgb_test2k.npz",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--energies", default="0.98,0.95,0.9,0.85")
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "nodata.json"))
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    energies = [float(e) for e in a.energies.split(",")]
    rows = []
    for name, test in ZOO.items():
        model = lr.load_model(ROOT / "models" / f"{name}.onnx")
        d = np.load(ROOT / "models" / test)
        x, y = d["x"], d["y"]
        base_acc = lr.accuracy(model, x, y, threads=a.threads)
        for e in energies:
            t0 = time.perf_counter()
            res = lr.compress(model, energy=e, threads=a.threads)
            secs = time.perf_counter() - t0
            acc = lr.accuracy(res.model, x, y, threads=a.threads) if res.changed else base_acc
            macs0 = sum(r.macs_before for r in res.layers)
            macs1 = sum(r.macs_after if r.status == "rewritten" else r.macs_before for r in res.layers)
            row = {
                "model": name, "energy": e, "changed": res.changed, "rewritten": len(res.rewritten),
                "layers": len(res.layers), "mac_ratio": macs0 / max(macs1, 1),
                "speedup_e2e": res.speedup if res.changed else 1.0,
                "acc_before": base_acc, "acc_after": acc, "delta_pts": (acc - base_acc) * 100, "seconds": secs,
            }
            rows.append(row)
            print(f"{name:14s} energy {e:<5g} rewritten {row['rewritten']}/{row['layers']}  MACs {row['mac_ratio']:.2f}x fewer  "
                  f"e2e {row['speedup_e2e']:.2f}x  acc {base_acc * 100:.2f}% -> {acc * 100:.2f}% ({row['delta_pts']:+.2f} pts)  "
                  f"[{secs:.0f} s]", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
