"""The pass infrastructure and the pipeline built from the options: each pass keeps its in-place
contract, build_pipeline builds what the options ask for, details leave through PassResult."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import random_feed, run
from fixtures import TOPOLOGIES

from gkp_onnx.api import build_pipeline
from gkp_onnx.graph import ensure_node_names, input_specs
from gkp_onnx.options import OptimizeOptions
from gkp_onnx.pipeline import Pass, PassResult, run_passes
from gkp_onnx.plan import Plan
from gkp_onnx.validate import Dataset


def _names(passes: list[Pass]) -> list[str]:
    return [p.name for p in passes]


def _model(name: str = "residual_stream"):
    model = TOPOLOGIES[name]()
    ensure_node_names(model)
    return model


def test_build_pipeline_builds_what_the_options_ask_for():
    specs = input_specs(_model())
    default = build_pipeline(OptimizeOptions(), specs)
    assert _names(default.analyze + default.partition + default.decide + default.finish) == [
        "analyze", "partition_streams", "cluster", "choose_groups", "select_kernels",
        "permute_streams", "rewrite_conv", "fold_gathers"]
    forced = build_pipeline(OptimizeOptions(groups=4, fold=False), specs)
    assert forced.partition == [] and _names(forced.finish) == ["permute_streams", "rewrite_conv"]
    data = Dataset({"x": np.zeros((2, 8, 10, 10), np.float32)})
    refit = build_pipeline(OptimizeOptions(reconstruct=True, calib="unused.npz", share_streams=False), specs,
                           reference=_model(), data=data)
    assert refit.partition == [] and "reconstruct" in _names(refit.finish)
    assert build_pipeline(OptimizeOptions(gkp=False), specs).analyze == []


def test_cluster_and_choose_groups_share_one_scorer():
    pipeline = build_pipeline(OptimizeOptions(), input_specs(_model()))
    cluster, choose, _ = pipeline.decide
    assert cluster.viable.__self__ is choose.scorer  # neither pass calls the other


@pytest.mark.parametrize("topology", ["residual_stream", "concat", "bn_chain"])
def test_every_pass_keeps_its_in_place_contract(topology):
    """in_place = False: the model given is left byte for byte as it was; the pipeline's output
    equals the one run_passes(keep=True) gives, and the input of that run is untouched too."""
    model = _model(topology)
    pipeline = build_pipeline(OptimizeOptions(ratio=0.5), input_specs(model))
    plan = Plan(ratio=0.5, method="leanflex", seed=0)
    run_passes(pipeline.analyze, model, plan)
    analysed, plan = run_passes(pipeline.partition, model, plan)
    run_passes(pipeline.decide, analysed, plan)
    current = model
    for p in pipeline.finish:
        before = current.SerializeToString()
        result = p(current, plan)
        if p.in_place:
            assert result.model is current, p.name
        else:
            assert current.SerializeToString() == before, f"{p.name} edited the model it was given"
        current = result.model
    given = model.SerializeToString()
    kept, _ = run_passes(pipeline.finish, model, plan, keep=True)
    assert model.SerializeToString() == given
    feed = random_feed(model)
    np.testing.assert_allclose(run(kept, feed)[0], run(current, feed)[0], rtol=1e-5, atol=1e-5)


def test_run_passes_merges_the_details_of_every_pass():
    class Finds(Pass):
        name, in_place = "finds", False

        def __init__(self, key):
            self.key = key

        def call(self, model, plan):
            return PassResult(model, plan, modified=False, details={self.key: len(model.graph.node)})

    details = {}
    model = _model("chain")
    run_passes([Finds("a"), Finds("b")], model, Plan(ratio=0.0, method="leanflex", seed=0), details)
    assert details == {"a": len(model.graph.node), "b": len(model.graph.node)}


def test_no_pass_imports_another_pass():
    """The layering: passes import the graph layer, scoring, cost, plan and pipeline, never a pass."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "passes").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        assert not [m for m in imported if m.startswith("gkp_onnx.passes")], path.name
    for path in sorted((root / "gkp_onnx" / "graph").glob("*.py")):
        tree = ast.parse(path.read_text())
        modules = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        modules += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        allowed = (*sys.stdlib_module_names, "numpy", "onnx", "onnx_graphsurgeon", "onnxruntime.tools", "gkp_onnx.graph",
                   "gkp_onnx.errors")
        assert [m for m in modules if not any(m == a or m.startswith(a + ".") for a in allowed)] == [], path.name


def test_optimize_and_the_cli_need_no_torch(tmp_path):
    """torch is the [recover] extra: optimize runs without it; --reconstruct says what to install."""
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(_model("residual"), path)
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 8, 10, 10), np.float32))
    blocked = tmp_path / "no-torch" / "torch"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")")
    script = f"""
import sys
sys.path.insert(0, r"{blocked.parent}")  # as if torch were not installed: importing it fails
from gkp_onnx.cli import main
assert main(["optimize", r"{path}", r"{tmp_path / 'out.onnx'}", "--ratio", "0.5"]) == 0
assert main(["optimize", r"{path}", r"{tmp_path / 'r.onnx'}", "--calib", r"{tmp_path / 'calib.npz'}",
             "--reconstruct"]) == 2
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reconstruction (--reconstruct) needs torch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.onnx").exists()
