"""The Python API, mirroring the CLI one-to-one.

>>> import onnxslim_lr as lr
>>> result = lr.compress("model.onnx", method="tucker2", rank_ratio=0.25)   # doctest: +SKIP
>>> lr.save(result, "fast.onnx")                                           # doctest: +SKIP
>>> print(lr.format_report(result))                                         # doctest: +SKIP

Every keyword has the meaning of the CLI flag of the same name (``--rank-ratio`` is
``rank_ratio``); method-specific options go in ``method_options``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from . import data as data_mod
from .errors import InputError
from .feeds import parse_input_shapes, real_inputs, resolve_shapes, random_feeds
from .graph import check_supported, load_model, save_model
from .manager import CompressResult, Options, compress as _compress
from .passes.base import Budget
from .report import layer_table, summary_lines
from .timing import Timing, cuda_available, make_session, time_models

def _as_model(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    """A loaded, supported model (in-memory models get the same opset check as files)."""
    if isinstance(model, onnx.ModelProto):
        check_supported(model)
        return model
    return load_model(model)


def make_budget(
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    target_speedup: float | None = None,
    metric: str = "frobenius",
    method_options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> Budget:
    """A validated Budget; invalid values raise InputError with the flag's name."""
    given = [n for n, v in (("--rank-ratio", rank_ratio), ("--energy", energy), ("--target-speedup", target_speedup)) if v is not None]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)} are mutually exclusive: give one rank rule")
    if rank_ratio is not None and not (0.0 < rank_ratio <= 1.0 and math.isfinite(rank_ratio)):
        raise InputError(f"--rank-ratio must be in (0, 1], got {rank_ratio}")
    if energy is not None and not (0.0 < energy <= 1.0 and math.isfinite(energy)):
        raise InputError(f"--energy must be in (0, 1], got {energy}")
    if target_speedup is not None and not (target_speedup > 1.0 and math.isfinite(target_speedup)):
        raise InputError(f"--target-speedup must be a number > 1, got {target_speedup}")
    if metric not in ("frobenius", "data"):
        raise InputError(f"--metric must be 'frobenius' or 'data', got {metric!r}")
    return Budget(rank_ratio=rank_ratio, energy=energy, target_speedup=target_speedup, metric=metric,
                  options=dict(method_options or {}), seed=seed)


def load_calibration(
    source: str | os.PathLike[str] | Mapping[str, np.ndarray] | np.ndarray,
    model: onnx.ModelProto,
    *,
    batch_size: int = 16,
    limit: int | None = 512,
    image_mean: float | Sequence[float] = 0.0,
    image_std: float | Sequence[float] = 1.0,
) -> list[dict[str, np.ndarray]]:
    """Calibration batches (feed dicts) from a path (.npy/.npz/image folder) or arrays."""
    names = [i.name for i in real_inputs(model)]
    if isinstance(source, np.ndarray):
        if len(names) != 1:
            raise InputError(f"a single array was given but the model has {len(names)} inputs")
        arrays = {names[0]: source}
    elif isinstance(source, Mapping):
        arrays = dict(source)
    else:
        size, channels, layout = _image_geometry(source, model)
        arrays = data_mod.load_arrays(source, names, size=size, channels=channels, mean=image_mean,
                                      std=image_std, layout=layout)
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    if limit is not None:
        arrays = {k: v[:limit] for k, v in arrays.items()}
    arrays = data_mod.validate_inputs(arrays, data_mod.input_specs(model))
    return list(data_mod.batches(arrays, batch_size))


def _image_geometry(source: str | os.PathLike[str], model: onnx.ModelProto) -> tuple[Any, Any, str]:
    if not Path(source).is_dir():
        return None, None, "NCHW"
    specs = data_mod.input_specs(model)
    if len(specs) != 1:
        raise InputError("an image folder can only feed a single-input model")
    return data_mod.image_options_from_spec(specs[0])


