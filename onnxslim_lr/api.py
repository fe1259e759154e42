"""The Python API, mirroring the CLI one-to-one.

>>> import onnxslim_lr as lr
>>> result = lr.compress("model.onnx", method="tucker2", rank_ratio=0.25)   # doctest: +SKIP
>>> lr.save(result, "fast.onnx")                                           # doctest: +SKIP
>>> print(lr.format_report(result))                                         # doctest: +SKIP

Every keyword has the meaning of the CLI flag of the same name (``--rank-ratio`` is
``rank_ratio``); method-specific options go in ``method_options``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from . import data as data_mod
from . import options as options_mod
from .budget_search import Contract
from .errors import InputError
from .feeds import parse_input_shapes, real_inputs, resolve_shapes, random_feeds
from .modelio import check_supported, load_model, save_model
from .manager import CompressResult, Options, compress as _compress
from .passes.base import Budget
from .progress import SILENT, Progress
from .timing import Timing, cuda_available, make_session, time_models

log = logging.getLogger(__name__)

#: the budget used with calibration data when the user gives no rank rule, guard or budget:
#: the rewritten model's top-1 agrees with the original's on 99 % of held-out calibration samples
DEFAULT_MIN_AGREEMENT = 0.99


def check_threads(threads: int | None) -> None:
    """``threads`` must be 1 .. the machine's cores: thousands of runtime threads hang for minutes."""
    options_mod.check({"threads": threads})


def check_seed(seed: int) -> None:
    """Seeds are non-negative integers below 2**32 (what every numpy generator accepts)."""
    options_mod.check({"seed": seed})


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
    """A validated Budget; invalid values raise InputError with the flag's name.

    The bounds are the option schema's (:mod:`onnxslim_lr.options`), the same the CLI applies.
    Method options are taken as given here (:func:`compress` checks them against the methods).
    """
    v = options_mod.check({"rank_ratio": rank_ratio, "energy": energy, "target_speedup": target_speedup,
                           "metric": metric, "seed": seed})
    return Budget(rank_ratio=v["rank_ratio"], energy=v["energy"], target_speedup=v["target_speedup"],
                  metric=v["metric"] or "frobenius", options=dict(method_options or {}), seed=v["seed"])


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
    specs = data_mod.input_specs(model)
    arrays = data_mod.validate_inputs(arrays, specs, what="calibration data")
    return list(data_mod.batches(arrays, data_mod.fixed_batch(specs) or batch_size))


def _image_geometry(source: str | os.PathLike[str], model: onnx.ModelProto) -> tuple[Any, Any, str]:
    if not Path(source).is_dir():
        return None, None, "NCHW"
    specs = data_mod.input_specs(model)
    if len(specs) != 1:
        raise InputError("an image folder can only feed a single-input model")
    return data_mod.image_options_from_spec(specs[0])


#: what a run without calibration data costs, and how to give data (shown once, as a warning)
NO_DATA_WARNING = (
    "no calibration data (--calib): ranks are chosen from the weights alone, which on trained models "
    "usually means little or no compression at a safe error, and fidelity can only be measured on random "
    "inputs, which says little about accuracy. Give a few hundred representative inputs: "
    "--calib FILE.npz (arrays keyed by input name, or x) or --calib IMAGE_FOLDER"
)

