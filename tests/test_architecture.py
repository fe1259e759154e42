"""The package's shape: the import DAG matches CONTRIBUTING.md, passes describe and never
decide or run sessions, every method reacts to --metric data as it declares, and the
new-method recipe of CONTRIBUTING.md works as written."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import run_ort, small_cnn

import onnxslim_lr as lr
from onnxslim_lr.cost import svd_macs
from onnxslim_lr.decompose.svd import channel_spectrum, channel_svd
from onnxslim_lr.passes import base as passes_base
from onnxslim_lr.passes import registry
from onnxslim_lr.passes.base import Candidate, Pass, conv_node, match_conv, register, spatial_attrs
from onnxslim_lr.planning import Ladder

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "onnxslim_lr"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> package modules it imports (module level or inside functions)."""
    edges: dict[str, set[str]] = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    targets.append(f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps.update(t for t in targets if t in mods and t != name)
        edges[name] = deps
    return edges


def _documented_layers() -> dict[str, int]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    block = text.split("<!-- layers: begin -->", 1)[1].split("<!-- layers: end -->", 1)[0]
    layers: dict[str, int] = {}
    for line in block.splitlines():
        m = re.match(r"\s*layer\s+(\d+)\s+(.*)", line)
        if m:
            for item in m.group(2).split():
                layers[item] = int(m.group(1))
    return layers


def _layer_of(module: str, layers: dict[str, int]) -> int | None:
    path = module.replace(".", "/")
    short = path[len("onnxslim_lr/"):] if path.startswith("onnxslim_lr/") else path
    if short in layers:
        return layers[short]
    parent = short.rsplit("/", 1)[0] + "/*" if "/" in short else None
    return layers.get(parent) if parent else None


def test_import_graph_is_the_documented_layering() -> None:
    mods = _modules()
    edges = _imports(mods)
    layers = _documented_layers()
    assert layers, "CONTRIBUTING.md has no layer block"
    missing = sorted(m for m in mods if _layer_of(m, layers) is None)
    assert not missing, f"modules missing from CONTRIBUTING.md's layers: {missing}"
    upward = []
    for m, deps in edges.items():
        for d in deps:
            lm, ld = _layer_of(m, layers), _layer_of(d, layers)
            inside_numerics = m.startswith("onnxslim_lr.decompose.") and d.startswith("onnxslim_lr.decompose")
            if not (ld < lm or inside_numerics):  # type: ignore[operator]
                upward.append(f"{m} (layer {lm}) imports {d} (layer {ld})")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_import_graph_is_acyclic() -> None:
    edges = _imports(_modules())
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])


RANK_RULES = re.compile(r"\b(rank_ratio|target_speedup|budget\.energy|DEFAULT_ENERGY|choose_rank|rank_for_energy|"
                        r"rank_from_ratio|_rank_for_speedup|ranks_for_speedup)\b")


@pytest.mark.parametrize("path", sorted((PKG / "passes").glob("*.py")), ids=lambda p: p.name)
def test_passes_run_no_session_and_do_not_import_the_api(path: Path) -> None:
    src = path.read_text()
    assert "make_session" not in src and "InferenceSession" not in src
    parts = path.relative_to(ROOT).with_suffix("").parts
    deps = _imports(_modules())[".".join(parts[:-1] if parts[-1] == "__init__" else parts)]
    assert not {"onnxslim_lr.api", "onnxslim_lr.manager", "onnxslim_lr.cli"} & deps


@pytest.mark.parametrize("path", sorted((PKG / "passes").glob("*.py")), ids=lambda p: p.name)
def test_ladder_passes_contain_no_rank_rule(path: Path) -> None:
    code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    body = code.split('"""', 2)[-1]  # the module docstring may describe the rules
    assert not RANK_RULES.findall(body), f"{path.name} decides ranks itself"


# ---- --metric data: every method honours it or says it has no data-aware form -----------------


