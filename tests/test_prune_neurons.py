"""prune_neurons: feed-forward neurons removed, every kept neuron computes what it did."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cli_error, run
from gkp_onnx import optimize
from gkp_onnx.cli import main
from gkp_onnx.passes.prune_neurons import PruneNeurons, ffn_regions
from gkp_onnx.structured import kept_neurons
from gkp_onnx.plan import Plan

D, F = 32, 128


def ffn(kind: str = "gelu", trans_b: bool = False) -> onnx.ModelProto:
    """x [N, 8, D] -> up-projection [D, F] (+ bias) -> activation -> down-projection [F, D] -> + x.
    kind: "gelu" (decomposed as exporters write it: x * 0.5 * (1 + erf(x / sqrt 2))), "swiglu"
    (silu(gate) * up), or "gemm" (x [N, D], Gemm with transB)."""
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
    scalar = lambda name, value: numpy_helper.from_array(np.array(value, np.float32), name)
    inits = [w("w_up", (D, F)), w("w_down", (F, D)), numpy_helper.from_array(rng.standard_normal(F).astype(np.float32), "b_up")]
    if kind == "gemm":
        inits = [w("w_up", (F, D)), w("w_down", (D, F)), inits[2], numpy_helper.from_array(np.zeros(D, np.float32), "b_down")]
        nodes = [helper.make_node("Gemm", ["x", "w_up", "b_up"], ["h"], transB=1, name="up"),
                 helper.make_node("Relu", ["h"], ["a"], name="act"),
                 helper.make_node("Gemm", ["a", "w_down", "b_down"], ["d"], transB=1, name="down"),
                 helper.make_node("Add", ["d", "x"], ["y"], name="residual")]
        shape = ["N", D]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w_up"], ["u"], name="up"),
                 helper.make_node("Add", ["u", "b_up"], ["h"], name="bias")]
        if kind == "gelu":
            inits += [scalar("sqrt2", np.sqrt(2.0)), scalar("one", 1.0), scalar("half", 0.5)]
            nodes += [helper.make_node("Div", ["h", "sqrt2"], ["s"], name="div"),
                      helper.make_node("Erf", ["s"], ["e"], name="erf"),
                      helper.make_node("Add", ["e", "one"], ["e1"], name="add1"),
                      helper.make_node("Mul", ["h", "e1"], ["g"], name="mul"),
                      helper.make_node("Mul", ["g", "half"], ["a"], name="mul_half")]
        else:
            inits.append(w("w_gate", (D, F)))
            nodes += [helper.make_node("MatMul", ["x", "w_gate"], ["gate"], name="gate"),
                      helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
                      helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
                      helper.make_node("Mul", ["silu", "h"], ["a"], name="glu")]
        nodes += [helper.make_node("MatMul", ["a", "w_down"], ["d"], name="down"),
                  helper.make_node("Add", ["d", "x"], ["y"], name="residual")]
        shape = ["N", 8, D]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("kind", ["gelu", "swiglu", "gemm"])
def test_kept_neurons_compute_what_they_did(kind):
    model = ffn(kind)
    x = np.random.default_rng(1).standard_normal([4, 8, D][-len(model.graph.input[0].type.tensor_type.shape.dim):])
    x = x.astype(np.float32)
    result = PruneNeurons(0.5)(onnx.ModelProto.FromString(model.SerializeToString()), Plan(ratio=0, method="x", seed=0))
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    (block,) = result.details["neurons"]
    assert block == {"consumers": ["down"], "neurons": F, "kept": F // 2}
    # the dense model with the removed neurons' outgoing weights zeroed is the same function
    before, after = weights(model), weights(pruned)
    down_axis = 1 if kind == "gemm" else 0
    kept = [j for j in range(F) if any(np.array_equal(np.take(before["w_down"], j, axis=down_axis),
                                                      np.take(after["w_down"], i, axis=down_axis)) for i in range(F // 2))]
    assert len(kept) == F // 2
    masked = onnx.ModelProto.FromString(model.SerializeToString())
    for init in masked.graph.initializer:
        if init.name == "w_down":
            zeroed = before["w_down"].copy()
            np.moveaxis(zeroed, down_axis, 0)[[j for j in range(F) if j not in kept]] = 0
            init.CopyFrom(numpy_helper.from_array(zeroed, "w_down"))
    np.testing.assert_allclose(run(pruned, {"x": x})[0], run(masked, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_kept_counts_round_to_blocks_of_16_and_a_ratio_of_0_keeps_everything():
    assert [kept_neurons(1536, r) for r in (0.0, 0.25, 0.5, 0.99)] == [1536, 1152, 768, 16]
    model = ffn()
    result = PruneNeurons(0.0)(model, Plan(ratio=0, method="x", seed=0))
    assert not result.modified and result.details["neurons"] == []


def test_a_block_read_by_anything_but_a_matmul_is_left_alone():
    model = ffn()
    model.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))  # the activation leaves
    assert ffn_regions(model) == []


def test_calibration_scores_and_refit_bring_the_output_closer(tmp_path):
    model = ffn("gelu")
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 8, D)) * np.linspace(0.1, 3, D)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    errors = {}
    for name, options in {"weights": {}, "calibration": dict(calib=str(tmp_path / "calib.npz")),
                          "refit": dict(calib=str(tmp_path / "calib.npz"), reconstruct=True)}.items():
        pruned, report = optimize(model, gkp=False, ffn_ratio=0.5, **options)
        assert report.neurons == [{"consumers": ["down"], "neurons": F, "kept": F // 2}]
        assert report.after.macs < 0.6 * report.before.macs
        errors[name] = float(np.mean((run(pruned, {"x": x})[0] - run(model, {"x": x})[0]) ** 2))
    assert errors["refit"] < errors["calibration"] and errors["refit"] < errors["weights"]


def test_command_line_ffn_ratio(tmp_path, capsys):
    path, out = tmp_path / "ffn.onnx", tmp_path / "out.onnx"
    onnx.save(ffn("swiglu"), path)
    assert main(["optimize", str(path), str(out), "--no-gkp", "--ffn-ratio", "0.25"]) == 0
    assert "feed-forward neurons: 1 block keeps 96 of 128" in capsys.readouterr().out
    assert numpy_helper.to_array(next(t for t in onnx.load(out).graph.initializer if t.name == "w_down")).shape == (96, D)
    for bad in ("1", "-0.1", "nan", "x"):
        line = cli_error(capsys, ["optimize", str(path), str(tmp_path / "bad.onnx"), "--no-gkp", "--ffn-ratio", bad],
                         usage=bad == "x")
        assert "--ffn-ratio" in line
    assert not (tmp_path / "bad.onnx").exists()


def test_the_refit_intercept_goes_into_the_bias_and_lowers_the_error():
    from gkp_onnx.passes.reconstruct import ReconstructNm
    from gkp_onnx.validate import Dataset

    model = ffn("gelu")
    model.graph.node[-1].input[1] = "b_down"  # residual Add -> a bias Add: y = down + b_down
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(D, np.float32), "b_down"))
    x = np.random.default_rng(3).standard_normal((64, 8, D)).astype(np.float32) + 1.0
    plan = Plan(ratio=0, method="x", seed=0)
    pruned = PruneNeurons(0.75)(onnx.ModelProto.FromString(model.SerializeToString()), plan).model
    errors = {}
    for intercept in (False, True):
        refit = ReconstructNm(model, Dataset({"x": x}), ["down"], intercept=intercept)(
            onnx.ModelProto.FromString(pruned.SerializeToString()), plan).model
        bias = numpy_helper.to_array(next(t for t in refit.graph.initializer if t.name == "b_down"))
        assert (np.abs(bias).max() > 0) == intercept
        errors[intercept] = float(np.mean((run(refit, {"x": x})[0] - run(model, {"x": x})[0]) ** 2))
    assert errors[True] < errors[False]


def test_a_block_reaching_two_consumers_through_two_tensors_is_pruned_once(tmp_path):
    model = ffn("gelu")
    rng = np.random.default_rng(4)
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(2.0), "two"),
                                    numpy_helper.from_array(rng.standard_normal((F, D)).astype(np.float32), "w_side")])
    model.graph.node.extend([helper.make_node("Mul", ["a", "two"], ["a2"], name="double"),
                             helper.make_node("MatMul", ["a2", "w_side"], ["side"], name="side_down"),
                             helper.make_node("Add", ["y", "side"], ["y2"], name="sum")])
    model.graph.output[0].name = "y2"
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8, D)).astype(np.float32))
    pruned, report = optimize(model, gkp=False, ffn_ratio=0.5, calib=str(tmp_path / "calib.npz"))
    assert report.neurons == [{"consumers": ["down", "side_down"], "neurons": F, "kept": F // 2}]
    assert weights(pruned)["w_up"].shape == (D, F // 2)


def test_n_m_after_neuron_pruning_refits_the_narrowed_projections_too(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).standard_normal((32, 8, D)).astype(np.float32))
    _, report = optimize(ffn("swiglu"), gkp=False, ffn_ratio=0.5, nm="2:4", calib=str(tmp_path / "calib.npz"),
                         reconstruct=True, nm_permute=True)
    assert {"up", "gate", "down", "down (structured)"} <= set(report.reconstruction)
    assert all(after <= before for before, after in report.reconstruction.values())