#: random inputs the fidelity is measured on when no calibration data is given (held out from
#: the one sample the layers were planned on: seeds seed+1 .. seed+N)
SYNTHETIC_SAMPLES = 8


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
    image_mean: float | Sequence[float] = 0.0,
    image_std: float | Sequence[float] = 1.0,
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
    quantize: str = "none",
    eval: Any = None,
    reconstruct: str | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Rewrite a model; see :mod:`onnxslim_lr.manager` for what happens, in order.

    **Accuracy budget** (:mod:`onnxslim_lr.budgeting`): with ``max_accuracy_drop`` (points of
    top-1; labels from ``eval``, or ``y`` in the calibration file), ``min_agreement`` (top-1
    agreement with the original) or -- without a rank rule -- ``max_output_error``, the
    fastest plan within the budget is searched for instead of applying a rank rule. With
    calibration data and no rank rule, no guard and no budget, the default budget
    :data:`DEFAULT_MIN_AGREEMENT` applies. ``quantize="int8"`` adds static int8 quantization,
    planned under the same budget.

    ``reconstruct`` (:mod:`onnxslim_lr.reconstruction`): ``"sequential"`` (the default with
    ``calib``), ``"independent"`` or ``"none"`` (the default without): refit the chosen
    rewrites from calibration moments, keeping a refit only where it is better on held-out
    samples.

    Every keyword is validated by the option schema shared with the CLI; ``method_options``
    are checked against the selected methods' declared options and parsed by their types.
    ``progress`` receives phases, steps and warnings (the default reports nothing). Without
    ``calib``, a warning says what that costs, and the fidelity is measured on
    :data:`SYNTHETIC_SAMPLES` random inputs (``result.fidelity_source`` says so).

    ``timing_batch``: the batch every timing (layer and end to end) runs at -- set it to the
    deployment batch. It fills a dynamic leading dimension of the sample input, or, with
    ``calib``, sets the calibration batch size (the first batch is the timing sample).
    """
    prog = progress if progress is not None else SILENT
    v = options_mod.check({
        "rank_ratio": rank_ratio, "energy": energy, "target_speedup": target_speedup, "metric": metric,
        "min_speedup": min_speedup, "allow_slower": bool(allow_slower), "threads": threads,
        "max_layer_error": max_layer_error, "min_top1": min_top1, "max_output_error": max_output_error,
        "calib_limit": calib_limit, "input_shape": None if isinstance(input_shape, Mapping) else input_shape,
        "image_mean": image_mean, "image_std": image_std, "only": only, "skip": skip, "fold": bool(fold),
        "upgrade_opset": bool(upgrade_opset), "seed": seed, "timing_batch": timing_batch,
        "max_accuracy_drop": max_accuracy_drop, "min_agreement": min_agreement, "quantize": quantize,
        "reconstruct": reconstruct,
    })
    if calib_batch < 1:
        raise InputError(f"calib_batch must be >= 1, got {calib_batch}")
    methods = options_mod.method_names(method)
    method_options = options_mod.check_method_options(method_options, methods)
    m = _as_model(model)
    if metric is None:
        # with calibration data the data metric is strictly better for accuracy at equal ranks
        # (measured: svd at rank ratio 0.5 on the zoo VGG, -0.8 pts against -7.5 pts)
        metric = "data" if calib is not None else "frobenius"
    budget = make_budget(rank_ratio=v["rank_ratio"], energy=v["energy"], target_speedup=v["target_speedup"],
                         metric=metric, method_options=method_options, seed=v["seed"])
    if isinstance(input_shape, Mapping):
        shapes = {k: tuple(int(d) for d in dims) for k, dims in input_shape.items()}
    else:
        shapes = parse_input_shapes(list(v["input_shape"] or []), m)
    if timing_batch is not None:
        calib_batch, shapes = _with_timing_batch(m, shapes, timing_batch, calib is None, calib_batch)
    batches = None
    if calib is not None:
        prog.phase("calibration data", str(calib) if isinstance(calib, (str, os.PathLike)) else "arrays")
        batches = load_calibration(calib, m, batch_size=calib_batch, limit=v["calib_limit"],
                                   image_mean=v["image_mean"], image_std=v["image_std"])
    else:
        prog.warn(NO_DATA_WARNING)
    budget = _load_data_options(budget, m)
    rule_given = any(v[k] is not None for k in ("rank_ratio", "energy", "target_speedup"))
    contract = Contract.from_options(
        max_accuracy_drop=v["max_accuracy_drop"], min_agreement=v["min_agreement"],
        max_output_error=v["max_output_error"] if (not rule_given and calib is not None) else None)
    if contract is not None and rule_given:
        raise InputError("an accuracy budget (--max-accuracy-drop, --min-agreement) replaces the rank rules: "
                         "give one or the other")
    if (contract is None and calib is not None and not rule_given and v["min_top1"] is None
            and v["max_output_error"] is None and methods == ["auto"] and not method_options):
        contract = Contract("agreement", DEFAULT_MIN_AGREEMENT)
    if contract is not None and calib is None:
        raise InputError("an accuracy budget needs calibration data (--calib FILE)")
    if v["quantize"] == "int8" and calib is None:
        raise InputError("--quantize int8 needs calibration data (--calib FILE)")
    calib_labels = eval_batches = eval_labels = None
    if contract is not None and contract.kind == "accuracy":
        if eval is not None:
            ex, ey = load_eval(eval, m, image_mean=v["image_mean"], image_std=v["image_std"])
            if ey is None:
                raise InputError(f"{eval}: --max-accuracy-drop needs labels (y) in the eval data")
            eval_batches, eval_labels = _batches_of(m, ex, calib_batch), ey
        elif isinstance(calib, (str, os.PathLike)):
            _, cy = load_eval(calib, m, limit=v["calib_limit"], image_mean=v["image_mean"], image_std=v["image_std"])
            if cy is None:
                raise InputError("--max-accuracy-drop needs labels: an --eval file with y, or y in the --calib file")
            calib_labels = cy
        else:
            raise InputError("--max-accuracy-drop needs labels: an --eval file with y, or y in the --calib file")
    opts = Options(
        methods=methods, budget=budget, min_speedup=v["min_speedup"], allow_slower=v["allow_slower"], fold=v["fold"],
        input_shapes=shapes, calib=batches, threads=v["threads"], only_nodes=v["only"], skip_nodes=v["skip"] or (),
        max_layer_error=v["max_layer_error"], min_top1=v["min_top1"], max_output_error=v["max_output_error"],
        end_to_end=end_to_end, upgrade_opset=v["upgrade_opset"], seed=v["seed"], progress=prog,
        contract=contract, calib_labels=calib_labels, eval_batches=eval_batches, eval_labels=eval_labels,
        quantize=v["quantize"],
        reconstruct=v["reconstruct"],  # None: the manager's default (sequential with --calib)
    )
    result = _compress(m, opts)
    if batches is not None:
        result.fidelity_source = f"{sum(_batch_len(b) for b in batches)} calibration samples"
        if result.fidelity is not None:
            result.fidelity_source = f"{result.fidelity.samples} calibration samples"
    elif result.changed:
        prog.phase("fidelity", f"{SYNTHETIC_SAMPLES} synthetic inputs")
        feeds = [random_feeds(m, result.feeds_shapes, seed=v["seed"] + 1 + i) for i in range(SYNTHETIC_SAMPLES)]
        try:
            from .verify import compare_outputs

            result.fidelity = compare_outputs(m, result.model, feeds, threads=v["threads"])
        except Exception as exc:  # the runtime refusing the input as written: keep the pipeline's figure
            log.info("fidelity on synthetic inputs failed (%s); keeping the sample's", exc)
        n = result.fidelity.samples if result.fidelity is not None else 0
        result.fidelity_source = f"{n} synthetic inputs (random, not an accuracy estimate)"
    return result


def _batches_of(model: onnx.ModelProto, x: np.ndarray, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Feed dicts of ``x`` for a single-input model (its fixed batch, when it has one)."""
    return load_calibration(x, model, batch_size=batch_size, limit=None)


