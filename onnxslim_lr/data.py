"""Loading the user's ``--calib`` and ``--eval`` data.

Calibration statistics and accuracy checks are only as good as the inputs fed to the
model, and the commonest failure is data that *almost* fits: a uint8 image batch given to a
float model, NHWC given to an NCHW model, a 28x28 test set for a 32x32 network. onnxruntime
reports these as long C++ errors from deep inside a run, so this module checks the data
once, up front, against the model's declared inputs and turns every mismatch into a
one-line :class:`~onnxslim_lr.errors.InputError`.

Three sources are accepted:

* ``.npy`` -- one array, fed to the model's only input;
* ``.npz`` -- one array per model input, keyed by input name (a single array under any key,
  conventionally ``x``, is accepted for single-input models); labels, when present, sit
  under ``y`` or ``labels``;
* a folder of images -- read with Pillow and preprocessed as described in
  :func:`preprocess_image`; labels come from class sub-folder names when the images are
  sorted into sub-folders.

Nothing here imports torch; Pillow is imported lazily so it stays an optional dependency.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from onnxslim_lr.errors import InputError

log = logging.getLogger(__name__)

#: npz keys that hold labels rather than model inputs.
LABEL_KEYS: tuple[str, ...] = ("y", "labels")

#: File name suffixes recognised as images in an image folder (lower case).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

#: Conventional key of the single input array in an ``.npz``.
DEFAULT_KEY = "x"


# --------------------------------------------------------------------------------------
# Input specifications and validation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """What one model input accepts.

    ``shape`` entries are ints for fixed dimensions and ``None`` for free ones (a symbolic
    batch dimension, say). ``dtype`` is the numpy dtype onnxruntime will insist on.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @property
    def rank(self) -> int:
        return len(self.shape)


def input_specs(model: Any) -> list[InputSpec]:
    """Return the :class:`InputSpec` of each real input of an ``onnx.ModelProto``.

    Graph inputs that are also initializers (old exporters list weights as inputs) are
    skipped: the user never feeds them.
    """
    import onnx  # core dependency; imported here so data.py stays cheap to import

    inits = {init.name for init in model.graph.initializer}
    specs: list[InputSpec] = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InputError(f"model input {value.name!r} is not a tensor; only tensor inputs are supported")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        dims: list[int | None] = []
        for dim in ttype.shape.dim:
            dims.append(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None)
        specs.append(InputSpec(value.name, tuple(dims), dtype))
    return specs


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def check_array(
    name: str,
    array: np.ndarray,
    *,
    rank: int | None = None,
    dtype: np.dtype | str | type | None = None,
    shape: Sequence[int | None] | None = None,
    cast_floats: bool = True,
) -> np.ndarray:
    """Check one array against what a model input expects and return it ready to feed.

    The checks exist because onnxruntime's own errors for these mistakes are hard to read
    and arrive only after a session is built. ``shape`` entries that are ``None`` match any
    size (a dynamic batch); giving ``shape`` implies its rank. A float array of another
    float width (the float64 numpy saves by default) is cast when ``cast_floats`` is true,
    since that loses nothing that matters for calibration; every other dtype mismatch,
    notably integer pixels given to a float model, means the data was not preprocessed and
    raises :class:`InputError`.
    """
    if not isinstance(array, np.ndarray):
        raise InputError(f"input {name!r}: expected a numpy array, got {type(array).__name__}")
    if shape is not None:
        rank = len(shape)
    if rank is not None and array.ndim != rank:
        want = _fmt_shape(shape) if shape is not None else f"rank {rank}"
        raise InputError(
            f"input {name!r}: expected {want}, got shape {tuple(array.shape)} (rank {array.ndim})"
        )
    if shape is not None:
        for axis, (want_dim, got_dim) in enumerate(zip(shape, array.shape)):
            if want_dim is not None and want_dim != got_dim:
                hint = ""
                if array.ndim == 4 and axis in (1, 3) and array.shape[3 if axis == 1 else 1] == want_dim:
                    hint = " (wrong layout? NCHW vs NHWC)"
                raise InputError(
                    f"input {name!r}: expected shape {_fmt_shape(shape)}, got {tuple(array.shape)}:"
                    f" axis {axis} is {got_dim}, not {want_dim}{hint}"
                )
    if dtype is not None:
        want_dt = np.dtype(dtype)
        if array.dtype != want_dt:
            if cast_floats and array.dtype.kind == "f" and want_dt.kind == "f":
                log.info("input %r: casting %s to %s", name, array.dtype, want_dt)
                array = array.astype(want_dt)
            else:
                hint = ""
                if array.dtype.kind in "ui" and want_dt.kind == "f":
                    hint = " (raw pixels? scale and normalise them as the model expects)"
                raise InputError(f"input {name!r}: expected dtype {want_dt}, got {array.dtype}{hint}")
    return array


