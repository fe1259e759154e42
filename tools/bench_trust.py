"""Trust benchmark: are speed decisions sound and repeatable on real and third-party models?

Three checks, on the bundled models (``models/*.onnx``) and the two generated third-party
stand-ins (``tools/standins.py``: a YOLO-style detector with dynamic dims, a
PP-OCR-recognition-like network):

1. **A/A**: ``onnxslim_lr.api.bench([m, m])`` -- a model timed against itself, in the same
   interleaved run as its A/A control. Passes when the model is not reported faster
   (the interval's lower bound is not above 1).
2. **Three-run repeatability**: the same CLI command
   (``onnx-lowrank M -o OUT -m svd --rank-ratio 0.5 --report R.json``, random seeded inputs)
   run three times. Passes when the three runs keep the same set of layers and give the
   same exit code. Layers that differ between runs are listed with their intervals: by
   design only a layer whose interval lies near the threshold may flip.
3. **No MAC-neutral rewrite kept**: in every run above, and (bundled models) in one extra
   "probe" run at ``--rank-ratio 0.88`` (which makes channel-SVD candidates with MAC ratios
   between 1.0 and 1.05 on 3x3 convs), no kept layer has a MAC ratio below 1.05, and a rewritten model cuts
   the watched layers' MACs by at least 1.05x.

Everything runs through the real CLI (subprocesses) on this machine, with whatever load it
has; the A/A columns show how noisy it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from benchkit import fmt as _f
from benchkit import md_table as _table

NAME = "trust"
TITLE = "Trustworthy speed decisions: A/A, repeatability, MAC-neutral rewrites"

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
MAC_MARGIN = 1.05
NOISE_GATE = 1.5  # onnxslim_lr.speed.NOISE_GATE (tools do not import the package at load time)
RUNS = 3
COMMAND = ["-m", "svd", "--rank-ratio", "0.5"]
PROBE = ["-m", "svd", "--rank-ratio", "0.88"]


def models(tmp: Path, quick: bool) -> list[tuple[str, Path, list[str]]]:
    """(name, path, extra CLI args) for every model the checks run on."""
    sys.path.insert(0, str(TOOLS))
    import standins

    out = [(p.stem, p, []) for p in sorted((REPO / "models").glob("*.onnx"))]
    paths = standins.save(tmp / "standins")
    out.append(("yolo_standin (dynamic, 1x3x96x96)", paths["yolo_standin"], ["--input-shape", "images:1x3x96x96"]))
    out.append(("ocr_standin (dynamic, 1x3x32x256)", paths["ocr_standin"], ["--input-shape", "x:1x3x32x256"]))
    return out[:2] if quick else out


def _cli(model: Path, args: list[str], out_dir: Path, tag: str) -> dict[str, Any]:
    out, rep = out_dir / f"{tag}.onnx", out_dir / f"{tag}.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    load0 = _load()
    proc = subprocess.run([sys.executable, "-m", "onnxslim_lr.cli", str(model), "-o", str(out), "--report", str(rep),
                           "-q", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(wall, 1), "load": [load0, _load()]}
    if proc.returncode not in (0, 3):
        row["error"] = proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "?"
        return row
    doc = json.loads(rep.read_text())
    rewritten = [r for r in doc["layers"] if r["status"] == "rewritten"]
    row["kept"] = sorted(r["node"] for r in rewritten)
    row["min_kept_mac_ratio"] = min((r["theoretical"] for r in rewritten if r.get("theoretical")), default=None)
    before = sum(r["macs_before"] for r in doc["layers"])
    after = sum(r["macs_after"] if r["status"] == "rewritten" else r["macs_before"] for r in doc["layers"])
    row["model_mac_ratio"] = before / after if after else None
    # every layer that was timed, with its chosen / best interval, to explain any flip
    timed = {}
    for r in doc["layers"]:
        ivs = [(a["measured"], a.get("interval"), a.get("macs_after"), "timing too noisy" in (a.get("reason") or ""))
               for a in r.get("attempts", []) if a.get("measured") is not None]
        if ivs:
            m, iv, _, gated = max(ivs, key=lambda v: (v[1] or [0, 0])[0])
            timed[r["node"]] = {"measured": m, "interval": iv, "status": r["status"], "gated": gated,
                                "mac_ratio": r["macs_before"] / max(min(v[2] or 1 for v in ivs), 1)}
    row["timed"] = timed
    # the noise gate (speed.NOISE_GATE): how many layer candidates / end-to-end claims it vetoed
    row["gated_layers"] = sum(1 for r in doc["layers"] for a in r.get("attempts", [])
                              if "timing too noisy" in (a.get("reason") or ""))
    row["gated_e2e"] = any("timing too noisy" in n for n in doc.get("notes", []))
    row["n_mac_neutral_timed"] = sum(1 for v in timed.values() if v["mac_ratio"] < MAC_MARGIN)
    t = doc.get("timing")
    if t:
        row["e2e"] = {"speedup": t["speedup"], "interval": t.get("speedup_interval"), "aa": t.get("aa"),
                      "batch": t.get("batch"), "threads": t.get("threads"), "rounds": t.get("rounds")}
    return row


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _aa(path: Path, args: list[str]) -> dict[str, Any]:
    import onnxslim_lr.api as api

    shape = [args[args.index("--input-shape") + 1]] if "--input-shape" in args else None
    m = api.load_model(str(path))
    t0 = time.perf_counter()
    t = api.bench([m, m], input_shape=shape)
    s, aa = t.speedup(0, 1), t.aa
    return {"ratio": s.ratio, "lo": s.lo, "hi": s.hi, "aa": aa.as_dict() if aa else None, "rounds": t.rounds,
            "threads": t.threads, "batch": t.batch, "stopped": t.stopped, "reported_faster": s.lo > 1.0,
            "seconds": round(time.perf_counter() - t0, 1)}


def run(quick: bool = False) -> dict[str, Any]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_trust_") as td:
        tmp = Path(td)
        for name, path, extra in models(tmp, quick):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"model": name, "command": " ".join(COMMAND + extra)}
            row["aa"] = _aa(path, extra)
            row["runs"] = [_cli(path, COMMAND + extra, tmp, f"{path.stem}_run{i}") for i in range(1 if quick else RUNS)]
            # the probe on the bundled models only (time: the stand-ins' runs are the slow ones)
            row["probe"] = _cli(path, PROBE + extra, tmp, f"{path.stem}_probe") if not extra else {"rc": None}
            row.update(judge(row))
            rows.append(row)
            print(f"  [trust] {name:36s} A/A {row['aa']['ratio']:.2f}x [{row['aa']['lo']:.2f}, {row['aa']['hi']:.2f}]"
                  f"  exits {[r['rc'] for r in row['runs']]}  kept {[len(r.get('kept', [])) for r in row['runs']]}"
                  f"  probe rc {row['probe']['rc']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"section": NAME, "quick": quick, "runs": RUNS, "command": COMMAND, "probe": PROBE, "rows": rows,
            "wall_s": round(time.perf_counter() - t_start, 1), "earlier": [] if quick else _earlier()}


def _earlier() -> list[dict[str, Any]]:
    """A compact summary of the previous committed results (kept: a run under other load)."""
    path = REPO / "bench_results" / f"{NAME}.json"
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    summary = {
        "commit": prev.get("_meta", {}).get("commit"), "started": prev.get("_meta", {}).get("started"),
        "loadavg_start": prev.get("_meta", {}).get("loadavg_start"), "loadavg_end": prev.get("_meta", {}).get("loadavg_end"),
        "rows": [{"model": r["model"], "aa": [r["aa"]["ratio"], r["aa"]["lo"], r["aa"]["hi"]], "aa_ok": r["aa_ok"],
                  "exits": [x["rc"] for x in r["runs"]], "kept": [len(x.get("kept", [])) for x in r["runs"]],
                  "repeatable": r["repeatable"], "mac_ok": r["mac_ok"], "flips": len(r["flips"]),
                  "loads": [x.get("load") for x in r["runs"]]} for r in prev["rows"]],
    }
    return [summary] + list(prev.get("earlier", []))[:2]


def judge(row: dict[str, Any]) -> dict[str, Any]:
    """The three checks' verdicts for one model."""
    runs = [r for r in row["runs"] if "error" not in r]
    kept_sets = [tuple(r["kept"]) for r in runs]
    exits = [r["rc"] for r in row["runs"]]
    union = set().union(*map(set, kept_sets)) if kept_sets else set()
    flips = sorted(union - set.intersection(*map(set, kept_sets))) if kept_sets else []
    all_runs = runs + ([row["probe"]] if row["probe"].get("rc") is not None and "error" not in row["probe"] else [])
    mac_ok = all((r["min_kept_mac_ratio"] is None or r["min_kept_mac_ratio"] >= MAC_MARGIN)
                 and (not r["kept"] or r["rc"] != 0 or (r["model_mac_ratio"] or 0) >= MAC_MARGIN) for r in all_runs)
    strict = len(set(kept_sets)) <= 1 and len(set(exits)) == 1 and len(runs) == len(row["runs"])
    return {
        "aa_ok": not row["aa"]["reported_faster"],
        "repeatable": strict,
        # the definition: runs may differ only where a decision straddled its threshold
        # (or was vetoed by the noise gate) and resolved to the original
        "repeatable_modulo_straddlers": strict or (len(runs) == len(row["runs"]) and all(
            _conservative(r, union) for r in runs if set(r["kept"]) != union)),
        "flips": {n: [r["timed"].get(n) for r in runs] for n in flips},
        "mac_ok": mac_ok,
        "mac_neutral_timed": sum(r["n_mac_neutral_timed"] for r in all_runs),
    }


