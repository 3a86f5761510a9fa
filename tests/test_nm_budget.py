"""nm_budget: --min-cosine with --nm keeps N:M only on the layers the output fidelity can afford."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from gkp_onnx import optimize
from gkp_onnx.errors import GkpError
from gkp_onnx.nm import satisfies_nm
from gkp_onnx.options import Thresholds

WIDTHS = [64, 256, 256, 64, 64]  # four hidden MatMuls (the 16-wide head stays dense)


def deep_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(zip(WIDTHS, WIDTHS[1:] + [16])):
        inits.append(numpy_helper.from_array((rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in))
                                             .astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        current = f"h{i}"
        if i < len(WIDTHS) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"a{i}"], name=f"act{i}"))
            current = f"a{i}"
    graph = helper.make_graph(nodes, "deep_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("budget") / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((96, 64)).astype(np.float32))
    return str(path)


def sparse_under(budget, calib, **options):
    return optimize(deep_mlp(), gkp=False, nm="2:4", calib=calib, thresholds=Thresholds(min_cosine=budget), **options)


def test_the_budget_holds_and_a_tighter_one_keeps_fewer_layers_sparse(calib):
    counts = []
    for budget in (-1.0, 0.85, 0.9):
        _, report = sparse_under(budget, calib, nm_permute=False)
        assert report.fidelity.min_cosine >= budget and report.passed
        assert report.nm.budget["cosine"] == pytest.approx(report.fidelity.min_cosine, abs=1e-6)
        counts.append(len(report.nm.layers))
    assert counts[0] == 4 and counts == sorted(counts, reverse=True) and len(set(counts)) == 3


def test_layers_left_dense_get_their_exact_weights_back_and_say_why(calib):
    model = deep_mlp()
    out, report = sparse_under(0.88, calib, nm_permute=False)
    given = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    result = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    sparse = {layer.weight for layer in report.nm.layers}
    dense = [(node, reason) for node, reason in report.nm.skipped if "fidelity budget" in reason]
    assert sparse and dense and len(sparse) + len(dense) == 4
    for name in given:
        if name in sparse:
            assert satisfies_nm(result[name], 0, 2, 4)
        else:
            np.testing.assert_array_equal(result[name], given[name])
    assert all(layer.damage is not None and layer.damage >= 0 for layer in report.nm.layers)
    assert "fidelity budget: cosine >= 0.88" in report.table()


def test_permuted_and_refit_layers_keep_the_budget(calib):
    x = np.load(calib)["x"]
    for method in ("wanda", "sparsegpt"):
        out, report = sparse_under(0.99, calib, reconstruct=True, nm_method=method)
        assert report.fidelity.min_cosine >= 0.99 and 0 < len(report.nm.layers) < 4
        assert set(report.reconstruction) <= {layer.node for layer in report.nm.layers}
        reference, candidate = run(deep_mlp(), {"x": x})[0], run(out, {"x": x})[0]
        cosine = float((reference * candidate).sum() / np.linalg.norm(reference) / np.linalg.norm(candidate))
        assert cosine == pytest.approx(report.fidelity.min_cosine, abs=1e-5)  # the budget measured the model written


def test_a_budget_no_layer_fits_is_a_one_line_error(calib):
    with pytest.raises(GkpError, match="nothing to optimize.*kept dense by the fidelity budget"):
        sparse_under(0.99, calib)


def test_command_line_budget_writes_the_model_and_leaves_the_input(calib, tmp_path, capsys):
    import hashlib
    import json

    from conftest import cli_error
    from gkp_onnx.cli import main

    model, out, report = tmp_path / "mlp.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(deep_mlp(), model)
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    assert main(["optimize", str(model), str(out), "--no-gkp", "--nm", "2:4", "--calib", calib,
                 "--min-cosine", "0.88", "--report", str(report)]) == 0
    assert "fidelity budget: cosine >= 0.88" in capsys.readouterr().out
    saved = json.loads(report.read_text())["nm"]["budget"]
    assert saved["min_cosine"] == 0.88 and saved["cosine"] >= 0.88 and 0 < saved["sparse_layers"] < 4
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    line = cli_error(capsys, ["optimize", str(model), str(tmp_path / "none.onnx"), "--no-gkp", "--nm", "2:4",
                              "--calib", calib, "--min-cosine", "0.99"])
    assert "kept dense by the fidelity budget (cosine >= 0.99)" in line and not (tmp_path / "none.onnx").exists()