def compress(
    model: onnx.ModelProto | str | os.PathLike[str],
    *,
    method: str | Sequence[str] = "auto",
    rank_ratio: float | None = None,
    energy: float | None = None,
    target_speedup: float | None = None,
    metric: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    calib: Any = None,
    calib_batch: int = 16,
    calib_limit: int | None = 512,
    input_shape: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    allow_slower: bool = False,
    min_speedup: float = 1.1,
    max_layer_error: float | None = None,
    min_top1: float | None = None,
    max_output_error: float | None = None,
    threads: int | None = None,
    timing_batch: int | None = None,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    fold: bool = True,
    end_to_end: bool = True,
    upgrade_opset: bool = True,
    seed: int = 0,
    progress: Any = None,
) -> CompressResult:
    """Rewrite a model; see :mod:`onnxslim_lr.manager` for what happens, in order.

    ``timing_batch``: the batch every timing (layer and end to end) runs at -- set it to the
    deployment batch. It fills a dynamic leading dimension of the sample input, or, with
    ``calib``, sets the calibration batch size (the first batch is the timing sample).
    """
    m = _as_model(model)
    methods = [method] if isinstance(method, str) else list(method)
    if min_speedup <= 0 or not math.isfinite(min_speedup):
        raise InputError(f"--min-speedup must be a positive number, got {min_speedup}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    if max_layer_error is not None and not max_layer_error > 0:
        raise InputError(f"--max-layer-error must be > 0, got {max_layer_error}")
    if min_top1 is not None and not (0.0 < min_top1 <= 1.0):
        raise InputError(f"--min-top1 must be in (0, 1], got {min_top1}")
    if max_output_error is not None and not max_output_error > 0:
        raise InputError(f"--max-output-error must be > 0, got {max_output_error}")
    if metric is None:
        # with calibration data the data metric is strictly better for accuracy at equal ranks
        # (measured: svd at rank ratio 0.5 on the zoo VGG, -0.8 pts against -7.5 pts)
        metric = "data" if calib is not None else "frobenius"
    budget = make_budget(rank_ratio=rank_ratio, energy=energy, target_speedup=target_speedup, metric=metric,
                         method_options=method_options, seed=seed)
    if isinstance(input_shape, Mapping):
        shapes = {k: tuple(int(d) for d in v) for k, v in input_shape.items()}
    else:
        shapes = parse_input_shapes(list(input_shape or []), m)
    if timing_batch is not None:
        calib_batch, shapes = _with_timing_batch(m, shapes, timing_batch, calib is None, calib_batch)
    batches = load_calibration(calib, m, batch_size=calib_batch, limit=calib_limit) if calib is not None else None
    opts = Options(
        methods=methods, budget=budget, min_speedup=min_speedup, allow_slower=allow_slower, fold=fold,
        input_shapes=shapes, calib=batches, threads=threads, only_nodes=only, skip_nodes=skip,
        max_layer_error=max_layer_error, min_top1=min_top1, max_output_error=max_output_error, end_to_end=end_to_end, upgrade_opset=upgrade_opset, seed=seed,
        progress=progress,
    )
    return _compress(m, opts)


def _with_timing_batch(m: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], batch: int, resolve: bool,
                       calib_batch: int) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(calibration batch size, input shapes) that make every timing run at ``batch``."""
    if batch < 1:
        raise InputError(f"--timing-batch must be >= 1, got {batch}")
    out = dict(shapes)
    for vi in real_inputs(m):
        dims = vi.type.tensor_type.shape.dim
        fixed = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
        if fixed is not None and fixed != batch:
            raise InputError(f"--timing-batch {batch}: input {vi.name!r} has a fixed batch of {fixed}")
        if vi.name in out and len(out[vi.name]):
            out[vi.name] = (batch, *out[vi.name][1:])
    if resolve:
        out = resolve_shapes(m, out, batch=batch)
    return batch, out


def save(result: CompressResult | onnx.ModelProto, path: str | os.PathLike[str], *,
         input_path: str | os.PathLike[str] | None = None) -> None:
    """Write the (rewritten) model atomically."""
    model = result.model if isinstance(result, CompressResult) else result
    save_model(model, path, input_path=input_path)


def format_report(result: CompressResult) -> str:
    return layer_table(result.layers) + "\n\n" + "\n".join(summary_lines(result))


def accuracy(model: onnx.ModelProto | str | os.PathLike[str], x: np.ndarray, y: np.ndarray, *,
             batch_size: int = 256, threads: int | None = None) -> float:
    """Top-1 accuracy of a single-input classifier on labelled data."""
    m = _as_model(model)
    sess = make_session(m, threads=threads)
    name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), batch_size):
        out = sess.run(None, {name: x[start:start + batch_size]})[0]
        correct += int(np.sum(np.argmax(out.reshape(out.shape[0], -1), axis=1) == y[start:start + batch_size]))
    return correct / max(len(x), 1)


def bench(
    models: Sequence[onnx.ModelProto | str | os.PathLike[str]],
    *,
    input_shape: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    batch: int | None = None,
    threads: int | None = None,
    provider: str = "CPUExecutionProvider",
    rounds: int = 15,
    max_rounds: int = 41,
    seed: int = 0,
) -> Timing:
    """Latency of one or more models on the same seeded inputs, interleaved, with an A/A control.

    ``timing.speedup(0, i)`` is model ``i``'s speedup over the first with its interval,
    ``timing.aa`` the A/A control (a second session of the first model). Rounds start at
    ``rounds`` and are added (up to ``max_rounds``) while a ratio's interval contains 1.
    """
    ms = [_as_model(m) for m in models]
    if provider == "CUDAExecutionProvider" and not cuda_available():
        raise InputError("CUDAExecutionProvider is not available (install onnxruntime-gpu in place of onnxruntime)")
    if isinstance(input_shape, Mapping):
        shapes_in = {k: tuple(int(d) for d in v) for k, v in input_shape.items()}
    else:
        shapes_in = parse_input_shapes(list(input_shape or []), ms[0])
    shapes = resolve_shapes(ms[0], shapes_in, batch=batch)
    feeds = random_feeds(ms[0], shapes, seed=seed)
    return time_models(ms, feeds, threads=threads, provider=provider, rounds=rounds, max_rounds=max_rounds,
                       max_total_s=60.0, decide_at=1.0 if len(ms) > 1 else None)


def load_eval(source: str | os.PathLike[str], model: onnx.ModelProto, *, limit: int | None = None,
              image_mean: float | Sequence[float] = 0.0, image_std: float | Sequence[float] = 1.0
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """Evaluation inputs and labels (None when the data has none) for a single-input model."""
    names = [i.name for i in real_inputs(model)]
    if len(names) != 1:
        raise InputError(f"--eval supports single-input models; this one has {len(names)} inputs")
    size, channels, layout = _image_geometry(source, model)
    x, y = data_mod.load_labelled(source, names, size=size, channels=channels, mean=image_mean, std=image_std, layout=layout)
    x = data_mod.validate_inputs({names[0]: x}, data_mod.input_specs(model))[names[0]]
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
    return x, y


def fidelity_on(original: onnx.ModelProto, rewritten: onnx.ModelProto, x: np.ndarray, *,
                batch_size: int = 256, threads: int | None = None):  # -> Fidelity
    """Output agreement of two single-input models on an array of inputs."""
    from .verify import compare_outputs

    name = real_inputs(original)[0].name
    batches = [{name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)]
    return compare_outputs(original, rewritten, batches, threads=threads)
