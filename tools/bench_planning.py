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

import os
import re
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

_PHASE = re.compile(r"^\[\s*([0-9.]+)s\] (\w+)")


def _time_v(stderr: str, key: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(key)}: (.*)$", stderr, re.M)
    return m.group(1).strip() if m else None


def _wall(text: str | None) -> float | None:
    if not text:
        return None
    parts = [float(p) for p in text.split(":")]
    return parts[0] * 60 + parts[1] if len(parts) == 2 else parts[0] * 3600 + parts[1] * 60 + parts[2]


def _plan_end(stderr: str) -> float | None:
    """Elapsed seconds of the first phase line after the plan phase (None: never left it)."""
    in_plan = False
    for line in stderr.splitlines():
        m = _PHASE.match(line)
        if not m:
            continue
        if m.group(2) == "plan":
            in_plan = True
        elif in_plan:
            return float(m.group(1))
    return None


def measure(model: Path, extra: list[str], limit: int = LIMIT_S) -> dict[str, Any]:
    """One CLI run under /usr/bin/time -v: wall, CPU, peak RSS, planning time, load."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["/usr/bin/time", "-v", "timeout", str(limit), sys.executable, "-m", "onnxslim_lr.cli",
               str(model), str(Path(tmp) / "out.onnx"), *extra]
        load0 = os.getloadavg()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        load1 = os.getloadavg()
    err = proc.stderr
    return {
        "args": extra, "rc": proc.returncode,
        "wall_s": _wall(_time_v(err, "Elapsed (wall clock) time (h:mm:ss or m:ss)")),
        "user_s": float(_time_v(err, "User time (seconds)") or "nan"),
        "sys_s": float(_time_v(err, "System time (seconds)") or "nan"),
        "max_rss_mb": int(_time_v(err, "Maximum resident set size (kbytes)") or 0) // 1024,
        "plan_end_s": _plan_end(err), "load": [round(x, 2) for x in load0 + load1],
    }


def run(quick: bool = False) -> dict[str, Any]:
    light = REPO / ".cache" / "light"
    missing = [n for n in ("vgg19", "zfnet512") if not (light / f"{n}.onnx").exists()]
    if missing:
        subprocess.run([sys.executable, str(REPO / "tools" / "light_models.py"), *missing], check=True, cwd=REPO)
    t0 = time.perf_counter()
    rows = [{"model": "vgg19", "run": "default", **measure(light / "vgg19.onnx", [])}]
    for m in METHODS[:1] if quick else METHODS:
        rows.append({"model": "zfnet512", "run": f"-m {m} --allow-slower",
                     **measure(light / "zfnet512.onnx", ["-m", m, "--allow-slower"])})
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 1), "cores": os.cpu_count()}


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
    return "\n".join(out).rstrip() + "\n"
