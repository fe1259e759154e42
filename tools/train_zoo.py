#!/usr/bin/env python
"""Train the bundled model zoo on Fashion-MNIST and export it to ONNX.

Three small CNNs, each standing for a family the rewriter must handle, trained to a real
accuracy so that "accuracy lost" is measured instead of guessed:

* ``vgg_fmnist``    VGG-style stack of 3x3 convs (64-64-P-128-128-P-256-256-P), global
  average pool, two FC layers. BatchNorm is used while training and folded into the convs
  before export, so the ONNX graph is plain Conv+Relu like the original VGG. This is the
  project's default model (kept under 5 MB).
* ``resnet_fmnist`` ResNet-style basic blocks with BatchNorm left UNFUSED in the ONNX
  (the tool folds BN itself) and residual Adds, identity and 1x1-projection shortcuts.
* ``zfnet_fmnist``  AlexNet/ZFNet-style: a large strided first kernel (7x7, stride 2) on a
  3-channel input, overlapping max pools, 5x5 then 3x3 convs, dropout FC head. BN is
  folded at export, as in the VGG.

Preprocessing (identical to ``onnxslim_lr.data.preprocess_image``, which is used here):
28x28 grayscale -> bilinear resize to 32x32 (Pillow) -> /255 -> (x - 0.2860) / 0.3530,
NCHW float32. ``zfnet_fmnist`` takes the grayscale image replicated to 3 equal channels
(Pillow ``convert("RGB")``), so its first conv has C=3 like the papers' RGB layer.

Data: the Debian package ``dataset-fashion-mnist`` (``apt-get install -y
dataset-fashion-mnist``), IDX files in ``/usr/share/datasets/fashion-mnist/``.

Usage::

    pip install torch          # optional "train" extra; never needed by onnxslim_lr
    python tools/train_zoo.py --out models --epochs 2 [--only vgg_fmnist]
    python tools/train_zoo.py --out models --data-only            # only the .npz files
    python tools/train_zoo.py --full-test /tmp/fmnist_test.npz    # full 10k test set
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("train_zoo")

DATA_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
MEAN = 0.2860  # Fashion-MNIST training-set pixel mean / std (after /255)
STD = 0.3530
SIZE = (32, 32)
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
OPSET = 17
IR_VERSION = 8  # onnxruntime refuses IR versions newer than it knows; 8 is what opset 17 needs
N_CALIB = 256
N_TEST_SMALL = 2000


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): magic, dims as big-endian int32, uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images (N, 28, 28) and int64 labels of ``split`` ('train' or 't10k')."""
    img = DATA_DIR / f"{split}-images-idx3-ubyte.gz"
    lab = DATA_DIR / f"{split}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        sys.exit(
            f"Fashion-MNIST not found in {DATA_DIR} (missing {img.name if not img.exists() else lab.name}).\n"
            "Install it with:  apt-get install -y dataset-fashion-mnist\n"
            "or point FMNIST_DIR at a folder holding the four *-ubyte.gz IDX files."
        )
    return _read_idx(img), _read_idx(lab).astype(np.int64)


