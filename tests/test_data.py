"""Tests of onnxslim_lr.data: .npy/.npz loading, image folders, validation, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxslim_lr import data
from onnxslim_lr.data import InputSpec
from onnxslim_lr.errors import InputError

PIL = pytest.importorskip("PIL.Image", reason="image-folder tests need Pillow")


def _x(n: int = 5, c: int = 1, h: int = 4, w: int = 4) -> np.ndarray:
    return np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)


# --------------------------------------------------------------------------- .npy / .npz


def test_npy_single_input(tmp_path: Path) -> None:
    p = tmp_path / "a.npy"
    np.save(p, _x())
    got = data.load_arrays(p, ["input"])
    assert list(got) == ["input"]
    np.testing.assert_array_equal(got["input"], _x())
    assert list(data.load_arrays(p)) == ["x"]  # no names: conventional key


def test_npy_multi_input_model_rejected(tmp_path: Path) -> None:
    p = tmp_path / "a.npy"
    np.save(p, _x())
    with pytest.raises(InputError, match="one array but the model has 2 inputs"):
        data.load_arrays(p, ["a", "b"])


def test_npz_keyed_by_input_names(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, a=_x(), b=_x() + 1, y=np.arange(5))
    got = data.load_arrays(p, ["a", "b"])
    assert sorted(got) == ["a", "b"]  # labels are not inputs
    np.testing.assert_array_equal(got["b"], _x() + 1)


def test_npz_single_array_any_key_and_x_key(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, images=_x())
    assert list(data.load_arrays(p, ["input"])) == ["input"]
    q = tmp_path / "b.npz"
    np.savez(q, x=_x(), other=_x(3))
    np.testing.assert_array_equal(data.load_arrays(q, ["input"])["input"], _x())


def test_npz_missing_input_name(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, a=_x(), c=_x())
    with pytest.raises(InputError, match=r"no array for model input\(s\) \['b'\]"):
        data.load_arrays(p, ["a", "b"])


def test_load_labelled(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, x=_x(), labels=np.array([0, 1, 2, 1, 0], dtype=np.int32))
    x, y = data.load_labelled(p)
    np.testing.assert_array_equal(x, _x())
    assert y is not None and y.dtype == np.int64 and y.tolist() == [0, 1, 2, 1, 0]
    q = tmp_path / "b.npy"
    np.save(q, _x())
    assert data.load_labelled(q)[1] is None


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.arange(4), "4 labels for 5 samples"),
        (np.zeros((5, 2), dtype=np.int64), "labels must be 1-D"),
        (np.full(5, 0.5), "integer class indices"),
    ],
)
def test_bad_labels(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, x=_x(), y=labels)
    with pytest.raises(InputError, match=message):
        data.load_labelled(p)


def test_both_label_keys_rejected(tmp_path: Path) -> None:
    p = tmp_path / "a.npz"
    np.savez(p, x=_x(), y=np.arange(5), labels=np.arange(5))
    with pytest.raises(InputError, match="keep one label array"):
        data.load_labelled(p)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="data path not found"):
        data.load_arrays(tmp_path / "missing.npz")
    txt = tmp_path / "a.csv"
    txt.write_text("1,2\n")
    with pytest.raises(InputError, match="unsupported data file"):
        data.load_arrays(txt)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="cannot read"):
        data.load_arrays(bad)
    only_labels = tmp_path / "y.npz"
    np.savez(only_labels, y=np.arange(3))
    with pytest.raises(InputError, match="holds no input arrays"):
        data.load_arrays(only_labels)


def test_pickled_object_array_refused(tmp_path: Path) -> None:
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read"):
        data.load_arrays(p)


# --------------------------------------------------------------------------- validation


def test_check_array_ok_and_float_cast() -> None:
    arr = _x().astype(np.float64)
    got = data.check_array("input", arr, shape=(None, 1, 4, 4), dtype=np.float32)
    assert got.dtype == np.float32


@pytest.mark.parametrize(
    "arr, kwargs, message",
    [
        (_x(), {"rank": 3}, r"expected rank 3, got shape \(5, 1, 4, 4\)"),
        (_x(), {"shape": (None, 1, 8, 8)}, "axis 2 is 4, not 8"),
        (np.zeros((2, 4, 4, 3), np.float32), {"shape": (None, 3, 4, 4)}, "wrong layout"),
        (np.zeros((2, 1, 4, 4), np.uint8), {"dtype": np.float32}, "raw pixels"),
        (_x(), {"dtype": np.float16, "cast_floats": False}, "expected dtype float16"),
        ([1, 2], {}, "expected a numpy array"),
    ],
)
def test_check_array_errors(arr: object, kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        data.check_array("input", arr, **kwargs)  # type: ignore[arg-type]


def test_validate_inputs() -> None:
    specs = [InputSpec("a", (None, 1, 4, 4), np.dtype(np.float32)), InputSpec("b", (None, 3), np.dtype(np.int64))]
    ok = data.validate_inputs({"a": _x(), "b": np.zeros((5, 3), np.int64)}, specs)
    assert sorted(ok) == ["a", "b"]
    with pytest.raises(InputError, match=r"no array for model input\(s\) \['b'\]"):
        data.validate_inputs({"a": _x()}, specs)
    with pytest.raises(InputError, match="match no model input"):
        data.validate_inputs({"a": _x(), "b": np.zeros((5, 3), np.int64), "c": _x()}, specs)
    with pytest.raises(InputError, match="different numbers of samples"):
        data.validate_inputs({"a": _x(), "b": np.zeros((4, 3), np.int64)}, specs)


def test_input_specs_from_onnx_model() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["out"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 32, 32])],
    )
    model = helper.make_model(graph)
    (spec,) = data.input_specs(model)
    assert spec == InputSpec("input", (None, 3, 32, 32), np.dtype(np.float32))
    assert data.image_options_from_spec(spec) == ((32, 32), 3, "NCHW")
    nhwc = InputSpec("input", (None, 28, 28, 1), np.dtype(np.float32))
    assert data.image_options_from_spec(nhwc) == ((28, 28), 1, "NHWC")
    with pytest.raises(InputError, match="image folders need a 4-D input"):
        data.image_options_from_spec(InputSpec("v", (None, 10), np.dtype(np.float32)))
    assert onnx  # imported for the helper


# --------------------------------------------------------------------------- batches


def test_batches() -> None:
    arrays = {"a": _x(5), "b": np.arange(5)}
    got = list(data.batches(arrays, 2))
    assert [len(b["a"]) for b in got] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["b"] for b in got]), np.arange(5))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="batch size must be a positive integer"):
            list(data.batches(arrays, bad))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="different numbers of samples"):
        list(data.batches({"a": _x(5), "b": np.arange(4)}, 2))


# --------------------------------------------------------------------------- image folders


def _png(path: Path, value: int, size: tuple[int, int] = (6, 4), mode: str = "L") -> None:
    """Write a flat image of grey ``value``; Pillow sizes are (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, value, value) if mode == "RGB" else (value, value, value, 255)
    PIL.new(mode, size, colour).save(path)


