"""The ONNX graph run in torch computes what onnxruntime computes, and writes back in place."""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from conftest import random_feed, run
from fixtures import TOPOLOGIES, GraphBuilder

from gkp_onnx import optimize
from gkp_onnx.errors import GkpError
from gkp_onnx.torch_graph import TorchGraph, trainable_initializers, write_back


def torch_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    graph = TorchGraph(model)
    with torch.no_grad():
        return [t.numpy() for t in graph(**{k: torch.from_numpy(v) for k, v in feed.items()})]


def assert_same_as_onnxruntime(model: onnx.ModelProto, feed=None, tol=1e-5) -> None:
    feed = feed or random_feed(model)
    for expected, actual in zip(run(model, feed), torch_run(model, feed), strict=True):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("topology", sorted(set(TOPOLOGIES) - {"subgraph"}))  # no If / Loop in torch
def test_every_topology_matches_onnxruntime(topology):
    model = TOPOLOGIES[topology]()
    tol = 2e-2 if topology == "fp16" else 1e-5
    assert_same_as_onnxruntime(model, tol=tol)
    if topology not in ("depthwise", "shared_weight", "fp16"):
        optimized, _ = optimize(model, ratio=0.5, groups=2, min_group_width=1, validate=False)
        assert any(n.op_type == "Gather" or max((a.i for a in n.attribute if a.name == "group"), default=1) > 1
                   for n in optimized.graph.node)
        assert_same_as_onnxruntime(optimized)