def preprocess(raw: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, C, 32, 32) exactly as the models expect."""
    from PIL import Image

    from onnxslim_lr.data import preprocess_image

    out = np.empty((len(raw), channels, *SIZE), dtype=np.float32)
    for i, a in enumerate(raw):
        out[i] = preprocess_image(Image.fromarray(a), SIZE, channels, MEAN, STD)
    return out


def write_full_test(path: Path, channels: int = 1) -> None:
    """Regenerate the full preprocessed 10k test set (x, y) from the Debian dataset."""
    raw, y = load_fmnist("t10k")
    np.savez_compressed(path, x=preprocess(raw, channels), y=y)
    log.info("wrote %s (%d images, %d channel(s))", path, len(raw), channels)


def write_npz_sets(out: Path, seed: int) -> None:
    """The small calibration / evaluation sets bundled in models/ (1- and 3-channel)."""
    raw_tr, _ = load_fmnist("train")
    raw_te, y_te = load_fmnist("t10k")
    rng = np.random.default_rng(seed)
    calib_idx = np.sort(rng.choice(len(raw_tr), N_CALIB, replace=False))
    for channels, prefix in ((1, "fmnist"), (3, "fmnist_rgb")):
        np.savez_compressed(out / f"{prefix}_calib.npz", x=preprocess(raw_tr[calib_idx], channels))
        np.savez_compressed(
            out / f"{prefix}_test2k.npz",
            x=preprocess(raw_te[:N_TEST_SMALL], channels),
            y=y_te[:N_TEST_SMALL],
        )
    log.info("wrote calibration (%d train images, seed %d) and test (first %d) sets", N_CALIB, seed, N_TEST_SMALL)


# --------------------------------------------------------------------------------------
# Models (torch imported lazily so --help and --full-test work without it)
# --------------------------------------------------------------------------------------


def build_vgg(nn):  # noqa: ANN001 - torch.nn passed in to keep torch imports lazy
    layers: list = []
    c = 1
    for v in (64, 64, "M", 128, 128, "M", 256, 256, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 256),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(256, 10),
    )


def build_zfnet(nn):  # noqa: ANN001
    def cbr(c, f, k, s=1, p=0):
        return [nn.Conv2d(c, f, k, stride=s, padding=p), nn.BatchNorm2d(f), nn.ReLU(inplace=True)]

    return nn.Sequential(
        nn.Sequential(
            *cbr(3, 64, 7, 2, 3),             # 32 -> 16
            nn.MaxPool2d(3, 2, 1),            # 16 -> 8 (overlapping pool)
            *cbr(64, 128, 5, 1, 2),
            nn.MaxPool2d(3, 2, 1),            # 8 -> 4
            *cbr(128, 192, 3, 1, 1),
            *cbr(192, 192, 3, 1, 1),
            *cbr(192, 128, 3, 1, 1),
            nn.MaxPool2d(2),                  # 4 -> 2
        ),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(128 * 2 * 2, 256),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Linear(256, 10),
    )


def build_resnet(nn, torch):  # noqa: ANN001
    class Block(nn.Module):
        def __init__(self, c: int, f: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, f, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(f)
            self.conv2 = nn.Conv2d(f, f, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(f)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Identity()
            if stride != 1 or c != f:
                self.shortcut = nn.Sequential(nn.Conv2d(c, f, 1, stride, bias=False), nn.BatchNorm2d(f))

        def forward(self, x):  # noqa: ANN001
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
            self.layers = nn.Sequential(
                Block(32, 32, 1),     # 32x32
                Block(32, 64, 2),     # 16x16
                Block(64, 128, 2),    # 8x8
                Block(128, 128, 1),   # 8x8
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):  # noqa: ANN001
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    return ResNet()


# name -> (input channels, builder, fold BN at export)
def model_table(torch) -> dict[str, tuple[int, Callable, bool]]:  # noqa: ANN001
    nn = torch.nn
    return {
        "vgg_fmnist": (1, lambda: build_vgg(nn), True),
        "resnet_fmnist": (1, lambda: build_resnet(nn, torch), False),
        "zfnet_fmnist": (3, lambda: build_zfnet(nn), True),
    }


def fold_bn(torch, model):  # noqa: ANN001
    """Fold every Conv2d directly followed by BatchNorm2d (inside nn.Sequential) in place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    nn = torch.nn
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        keys = list(module._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    return model


# --------------------------------------------------------------------------------------
# Training / export / evaluation
# --------------------------------------------------------------------------------------


def train(torch, model, x, y, epochs: int, seed: int, batch: int = 128, lr: float = 0.05):  # noqa: ANN001
    """SGD (momentum 0.9, nesterov, wd 5e-4) with a one-cycle LR schedule, random h-flips."""
    nn = torch.nn
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for epoch in range(epochs):
        t0 = time.time()
        perm = torch.randperm(len(x), generator=g)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            opt.zero_grad(set_to_none=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            total += len(idx)
        log.info(
            "  epoch %d/%d: loss %.4f train acc %.4f (%.0f s)",
            epoch + 1, epochs, loss_sum / total, correct / total, time.time() - t0,
        )
    model.eval()
    return model


def export_onnx(torch, model, channels: int, path: Path) -> None:  # noqa: ANN001
    """Legacy (TorchScript) exporter: one self-contained file, BN kept as BatchNormalization."""
    import onnx

    buf = io.BytesIO()
    dummy = torch.zeros(2, channels, *SIZE)
    torch.onnx.export(
        model, (dummy,), buf,
        dynamo=False,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=False,  # keeps BatchNormalization nodes (folding would fuse them)
    )
    m = onnx.load_from_string(buf.getvalue())
    # The exporter deduplicates equal-valued initializers through Identity nodes; turn
    # those back into plain initializers so every weight is a direct Conv/Gemm input.
    inits = {i.name: i for i in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    m.ir_version = IR_VERSION
    m.producer_name = "onnxslim_lr tools/train_zoo.py"
    m.doc_string = (
        f"Fashion-MNIST classifier. Input NCHW float32 (N,{channels},32,32): 28x28 image, bilinear "
        f"resize to 32x32, /255, (x-{MEAN})/{STD}"
        + (", grayscale replicated to 3 channels" if channels == 3 else "")
        + ". Output: 10 logits."
    )
    onnx.checker.check_model(m, full_check=True)
    onnx.save_model(m, str(path))


def ort_logits(path: Path, x: np.ndarray, batch: int = 500) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def count_macs(path: Path) -> int:
    """Multiply-accumulates of one image for Conv and Gemm/MatMul (shape inference)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)
    }
    w = {i.name: numpy_helper.to_array(i).shape for i in m.graph.initializer}
    macs = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            f, cg, kh, kw = w[n.input[1]]
            out = shapes[n.output[0]]
            macs += out[2] * out[3] * f * cg * kh * kw
        elif n.op_type in ("Gemm", "MatMul"):
            macs += int(np.prod(w[n.input[1]]))
    return int(macs)


def run_model(torch, name: str, out: Path, epochs: int, seed: int, data: dict) -> dict:  # noqa: ANN001
    import onnx

    channels, builder, fold = model_table(torch)[name]
    torch.manual_seed(seed)
    model = builder()
    x_tr = torch.from_numpy(data[("train", channels)])
    y_tr = torch.from_numpy(data["y_train"])
    n_params_train = sum(p.numel() for p in model.parameters())
    log.info("%s: %d trainable parameters, training %d epoch(s)", name, n_params_train, epochs)
    t0 = time.time()
    train(torch, model, x_tr, y_tr, epochs, seed)
    train_s = time.time() - t0
    if fold:
        fold_bn(torch, model)
    path = out / f"{name}.onnx"
    export_onnx(torch, model, channels, path)

    x_te, y_te = data[("test", channels)], data["y_test"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x_te[:64])).numpy()
    got = ort_logits(path, x_te[:64])
    diff = float(np.abs(ref - got).max())
    if diff > 1e-3:
        raise SystemExit(f"{name}: onnxruntime differs from torch by {diff:g}")
    logits = ort_logits(path, x_te)
    acc = float((logits.argmax(1) == y_te).mean())
    m = onnx.load(str(path))
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    n_params = int(sum(np.prod(i.dims) for i in m.graph.initializer))
    result = {
        "model": name,
        "input_shape": ["batch", channels, *SIZE],
        "params_onnx": n_params,
        "macs": count_macs(path),
        "test_accuracy_onnx": round(acc, 4),
        "max_abs_diff_torch_vs_ort": diff,
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(train_s, 1),
        "torch": torch.__version__,
        "size_bytes": path.stat().st_size,
        "ops": ops,
        "ir_version": m.ir_version,
        "opset": m.opset_import[0].version,
    }
    log.info("%s: ONNX test accuracy %.4f, %s", name, acc, json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models"), help="output folder (default: models)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", choices=["vgg_fmnist", "resnet_fmnist", "zfnet_fmnist"],
                    help="train only this model (repeatable)")
    ap.add_argument("--train-limit", type=int, default=0, help=argparse.SUPPRESS)  # smoke tests
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--data-only", action="store_true", help="only write the calibration / test .npz files")
    ap.add_argument("--no-data", action="store_true", help="do not (re)write the .npz files")
    ap.add_argument("--full-test", type=Path, metavar="FILE",
                    help="write the full preprocessed 10k test set (x, y) to FILE and exit")
    ap.add_argument("--channels", type=int, default=1, choices=[1, 3], help="channels for --full-test")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.full_test:
        write_full_test(args.full_test, args.channels)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_data:
        write_npz_sets(args.out, args.seed)
    if args.data_only:
        return 0

    try:
        import torch
    except ImportError:
        sys.exit("training needs PyTorch: pip install torch  (or pip install -e .[train])")
    torch.set_num_threads(args.threads)

    names = args.only or list(model_table(torch))
    raw_tr, y_tr = load_fmnist("train")
    raw_te, y_te = load_fmnist("t10k")
    if args.train_limit:
        raw_tr, y_tr = raw_tr[: args.train_limit], y_tr[: args.train_limit]
    data: dict = {"y_train": y_tr, "y_test": y_te}
    for c in sorted({model_table(torch)[n][0] for n in names}):
        data[("train", c)] = preprocess(raw_tr, c)
        data[("test", c)] = preprocess(raw_te, c)
    results_path = args.out / "zoo_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in names:
        results[name] = run_model(torch, name, args.out, args.epochs, args.seed, data)
        results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
