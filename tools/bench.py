"""Benchmark driver: run benchmark sections and regenerate BENCHMARKS.md.

    python tools/bench.py                          # every section found (tools/bench_*.py)
    python tools/bench.py --sections layers,arch   # the chosen ones
    python tools/bench.py --quick                  # smoke run (minutes), results in .cache/bench_quick/
    python tools/bench.py --render-only            # rebuild BENCHMARKS.md from bench_results/*.json

A section is a module ``tools/bench_<name>.py`` exposing

    run(quick: bool) -> dict        # JSON-serialisable results
    render(results: dict) -> str    # a Markdown section (starting with "## ...")

and is discovered automatically: adding the file is all it takes. Its results go to
``bench_results/<name>.json`` (committed), and BENCHMARKS.md is rebuilt from ALL the JSON
files present there, so sections run at different times (or by different people) stay in it.
A ``--quick`` run writes to ``.cache/bench_quick/`` instead, so it never replaces real results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
RESULTS = REPO / "bench_results"
MARKDOWN = REPO / "BENCHMARKS.md"
QUICK_DIR = REPO / ".cache" / "bench_quick"
#: sections first in BENCHMARKS.md, in this order; the others follow alphabetically
ORDER = ("layers", "arch")

if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))


def discover() -> list[str]:
    """Section names, from the files ``tools/bench_<name>.py``."""
    # a section defines run() and render(); other bench_*.py files are stand-alone tools
    names = [p.stem[len("bench_"):] for p in TOOLS.glob("bench_*.py")
             if p.stem != "bench" and "\ndef run(" in p.read_text() and "\ndef render(" in p.read_text()]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def load_section(name: str) -> Any:
    mod = importlib.import_module(f"bench_{name}")
    for fn in ("run", "render"):
        if not callable(getattr(mod, fn, None)):
            raise SystemExit(f"tools/bench_{name}.py has no {fn}() function")
    return mod


# ---- environment ----------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal:")), 0)
    os_name = next((line.split("=", 1)[1].strip().strip('"') for line in _read("/etc/os-release").splitlines()
                    if line.startswith("PRETTY_NAME=")), platform.system())
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": affinity, "ram_gib": round(mem_kb / 2**20, 1),
            "os": f"{os_name} ({platform.system()} {platform.release()})", "arch": platform.machine()}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "numpy", "scipy", "onnx_graphsurgeon", "onnxslim_lr"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # not installed: say so rather than fail
            out[mod] = "not installed"
    return out


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except Exception:
        return "unknown"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "python tools/bench.py" + ("" if not args else " " + " ".join(shlex.quote(a) for a in args))


# ---- running and rendering ------------------------------------------------------------------


def run_section(name: str, quick: bool, out_dir: Path, command: str) -> dict[str, Any]:
    mod = load_section(name)
    print(f"== section {name}{' (quick)' if quick else ''}", flush=True)
    meta = {"section": name, "command": command, "quick": quick,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": loadavg(), "machine": machine(), "versions": versions(), "commit": git_commit()}
    t0 = time.perf_counter()
    results = mod.run(quick)
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["loadavg_end"] = loadavg()
    results["_meta"] = meta
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    print(f"== section {name}: {meta['wall_s']:.0f} s -> {_rel(path)}", flush=True)
    return results


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def header(command: str, metas: list[dict[str, Any]], results_dir: Path = RESULTS) -> str:
    m, v = machine(), versions()
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `tools/bench.py` from `{_rel(results_dir)}/*.json`; do not edit by hand. "
        "Each section is a module `tools/bench_<name>.py` (`run(quick)`, `render(results)`), found automatically.",
        "",
        "**Every figure is a ratio against the original model measured in the same interleaved run** "
        "(`onnxslim_lr.timing.time_models`: sessions with full graph optimisations, warm-up, then rounds "
        "interleaving the models, with an A/A control), so a machine that is slower or busier as a whole shifts "
        "both sides alike. Sections run before 2026-12-02 used alternating A, B, A, B ... rounds and per-model "
        "medians; the `layers` and `trust` sections use paired rounds with a rotating order and report each ratio "
        "with its 95% interval (`onnxslim_lr/speed.py`). Absolute latencies in the JSON files are for orientation only.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['ram_gib']} GiB RAM, {m['arch']}",
        f"- OS: {m['os']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Rendered: {now}, commit {git_commit()}",
    ]
    ran = list(dict.fromkeys(meta["command"] for meta in metas if meta.get("command")))
    if ran:
        lines.append("- Command(s) that produced the results: " + "; ".join(f"`{c}`" for c in ran))
    if command not in ran:
        lines.append(f"- This file rendered by: `{command}`")
    lines.append("")
    if metas:
        lines += ["| section | run at | command | wall | load avg (1/5/15 min) start -> end | commit |",
                  "|---|---|---|---|---|---|"]
        bare = [meta.get("section", "?") for meta in metas if "command" not in meta]
        metas = [meta for meta in metas if "command" in meta]
        for meta in metas:
            la0, la1 = meta.get("loadavg_start"), meta.get("loadavg_end")
            la = f"{'/'.join(map(str, la0)) if la0 else '-'} -> {'/'.join(map(str, la1)) if la1 else '-'}"
            lines.append(f"| {meta.get('section')} | {meta.get('started', '-')} | `{meta.get('command', '-')}` | "
                         f"{(meta.get('wall_s') or 0) / 60:.1f} min | {la} | {meta.get('commit', '-')} |")
        if bare:
            lines.append(f"| {', '.join(bare)} | (JSON written without `tools/bench.py`: no run metadata) | | | | |")
        lines.append("")
        cores = m["cores"] or 1
        busy = [meta for meta in metas if (meta.get("loadavg_start") or [0])[0] > cores]
        if busy:
            lines.append(f"Note: the machine was shared: the load average exceeded its {cores} cores during "
                         f"{', '.join(x['section'] for x in busy)}. Ratios from one interleaved run remain "
                         "comparable; multi-threaded figures are the noisiest (see each section's A/A or 1-thread "
                         "columns).")
            lines.append("")
        for meta in metas:
            mm = meta.get("machine") or {}
            if mm and (mm.get("cpu"), mm.get("cores")) != (m["cpu"], m["cores"]):
                lines.append(f"Note: section {meta.get('section')} was measured on a different machine: "
                             f"{mm.get('cpu')}, {mm.get('cores')} cores.")
                lines.append("")
    return "\n".join(lines)


def render_all(results_dir: Path, markdown: Path, command: str) -> str:
    """BENCHMARKS.md from every section JSON in ``results_dir``."""
    files = {p.stem: p for p in results_dir.glob("*.json")}
    known = discover()
    # JSON files without a section module are raw data of stand-alone tools (nodata.json)
    names = [n for n in known if n in files]
    metas, sections = [], []
    for name in names:
        try:
            data = json.loads(files[name].read_text())
        except json.JSONDecodeError as exc:
            sections.append(f"## {name}\n\n(unreadable {files[name].name}: {exc})\n")
            continue
        # a section may store a list of rows (no metadata block)
        metas.append((data.get("_meta") if isinstance(data, dict) else None) or {"section": name})
        if name in known:
            try:
                sections.append(load_section(name).render(data).rstrip() + "\n")
            except Exception as exc:  # a broken renderer must not lose the other sections
                sections.append(f"## {name}\n\n(render failed: {type(exc).__name__}: {exc})\n")
        else:
            sections.append(f"## {name}\n\n(no tools/bench_{name}.py to render {files[name].name})\n")
    text = header(command, metas, results_dir) + "\n" + "\n".join(sections)
    tmp = markdown.with_suffix(".md.tmp")
    markdown.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    os.replace(tmp, markdown)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    known = discover()
    ap.add_argument("--sections", default=",".join(known),
                    help=f"comma-separated sections to run (found: {', '.join(known)}; default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run; results in .cache/bench_quick/")
    ap.add_argument("--render-only", action="store_true", help="only rebuild the Markdown from the JSON files")
    ap.add_argument("--results-dir", type=Path, default=None, help="default: bench_results/ (quick: .cache/bench_quick/)")
    ap.add_argument("--markdown", type=Path, default=None, help="default: BENCHMARKS.md (quick: .cache/bench_quick/BENCHMARKS.md)")
    args = ap.parse_args(argv)
    command = command_line(argv)
    out_dir = args.results_dir or (QUICK_DIR if args.quick else RESULTS)
    md = args.markdown or ((QUICK_DIR / "BENCHMARKS.md") if args.quick else MARKDOWN)
    if args.quick and out_dir == QUICK_DIR:
        QUICK_DIR.parent.mkdir(parents=True, exist_ok=True)
        gi = QUICK_DIR.parent / ".gitignore"
        if not gi.exists():
            gi.write_text("*\n")
    if not args.render_only:
        chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in known]
        if unknown:
            ap.error(f"unknown section(s) {', '.join(unknown)}; found: {', '.join(known)}")
        t0 = time.perf_counter()
        for name in chosen:
            run_section(name, args.quick, out_dir, command)
        print(f"== all sections: {time.perf_counter() - t0:.0f} s", flush=True)
    render_all(out_dir, md, command)
    print(f"== wrote {md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
