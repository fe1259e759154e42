"""One graph representation through the pipeline: the model proto is imported into
graphsurgeon once per run, and a graph is exported only where onnxruntime needs a proto.

``gs.import_onnx`` / ``gs.export_onnx`` are wrapped with counters. Exports are told apart by
the function that asked for them: ``export_model`` (the folded model the probe and the data
service run, and every spliced model the guards and searches score) and ``model_from_graph``
(the one-layer models the layer checks time). The expected counts are derived from what the
run reports doing, so a new conversion on the way fails here.

Also: :func:`onnxslim_lr.graph.adopt` gives an exported graph exactly what a re-import would
(shapes, dtypes, weights), and :func:`~onnxslim_lr.graph.splice_all` cleans up and sorts once
per batch.
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import run_ort, small_cnn

import onnxslim_lr as lr
from onnxslim_lr import manager
from onnxslim_lr.graph import Names, adopt, copy_graph, export_model, import_graph, splice_all


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counter of ``import``, ``export_model``, ``model_from_graph`` (and any other exporter)."""
    counts: Counter = Counter()
    real_import, real_export = gs.import_onnx, gs.export_onnx

    def counted_import(*a, **kw):  # type: ignore[no-untyped-def]
        counts["import"] += 1
        return real_import(*a, **kw)

    def counted_export(*a, **kw):  # type: ignore[no-untyped-def]
        counts[sys._getframe(1).f_code.co_name] += 1
        return real_export(*a, **kw)

    monkeypatch.setattr(gs, "import_onnx", counted_import)
    monkeypatch.setattr(gs, "export_onnx", counted_export)
    return counts


@pytest.fixture
def applies(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How often the manager splices a set of rewrites into a fresh copy (each needs one export)."""
    counts: Counter = Counter()
    real = manager.apply_rewrites

    def counted(*a, **kw):  # type: ignore[no-untyped-def]
        model, n_perm = real(*a, **kw)
        counts["apply"] += 1
        counts["gather"] += any(n.op_type == "Gather" for n in model.graph.node) or n_perm > 0
        return model, n_perm

    monkeypatch.setattr(manager, "apply_rewrites", counted)
    return counts


def _layer_models(res: lr.CompressResult) -> int:
    """One-layer models the layer checks built: each measured candidate, and its layer's original."""
    total = 0
    for r in res.layers:
        built = sum(1 for a in r.attempts if a.out_error is not None)
        total += built + (1 if built else 0)
    return total


def _calib(n: int = 32) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_the_rank_rule_path_imports_once_and_exports_what_onnxruntime_runs(conversions: Counter,
                                                                           applies: Counter) -> None:
    res = lr.compress(small_cnn(), method="svd", rank_ratio=0.5, allow_slower=True, end_to_end=False)
    assert res.changed and res.rewritten
    assert conversions["import"] == 1
    assert applies["apply"] == 1 and applies["gather"] == 0
    assert conversions["export_model"] == 1 + applies["apply"]  # the folded model, the spliced one
    assert conversions["model_from_graph"] == _layer_models(res) > 0
    assert set(conversions) == {"import", "export_model", "model_from_graph"}


def test_the_default_path_without_calibration_imports_once(conversions: Counter, applies: Counter) -> None:
    # the README's no-calib default (energy 0.98): on random weights nothing is worth rewriting
    res = lr.compress(small_cnn(), allow_slower=True, end_to_end=False)
    assert conversions["import"] == 1
    assert conversions["export_model"] == 1 + applies["apply"]
    assert conversions["model_from_graph"] == _layer_models(res)


def test_guards_and_reconstruction_splice_copies_without_importing(conversions: Counter, applies: Counter) -> None:
    # calibration data, a rank rule (sequential reconstruction) and a fidelity guard: the
    # manager splices many plans; each is one export and no import. Reconstruction builds its
    # partially rewritten models on the network up to the chosen layers (small_cnn's head is
    # cut off): one more import, once per run
    res = lr.compress(small_cnn(), method="svd", rank_ratio=0.5, calib=_calib(), min_top1=0.5, allow_slower=True,
                      end_to_end=False)
    assert res.changed
    assert applies["apply"] > 1
    assert conversions["import"] == 2
    assert conversions["export_model"] == 1 + applies["apply"]
    assert conversions["model_from_graph"] == _layer_models(res)


def test_the_accuracy_budget_path_imports_once(conversions: Counter, applies: Counter) -> None:
    # the README's main command on a small model: --calib and no rule = --min-agreement 0.99
    lr.compress(small_cnn(), calib=_calib(48), allow_slower=True, end_to_end=False)
    assert conversions["import"] == 1
    assert conversions["export_model"] == 1 + applies["apply"]
    assert set(conversions) <= {"import", "export_model", "model_from_graph"}


def test_a_folded_permutation_costs_one_export_more_and_no_import(conversions: Counter, applies: Counter) -> None:
    res = lr.compress(small_cnn(), method="mono", method_options={"colors": 4}, allow_slower=True, end_to_end=False)
    layer = next(r for r in res.layers if r.method == "mono")
    assert "perm=folded" in layer.params
    assert conversions["import"] == 1
    assert applies["apply"] == 1
    assert conversions["export_model"] == 1 + 2 * applies["apply"]


# ---- adopt / copy_graph / splice_all -----------------------------------------------------------


def _tensors(graph: gs.Graph) -> dict[str, tuple]:
    out = {}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant):
            out[name] = ("const", t.values.dtype, tuple(t.values.shape), t.values.tobytes())
        else:
            out[name] = ("var", t.dtype, None if t.shape is None else tuple(t.shape))
    return out


