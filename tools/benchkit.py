"""Pieces shared by the benchmark sections (``tools/bench_<name>.py``).

* the typical 3x3 conv layers (:class:`Layer`, :data:`LAYERS`) and the one-Conv model
  builders (:func:`conv_model`, :func:`one_conv_model`);
* :func:`rel_error`, the relative output error of a rewrite;
* :func:`timing_threads`, the thread counts a section times at;
* the Markdown helpers :func:`fmt` and :func:`md_table`;
* :func:`save_results`, the JSON writer of the standalone entry points.

Not a section: its name does not match ``bench_*.py``, so ``tools/bench.py`` does not discover
it. It imports no section and not ``bench`` (the driver imports the sections, which import this).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


# ---- typical layers and one-Conv models ----------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A square conv layer, stride 1: ``C -> F`` channels on an ``H x H`` map, ``k x k``, pad ``pad``."""

    name: str
    C: int
    F: int
    H: int
    k: int = 3
    pad: int = 1

    @property
    def macs(self) -> int:
        return self.F * self.C * self.k * self.k * self.H * self.H

    def describe(self) -> str:
        return f"{self.k}x{self.k} {self.C}->{self.F} @{self.H}x{self.H}"


#: VGG-style 3x3 layers (pad 1, stride 1) at four widths
LAYERS = (
    Layer("3x3_64_112", 64, 64, 112),
    Layer("3x3_128_56", 128, 128, 56),
    Layer("3x3_256_56", 256, 256, 56),
    Layer("3x3_512_28", 512, 512, 28),
)
QUICK_LAYERS = ("3x3_128_56", "3x3_256_56")


def one_conv_model(name: str, C: int, F: int, H: int, k: int, pad: int, *, seed_key: Sequence[int],
                   stride: int | None = None, opset: int = 17, producer: str = "benchkit") -> onnx.ModelProto:
    """A single Conv (with bias) on input ``x: 1 x C x H x H``, seeded He-scaled Gaussian weights.

    ``seed_key`` seeds ``np.random.default_rng``; ``stride=None`` leaves the ``strides``
    attribute out (stride 1).
    """
    rng = np.random.default_rng(list(seed_key))
    fan_in = C * k * k
    w = (rng.standard_normal((F, C, k, k)) * math.sqrt(2.0 / fan_in)).astype(np.float32)
    b = (rng.standard_normal(F) * 0.01).astype(np.float32)
    attrs: dict[str, Any] = {"kernel_shape": [k, k], "pads": [pad] * 4}
    if stride is not None:
        attrs["strides"] = [stride] * 2
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    o = (H + 2 * pad - k) // (stride or 1) + 1
    graph = helper.make_graph(
        [node], f"conv_{name}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, F, o, o])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = 8
    return model


def conv_model(layer: Layer, seed: int = 0, *, producer: str = "benchkit") -> onnx.ModelProto:
    """The one-Conv model of a :class:`Layer` (opset 17, static shape, batch 1)."""
    return one_conv_model(layer.name, layer.C, layer.F, layer.H, layer.k, layer.pad,
                          seed_key=[seed, layer.C, layer.F, layer.H], producer=producer)


def load_zoo_vgg(quick: bool, path: Path | None = None) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, float] | str:
    """The trained zoo VGG, its test images/labels (500 in quick mode) and its accuracy.

    Returns the reason to skip (a string) when the model or the test set is missing, so the
    end-to-end sections of several benchmarks load and score the original the same way.
    """
    import onnxslim_lr as lr

    path = path or ROOT / "models" / "vgg_fmnist.onnx"
    test = ROOT / "models" / "fmnist_test2k.npz"
    if not path.exists() or not test.exists():
        try:
            shown = str(path.relative_to(ROOT))
        except ValueError:
            shown = str(path)
        return f"{shown} not found (the zoo model is trained by tools/train_zoo.py)"
    model = lr.load_model(path)
    data = np.load(test)
    x, y = data["x"].astype(np.float32), data["y"]
    if quick:
        x, y = x[:500], y[:500]
    return model, x, y, lr.accuracy(model, x, y)


def rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    """``||ref - got|| / ||ref||`` in float64."""
    ref64 = ref.astype(np.float64)
    return float(np.linalg.norm(ref64 - got) / np.linalg.norm(ref64))


# ---- timing --------------------------------------------------------------------------------


def timing_threads() -> list[int]:
    """All cores (as asked), and 1 thread: on a shared box a 2-thread onnxruntime session
    stalls whenever one of its threads is descheduled, one thread does not."""
    return sorted({os.cpu_count() or 1, 1}, reverse=True)


# ---- Markdown ------------------------------------------------------------------------------


def fmt(x: Any, fmt: str = "{:.2f}", none: str = "-") -> str:
    """``x`` formatted, or ``none`` for None."""
    return none if x is None else fmt.format(x)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---- standalone entry points ---------------------------------------------------------------


def save_results(name: str, results: dict[str, Any], *, trailing_newline: bool = True) -> Path:
    """Write ``bench_results/<name>.json`` atomically (what a section's standalone ``main`` does)."""
    out_dir = ROOT / "bench_results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float) + ("\n" if trailing_newline else ""))
    os.replace(tmp, path)
    return path