def validate_inputs(
    arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], *, cast_floats: bool = True,
    what: str = "data",
) -> dict[str, np.ndarray]:
    """Check a feed dict against the model's inputs; return it with floats cast if needed.

    This is the one validation every calibration and eval array goes through before anything
    uses it: every spec must be fed, no unknown name may be present, all arrays must share the
    same leading (sample) size, since they are later sliced together by :func:`batches`, and
    the values must be usable (:func:`check_values`: finite, not constant).

    Axis 0 counts samples. A model with a fixed batch dimension (torch exports batch 1 by
    default) is fed in batches of exactly that size (:func:`fixed_batch`), so any number of
    samples that is a multiple of it is accepted.
    """
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"{what} has no array for model input(s) {missing}; it has {sorted(arrays)}")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise InputError(f"{what} has array(s) {extra} that match no model input {names}")
    out = {}
    for s in specs:
        shape = (None, *s.shape[1:]) if s.shape else s.shape
        out[s.name] = check_array(s.name, arrays[s.name], shape=shape, dtype=s.dtype, cast_floats=cast_floats)
    n = _common_length(out)
    batch = fixed_batch(specs)
    if batch is not None and n % batch:
        raise InputError(f"{what}: the model takes batches of exactly {batch} samples (fixed first dimension); "
                         f"{n} samples is not a multiple of {batch}")
    for name, arr in out.items():
        check_values(name, arr, what=what)
    return out


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size the model insists on (a fixed first dimension), or None when it is free."""
    dims = {s.shape[0] for s in specs if s.shape}
    fixed = {d for d in dims if d is not None}
    return fixed.pop() if len(fixed) == 1 else None


def check_values(name: str, array: np.ndarray, *, what: str = "data") -> None:
    """Refuse float data that would make every statistic, and every guard, meaningless.

    NaN or infinity propagates to NaN errors, and NaN compares false with every limit, so the
    fidelity guards would pass anything; a constant array (zero variance: all zeros, say)
    gives activation statistics that make any rank look exact. Both are refused here, once,
    before anything uses the data. Identical samples (a batch of one image repeated) are
    allowed but warned about: the statistics then describe one input.
    """
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InputError(f"{what}: input {name!r} holds {bad} non-finite value(s) (NaN or infinity); "
                         "clean the data first")
    flat = array.reshape(-1)
    if np.all(flat == flat[0]):
        raise InputError(f"{what}: input {name!r} is constant (every value is {flat[0]:g}, zero variance); "
                         "its statistics would make any rank look exact: give real samples")
    if array.shape[0] > 1 and np.all(array == array[:1]):
        log.warning("%s: every sample of input %r is identical; statistics describe a single input", what, name)


def check_labels(labels: np.ndarray, n_classes: int | None, *, what: str = "eval data") -> np.ndarray:
    """Labels must index the model's classes: out-of-range labels would read as 0 % accuracy."""
    if labels.size == 0:
        return labels
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise InputError(f"{what}: label {low} is negative; labels are class indices 0..N-1")
    if n_classes is not None and high >= n_classes:
        raise InputError(f"{what}: label {high} is out of range for a model with {n_classes} output classes")
    return labels


