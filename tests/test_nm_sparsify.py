import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import random_feed, run, shared_file

from gkp_onnx import optimize
from gkp_onnx.errors import GkpError
from gkp_onnx.nm import tensorrt_sparse_likely
from gkp_onnx.nm import nm_mask, parse_nm, satisfies_nm
from gkp_onnx.passes.nm_sparsify import NmSparsify
from gkp_onnx.plan import Plan


def build(nodes, inits, x_shape, out="y", dtype=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "nm", [helper.make_tensor_value_info("x", dtype, x_shape)], [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend([inferred[out]])
    onnx.checker.check_model(model, full_check=True)
    return model


def weight(name, shape, dtype=np.float32, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(dtype), name)


def weights_of(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def mlp(dtype=np.float32, elem=TensorProto.FLOAT):
    """x [2, 16] -> MatMul W1 [16, 32] -> Relu -> MatMul W2 [32, 8] (a head: produces the output)."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    return build(nodes, [weight("w1", [16, 32], dtype), weight("w2", [32, 8], dtype, 1)], [2, 16], dtype=elem)


def test_nm_mask_matches_a_loop_and_the_checker():
    scores = np.random.default_rng(0).random((6, 12, 3))
    mask = nm_mask(scores, axis=1, n=2, m=4)
    for i in range(6):
        for k in range(3):
            for run_start in range(0, 12, 4):
                run_scores = scores[i, run_start:run_start + 4, k]
                expected = set(np.argsort(-run_scores)[:2])
                assert set(np.flatnonzero(mask[i, run_start:run_start + 4, k])) == expected
    assert satisfies_nm(np.where(mask, scores, 0), 1, 2, 4)
    assert not satisfies_nm(scores, 1, 2, 4)
    assert not satisfies_nm(np.where(mask, scores, 0), 0, 2, 4)  # 6 rows: not a multiple of 4


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8)
    for bad in ("4:2", "2/4", "0:4", "2:2"):
        with pytest.raises(GkpError):
            parse_nm(bad)


def test_matmul_pruned_along_reduction_axis_and_head_kept_dense():
    model = mlp()
    out, report = optimize(model, gkp=False, nm="2:4", nm_permute=False)
    w = weights_of(out)
    assert satisfies_nm(w["w1"], 0, 2, 4) and (w["w1"] != 0).mean() == 0.5
    np.testing.assert_array_equal(w["w2"], weights_of(model)["w2"])  # the head
    assert [layer.node for layer in report.nm.layers] == ["fc1"]
    assert "graph output" in dict(report.nm.skipped)["fc2"]
    out, report = optimize(model, gkp=False, nm="2:4", nm_include_head=True, nm_permute=False)
    assert satisfies_nm(weights_of(out)["w2"], 0, 2, 4)
    assert report.nm.eligible_mac_share == 1.0


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_axis_follows_transB(trans_b):
    shape = [8, 16] if trans_b else [16, 8]  # B is [N, K] with transB
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm", transB=trans_b),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = build(nodes, [weight("w", shape), weight("b", [8])], [2, 16])
    out, _ = optimize(model, gkp=False, nm="2:4", nm_permute=False)
    w = weights_of(out)["w"]
    assert satisfies_nm(w, 1 if trans_b else 0, 2, 4)
    assert not satisfies_nm(w, 0 if trans_b else 1, 2, 4)


def test_weight_behind_transpose_is_masked_on_the_mapped_axis():
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = build(nodes, [weight("w", [8, 16])], [2, 16])  # MatMul B = w^T: K is w's axis 1
    out, report = optimize(model, gkp=False, nm="2:4")
    assert report.nm.layers[0].axis == 1 and satisfies_nm(weights_of(out)["w"], 1, 2, 4)


def test_transpose_without_perm_reverses_the_axes():
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t"),  # default: reverse
             helper.make_node("MatMul", ["x", "wt"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = build(nodes, [weight("w", [8, 16])], [2, 16])
    out, report = optimize(model, gkp=False, nm="2:4")
    assert report.nm.layers[0].axis == 1 and satisfies_nm(weights_of(out)["w"], 1, 2, 4)


def test_dequantize_linear_pruned_to_the_zero_point():
    q = numpy_helper.from_array(np.random.default_rng(0).integers(-100, 100, (16, 8)).astype(np.int8), "wq")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"], name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    inits = [q, numpy_helper.from_array(np.float32(0.05), "scale"), numpy_helper.from_array(np.int8(3), "zero")]
    model = build(nodes, inits, [2, 16])
    out, _ = optimize(model, gkp=False, nm="2:4")
    wq = weights_of(out)["wq"]
    assert satisfies_nm(wq.astype(np.int32) - 3, 0, 2, 4)
    kept = wq != 3
    np.testing.assert_array_equal(wq[kept], weights_of(model)["wq"][kept])


def test_shared_weight_and_odd_reduction_are_skipped():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h1"], name="a"),
             helper.make_node("MatMul", ["x", "w"], ["h2"], name="b"),
             helper.make_node("MatMul", ["x", "w6"], ["h3"], name="c"),
             helper.make_node("Add", ["h1", "h2"], ["s"], name="add"),
             helper.make_node("Concat", ["s", "h3"], ["y"], name="cat", axis=1)]
    model = build(nodes, [weight("w", [18, 8]), weight("w6", [18, 8])], [2, 18])
    with pytest.raises(GkpError, match="nothing to optimize: no weight N:M can sparsify .reduction length 18 is not a multiple of 4; weight is shared"):
        optimize(model, gkp=False, nm="2:4")


def test_fp16_weights_stay_fp16():
    model = mlp(np.float16, TensorProto.FLOAT16)
    out, _ = optimize(model, gkp=False, nm="2:4")
    w1 = next(t for t in out.graph.initializer if t.name == "w1")
    assert w1.data_type == TensorProto.FLOAT16 and satisfies_nm(numpy_helper.to_array(w1), 0, 2, 4)


def test_calibration_aware_score_keeps_the_weights_of_loud_channels(tmp_path):
    model = mlp()
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    x[:, 0] *= 1000  # channel 0 carries almost all the signal
    np.savez(tmp_path / "calib.npz", x=x)
    out, report = optimize(model, gkp=False, nm="2:4", nm_permute=False, calib=str(tmp_path / "calib.npz"))
    assert report.nm.layers[0].score == "calibration"
    assert (weights_of(out)["w1"][0] != 0).all()  # every weight reading channel 0 survives
    plain, _ = optimize(model, gkp=False, nm="2:4", nm_permute=False)
    assert not (weights_of(plain)["w1"][0] != 0).all()


def test_nm_conv_prunes_input_channels_of_grouped_convs_too():
    from fixtures import TOPOLOGIES
    model = TOPOLOGIES["chain"]()
    out, report = optimize(model, ratio=0.5, groups=2, min_group_width=1, nm="2:4", nm_conv=True)
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    w = weights_of(out)
    assert all(satisfies_nm(w[c.input[1]], 1, 2, 4) for c in convs)
    feed = random_feed(model)
    assert run(out, feed)[0].shape == run(model, feed)[0].shape


def test_tensorrt_rule():
    assert tensorrt_sparse_likely([384, 1152], 0, True, 2, 4)
    assert not tensorrt_sparse_likely([64, 64], 0, True, 2, 4)
    assert not tensorrt_sparse_likely([384, 1152], 0, False, 2, 4)


def test_real_tiny_llama_all_projections_2_4_head_dense():
    path = shared_file("tinyllama-aidreams260K/aidreams260K_derived.onnx")
    model = onnx.load(path)
    out, report = optimize(path, gkp=False, nm="2:4", input_shapes={"input_ids": [1, 16]}, validate=False)
    assert len(report.nm.layers) == 28  # 4 layers x (q, k, v, o, w1, w2, w3)
    assert sum(layer.permuted for layer in report.nm.layers) == 4  # every FFN down-projection
    w, original = weights_of(out), weights_of(model)
    for layer in report.nm.layers:
        assert satisfies_nm(w[layer.weight], layer.axis, 2, 4)
        assert layer.kept_magnitude >= layer.kept_magnitude_plain - 1e-12
    head = next(n for n in model.graph.node if n.output[0] == "logits")
    np.testing.assert_array_equal(w[head.input[1]], original[head.input[1]])


def test_weight_behind_cast_is_masked_in_its_stored_dtype():
    nodes = [helper.make_node("Cast", ["w16"], ["w"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = build(nodes, [weight("w16", [16, 8], np.float16)], [2, 16])
    out, report = optimize(model, gkp=False, nm="2:4")
    w16 = next(t for t in out.graph.initializer if t.name == "w16")
    assert w16.data_type == TensorProto.FLOAT16 and satisfies_nm(numpy_helper.to_array(w16), 0, 2, 4)
    assert report.nm.layers[0].weight == "w16"


def test_exclude_keeps_a_layer_dense():
    model = mlp()
    with pytest.raises(GkpError, match="excluded by --exclude"):
        optimize(model, gkp=False, nm="2:4", exclude=["fc1"])
    out, report = optimize(model, gkp=False, nm="2:4", exclude=["fc1"], nm_include_head=True)
    assert [layer.node for layer in report.nm.layers] == ["fc2"]
    w1, original = weights_of(out)["w1"], weights_of(model)["w1"]
    assert (w1 != 0).all()  # excluded: dense; its columns may carry fc2's free channel permutation
    np.testing.assert_array_equal(np.sort(w1, axis=1), np.sort(original, axis=1))


def test_pass_leaves_2_of_every_4_weights_along_the_reduction_axis():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),  # x [2, 16] @ w [16, 8]: K = 16
             helper.make_node("Relu", ["h"], ["y"], name="act")]
    model = build(nodes, [weight("w", [16, 8])], [2, 16])
    original = weights_of(model)["w"]
    result = NmSparsify(n=2, m=4)(model, Plan(ratio=0.0, method="l2", seed=0))
    w = weights_of(result.model)["w"]
    assert result.modified and satisfies_nm(w, 0, 2, 4) and (w != 0).mean() == 0.5
    runs = np.abs(original).reshape(4, 4, 8)  # [run, position in the run, column]
    np.testing.assert_array_equal(w != 0, (runs >= np.sort(runs, axis=1)[:, 2:3]).reshape(16, 8))  # the 2 largest |w|
    np.testing.assert_array_equal(w[w != 0], original[w != 0])
    assert [layer.node for layer in result.details["nm"].layers] == ["mm"]
    assert isinstance(result.details["output_orders"], dict)


def test_calibration_scores_of_a_grouped_conv_use_each_groups_own_input_channels():
    """Filter f of group g reads input channels g*w .. (g+1)*w - 1: its kept weights follow their norms."""
    from gkp_onnx.nm import WeightRef, mask_for

    weight = np.ones((2, 2, 1, 1), np.float32)  # 2 groups, 1 filter and 2 input channels each
    ref = WeightRef("conv", "Conv", "w", axis=1)
    mask = mask_for(ref, weight, {}, np.array([1.0, 5.0, 7.0, 2.0]), n=1, m=2)
    assert mask[:, :, 0, 0].tolist() == [[False, True], [True, False]]