def test_adopt_gives_what_a_reimport_gives() -> None:
    model = small_cnn()
    graph = import_graph(model)
    for t in graph.tensors().values():  # stale annotations a re-import would not have
        if isinstance(t, gs.Variable) and t.name == "r1":
            t.shape = [7, 7]
    exported = export_model(graph, like=model)
    adopted = adopt(graph, exported)
    fresh = import_graph(exported)
    assert _tensors(adopted) == _tensors(fresh)
    assert [n.name for n in adopted.nodes] == [n.name for n in fresh.nodes]
    assert adopted.tensors()["c2"].shape == fresh.tensors()["c2"].shape == ["N", 16, 16, 16]


def test_copy_graph_is_independent_and_exports_the_same_model() -> None:
    model = small_cnn(bn=False)
    graph = import_graph(model)
    base = export_model(graph, like=model)
    adopt(graph, base)
    _ = graph.tensors()["w2"].values  # a pass read (loaded) a weight
    work = copy_graph(graph, base)
    conv = next(n for n in work.nodes if n.name == "conv2")
    names = Names.for_graph(work)
    splice_all(work, [(conv, [names.scoped("conv2").node("Identity", "id", [conv.inputs[0]], [conv.outputs[0]])])])
    assert "conv2" not in {n.name for n in work.nodes} and "w2" not in work.tensors()
    assert "conv2" in {n.name for n in graph.nodes} and "w2" in graph.tensors()
    # the untouched graph still exports the folded model, bit for bit, weights included
    again = export_model(copy_graph(graph, base), like=model)
    assert again.SerializeToString() == base.SerializeToString()
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(again, x)[0], run_ort(model, x)[0])


def test_splice_all_cleans_up_and_sorts_once_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = import_graph(small_cnn(bn=False))
    calls: Counter = Counter()
    real_cleanup, real_sort = gs.Graph.cleanup, gs.Graph.toposort

    def cleanup(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls["cleanup"] += 1
        return real_cleanup(self, *a, **kw)

    def toposort(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls["toposort"] += 1
        return real_sort(self, *a, **kw)

    monkeypatch.setattr(gs.Graph, "cleanup", cleanup)
    monkeypatch.setattr(gs.Graph, "toposort", toposort)
    names = Names.for_graph(graph)
    batch = []
    for node in [n for n in graph.nodes if n.op in ("Conv", "Gemm")]:
        n = names.scoped(node.name)
        batch.append((node, [n.node("Identity", "id", [node.inputs[0]], [node.outputs[0]])]))
    assert len(batch) == 3
    splice_all(graph, batch)
    assert calls == Counter(cleanup=1, toposort=1)
    assert [n.op for n in graph.nodes].count("Identity") == 3
