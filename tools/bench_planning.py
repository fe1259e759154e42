"""Benchmark section: how long planning takes and how much memory it holds (issue 10, item 4).

Runs the CLI as a user would, under ``/usr/bin/time -v``, on the architecture-scale light
models (``tools/light_models.py``, seeded weights, 1x3x224x224):

* ``onnx-lowrank vgg19.onnx out.onnx`` (the default run, no ``--calib``): goal under 2 minutes
  and under 2.5 GB peak RSS on the 2-core machine;
* ``onnx-lowrank zfnet512.onnx out.onnx -m METHOD --allow-slower`` for every opt-in method:
  goal, planning under 5 minutes. ``--allow-slower`` separates planning from layer timing;
  the ``plan s`` column is the elapsed time at which the CLI's phase log leaves the plan phase.

The machine is shared: CPU time (user + sys) is recorded beside wall time, with the load
average before and after each run. Timings are not ratios here, so they move with the load.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TITLE = "Planning time and memory (VGG-19 default run, opt-in methods on ZFNet-512)"
REPO = Path(__file__).resolve().parent.parent
METHODS = ("bicluster", "mono", "cp", "perforate", "structured")
LIMIT_S = 600
VGG_WALL_S, VGG_RSS_MB, PLAN_S = 120, 2500, 300

_PHASE = re.compile(r"^\[\s*([0-9.]+)s\] (\w+)")


def _time_v(stderr: str, key: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(key)}: (.*)$", stderr, re.M)
    return m.group(1).strip() if m else None


def _wall(text: str | None) -> float | None:
    if not text:
        return None
    parts = [float(p) for p in text.split(":")]
    return parts[0] * 60 + parts[1] if len(parts) == 2 else parts[0] * 3600 + parts[1] * 60 + parts[2]


def _phase_end(stderr: str, phase: str) -> float | None:
    """Elapsed seconds of the first phase line after ``phase`` (None: never left it)."""
    inside = False
    for line in stderr.splitlines():
        m = _PHASE.match(line)
        if not m:
            continue
        if m.group(2) == phase:
            inside = True
        elif inside:
            return float(m.group(1))
    return None


def _plan_end(stderr: str) -> float | None:
    """Elapsed seconds of the first phase line after the plan phase (None: never left it)."""
    return _phase_end(stderr, "plan")


def measure(model: Path, extra: list[str], limit: int = LIMIT_S, stop_after_plan: bool = False,
            stop_after: str | None = None) -> dict[str, Any]:
    """One CLI run under /usr/bin/time -v: wall, CPU, peak RSS, planning time, load.

    ``stop_after_plan``: interrupt the run (SIGINT, the CLI's Ctrl-C: exit 130, nothing
    written) as soon as its phase log leaves the plan phase; the figures then cover loading
    and planning only, which is what the opt-in methods' goal is about (their verification
    and end-to-end timing would add minutes that say nothing about planning). ``stop_after``
    names another phase to stop after (``reconstruct``).
    """
    stop_phase = stop_after or ("plan" if stop_after_plan else None)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["/usr/bin/time", "-v", "timeout", str(limit), sys.executable, "-m", "onnxslim_lr.cli",
               str(model), str(Path(tmp) / "out.onnx"), *extra]
        load0 = os.getloadavg()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stderr is not None
        lines: list[str] = []
        stopped = False
        for line in proc.stderr:
            lines.append(line)
            if stop_phase and not stopped and _phase_end("".join(lines), stop_phase) is not None:
                stopped = True
                _interrupt_cli(proc.pid)
        proc.wait()
        load1 = os.getloadavg()
    err = "".join(lines)
    rc = _time_v(err, "Exit status")
    return {
        "args": extra, "rc": int(rc) if rc and rc.lstrip("-").isdigit() else proc.returncode,
        "wall_s": _wall(_time_v(err, "Elapsed (wall clock) time (h:mm:ss or m:ss)")),
        "user_s": float(_time_v(err, "User time (seconds)") or "nan"),
        "sys_s": float(_time_v(err, "System time (seconds)") or "nan"),
        "max_rss_mb": int(_time_v(err, "Maximum resident set size (kbytes)") or 0) // 1024,
        "plan_end_s": _plan_end(err), "recon_end_s": _phase_end(err, "reconstruct"),
        "load": [round(x, 2) for x in load0 + load1],
        "stopped_after_plan": stopped,
    }


def _interrupt_cli(time_pid: int) -> None:
    """SIGINT to the CLI process: /usr/bin/time -> timeout -> python (found through /proc)."""
    pid = time_pid
    for _ in range(2):
        children = Path(f"/proc/{pid}/task/{pid}/children")
        try:
            kids = children.read_text().split()
        except OSError:
            return
        if not kids:
            return
        pid = int(kids[0])
    try:
        os.kill(pid, signal.SIGINT)
    except OSError:
        pass


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        return out.stdout.strip() or "-"
    except OSError:
        return "-"


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """Goal checks computed from the measured rows (no hand-written verdicts)."""
    out = []
    for r in rows:
        load = r.get("load") or []
        at = f" (1-min load {load[0]:.1f} -> {load[3]:.1f} on {os.cpu_count()} cores)" if len(load) >= 4 else ""
        cpu = (r.get("user_s") or 0) + (r.get("sys_s") or 0)
        if r.get("run", "").startswith("recon"):
            end = r.get("recon_end_s")
            ok = end is not None and end < PLAN_S
            out.append(f"VGG-19 planning with sequential reconstruction (64 calibration images): reconstruction "
                       f"finished at {_fmt(end)} s ({cpu:.0f} s CPU up to then, peak RSS {r.get('max_rss_mb')} MB){at}: "
                       f"goal (< {PLAN_S} s) {'met' if ok else '**not met**'}.")
        elif r["model"] == "vgg19":
            wall, rss = r.get("wall_s"), r.get("max_rss_mb")
            ok_t = wall is not None and wall < VGG_WALL_S
            ok_m = rss is not None and 0 < rss < VGG_RSS_MB
            out.append(f"VGG-19 default run: {_fmt(wall)} s wall, {cpu:.0f} s CPU, peak RSS {rss} MB{at}: "
                       f"time goal (< {VGG_WALL_S} s) {'met' if ok_t else '**not met**'}, "
                       f"memory goal (< {VGG_RSS_MB} MB) {'met' if ok_m else '**not met**'}.")
        else:
            plan = r.get("plan_end_s")
            ok = plan is not None and plan < PLAN_S
            out.append(f"ZFNet-512 `{r['run']}`: planned in {_fmt(plan)} s ({cpu:.0f} s CPU up to then, peak RSS "
                       f"{r.get('max_rss_mb')} MB){at}: goal (< {PLAN_S} s) {'met' if ok else '**not met**'}.")
    return out


def run(quick: bool = False) -> dict[str, Any]:
    light = REPO / ".cache" / "light"
    missing = [n for n in ("vgg19", "zfnet512") if not (light / f"{n}.onnx").exists()]
    if missing:
        subprocess.run([sys.executable, str(REPO / "tools" / "light_models.py"), *missing], check=True, cwd=REPO)
    t0 = time.perf_counter()
    commit = _commit()
    vgg = [{"model": "vgg19", "run": "default", "commit": commit, **measure(light / "vgg19.onnx", [])}]
    zf = []
    for m in METHODS[:1] if quick else METHODS:
        row = measure(light / "zfnet512.onnx", ["-m", m, "--allow-slower"], stop_after_plan=True)
        zf.append({"model": "zfnet512", "run": f"-m {m} --allow-slower", "commit": commit, **row,
                   "note": "interrupted after planning" if row["stopped_after_plan"] else ""})
    rec = reconstruction_rows(light)
    blocks = [{"title": "VGG-19, default run (`onnx-lowrank vgg19.onnx out.onnx`, no --calib)", "rows": vgg},
              {"title": "ZFNet-512, opt-in methods (`-m METHOD --allow-slower`), each run interrupted once planned",
               "rows": zf}, RECON_BLOCK | {"rows": rec}]
    old = _previous()
    return {"blocks": blocks + [b for b in old.get("blocks", []) if b.get("history")],
            "findings": findings(vgg + zf + rec), "notes": old.get("notes", []),
            "findings_history": old.get("findings_history", []),
            "seconds": round(time.perf_counter() - t0, 1), "cores": os.cpu_count()}


RECON_BLOCK = {"title": "VGG-19 planning with reconstruction (issue 13: `-m svd --rank-ratio 0.5 --allow-slower "
                       "--calib` 64 seeded random images at 224x224), interrupted once reconstructed"}


def reconstruction_rows(light: Path) -> list[dict[str, Any]]:
    """VGG-19 with sequential reconstruction from 64 calibration images, up to the end of the reconstruct phase."""
    import numpy as np

    calib = light / "vgg19_calib64.npz"
    if not calib.exists():
        np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32))
    args = ["-m", "svd", "--rank-ratio", "0.5", "--allow-slower", "--calib", str(calib)]
    row = measure(light / "vgg19.onnx", args, limit=1800, stop_after="reconstruct")
    return [{"model": "vgg19", "run": "reconstruct: -m svd --rank-ratio 0.5 --calib (64 images)", "commit": _commit(),
             **row, "note": f"reconstructed at {_fmt(row.get('recon_end_s'))} s" +
             (", interrupted after it" if row["stopped_after_plan"] else "")}]


def _previous() -> dict[str, Any]:
    """The committed results: their history blocks (earlier, hand-measured) are kept below the new ones."""
    try:
        return json.loads((REPO / "bench_results" / "planning.json").read_text())
    except (OSError, ValueError):
        return {}


def _fmt(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def render(results: dict[str, Any]) -> str:
    out = [f"## {TITLE}", "",
           "CLI runs under `/usr/bin/time -v` on the light models with seeded weights at 1x3x224x224 "
           "(`tools/light_models.py`). **plan s**: elapsed time when the phase log leaves the plan phase "
           "(`-` = killed before); **CPU s** = user + sys; **load** = 1-minute load average before -> after "
           "(2 cores, shared with other jobs: wall times move with the load, CPU times much less). "
           "Goals: VGG-19 default run < 120 s and < 2.5 GB peak RSS; every opt-in method plans ZFNet-512 in < 300 s.",
           ""]
    for block in results.get("blocks", [results]):
        if block.get("title"):
            out += [f"### {block['title']}", ""]
        if block.get("note"):
            out += [block["note"], ""]
        out += ["| model | run | commit | wall s | plan s | CPU s (user+sys) | peak RSS MB | load | rc | note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in block["rows"]:
            cpu = None if r.get("user_s") is None else r["user_s"] + r["sys_s"]
            load = r.get("load") or []
            shown = f"{load[0]:.1f} -> {load[3]:.1f}" if len(load) >= 4 else "-"
            out.append(f"| {r['model']} | `{r['run']}` | {r.get('commit', '-')} | {_fmt(r.get('wall_s'))} | "
                       f"{_fmt(r.get('plan_end_s'))} | {_fmt(cpu)} ({_fmt(r.get('user_s'))}+{_fmt(r.get('sys_s'))}) | "
                       f"{_fmt(r.get('max_rss_mb'), 'd')} | {shown} | {r.get('rc', '-')} | {r.get('note', '')} |")
        out.append("")
    for line in results.get("findings", []):
        out.append(f"- {line}")
    if results.get("notes"):
        out += ["", "Where the time and memory go (measured by hand, kept with the results):", ""]
        out += [f"- {line}" for line in results["notes"]]
    if results.get("findings_history"):
        out += ["", "Earlier findings (before the latest measurement, kept for the record):", ""]
        out += [f"- {line}" for line in results["findings_history"]]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    # ``--reconstruction-only``: measure only the VGG-19 reconstruction block and merge it into
    # bench_results/planning.json (the other blocks are kept as measured)
    if "--reconstruction-only" in sys.argv:
        import json as _json

        light_ = REPO / ".cache" / "light"
        if not (light_ / "vgg19.onnx").exists():
            subprocess.run([sys.executable, str(REPO / "tools" / "light_models.py"), "vgg19"], check=True, cwd=REPO)
        res = _previous()
        rows_ = reconstruction_rows(light_)
        blocks_ = [b for b in res.get("blocks", []) if b.get("title") != RECON_BLOCK["title"]]
        at = next((i for i, b in enumerate(blocks_) if b.get("history")), len(blocks_))
        blocks_.insert(at, RECON_BLOCK | {"rows": rows_})
        res["blocks"] = blocks_
        res["findings"] = [f for f in res.get("findings", []) if not f.startswith("VGG-19 planning with")] + findings(rows_)
        path = REPO / "bench_results" / "planning.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(_json.dumps(res, indent=1) + "\n")
        os.replace(tmp, path)
        print(render(res))
