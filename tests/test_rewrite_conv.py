import numpy as np
import onnx
from onnx import numpy_helper

from conftest import random_feed, run
from fixtures import GraphBuilder, TOPOLOGIES

from gkp_onnx import optimize
from gkp_onnx.graph import ensure_node_names
from gkp_onnx.passes.rewrite_conv import RewriteConv, grouped_weight
from gkp_onnx.plan import LayerPlan, Plan


def single_conv(**attrs):
    b = GraphBuilder(in_channels=8, size=9)
    return b.build(b.conv("x", 8, **attrs))


def plan_for(model, groups, kept):
    weight = model.graph.initializer[0]
    co, ci, kh, kw = weight.dims
    layer = LayerPlan(model.graph.node[0].name, weight.name, co, ci, [kh, kw], macs=0,
                      kept_per_group=len(kept[0]), group_count=len(groups), groups=groups, kept_channels=kept)
    return Plan(ratio=0.5, method="test", seed=0, layers=[layer])


def rewrite(model, plan):
    ensure_node_names(model)
    return RewriteConv()(model, plan).model


def test_structure_gather_grouped_conv_gather():
    model = single_conv(strides=[2, 2], dilations=[1, 1])
    groups, kept = [[1, 3, 5, 7], [0, 2, 4, 6]], [[0, 1, 2, 3], [2, 3, 6, 7]]
    optimized = rewrite(model, plan_for(model, groups, kept))
    ops = [n.op_type for n in optimized.graph.node]
    assert ops == ["Gather", "Conv", "Gather"]
    gather_in, conv, gather_out = optimized.graph.node
    inits = {t.name: numpy_helper.to_array(t) for t in optimized.graph.initializer}
    np.testing.assert_array_equal(inits[gather_in.input[1]], [0, 1, 2, 3, 2, 3, 6, 7])
    np.testing.assert_array_equal(inits[gather_out.input[1]], np.argsort([1, 3, 5, 7, 0, 2, 4, 6]))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs["group"] == 2 and attrs["strides"] == [2, 2] and attrs["pads"] == [1, 1, 1, 1]
    assert inits[conv.input[1]].shape == (8, 4, 3, 3)
    assert gather_out.output[0] == model.graph.output[0].name  # consumers see the same tensor name


def test_identity_gathers_are_left_out():
    model = single_conv()
    groups = [list(range(8))]
    optimized = rewrite(model, plan_for(model, groups, [list(range(8))]))
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    optimized = rewrite(model, plan_for(model, groups, [[0, 2, 4, 6]]))
    assert [n.op_type for n in optimized.graph.node] == ["Gather", "Conv"]


def test_no_dead_initializers_and_unique_names():
    model = TOPOLOGIES["residual"]()
    optimized, _ = optimize(model, ratio=0.5, groups=2, min_group_width=1, validate=False)
    read = {name for node in optimized.graph.node for name in node.input}
    assert all(t.name in read for t in optimized.graph.initializer)
    names = [n.name for n in optimized.graph.node]
    assert len(names) == len(set(names)) and all(names)
    tensors = [o for n in optimized.graph.node for o in n.output] + [t.name for t in optimized.graph.initializer]
    assert len(tensors) == len(set(tensors))


def test_grouped_weight_matches_the_masked_rows():
    weight = np.random.default_rng(0).standard_normal((4, 6, 3, 3))
    layer = LayerPlan("c", "w", 4, 6, [3, 3], 0, 2, group_count=2, groups=[[0, 3], [1, 2]],
                      kept_channels=[[1, 4], [0, 5]])
    packed = grouped_weight(weight, layer)
    np.testing.assert_array_equal(packed[1], weight[3][[1, 4]])
    np.testing.assert_array_equal(packed[2], weight[1][[0, 5]])


def test_bias_follows_the_filter_order():
    model = single_conv(bias=True)
    groups, kept = [[1, 3, 5, 7], [0, 2, 4, 6]], [list(range(8)), list(range(8))]
    optimized = rewrite(model, plan_for(model, groups, kept))
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