def test_image_folder_with_classes(tmp_path: Path) -> None:
    _png(tmp_path / "dog" / "b.png", 51)
    _png(tmp_path / "dog" / "a.png", 102, mode="RGB")
    _png(tmp_path / "cat" / "z.png", 255, mode="RGBA")
    x, y, classes = data.load_image_folder_labelled(tmp_path, size=(8, 8), channels=3, mean=0.5, std=0.25)
    assert classes == ["cat", "dog"]
    assert y is not None and y.tolist() == [0, 1, 1]
    assert x.shape == (3, 3, 8, 8) and x.dtype == np.float32
    # sorted order: cat/z (255), dog/a (102), dog/b (51); flat images survive the resize
    expected = [(v / 255.0 - 0.5) / 0.25 for v in (255, 102, 51)]
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), expected, atol=1e-6)
    x2, y2 = data.load_labelled(tmp_path, size=(8, 8), channels=3, mean=0.5, std=0.25)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_image_folder_flat_grayscale_nhwc(tmp_path: Path) -> None:
    _png(tmp_path / "1.png", 0, mode="RGB")
    _png(tmp_path / "2.jpg", 255)
    (tmp_path / "notes.txt").write_text("ignored")
    x = data.load_image_folder(tmp_path, size=(5, 7), channels=1, layout="NHWC")
    assert x.shape == (2, 5, 7, 1)
    np.testing.assert_allclose(x[:, 0, 0, 0], [0.0, 1.0], atol=1e-6)
    feed = data.load_arrays(tmp_path, ["input"], size=(5, 7), channels=1, layout="NHWC")
    assert list(feed) == ["input"]
    assert data.load_labelled(tmp_path, size=(5, 7), channels=1)[1] is None


