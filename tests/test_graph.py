"""The graph layer: node marks (metadata_props, never names) and the op table the walks share."""

from fixtures import TOPOLOGIES

from gkp_onnx import optimize
from gkp_onnx.graph import (GATHER_IN, SHORTCUT_CONV, UNARY_ELEMENTWISE, clear_marks, is_per_channel,
                            mark, marked)
from gkp_onnx.graph.index import MARK_PREFIX
from gkp_onnx.passes.shortcut_convs import shortcuts_as_convs


def test_marks_are_metadata_props_and_leave_the_output():
    model = TOPOLOGIES["chain"]()
    node = model.graph.node[0]
    name = node.name
    assert marked(node, "x") is None
    mark(node, "x", "layer1")
    mark(node, "x", "layer2")  # one entry per key: a second mark replaces the value
    assert marked(node, "x") == "layer2" and len(node.metadata_props) == 1 and node.name == name
    node.metadata_props.add(key="user", value="kept")
    clear_marks(model)
    assert [(p.key, p.value) for p in node.metadata_props] == [("user", "kept")]


def test_the_shortcut_conv_is_marked_and_the_output_carries_no_mark():
    model = TOPOLOGIES["option_a_shortcut"]()
    converted = shortcuts_as_convs(model)
    assert sum(bool(marked(n, SHORTCUT_CONV)) for n in converted.graph.node) == 1
    optimized, report = optimize(model, ratio=0.5, validate=False, fold=False)
    assert not any(p.key.startswith(MARK_PREFIX) for n in optimized.graph.node for p in n.metadata_props)
    assert report.plan.layers


def test_rewrite_conv_marks_the_input_gathers_with_their_layer():
    from gkp_onnx.api import build_pipeline
    from gkp_onnx.graph import ensure_node_names, input_specs
    from gkp_onnx.options import OptimizeOptions
    from gkp_onnx.pipeline import run_passes
    from gkp_onnx.plan import Plan

    model = TOPOLOGIES["residual"]()
    ensure_node_names(model)
    pipeline = build_pipeline(OptimizeOptions(ratio=0.5, groups=2, fold=False), input_specs(model))
    plan = Plan(ratio=0.5, method="leanflex", seed=0)
    run_passes(pipeline.analyze + pipeline.decide, model, plan)
    rewritten, plan = run_passes(pipeline.finish, model, plan)
    gathers = {marked(n, GATHER_IN) for n in rewritten.graph.node if n.op_type == "Gather" and marked(n, GATHER_IN)}
    assert gathers and gathers <= {layer.node for layer in plan.layers}


def test_the_walks_and_the_nm_regions_share_one_table_of_elementwise_ops():
    from onnx import helper

    for op in sorted(UNARY_ELEMENTWISE):
        assert is_per_channel(helper.make_node(op, ["a"], ["b"]), {})
