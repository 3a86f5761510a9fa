import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fixtures import GraphBuilder, TOPOLOGIES, residual

from gkp_onnx.graph_stats import ensure_node_names, input_specs
from gkp_onnx.passes.analyze import Analyze, kept_per_group
from gkp_onnx.plan import Plan


def analyze(model, ratio=0.5, **kw) -> Plan:
    ensure_node_names(model)
    plan = Plan(ratio=ratio, method="leanflex", seed=0)
    result = Analyze(input_specs(model), **kw)(model, plan)
    assert not result.modified
    return result.plan


def test_records_shapes_and_macs():
    plan = analyze(TOPOLOGIES["stride2"]())
    first, second = plan.layers
    assert (first.out_channels, first.in_channels, first.kernel_shape) == (16, 8, [3, 3])
    assert first.macs == 16 * 8 * 9 * 5 * 5  # 10x10 input, stride 2 -> 5x5
    assert second.macs == 32 * 16 * 9 * 3 * 3
    assert first.kept_per_group == 4 and second.kept_per_group == 8


def test_kept_per_group_rounds_half_up_and_keeps_one():
    assert kept_per_group(16, 0.4375) == 9
    assert kept_per_group(64, 0.4375) == 36
    assert kept_per_group(10, 0.25) == 8  # 7.5 -> 8
    assert kept_per_group(3, 0.99) == 1


def test_skip_reasons():
    depthwise = analyze(TOPOLOGIES["depthwise"]())
    assert [s.reason for s in depthwise.skipped] == ["depthwise Conv"]
    shared = analyze(TOPOLOGIES["shared_weight"]())
    assert len(shared.skipped) == 2 and all("shared by 2 nodes" in s.reason for s in shared.skipped)


def test_stem_is_skipped_unless_included():
    b = GraphBuilder(in_channels=3)
    model = b.build(b.conv(b.conv("x", 16), 16))
    assert "stem" in analyze(model).skipped[0].reason
    assert len(analyze(model, include_stem=True).layers) == 2


def test_exclude_matches_node_or_weight_name():
    plan = analyze(TOPOLOGIES["chain"](), exclude=[re.compile(r"conv3\.weight")])
    assert [layer.node for layer in plan.layers] == ["conv1"]
    assert "excluded" in plan.skipped[0].reason


def test_dynamic_weight_and_grouped_conv_are_skipped():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 6, 6])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [8, 8, 3, 3])
    grouped = numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32), "g")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dyn"),
             helper.make_node("Conv", ["y", "g"], ["z"], name="grp", group=2)]
    graph = helper.make_graph(nodes, "g", [x, w], [helper.make_tensor_value_info("z", 1, None)], [grouped])
    plan = analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    reasons = {s.node: s.reason for s in plan.skipped}
    assert "not a constant initializer" in reasons["dyn"]
    assert "already grouped (group=2)" == reasons["grp"]


def test_channel_multiple_rounds_kept_channels_for_nchwc_kernels():
    assert kept_per_group(16, 0.4375, multiple=8) == 8  # 9 -> 8
    assert kept_per_group(32, 0.4375, multiple=8) == 16  # 18 -> 16
    assert kept_per_group(64, 0.4375, multiple=8) == 40  # 36 -> 40 (nearest)
    assert kept_per_group(16, 0.1, multiple=8) == 16  # never more than Ci
    assert kept_per_group(16, 0.9, multiple=8) == 8  # never fewer than the multiple
    assert kept_per_group(4, 0.5, multiple=8) == 2  # too narrow to round: the plain n


def test_where_the_gathers_can_go_is_recorded_per_layer():
    layers = analyze(residual()).layers  # conv1 -> a (shared: conv2 and the Add); conv2 -> conv3 -> Add
    assert [(layer.input_folds, layer.output_sinks) for layer in layers] == [(False, False), (False, True),
                                                                            (True, False)]
