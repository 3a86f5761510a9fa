import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fixtures import GraphBuilder, TOPOLOGIES, residual

from gkp_onnx.graph import ensure_node_names, input_specs
from gkp_onnx.passes.analyze import Analyze, kept_per_group, round_to_multiple
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


def test_channel_multiple_rounds_to_multiples_and_holds_the_ratio_over_the_model():
    layers = [(64, 1000)] * 8  # 64 channels, 0.4375: 36 kept exactly, between the multiples 32 and 48
    kept = round_to_multiple(layers, 0.4375, 16)
    assert set(kept) == {32, 48}  # never the NCHWc-padded 36
    assert sum(kept) / len(kept) == 36  # the kept MACs of the rounded layers hold the ratio exactly here
    assert kept == round_to_multiple(layers, 0.4375, 16)  # deterministic
    # weighted by MACs: the big layer takes the nearest multiple (18 -> 16), the small ones make up what they can
    assert round_to_multiple([(32, 10_000), (32, 100), (32, 100)], 0.4375, 16) == [16, 32, 32]
    assert round_to_multiple([(16, 1), (64, 1)], 0.5, 16) == [8, 32]  # below the multiple: as computed
    assert round_to_multiple([(16, 1), (10, 1)], 0.25, 1) == [kept_per_group(16, 0.25), kept_per_group(10, 0.25)]


def test_a_layer_rounded_up_to_all_its_channels_stays_dense():
    b = GraphBuilder(in_channels=32)
    model = b.build(b.conv(b.op("Relu", [b.conv("x", 32)]), 32))  # two Convs reading 32 channels
    plan = analyze(model, ratio=0.25, channel_multiple=16)  # 24 kept exactly: 32 (a tie keeps more), then 16
    assert [layer.kept_per_group for layer in plan.layers] == [16]
    assert [s.reason for s in plan.skipped] == ["kept dense: rounded to multiples of 16, it keeps all 32 channels"]
    assert len(analyze(model, ratio=0.0, channel_multiple=16).layers) == 2  # ratio 0: the lossless rewrite stays


def test_where_the_gathers_can_go_is_recorded_per_layer():
    layers = analyze(residual()).layers  # conv1 -> a (shared: conv2 and the Add); conv2 -> conv3 -> Add
    assert [(layer.input_folds, layer.output_sinks) for layer in layers] == [(False, False), (False, True),
                                                                            (True, False)]
