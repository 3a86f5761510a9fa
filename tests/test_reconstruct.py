import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import run
from fixtures import TOPOLOGIES

from gkp_onnx import optimize
from gkp_onnx.cli import main
from gkp_onnx.passes.reconstruct import _attrs, patches


@pytest.fixture
def calib(tmp_path):
    def make(model, n=48, seed=0):
        dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
        path = tmp_path / f"calib{seed}.npz"
        np.savez(path, x=x)
        return str(path), x
    return make


@pytest.mark.parametrize("topology", ["chain", "residual", "stride2", "padding_variants", "dilation",
                                      "kernel_sizes", "bn_chain"])
def test_refit_at_ratio_zero_reproduces_every_layer(topology, calib):
    # nothing pruned: the least-squares refit must find the original kernels again (exercises
    # im2col against strides, asymmetric pads, auto_pad, dilation, non-square kernels)
    model = TOPOLOGIES[topology]()
    path, _ = calib(model)
    _, report = optimize(model, ratio=0.0, groups=2, min_group_width=1, calib=path, reconstruct=True)
    for before, after in report.reconstruction.values():  # float32 Gram sums: ~1e-7 noise
        assert after <= before and after < 1e-5


@pytest.mark.parametrize("topology", ["stride2", "padding_variants", "dilation", "kernel_sizes"])
def test_im2col_matches_onnxruntime_conv(topology):
    model = TOPOLOGIES[topology]()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(0).standard_normal([2, 8, 12, 12]).astype(np.float32)
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[0] != "x":
            continue
        single = helper.make_model(helper.make_graph(
            [helper.make_node("Conv", node.input[:2], ["y"], **_attrs(node))], "one",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weights[node.input[1]], node.input[1])]),
            opset_imports=[helper.make_opsetid("", 17)])
        expected = run(single, {"x": x})[0]
        w = weights[node.input[1]]
        cols = patches(x, _attrs(node), list(w.shape[2:])).numpy()  # [N, C*k, L]
        got = np.einsum("ok,nkl->nol", w.reshape(w.shape[0], -1), cols).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_refit_never_worsens_a_layer_and_brings_the_output_closer(groups, calib):
    model = TOPOLOGIES["residual"]()
    path, x = calib(model)
    plain, _ = optimize(model, ratio=0.5, groups=groups, min_group_width=1)
    refit, report = optimize(model, ratio=0.5, groups=groups, min_group_width=1, calib=path, reconstruct=True)
    assert all(after <= before for before, after in report.reconstruction.values())
    assert any(after < 0.9 * before for before, after in report.reconstruction.values())
    _, held_out = calib(model, seed=1)
    reference = run(model, {"x": held_out})[0]
    error = lambda m: np.mean((run(m, {"x": held_out})[0] - reference) ** 2)  # noqa: E731
    assert error(refit) < error(plain)
    assert [n.op_type for n in refit.graph.node] == [n.op_type for n in plain.graph.node]


def test_reconstruct_without_calibration_data_is_an_input_error(tmp_path, capsys):
    import onnx
    path = tmp_path / "m.onnx"
    onnx.save(TOPOLOGIES["chain"](), path)
    assert main(["optimize", str(path), str(tmp_path / "o.onnx"), "--reconstruct"]) == 2
    assert "--reconstruct needs calibration data" in capsys.readouterr().err
