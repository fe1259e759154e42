"""Concrete inputs for a model whose inputs may have dynamic dimensions.

Timing and verification need real shapes. A leading dynamic dimension is the batch and
defaults to 1; any other dynamic dimension (height, width, sequence) cannot be guessed, so
the user names it with ``--input-shape NAME:1x3x224x224`` or gives calibration data, and
otherwise gets a one-line error saying exactly that.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import onnx

from .errors import InputError

_NP_OF_ONNX = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


#: Largest input we ever synthesise (elements): a declared dim of 2**62 is a hostile or broken
#: model, and numpy would fail deep inside with an unreadable error (or exhaust memory).
MAX_FEED_ELEMENTS = 2**31


def _check_size(name: str, shape: tuple[int, ...]) -> None:
    count = 1
    for d in shape:
        count *= int(d)
    if count > MAX_FEED_ELEMENTS:
        raise InputError(f"input {name!r} of shape {'x'.join(map(str, shape))} has {count} elements, more than "
                         f"{MAX_FEED_ELEMENTS} this tool will synthesise; pass --input-shape {name}:DIMS with real sizes")


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (legacy models list weights as inputs too)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def parse_input_shapes(specs: list[str] | None, model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` (or ``1x3x224x224`` for single-input models)."""
    out: dict[str, tuple[int, ...]] = {}
    inputs = [i.name for i in real_inputs(model)]
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        if not name:
            if len(inputs) != 1:
                raise InputError(f"--input-shape {spec!r}: the model has {len(inputs)} inputs; write NAME:DIMS")
            name = inputs[0]
        if name not in inputs:
            raise InputError(f"--input-shape {spec!r}: model has no input {name!r} (inputs: {', '.join(inputs)})")
        if not re.fullmatch(r"\d+(x\d+)*", dims) or any(int(d) <= 0 for d in dims.split("x")):
            raise InputError(f"--input-shape {spec!r}: dimensions must look like 1x3x224x224")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def resolve_shapes(
    model: onnx.ModelProto,
    overrides: Mapping[str, tuple[int, ...]] | None = None,
    batch: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every real input: overrides first, then static dims, batch for dim 0."""
    overrides = dict(overrides or {})
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in real_inputs(model):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            if vi.name in overrides:
                shapes[vi.name] = overrides[vi.name]
                continue
            raise InputError(f"input {vi.name!r} has no declared shape; pass --input-shape {vi.name}:DIMS")
        dims = tt.shape.dim
        if vi.name in overrides:
            given = overrides[vi.name]
            if len(given) != len(dims):
                raise InputError(f"--input-shape for {vi.name!r} has {len(given)} dims, the model declares {len(dims)}")
            for i, (g, d) in enumerate(zip(given, dims)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != g:
                    raise InputError(f"--input-shape for {vi.name!r}: dim {i} is fixed to {d.dim_value} in the model, got {g}")
            shapes[vi.name] = tuple(given)
            continue
        concrete: list[int] = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                concrete.append(int(d.dim_value))
            elif i == 0:
                concrete.append(batch or 1)
            else:
                label = d.dim_param or "?"
                raise InputError(
                    f"input {vi.name!r} has dynamic dim {i} ({label}); pass --input-shape "
                    f"{vi.name}:{'x'.join(str(x.dim_value) if x.dim_value > 0 else 'N' for x in dims)} with numbers"
                )
        if batch and concrete:
            concrete[0] = batch if not (dims[0].HasField("dim_value") and dims[0].dim_value > 0) else concrete[0]
        shapes[vi.name] = tuple(concrete)
    for name, shape in shapes.items():
        _check_size(name, shape)
    return shapes


def input_dtype(vi: onnx.ValueInfoProto) -> type:
    et = vi.type.tensor_type.elem_type
    if et not in _NP_OF_ONNX:
        raise InputError(f"input {vi.name!r} has element type {onnx.TensorProto.DataType.Name(et)}, which is not supported")
    return _NP_OF_ONNX[et]


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal for float inputs, zeros for integer/bool inputs."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for vi in real_inputs(model):
        dt = input_dtype(vi)
        shape = shapes[vi.name]
        if np.issubdtype(dt, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
        else:
            feeds[vi.name] = np.zeros(shape, dtype=dt)
    return feeds


def check_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> None:
    """User-provided arrays must match the inputs' names, ranks and fixed dims."""
    for vi in real_inputs(model):
        if vi.name not in feeds:
            raise InputError(f"calibration data has no array for input {vi.name!r}")
        arr = feeds[vi.name]
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and arr.ndim != len(dims):
            raise InputError(f"array for {vi.name!r} has {arr.ndim} dims, the model expects {len(dims)}")
        for i, d in enumerate(dims):
            if i > 0 and d.HasField("dim_value") and d.dim_value > 0 and arr.shape[i] != d.dim_value:
                raise InputError(f"array for {vi.name!r} has shape {arr.shape}; dim {i} must be {d.dim_value}")