def single_op(op_type: str, inputs: dict[str, np.ndarray], constants: dict[str, np.ndarray] | None = None,
              outputs: int = 1, opset: int = 17, **attrs) -> tuple[onnx.ModelProto, dict]:
    constants = constants or {}
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                    for name, a in inputs.items()]
    names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op_type, [*inputs, *constants], names, **attrs)
    graph = helper.make_graph([node], "op", graph_inputs, [helper.make_value_info(n, onnx.TypeProto()) for n in names],
                              [numpy_helper.from_array(v, k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, inputs


X = np.random.default_rng(0).standard_normal((2, 3, 6, 7)).astype(np.float32)
I64 = np.int64

OP_CASES = {
    "slice_negative_step": ("Slice", {"x": X}, {"s": np.array([-1, 5], I64), "e": np.array([-7, 0], I64),
                                                "a": np.array([3, 2], I64), "t": np.array([-2, -3], I64)}, {}),
    "slice_clamped": ("Slice", {"x": X}, {"s": np.array([1], I64), "e": np.array([2**62], I64),
                                          "a": np.array([-1], I64)}, {}),
    "pad_reflect": ("Pad", {"x": X}, {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], I64)}, {"mode": "reflect"}),
    "pad_edge": ("Pad", {"x": X}, {"p": np.array([0, 0, 1, 0, 0, 0, 0, 3], I64)}, {"mode": "edge"}),
    "pad_constant": ("Pad", {"x": X}, {"p": np.array([0, 1, 1, 0, 0, 0, 2, 1], I64),
                                       "v": np.array(1.5, np.float32)}, {}),
    "split_even": ("Split", {"x": X}, {}, {"axis": 2, "_outputs": 3, "_opset": 17}),
    "split_num_outputs": ("Split", {"x": X}, {}, {"axis": 2, "_outputs": 3, "num_outputs": 3}),
    "split_sizes": ("Split", {"x": X}, {"s": np.array([1, 5], I64)}, {"axis": 2, "_outputs": 2}),
    "gather_scalar": ("Gather", {"x": X}, {"i": np.array(-2, I64)}, {"axis": 3}),
    "gather_matrix": ("Gather", {"x": X}, {"i": np.array([[0, 2], [1, 1]], I64)}, {"axis": 1}),
    "max_pool_ceil": ("MaxPool", {"x": X}, {}, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    "avg_pool_pad": ("AveragePool", {"x": X}, {}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    "avg_pool_asym_include": ("AveragePool", {"x": X}, {}, {"kernel_shape": [2, 2], "pads": [0, 1, 1, 0],
                                                            "count_include_pad": 1}),
    "max_pool_same": ("MaxPool", {"x": X}, {}, {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "reduce_mean": ("ReduceMean", {"x": X}, {}, {"axes": [1, -1], "keepdims": 0, "_opset": 17}),
    "reduce_sum_input_axes": ("ReduceSum", {"x": X}, {"a": np.array([2], I64)}, {}),
    "softmax": ("Softmax", {"x": X}, {}, {"axis": 1}),
    "layer_norm": ("LayerNormalization", {"x": X}, {"g": np.linspace(0.5, 2, 42, dtype=np.float32).reshape(6, 7),
                                                    "b": np.full((6, 7), 0.1, np.float32)}, {"axis": 2}),
    "expand": ("Expand", {"x": X[:, :1]}, {"s": np.array([4, 2, 1, 1, 1], I64)}, {}),
    "tile": ("Tile", {"x": X}, {"r": np.array([1, 2, 1, 3], I64)}, {}),
    "trilu_lower": ("Trilu", {"x": X}, {"k": np.array(1, I64)}, {"upper": 0}),
    "transpose_default": ("Transpose", {"x": X}, {}, {}),
    "flatten": ("Flatten", {"x": X}, {}, {"axis": 2}),
    "unsqueeze": ("Unsqueeze", {"x": X}, {"a": np.array([-1, 0], I64)}, {}),
    "squeeze": ("Squeeze", {"x": X[:, :1]}, {"a": np.array([1], I64)}, {}),
    "gemm_trans": ("Gemm", {"a": X[0, 0].copy()}, {"b": np.ones((5, 6), np.float32), "c": np.ones(5, np.float32)},
                   {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    "clip": ("Clip", {"x": X}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.5, np.float32)}, {}),
    "hard_sigmoid": ("HardSigmoid", {"x": X}, {}, {"alpha": 0.3}),
    "gelu_tanh": ("Gelu", {"x": X}, {}, {"approximate": "tanh", "_opset": 20}),
    "conv1d_group": ("Conv", {"x": X[:, :, 0]}, {"w": np.ones((6, 1, 3), np.float32)},
                     {"group": 3, "pads": [2, 0], "strides": [2]}),
    "conv_transpose_pads": ("ConvTranspose", {"x": X}, {"w": np.random.default_rng(1).standard_normal(
        (3, 4, 3, 2)).astype(np.float32), "b": np.arange(4, dtype=np.float32)},
        {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 0]}),
    "dequantize_per_axis": ("DequantizeLinear", {"x": (X * 40).astype(np.int8)},
                            {"s": np.array([0.1, 0.2, 0.3], np.float32), "z": np.array([1, -2, 0], np.int8)},
                            {"axis": 1}),
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_semantics_match_onnxruntime(case):
    op, inputs, constants, attrs = OP_CASES[case]
    attrs = dict(attrs)
    outputs, opset = attrs.pop("_outputs", 1), attrs.pop("_opset", 18)
    model, feed = single_op(op, inputs, constants, outputs=outputs, opset=opset, **attrs)
    assert_same_as_onnxruntime(model, feed)


def test_shape_arithmetic_with_a_dynamic_batch():
    b = GraphBuilder()

    def const(name, value):
        b.inits.append(numpy_helper.from_array(value, name))
        return name

    shape = b.op("Shape", ["x"])
    first = b.op("Gather", [shape, const("zero", np.array(0, np.int64))], axis=0)
    rows = b.op("Unsqueeze", [first, const("axes", np.array([0], np.int64))])
    flat = b.op("Concat", [rows, const("rest", np.array([-1], np.int64))], axis=0)
    y = b.op("Reshape", [b.conv("x", 16), flat])
    filled = b.op("ConstantOfShape", [b.op("Shape", [y])], value=numpy_helper.from_array(np.array([2.0], np.float32)))
    model = b.build(b.op("Mul", [y, filled]))
    for batch in (1, 3):
        assert_same_as_onnxruntime(model, random_feed(model, batch=batch))


def test_trainable_initializers_are_weights_not_constants():
    optimized, _ = optimize(TOPOLOGIES["bn_chain"](), ratio=0.5, groups=2, min_group_width=1, validate=False,
                            nm="2:4", nm_conv=True, gkp=False)
    trainable = trainable_initializers(optimized)
    conv_weights = {n.input[1] for n in optimized.graph.node if n.op_type == "Conv"}
    assert conv_weights <= set(trainable) and all(trainable[w] for w in conv_weights)
    assert "bn.scale" in trainable and not trainable["bn.scale"]
    assert "bn.mean" not in trainable and "bn.var" not in trainable  # running statistics stay fixed
    assert "scale.c" in trainable and "shift.c" in trainable


def test_write_back_keeps_the_graph_and_carries_new_values():
    model, _ = optimize(TOPOLOGIES["residual"](), ratio=0.5, groups=2, min_group_width=1, validate=False)
    graph = TorchGraph(model)
    assert write_back(model, graph).SerializeToString() == model.SerializeToString()
    name, param = graph.named_weights()[0]
    with torch.no_grad():
        param.add_(1.0)
    updated = write_back(model, graph)
    assert [n.SerializeToString() for n in updated.graph.node] == [n.SerializeToString() for n in model.graph.node]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in updated.graph.initializer}
    assert before.keys() == after.keys()
    np.testing.assert_allclose(after[name], before[name] + 1.0)
    assert all(np.array_equal(after[k], before[k]) for k in before if k != name)


def test_unsupported_operator_is_one_line_error():
    model, _ = single_op("Resize", {"x": X}, {"r": np.array([], np.float32), "s": np.array([1, 1, 2, 2], np.float32)})
    with pytest.raises(GkpError, match="unsupported operator.*Resize"):
        TorchGraph(model)


def test_gather_into_grouped_conv_runs_as_one_dense_conv_with_the_grouped_gradients():
    # group 0 reads channel 1 twice and channel -1 (= 3); group 1 reads channels 0 and 2 (and 2 again)
    indices = np.array([1, -1, 1, 0, 2, 2], np.int64)
    weight = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((2, 4, 5, 5)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["x", "idx"], ["g"], axis=1),
             helper.make_node("Conv", ["g", "w"], ["y"], group=2, pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
    graph = helper.make_graph(nodes, "gather_conv",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(indices, "idx"), numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    module = TorchGraph(model)
    assert [node[0] for node in module.nodes] == ["GatherConv"]
    assert_same_as_onnxruntime(model, {"x": x})

    (param,) = [p for _, p in module.named_weights()]
    module(x=torch.from_numpy(x))[0].square().sum().backward()
    reference = torch.from_numpy(weight).requires_grad_()
    torch.nn.functional.conv2d(torch.from_numpy(x)[:, torch.from_numpy(indices % 4)], reference,
                               padding=1, groups=2).square().sum().backward()
    np.testing.assert_allclose(param.grad.numpy(), reference.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_wide_gather_conv_runs_grouped_and_computes_the_same():
    # 16 input channels, 2 kept per group: a dense Conv would do 8x the work, so the grouped form runs
    model, _ = optimize(TOPOLOGIES["chain"](), ratio=0.875, groups=2, min_group_width=1, fold=False, validate=False)
    assert any(node[0] == "GatherConv" for node in TorchGraph(model).nodes)
    assert_same_as_onnxruntime(model)