def _batch_len(feeds: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0]) if feeds else 0


def _load_data_options(budget: Budget, model: onnx.ModelProto) -> Budget:
    """Method options naming calibration data (``PassOption.data``) loaded into feed dicts.

    Passes never read files or run sessions: the data service streams what they declare,
    and a path given for one statistic only (``--perforation-calib``) is loaded here.
    """
    from dataclasses import replace

    from .passes import registry

    loaded = dict(budget.options)
    for cls in registry().values():
        for opt in cls.options:
            value = loaded.get(opt.key)
            if opt.data and value is not None and isinstance(value, (str, os.PathLike, Mapping, np.ndarray)):
                loaded[opt.key] = load_calibration(value, model, limit=opt.data_limit)
    return replace(budget, options=loaded)


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
         input_path: str | os.PathLike[str] | None = None, reads: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Write the (rewritten) model atomically; never over ``input_path`` or any file in ``reads``."""
    model = result.model if isinstance(result, CompressResult) else result
    save_model(model, path, input_path=input_path, reads=reads)


def format_report(result: CompressResult, *, full: bool = False) -> str:
    """The report the CLI prints: rewritten layers, reasons with counts, end-to-end figures
    (every layer with ``full``)."""
    from .report import report_lines

    return "\n".join(report_lines(result, full=full))


def accuracy(model: onnx.ModelProto | str | os.PathLike[str], x: np.ndarray, y: np.ndarray, *,
             batch_size: int = 256, threads: int | None = None) -> float:
    """Top-1 accuracy of a single-input classifier on labelled data."""
    m = _as_model(model)
    check_threads(threads)
    batch_size = _batch_for(m, batch_size)
    sess = make_session(m, threads=threads)
    name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), batch_size):
        out = sess.run(None, {name: x[start:start + batch_size]})[0]
        data_mod.check_labels(y[start:start + batch_size], int(np.prod(out.shape[1:])) if out.ndim > 1 else None)
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
    check_threads(threads)
    check_seed(seed)
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
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
    x = data_mod.validate_inputs({names[0]: x}, data_mod.input_specs(model), what="eval data")[names[0]]
    if y is not None:
        data_mod.check_labels(y, _declared_classes(model))
    return x, y


def _declared_classes(model: onnx.ModelProto) -> int | None:
    """Class count of a classifier-shaped first output (N, C), when C is declared."""
    if not model.graph.output:
        return None
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
        return int(dims[1].dim_value)
    return None


def _batch_for(model: onnx.ModelProto, wanted: int) -> int:
    """Feed batches of the model's fixed batch size when it has one (torch exports: 1)."""
    return data_mod.fixed_batch(data_mod.input_specs(model)) or wanted


def fidelity_on(original: onnx.ModelProto, rewritten: onnx.ModelProto, x: np.ndarray, *,
                batch_size: int = 256, threads: int | None = None):  # -> Fidelity
    """Output agreement of two single-input models on an array of inputs."""
    from .verify import compare_outputs

    check_threads(threads)
    batch_size = _batch_for(original, batch_size)
    name = real_inputs(original)[0].name
    batches = [{name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)]
    return compare_outputs(original, rewritten, batches, threads=threads)