def _conservative(run: dict[str, Any], union: set[str], min_speedup: float = 1.1) -> bool:
    """Whether a run kept less than the union of the runs only by resolving undecided timings to the original.

    Undecided: the end-to-end interval straddled 1 (or the noise gate vetoed it), so the whole
    rewrite went; or every layer this run did not keep had an interval straddling
    ``min_speedup`` (or a gated one).
    """
    e2e = run.get("e2e") or {}
    iv = e2e.get("interval")
    if run["rc"] == 3 and (run.get("gated_e2e") or (iv is not None and iv[0] <= 1.0 <= iv[1])):
        return True
    missing = union - set(run["kept"])
    return all((t := run["timed"].get(n)) is not None and (t.get("gated") or (
        t["interval"] is not None and t["interval"][0] < min_speedup <= t["interval"][1])) for n in missing)


def _iv(d: dict[str, Any] | None) -> str:
    if not d or d.get("interval") is None:
        return "-"
    lo, hi = d["interval"]
    return f"{d['speedup']:.2f}x [{lo:.2f}, {hi:.2f}]"


def render(results: dict[str, Any]) -> str:
    rows = results["rows"]
    out = [f"## {TITLE}", ""]
    out.append(
        f"Each model: (1) **A/A** = `onnxslim_lr.api.bench([m, m])`, the model timed against itself (batch 1, all "
        f"cores), with the run's own A/A control; (2) the same command `onnx-lowrank M -o OUT "
        f"{' '.join(results['command'])} --report R.json` run {results['runs']} times (random seeded input, batch 1; "
        f"`--input-shape` for the dynamic stand-ins); (3) on the bundled models, a probe run with `{' '.join(results['probe'])}`, which makes "
        "3x3-conv SVD candidates with MAC ratios between 1.00 and 1.05. Speedups are Hodges-Lehmann estimates with "
        "signed-rank intervals over paired rounds (95% overall; Bonferroni-corrected over the looks of the adaptive "
        "rounds), widened by the farthest the run's A/A interval reaches from 1 (`onnxslim_lr/speed.py`). The stand-ins "
        "come from `tools/standins.py` (seeded weights)." + (" **Quick (smoke) run.**" if results.get("quick") else ""))
    out.append("")
    header = ["model", "A/A (bench m m)", "A/A ok", "exit codes", "layers kept per run", "1-min load per run",
              "same kept set + exit", "same up to straddlers", "end-to-end per run [its A/A]", "noise gate fired",
              "probe exit", "MAC-neutral timed", "none kept < 1.05x MACs"]
    table = []
    for r in rows:
        aa = r["aa"]
        e2e = []
        for x in r["runs"]:
            e = x.get("e2e")
            e2e.append("-" if not e else _iv(e) + (f" [A/A {e['aa']['ratio']:.2f}x [{e['aa']['lo']:.2f}, "
                                                    f"{e['aa']['hi']:.2f}]]" if e.get("aa") else ""))
        gates = [f"{x.get('gated_layers', 0)}L" + ("+E" if x.get("gated_e2e") else "") for x in r["runs"]]
        table.append([
            r["model"], f"{aa['ratio']:.2f}x [{aa['lo']:.2f}, {aa['hi']:.2f}]", "yes" if r["aa_ok"] else "**no**",
            " ".join(str(x["rc"]) for x in r["runs"]), " / ".join(str(len(x.get("kept", []))) for x in r["runs"]),
            " / ".join("-" if not x.get("load") else f"{x['load'][0]}-{x['load'][1]}" for x in r["runs"]),
            "yes" if r["repeatable"] else "**no**", "yes" if r.get("repeatable_modulo_straddlers") else "**no**",
            "; ".join(e2e), " ".join(gates),
            "-" if r["probe"].get("rc") is None else str(r["probe"]["rc"]), str(r["mac_neutral_timed"]), "yes" if r["mac_ok"] else "**no**",
        ])
    out.append(_table(header, table))
    out.append("")
    n = len(rows)
    out.append(f"A/A: {sum(r['aa_ok'] for r in rows)}/{n} models not reported faster than themselves. "
               f"Repeatability: {sum(r['repeatable'] for r in rows)}/{n} models gave the same kept set and exit code "
               f"in all {results['runs']} runs; {sum(bool(r.get('repeatable_modulo_straddlers')) for r in rows)}/{n} "
               "differed at most where a decision was undecided (an interval straddling its threshold, or the noise "
               "gate) and resolved to the original. MAC-neutral: "
               f"{sum(r['mac_ok'] for r in rows)}/{n} models never kept a "
               f"layer under {MAC_MARGIN}x MACs ({sum(r['mac_neutral_timed'] for r in rows)} such candidates were timed "
               "and all rejected by the MAC margin). **noise gate fired**: per run, the number of layer candidates "
               "(`L`) and whether the end-to-end claim (`E`) were vetoed because the run's A/A control reached beyond "
               f"{NOISE_GATE:g}x.")
    flips = [(r["model"], node, per) for r in rows for node, per in r["flips"].items()]
    if flips:
        out.append("")
        out.append("Layers whose decision differed between runs (best candidate's measured interval in each run; "
                   "the required lower bound is 1.1; a layer shown `kept` with a lower bound above 1.1 was dropped, "
                   "with the whole rewrite, by the end-to-end guard of that run: its interval reached below 1, or the noise "
                   "gate vetoed it):")
        out.append("")
        for model, node, per in flips:
            desc = "; ".join("-" if p is None else f"{_iv({'speedup': p['measured'], 'interval': p['interval']})} "
                             f"({p['status']})" for p in per)
            out.append(f"- {model} `{node}`: {desc}")
    meta = results.get("_meta", {})
    if meta.get("loadavg_start"):
        out.append("")
        out.append(f"Load during this run (1/5/15-minute load averages): {meta['loadavg_start']} at the start, "
                   f"{meta.get('loadavg_end')} at the end.")
    for e in results.get("earlier", []):
        out.append("")
        out.append(f"Earlier run (commit {e.get('commit')}, {e.get('started')}, load averages {e.get('loadavg_start')} "
                   f"-> {e.get('loadavg_end')}), with the code of that commit:")
        out.append("")
        out.append(_table(["model", "A/A (bench m m)", "exit codes", "layers kept per run", "same kept set + exit",
                           "layers that flipped", "none kept < 1.05x MACs"],
                          [[r["model"], f"{r['aa'][0]:.2f}x [{r['aa'][1]:.2f}, {r['aa'][2]:.2f}]",
                            " ".join(map(str, r["exits"])), " / ".join(map(str, r["kept"])),
                            "yes" if r["repeatable"] else "**no**", str(r["flips"]), "yes" if r["mac_ok"] else "**no**"]
                           for r in e["rows"]]))
    out.append("")
    out.append(f"Total wall time {results.get('wall_s', 0):.0f} s.")
    return "\n".join(out)


if __name__ == "__main__":
    # same as: python tools/bench.py --sections trust [--quick]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench

    sys.exit(bench.main(["--sections", NAME] + sys.argv[1:]))