def test_image_preprocessing_matches_manual(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    PIL.fromarray(pixels).save(tmp_path / "img.png")
    x = data.load_image_folder(tmp_path, size=(32, 32), channels=3, mean=[0.1, 0.2, 0.3], std=0.5)
    resized = np.asarray(PIL.fromarray(pixels).resize((32, 32), PIL.BILINEAR), dtype=np.float32) / 255.0
    for c, m in enumerate([0.1, 0.2, 0.3]):
        np.testing.assert_allclose(x[0, c], (resized - m) / 0.5, atol=1e-6)


def test_image_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images found"):
        data.load_image_folder(empty, size=(4, 4), channels=1)
    mixed = tmp_path / "mixed"
    _png(mixed / "a.png", 0)
    _png(mixed / "cls" / "b.png", 0)
    with pytest.raises(InputError, match="mixes images and class sub-folders"):
        data.load_image_folder(mixed, size=(4, 4), channels=1)
    ok = tmp_path / "ok"
    _png(ok / "a.png", 0)
    with pytest.raises(InputError, match="channels must be 1 or 3"):
        data.load_image_folder(ok, size=(4, 4), channels=2)
    with pytest.raises(InputError, match="mean has 2 values"):
        data.load_image_folder(ok, size=(4, 4), channels=3, mean=[0.1, 0.2])
    with pytest.raises(InputError, match="layout must be NCHW or NHWC"):
        data.load_image_folder(ok, size=(4, 4), channels=1, layout="CHW")
    with pytest.raises(InputError, match="size and channels must be known"):
        data.load_arrays(ok)
    with pytest.raises(InputError, match="single-input model"):
        data.load_arrays(ok, ["a", "b"], size=(4, 4), channels=1)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image"):
        data.load_image_folder(corrupt, size=(4, 4), channels=1)


def test_missing_pillow_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("no PIL")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match="reading image folders needs Pillow: pip install pillow"):
        data.load_image_folder(tmp_path, size=(4, 4), channels=1)


FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
BUNDLED = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.skipif(
    not FMNIST_TEST.exists() or not (BUNDLED / "fmnist_test2k.npz").exists(),
    reason="needs apt-get install dataset-fashion-mnist and the bundled models/fmnist_test2k.npz",
)
@pytest.mark.parametrize("channels, name", [(1, "fmnist_test2k.npz"), (3, "fmnist_rgb_test2k.npz")])
def test_bundled_fmnist_matches_image_folder(tmp_path: Path, channels: int, name: str) -> None:
    """A folder of the original 28x28 PNGs must give the bundled models' exact inputs."""
    import gzip

    n = 6
    with gzip.open(FMNIST_TEST, "rb") as f:
        raw = np.frombuffer(f.read(16 + n * 28 * 28), dtype=np.uint8, offset=16).reshape(n, 28, 28)
    for i, img in enumerate(raw):
        PIL.fromarray(img).save(tmp_path / f"{i:05d}.png")
    x = data.load_image_folder(tmp_path, size=(32, 32), channels=channels, mean=0.2860, std=0.3530)
    bundled, labels = data.load_labelled(BUNDLED / name)
    assert labels is not None and len(labels) == len(bundled)
    np.testing.assert_array_equal(x, bundled[:n])


