"""tools/bench_planning.py: parsing of /usr/bin/time -v and of the CLI's phase log, and the table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_planning  # noqa: E402

LOG = """[    0.0s] load: m.onnx (1.0 MB)
[    6.6s] fold
[   27.1s] plan: 19 layers
[   27.1s] plan layer 1/19 (n0)
[  478.7s] plan layer 19/19 (n44)
[  483.7s] write: out.onnx (unchanged copy of the input)
\tUser time (seconds): 238.84
\tElapsed (wall clock) time (h:mm:ss or m:ss): 8:07.89
\tMaximum resident set size (kbytes): 5333368
"""


def test_plan_end_is_the_first_phase_after_plan() -> None:
    assert bench_planning._plan_end(LOG) == 483.7
    assert bench_planning._plan_end(LOG.split("[  483.7s]")[0]) is None  # killed while planning


def test_time_v_fields() -> None:
    assert bench_planning._wall(bench_planning._time_v(LOG, "Elapsed (wall clock) time (h:mm:ss or m:ss)")) == 487.89
    assert bench_planning._wall("1:02:03") == 3723.0
    assert bench_planning._time_v(LOG, "Maximum resident set size (kbytes)") == "5333368"


def test_render_has_one_row_per_run() -> None:
    rows = [{"model": "vgg19", "run": "default", "wall_s": 100.0, "plan_end_s": 90.0, "user_s": 50.0, "sys_s": 10.0,
             "max_rss_mb": 3000, "load": [1.0, 1.0, 1.0, 2.0, 1.0, 1.0], "rc": 0}]
    md = bench_planning.render({"rows": rows})
    assert md.startswith("## " + bench_planning.TITLE)
    assert "| vgg19 | `default` | - | 100 | 90 | 60 (50+10) | 3000 | 1.0 -> 2.0 | 0 |" in md
