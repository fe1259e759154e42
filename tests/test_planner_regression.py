"""The refactor to ladders + planner changed no decision: the ranks chosen on the bundled models.

The expected parameters were recorded by running the code before the refactor (main at
0039531) with the same calls: ``method="auto"``, ``allow_slower=True`` (so measured timing
plays no part: the fewest MACs win among candidates), no end-to-end timing, the default
energy rule or ``rank_ratio=0.5``, and once with 64 calibration images (the data metric).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxslim_lr as lr

MODELS = Path(__file__).resolve().parents[1] / "models"

#: (model, rank_ratio or None for the default energy rule, with calibration data) ->
#: node -> "method params", as main chose them before the refactor
EXPECTED: dict[tuple[str, float | None, bool], dict[str, str]] = {
    ('resnet_fmnist', None, False): {
        '/fc/Gemm': 'fc-svd rank=10,full=10',
        '/layers/layers.0/conv1/Conv': 'svd rank=30,full=32',
        '/layers/layers.0/conv2/Conv': 'svd rank=31,full=32',
        '/layers/layers.1/conv1/Conv': 'svd rank=60,full=64',
        '/layers/layers.1/conv2/Conv': 'svd rank=61,full=64',
        '/layers/layers.1/shortcut/shortcut.0/Conv': 'svd rank=29,full=32',
        '/layers/layers.2/conv1/Conv': 'svd rank=120,full=128',
        '/layers/layers.2/conv2/Conv': 'svd rank=121,full=128',
        '/layers/layers.2/shortcut/shortcut.0/Conv': 'svd rank=56,full=64',
        '/layers/layers.3/conv1/Conv': 'svd rank=122,full=128',
        '/layers/layers.3/conv2/Conv': 'svd rank=121,full=128',
        '/stem/stem.0/Conv': 'spatial rank=3,full=3',
    },
    ('resnet_fmnist', 0.5, False): {
        '/fc/Gemm': 'fc-svd rank=5,full=10',
        '/layers/layers.0/conv1/Conv': 'tucker2 r_out=16,r_in=16',
        '/layers/layers.0/conv2/Conv': 'tucker2 r_out=16,r_in=16',
        '/layers/layers.1/conv1/Conv': 'tucker2 r_out=32,r_in=16',
        '/layers/layers.1/conv2/Conv': 'tucker2 r_out=32,r_in=32',
        '/layers/layers.1/shortcut/shortcut.0/Conv': 'svd rank=16,full=32',
        '/layers/layers.2/conv1/Conv': 'tucker2 r_out=64,r_in=32',
        '/layers/layers.2/conv2/Conv': 'tucker2 r_out=64,r_in=64',
        '/layers/layers.2/shortcut/shortcut.0/Conv': 'svd rank=32,full=64',
        '/layers/layers.3/conv1/Conv': 'tucker2 r_out=64,r_in=64',
        '/layers/layers.3/conv2/Conv': 'tucker2 r_out=64,r_in=64',
        '/stem/stem.0/Conv': 'spatial rank=2,full=3',
    },
    ('vgg_fmnist', None, False): {
        '/0/0.0/Conv': 'svd rank=8,full=9',
        '/0/0.10/Conv': 'svd rank=122,full=128',
        '/0/0.14/Conv': 'svd rank=239,full=256',
        '/0/0.17/Conv': 'svd rank=244,full=256',
        '/0/0.3/Conv': 'svd rank=60,full=64',
        '/0/0.7/Conv': 'svd rank=119,full=128',
        '/3/Gemm': 'fc-svd rank=179,full=256',
        '/6/Gemm': 'fc-svd rank=10,full=10',
    },
    ('vgg_fmnist', None, True): {
        '/0/0.0/Conv': 'svd rank=6,full=9',
        '/0/0.10/Conv': 'svd rank=61,full=128',
        '/0/0.14/Conv': 'svd rank=102,full=256',
        '/0/0.17/Conv': 'svd rank=134,full=256',
        '/0/0.3/Conv': 'svd rank=19,full=64',
        '/0/0.7/Conv': 'svd rank=40,full=128',
        '/3/Gemm': 'fc-svd rank=10,full=256',
        '/6/Gemm': 'fc-svd rank=9,full=10',
    },
    ('vgg_fmnist', 0.5, False): {
        '/0/0.0/Conv': 'svd rank=5,full=9',
        '/0/0.10/Conv': 'tucker2 r_out=64,r_in=64',
        '/0/0.14/Conv': 'tucker2 r_out=128,r_in=64',
        '/0/0.17/Conv': 'tucker2 r_out=128,r_in=128',
        '/0/0.3/Conv': 'tucker2 r_out=32,r_in=32',
        '/0/0.7/Conv': 'tucker2 r_out=64,r_in=32',
        '/3/Gemm': 'fc-svd rank=128,full=256',
        '/6/Gemm': 'fc-svd rank=5,full=10',
    },
    ('zfnet_fmnist', None, False): {
        '/0/0.0/Conv': 'spatial rank=21,full=21',
        '/0/0.11/Conv': 'svd rank=183,full=192',
        '/0/0.14/Conv': 'svd rank=123,full=128',
        '/0/0.4/Conv': 'tucker2 r_out=121,r_in=62',
        '/0/0.8/Conv': 'svd rank=180,full=192',
        '/3/Gemm': 'fc-svd rank=223,full=256',
        '/6/Gemm': 'fc-svd rank=10,full=10',
    },
    ('zfnet_fmnist', 0.5, False): {
        '/0/0.0/Conv': 'tucker2 r_out=32,r_in=2',
        '/0/0.11/Conv': 'tucker2 r_out=96,r_in=96',
        '/0/0.14/Conv': 'tucker2 r_out=64,r_in=96',
        '/0/0.4/Conv': 'tucker2 r_out=64,r_in=32',
        '/0/0.8/Conv': 'tucker2 r_out=96,r_in=64',
        '/3/Gemm': 'fc-svd rank=128,full=256',
        '/6/Gemm': 'fc-svd rank=5,full=10',
    },
}


def _cases() -> list:
    """VGG in the default suite; ResNet and ZFNet (another minute) behind ``slow``."""
    return [pytest.param(*k, marks=() if k[0] == "vgg_fmnist" else pytest.mark.slow) for k in sorted(EXPECTED, key=str)]


@pytest.mark.parametrize("model,ratio,calib", _cases(), ids=lambda v: str(v))
def test_chosen_ranks_on_the_bundled_models_are_unchanged(model: str, ratio: float | None, calib: bool) -> None:
    path = MODELS / f"{model}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    x = np.load(MODELS / "fmnist_calib.npz")["x"][:64] if calib else None
    # the energy rule stated explicitly: with calibration data and no rule the default is now
    # the accuracy budget (budgeting.py), which this regression is not about
    energy = 0.98 if ratio is None else None
    res = lr.compress(str(path), method="auto", rank_ratio=ratio, energy=energy, allow_slower=True, end_to_end=False,
                      calib=x)
    got = {r.node: f"{r.method} {r.params}" for r in res.layers}
    assert all(r.status == "rewritten" for r in res.layers)
    assert got == EXPECTED[(model, ratio, calib)]