# --------------------------------------------------------------------------- issue 11: one validation


def test_npz_named_npy_and_npy_named_npz_are_read_by_content(tmp_path: Path) -> None:
    a = tmp_path / "a.npy"
    with open(a, "wb") as fh:
        np.savez(fh, x=_x())
    np.testing.assert_array_equal(data.load_arrays(a, ["input"])["input"], _x())
    b = tmp_path / "b.npz"
    with open(b, "wb") as fh:
        np.save(fh, _x())
    np.testing.assert_array_equal(data.load_arrays(b, ["input"])["input"], _x())


def test_corrupt_huge_header_is_corrupt_not_out_of_memory(tmp_path: Path) -> None:
    p = tmp_path / "h.npy"
    with open(p, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**7)})
        fh.write(b"\0" * 16)
    with pytest.raises(InputError, match="corrupt or truncated"):
        data.load_arrays(p, ["input"])
    z = tmp_path / "h.npz"
    np.savez(z, x=_x())
    import zipfile

    with zipfile.ZipFile(z, "w") as zf:  # a member whose header promises far more than it holds
        zf.writestr("x.npy", p.read_bytes())
    with pytest.raises(InputError, match="corrupt or truncated"):
        data.load_arrays(z, ["input"])


SPEC = [InputSpec("input", (None, 1, 4, 4), np.dtype(np.float32))]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    x = _x()
    x[2, 0, 1, 1] = bad
    with pytest.raises(InputError, match="non-finite"):
        data.validate_inputs({"input": x}, SPEC)


def test_constant_data_is_refused_and_repeated_samples_warned(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(InputError, match="zero variance"):
        data.validate_inputs({"input": np.zeros((5, 1, 4, 4), np.float32)}, SPEC)
    one = np.repeat(_x(1), 3, axis=0)
    with caplog.at_level("WARNING"):
        data.validate_inputs({"input": one}, SPEC)
    assert "identical" in caplog.text


def test_fixed_batch_models_take_any_multiple_of_their_batch() -> None:
    spec1 = [InputSpec("input", (1, 1, 4, 4), np.dtype(np.float32))]
    got = data.validate_inputs({"input": _x(5)}, spec1)  # torch's batch-1 export, 5 samples
    assert got["input"].shape[0] == 5 and data.fixed_batch(spec1) == 1
    spec2 = [InputSpec("input", (2, 1, 4, 4), np.dtype(np.float32))]
    with pytest.raises(InputError, match="exactly 2"):
        data.validate_inputs({"input": _x(5)}, spec2)
    assert data.fixed_batch(SPEC) is None


def test_labels_must_index_the_classes() -> None:
    assert list(data.check_labels(np.array([0, 9]), 10)) == [0, 9]
    with pytest.raises(InputError, match="out of range"):
        data.check_labels(np.array([0, 10]), 10)
    with pytest.raises(InputError, match="negative"):
        data.check_labels(np.array([0, -1]), None)


def test_fixed_batch_1_model_calibrates_and_evaluates_on_many_samples(tmp_path: Path) -> None:
    """Issue 11: a batch-1 model (the torch default) with --calib/--eval of several samples."""
    import onnxslim_lr as lr
    from test_hostile_cli import _conv_model

    m = _conv_model(batch=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 8, 16, 16)).astype(np.float32)
    batches = lr.load_calibration(x, m)
    assert [b["x"].shape[0] for b in batches] == [1] * 6
    y = np.zeros(6, np.int64)
    acc = lr.accuracy(m, x, y)
    from onnxslim_lr.timing import make_session

    sess = make_session(m, threads=1)
    want = np.mean([int(np.argmax(sess.run(None, {"x": x[i:i + 1]})[0])) == 0 for i in range(6)])
    assert acc == pytest.approx(want)
    p = tmp_path / "e.npz"
    np.savez(p, x=x, y=np.array([0, 1, 2, 3, 4, 11]))
    with pytest.raises(InputError, match="out of range"):
        lr.load_eval(p, m)
