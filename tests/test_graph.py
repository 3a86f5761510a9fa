"""The graph layer: node marks (metadata_props, never names) and the op table the walks share."""

import numpy as np
import onnx
import onnxruntime as ort
from fixtures import TOPOLOGIES
from onnx import helper, numpy_helper

from gkp_onnx import optimize
from gkp_onnx.graph import (GATHER_IN, SHORTCUT_CONV, UNARY_ELEMENTWISE, clear_marks, is_per_channel,
                            mark, marked)
from gkp_onnx.graph import input_specs, model_stats
from gkp_onnx.graph.index import MARK_PREFIX
from gkp_onnx.graph.shapes import infer_shapes
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


def _encoder_like() -> onnx.ModelProto:
    """x [batch, seq, 32] with dynamic batch and sequence, as Hugging Face exports: a position table
    (a weight over 4096 bytes) gathered by constant ids, and a mask built at run time from Shape and
    Range (where onnx's own shape inference stops) giving the input of a MatMul its sequence axis."""
    rng = np.random.default_rng(0)
    const = lambda name, value: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))
    nodes = [
        const("ids", np.arange(64, dtype=np.int64)[None]),
        const("one", np.array(1, np.int64)), const("zero", np.array(0, np.int64)),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "one"], ["x_seq"]),
        helper.make_node("Unsqueeze", ["x_seq", "axis0"], ["end"]),
        helper.make_node("Slice", ["ids", "start", "end", "axis1"], ["positions"]),
        helper.make_node("Gather", ["table", "positions"], ["position_rows"]),
        helper.make_node("Add", ["x", "position_rows"], ["embedded"]),
        helper.make_node("Shape", ["embedded"], ["shape"]),  # of an inner tensor
        helper.make_node("Gather", ["shape", "one"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["steps"]),
        helper.make_node("Unsqueeze", ["steps", "axes02"], ["steps3"]),
        helper.make_node("Cast", ["steps3"], ["scale"], to=onnx.TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["embedded"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),  # [batch, 1, 32] * [1, ?, 1]
        helper.make_node("MatMul", ["scaled", "w"], ["y"], name="projection"),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([0, 2], np.int64), "axes02")]
    graph = helper.make_graph(nodes, "encoder_like",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "sequence", 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "sequence", 16])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_macs_are_counted_through_shapes_computed_at_run_time():
    model = _encoder_like()
    specs = input_specs(model, {"x": [2, 10, 32]})
    stats = model_stats(model, specs)
    assert stats.node_macs == {"projection": 2 * 10 * 32 * 16}
    session_shapes = [o.shape for o in ort.InferenceSession(model.SerializeToString()).run(
        None, {"x": np.zeros((2, 10, 32), np.float32)})]
    assert session_shapes == [(2, 10, 16)]


def test_shape_inference_does_not_change_the_model():
    model = _encoder_like()
    before = model.SerializeToString()
    infer_shapes(model, input_specs(model, {"x": [1, 4, 32]}))
    assert model.SerializeToString() == before


def test_shape_inference_writes_nothing_where_it_runs(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference saves the model to the working directory when it cannot
    finish (here: an op of an unknown domain); gkp-onnx takes the shapes it found and writes nothing."""
    model = _encoder_like()
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    scaled = next(node for node in model.graph.node if node.output[0] == "scaled")
    scaled.output[0] = "scaled_raw"
    model.graph.node.insert(len(model.graph.node) - 1,
                            helper.make_node("Unknown", ["scaled_raw"], ["scaled"], domain="custom.domain"))
    monkeypatch.chdir(tmp_path)
    stats = model_stats(model, input_specs(model, {"x": [1, 4, 32]}))
    assert list(tmp_path.iterdir()) == []
    assert stats.node_macs == {"projection": None}  # after the unknown op nothing can know the shape


def test_conv_transpose_macs_are_counted():
    """A U-Net's ConvTranspose: every input pixel meets the Cout/group x kernel weights of its channel."""
    model = TOPOLOGIES["conv_transpose"]()
    stats = model_stats(model, input_specs(model, {}))
    node = next(n for n in model.graph.node if n.op_type == "ConvTranspose")
    assert stats.node_macs[node.name] == 16 * 5 * 5 * 8 * 2 * 2  # input [1, 16, 5, 5], weight [16, 8, 2, 2]
    assert stats.macs == sum(stats.node_macs.values())