def _common_length(arrays: Mapping[str, np.ndarray]) -> int:
    """Return the shared leading dimension of ``arrays`` (the number of samples)."""
    if not arrays:
        raise InputError("no input arrays given")
    lengths = {}
    for name, arr in arrays.items():
        if arr.ndim == 0:
            raise InputError(f"input {name!r} is a scalar; expected a batch of samples along axis 0")
        lengths[name] = arr.shape[0]
    if len(set(lengths.values())) != 1:
        raise InputError(f"input arrays hold different numbers of samples: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise InputError("input arrays hold no samples (leading dimension is 0)")
    return n


# --------------------------------------------------------------------------------------
# .npy / .npz
# --------------------------------------------------------------------------------------


def _open_numpy(path: Path) -> dict[str, np.ndarray]:
    """Read every array of a .npy/.npz file, refusing pickles (they can run code).

    The format is told from the content, not the suffix (an .npz saved under a .npy name is
    read as what it is), and every array header is checked against the bytes actually present
    before anything is allocated: a corrupt header claiming terabytes is "corrupt", not
    "out of memory".
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename.endswith(".npy"):
                        with zf.open(info) as member:
                            _check_npy_header(path, member, info.file_size, info.filename[:-4])
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        if magic == b"\x93NUMPY":
            with open(path, "rb") as fh:
                _check_npy_header(path, fh, os.fstat(fh.fileno()).st_size, None)
            return {"": np.load(path, allow_pickle=False)}
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {path}: {reason}") from None
    raise InputError(f"cannot read {path}: not a numpy .npy or .npz file (unrecognised content)")


def _check_npy_header(path: Path, fh: Any, size: int, key: str | None) -> None:
    """The array a .npy header announces must fit in the bytes that follow it."""
    where = f"{path}" + (f" (array {key!r})" if key else "")
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise InputError(f"cannot read {where}: corrupt array header ({str(exc).splitlines()[0][:120]})") from None
    if dtype.hasobject:
        raise InputError(f"cannot read {where}: object arrays need pickle, which is never loaded")
    count = 1
    for d in shape:
        count *= int(d)
    need = count * dtype.itemsize
    have = size - fh.tell()
    if need > have:
        raise InputError(f"cannot read {where}: the header announces {need} bytes of data "
                         f"(shape {tuple(shape)}, {dtype}) but the file holds {max(have, 0)}; corrupt or truncated")


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"data path not found: {p}")
    return p


def _split_labels(path: Path, contents: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    present = [k for k in LABEL_KEYS if k in contents]
    if len(present) > 1:
        raise InputError(f"{path}: both {present[0]!r} and {present[1]!r} present; keep one label array")
    labels = contents.pop(present[0]) if present else None
    if labels is not None:
        labels = _check_labels(path, labels)
    return contents, labels


def _check_labels(path: Path, labels: np.ndarray) -> np.ndarray:
    """Labels must be a 1-D integer class-index vector: accuracy compares argmax to them."""
    if labels.ndim != 1:
        raise InputError(f"{path}: labels must be 1-D class indices, got shape {labels.shape}")
    if labels.dtype.kind not in "ui":
        if labels.dtype.kind == "f" and labels.size and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise InputError(f"{path}: labels must be integer class indices, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _assign_inputs(
    path: Path, contents: dict[str, np.ndarray], input_names: Sequence[str] | None
) -> dict[str, np.ndarray]:
    """Map the arrays of a file to model input names (see :func:`load_arrays`)."""
    if not contents:
        raise InputError(f"{path}: holds no input arrays (only labels?)")
    if "" in contents:  # .npy: one anonymous array
        arr = contents[""]
        if input_names is None:
            return {DEFAULT_KEY: arr}
        if len(input_names) != 1:
            raise InputError(
                f"{path}: a .npy holds one array but the model has {len(input_names)} inputs"
                f" {list(input_names)}; use an .npz keyed by input name"
            )
        return {input_names[0]: arr}
    if input_names is None:
        return dict(contents)
    names = list(input_names)
    if all(n in contents for n in names):
        extra = sorted(set(contents) - set(names))
        if extra:
            log.warning("%s: ignoring array(s) %s that match no model input", path, extra)
        return {n: contents[n] for n in names}
    if len(names) == 1:
        if len(contents) == 1:
            return {names[0]: next(iter(contents.values()))}
        if DEFAULT_KEY in contents:
            return {names[0]: contents[DEFAULT_KEY]}
    missing = [n for n in names if n not in contents]
    raise InputError(
        f"{path}: no array for model input(s) {missing}; keys are {sorted(contents)}"
        f" (name arrays after the model inputs{', or use key x' if len(names) == 1 else ''})"
    )


def _load_numpy_labelled(
    path: Path, input_names: Sequence[str] | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    contents, labels = _split_labels(path, _open_numpy(path))
    arrays = _assign_inputs(path, contents, input_names)
    n = _common_length(arrays)
    if labels is not None and labels.shape[0] != n:
        raise InputError(f"{path}: {labels.shape[0]} labels for {n} samples")
    return arrays, labels


# --------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("reading image folders needs Pillow: pip install pillow") from exc
    return Image


def _per_channel(value: float | Sequence[float], channels: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise InputError(f"{what} has {arr.size} values but the images have {channels} channel(s)")
    return arr


def preprocess_image(
    image: Any,
    size: tuple[int, int],
    channels: int,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
) -> np.ndarray:
    """Turn one PIL image into a ``(C, H, W)`` float32 array.

    The steps, in this order, are the contract shared with the bundled models
    (``tools/train_zoo.py`` preprocesses its training data with this very function, so a
    folder of the original 28x28 Fashion-MNIST PNGs gives bit-identical inputs):

    1. convert to grayscale (``channels=1``, Pillow mode ``L``) or RGB (``channels=3``; a
       grayscale image is replicated to three equal channels, alpha is dropped);
    2. resize to ``size = (H, W)`` with bilinear interpolation, skipped when it already fits
       (no crop: aspect ratio is not preserved);
    3. scale to ``[0, 1]`` by dividing by 255;
    4. subtract ``mean`` and divide by ``std`` (scalars or one value per channel).
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 or 3, got {channels}")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise InputError(f"image size must be positive, got {size}")
    image_mod = _pil()
    img = image.convert("L" if channels == 1 else "RGB")
    if img.size != (w, h):  # Pillow sizes are (width, height)
        img = img.resize((w, h), image_mod.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1)
    m = _per_channel(mean, channels, "mean")[:, None, None]
    s = _per_channel(std, channels, "std")[:, None, None]
    if np.any(s == 0):
        raise InputError("std must be non-zero")
    return np.ascontiguousarray((arr - m) / s, dtype=np.float32)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _scan_folder(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """List images in sorted order; labels from class sub-folders if that is the layout."""
    if not root.is_dir():
        raise InputError(f"not a folder: {root}")
    entries = sorted(root.iterdir())
    top_images = [p for p in entries if _is_image(p)]
    subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    class_dirs = [d for d in subdirs if any(_is_image(p) for p in d.iterdir())]
    if top_images and class_dirs:
        raise InputError(
            f"{root}: mixes images and class sub-folders; put every image in a class folder or none"
        )
    if top_images:
        return top_images, None, []
    if not class_dirs:
        raise InputError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    files: list[Path] = []
    labels: list[int] = []
    classes = [d.name for d in class_dirs]  # already sorted
    for idx, d in enumerate(class_dirs):
        imgs = sorted(p for p in d.iterdir() if _is_image(p))
        files.extend(imgs)
        labels.extend([idx] * len(imgs))
    return files, labels, classes


def load_image_folder_labelled(
    path: str | os.PathLike[str],
    size: tuple[int, int],
    channels: int = 3,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    layout: str = "NCHW",
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Read a folder of images; return ``(x, labels or None, class names)``.

    Images directly in ``path`` are unlabelled. Images sorted into sub-folders
    (``path/<class>/*.png``) are labelled by the index of their class in the sorted list
    of sub-folder names, the same convention as torchvision's ``ImageFolder``, so labels
    line up with a model trained that way. Files are read in sorted order so the result is
    reproducible. See :func:`preprocess_image` for the preprocessing.
    """
    root = _check_path(path)
    if layout not in ("NCHW", "NHWC"):
        raise InputError(f"layout must be NCHW or NHWC, got {layout!r}")
    image_mod = _pil()
    files, labels, classes = _scan_folder(root)
    out = np.empty((len(files), channels, int(size[0]), int(size[1])), dtype=np.float32)
    for i, f in enumerate(files):
        try:
            with image_mod.open(f) as img:
                out[i] = preprocess_image(img, size, channels, mean, std)
        except InputError:
            raise
        except Exception as exc:  # Pillow raises several unrelated types for bad files
            raise InputError(f"cannot read image {f}: {exc}") from exc
    if layout == "NHWC":
        out = np.ascontiguousarray(out.transpose(0, 2, 3, 1))
    log.info("read %d images from %s (%d classes)", len(files), root, len(classes))
    y = np.asarray(labels, dtype=np.int64) if labels is not None else None
    return out, y, classes


def load_image_folder(
    path: str | os.PathLike[str],
    size: tuple[int, int],
    channels: int = 3,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    layout: str = "NCHW",
) -> np.ndarray:
    """Read a folder of images into one float32 batch (labels dropped).

    See :func:`load_image_folder_labelled` for the folder layout and
    :func:`preprocess_image` for the preprocessing.
    """
    return load_image_folder_labelled(path, size, channels, mean, std, layout)[0]


def image_options_from_spec(spec: InputSpec) -> tuple[tuple[int, int], int, str]:
    """Infer ``(size, channels, layout)`` for an image folder from a 4-D model input.

    Image folders carry no shape of their own, so the model's declared input decides the
    resize target; a channel axis of 1 or 3 in position 1 means NCHW, in position 3 NHWC.
    """
    shape = spec.shape
    if len(shape) != 4:
        raise InputError(f"input {spec.name!r} has shape {_fmt_shape(shape)}; image folders need a 4-D input")
    if shape[1] in (1, 3) and shape[2] and shape[3]:
        return (int(shape[2]), int(shape[3])), int(shape[1]), "NCHW"
    if shape[3] in (1, 3) and shape[1] and shape[2]:
        return (int(shape[1]), int(shape[2])), int(shape[3]), "NHWC"
    raise InputError(
        f"input {spec.name!r} has shape {_fmt_shape(shape)}: cannot tell image size and 1 or 3"
        " channels from it, so an image folder cannot be resized to fit"
    )


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def load_labelled(
    path: str | os.PathLike[str],
    input_names: Sequence[str] | None = None,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    layout: str = "NCHW",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load the single-input data at ``path`` and its labels (``None`` when it has none).

    This is the ``--eval`` entry point: accuracy needs one input and class labels. The
    labels of an ``.npz`` are under ``y`` or ``labels``; an image folder's come from its
    class sub-folders (``size`` and ``channels`` are then required).
    """
    p = _check_path(path)
    if p.is_dir():
        if size is None or channels is None:
            raise InputError(f"{p} is an image folder: the input size and channels must be known to read it")
        x, y, _ = load_image_folder_labelled(p, size, channels, mean, std, layout)
        return x, y
    arrays, labels = _load_numpy_labelled(_numpy_path(p), input_names)
    if len(arrays) != 1:
        raise InputError(f"{p}: holds {len(arrays)} input arrays {sorted(arrays)}; expected one (key x)")
    return next(iter(arrays.values())), labels


def load_arrays(
    path: str | os.PathLike[str],
    input_names: Sequence[str] | None = None,
    *,
    size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    layout: str = "NCHW",
) -> dict[str, np.ndarray]:
    """Load model inputs from ``path`` as a feed dict ``{input name: batch}``.

    * ``.npy``: one array, for the model's only input (key ``x`` when ``input_names`` is
      not given).
    * ``.npz``: arrays keyed by input name; for a single-input model, a lone array under
      any key, or the one under ``x``, is accepted. Label arrays (``y``, ``labels``) are
      left out -- use :func:`load_labelled` for them.
    * a folder: images, preprocessed as in :func:`preprocess_image` (needs ``size`` and
      ``channels``; single-input models only).

    Arrays are returned as stored; check them against the model with
    :func:`validate_inputs` before running it.
    """
    p = _check_path(path)
    if p.is_dir():
        if input_names is not None and len(input_names) != 1:
            raise InputError(f"{p}: an image folder can only feed a single-input model, not {list(input_names)}")
        if size is None or channels is None:
            raise InputError(f"{p} is an image folder: the input size and channels must be known to read it")
        x = load_image_folder(p, size, channels, mean, std, layout)
        return {(input_names[0] if input_names else DEFAULT_KEY): x}
    arrays, _ = _load_numpy_labelled(_numpy_path(p), input_names)
    return arrays


def _numpy_path(p: Path) -> Path:
    if p.suffix.lower() not in (".npy", ".npz"):
        raise InputError(f"unsupported data file {p}: expected .npy, .npz or a folder of images")
    return p


def batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield feed dicts of at most ``batch_size`` samples, slicing all inputs together.

    Streaming keeps calibration memory bounded: activations of a whole calibration set
    for a large layer do not fit, those of a batch do. Slices are views, not copies. The
    last batch may be smaller.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    n = _common_length(arrays)
    for start in range(0, n, int(batch_size)):
        yield {name: arr[start : start + batch_size] for name, arr in arrays.items()}


__all__ = [
    "DEFAULT_KEY",
    "IMAGE_SUFFIXES",
    "InputSpec",
    "LABEL_KEYS",
    "batches",
    "check_array",
    "check_labels",
    "check_values",
    "fixed_batch",
    "image_options_from_spec",
    "input_specs",
    "load_arrays",
    "load_image_folder",
    "load_image_folder_labelled",
    "load_labelled",
    "preprocess_image",
    "validate_inputs",
]