def _calib(n: int = 8) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("method", sorted(registry()))
def test_every_method_reacts_to_the_data_metric_as_declared(method: str) -> None:
    model = small_cnn(c=16)
    # reconstruction off: this checks the fit of the factors themselves (the metric), not the refit
    kw = dict(method=method, allow_slower=True, end_to_end=False, calib=_calib(), rank_ratio=0.5, reconstruct="none")
    data = lr.compress(model, metric="data", **kw)
    frob = lr.compress(model, metric="frobenius", **kw)
    aware = registry()[method].data_aware
    note = [n for n in data.notes if "no data-aware form" in n]
    rewritten = [(d, f) for d, f in zip(data.layers, frob.layers) if d.status == "rewritten" == f.status]
    assert rewritten, f"{method}: nothing rewritten on the test model"
    if aware:
        assert not note
        # the approximation is fitted and measured in the data metric: its error changes
        assert any(abs(d.rel_error - f.rel_error) > 1e-6 for d, f in rewritten if np.isfinite(d.rel_error))
    else:
        assert note and method in note[0]
        # no data-aware form: the very same factors
        assert all(d.params == f.params and (d.rel_error == f.rel_error or not np.isfinite(d.rel_error))
                   for d, f in rewritten)
        assert any("Frobenius" in n for n in data.notes)


# ---- the new-method recipe of CONTRIBUTING.md ------------------------------------------------------


class HalfRankPass(Pass):
    """CONTRIBUTING.md's example, verbatim in substance: a channel SVD described as a ladder."""

    name = "half-svd"
    summary = "channel SVD (example)"

    def match(self, node, ctx):  # type: ignore[no-untyped-def]
        return match_conv(node, ctx)

    def ladder(self, site, ctx, settings):  # type: ignore[no-untyped-def]
        F, C, kh, kw = site.weight.shape
        full = min(F, C * kh * kw)
        hw = site.out_hw
        macs = lambda s: svd_macs(F, C, kh, kw, *hw, s[0]) if hw else 0  # noqa: E731

        def build(s):  # type: ignore[no-untyped-def]
            fac = channel_svd(site.weight, s[0])

            def nodes(x, y, names):  # type: ignore[no-untyped-def]
                n = names.scoped(f"{site.name}/half")
                mid = n.var("mid")
                return [conv_node(n, "a", x, mid, fac.first, **spatial_attrs(site.attrs)),
                        conv_node(n, "b", mid, y, fac.second, site.bias)]

            return Candidate(self.name, {"rank": s[0]}, site.macs(), macs(s), fac.rel_error, nodes)

        return Ladder(full=(full,), rungs=[(r,) for r in range(1, full + 1)], macs_before=site.macs(),
                      macs=macs, build=build, spectra=lambda: [[channel_spectrum(site.weight)]])


@pytest.fixture
def example_pass():
    register(HalfRankPass)
    try:
        yield HalfRankPass
    finally:
        passes_base._REGISTRY.pop(HalfRankPass.name, None)


def test_the_example_pass_is_exact_at_full_rank_and_follows_every_rule(example_pass) -> None:
    model = small_cnn(c=16)
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    res = lr.compress(model, method="half-svd", rank_ratio=1.0, allow_slower=True, end_to_end=False)
    assert [r.status for r in res.layers if r.op == "Conv"] == ["rewritten", "rewritten"]
    np.testing.assert_allclose(run_ort(res.model, {"x": x})[0], run_ort(model, {"x": x})[0], rtol=1e-3, atol=1e-4)
    # the planner's rules reach a pass that never mentions them: the same ranks as svd's
    for rule in ({"rank_ratio": 0.5}, {"target_speedup": 2.0}, {"energy": 0.9}, {}):
        mine = lr.compress(model, method="half-svd", allow_slower=True, end_to_end=False, **rule)
        ref = lr.compress(model, method="svd", allow_slower=True, end_to_end=False, **rule)
        got = [r.params for r in mine.layers if r.op == "Conv"]
        want = [r.params.split(",")[0] for r in ref.layers if r.op == "Conv"]
        assert got == want, rule
