from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gkp_onnx.graph.canonical import canonicalize

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
                "squeezenet", "vgg19", "zfnet512"]
HUGE = {"vgg19"}  # 550 MB once folded: checked, but not run, to keep the test short


def real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def run(model, seed=0):
    rng = np.random.default_rng(seed)
    feed = {}
    for value in real_inputs(model):
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feed[value.name] = rng.standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def assert_same_outputs(a, b):
    for x, y in zip(run(a), run(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def initializer_names(model):
    return {t.name for t in model.graph.initializer}


def canonical(model, capfd):
    """canonicalize `model`, checking that it printed nothing and left `model` as it was."""
    before = model.SerializeToString()
    out, notes = canonicalize(model)
    assert capfd.readouterr() == ("", "")
    assert model.SerializeToString() == before
    return out, notes


def const(name, array):
    return helper.make_node("Constant", [], [name], name=f"{name}_node", value=numpy_helper.from_array(array))


def conv_model(weight_nodes, initializers=(), opset=13, ir_version=8, domains=(), listed=False):
    """x -> Conv(w, b) -> Relu -> y, with `weight_nodes` computing w and b; `listed`: the
    initializers are graph inputs too (IR 3)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if listed:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in initializers]
    nodes = [*weight_nodes, helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(domain, 1) for domain in domains)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_weight_from_constant_node_becomes_an_initializer(capfd):
    model = conv_model([const("w", rand(4, 3, 3, 3)), const("b", rand(4, seed=1))])
    model.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 8, 8]))
    out, notes = canonical(model, capfd)
    assert initializer_names(out) == {"w", "b"}
    assert [(n.name, n.op_type) for n in out.graph.node] == [("conv", "Conv"), ("relu", "Relu")]
    assert notes == ["2 constant nodes folded into initializers (Constant 2)", "1 stale value_info entries dropped"]
    assert not out.graph.value_info and out.ir_version == 8 and out.opset_import == model.opset_import
    onnx.checker.check_model(out)
    assert_same_outputs(model, out)


def test_weight_from_constant_of_shape_cast_reshape_chain_becomes_an_initializer(capfd):
    weight = [const("numel", np.array([108], np.int64)),
              helper.make_node("ConstantOfShape", ["numel"], ["ones"], name="cos",
                               value=numpy_helper.from_array(np.array([2], np.int32))),
              helper.make_node("Cast", ["ones"], ["ones_f"], name="cast", to=TensorProto.FLOAT),
              helper.make_node("Mul", ["ones_f", "noise"], ["flat"], name="mul"),
              const("shape", np.array([4, 3, 3, 3], np.int64)),
              helper.make_node("Reshape", ["flat", "shape"], ["w"], name="reshape"),
              helper.make_node("Identity", ["bias"], ["b"], name="identity")]
    model = conv_model(weight, [numpy_helper.from_array(rand(108), "noise"),
                                numpy_helper.from_array(rand(4, seed=1), "bias")])
    out, notes = canonical(model, capfd)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert conv.input[1] == "w" and {"w", "b"} <= initializer_names(out)
    assert [n.name for n in out.graph.node] == ["conv", "relu"]
    assert notes == ["7 constant nodes folded into initializers "
                     "(Cast 1, Constant 2, ConstantOfShape 1, Identity 1, Mul 1, Reshape 1)"]
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w")),
                                  (2 * rand(108)).reshape(4, 3, 3, 3))
    onnx.checker.check_model(out)
    assert_same_outputs(model, out)


def test_nothing_that_reads_a_graph_input_is_folded(capfd):
    # The input shape is static, but Shape(x) stays a node: only constants are folded.
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
             helper.make_node("ConstantOfShape", ["x_shape"], ["zeros"], name="zeros",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["x", "zeros"], ["x2"], name="add"),
             const("w", rand(4, 3, 3, 3)), const("b", rand(4))]
    model = conv_model(nodes)
    model.graph.node[-2].input[0] = "x2"  # the Conv reads x + zeros
    out, notes = canonical(model, capfd)
    assert [n.name for n in out.graph.node] == ["shape", "zeros", "add", "conv", "relu"]
    assert [o for n in out.graph.node for o in n.output] == ["x_shape", "zeros", "x2", "c", "y"]
    assert initializer_names(out) == {"w", "b"}
    assert notes == ["2 constant nodes folded into initializers (Constant 2)"]
    assert_same_outputs(model, out)


def test_random_ops_are_not_frozen(capfd):
    nodes = [helper.make_node("RandomNormal", [], ["w"], name="random", shape=[4, 3, 3, 3], seed=1.0),
             helper.make_node("Identity", ["bias"], ["b"], name="identity")]
    model = conv_model(nodes, [numpy_helper.from_array(rand(4), "bias")])
    out, notes = canonical(model, capfd)
    assert [n.name for n in out.graph.node] == ["random", "conv", "relu"]
    assert notes == ["1 constant nodes folded into initializers (Identity 1)"]


def test_an_op_onnxruntime_cannot_run_is_left_and_the_rest_is_folded(capfd):
    nodes = [const("w", rand(4, 3, 3, 3)), const("b0", rand(4)),
             helper.make_node("Mystery", ["b0"], ["b"], name="mystery", domain="custom")]
    model = conv_model(nodes, domains=["custom"])
    out, notes = canonical(model, capfd)
    assert [n.name for n in out.graph.node] == ["mystery", "conv", "relu"]
    assert initializer_names(out) == {"w", "b0"}
    assert notes == ["2 constant nodes folded into initializers (Constant 2)"]


def test_a_canonical_model_comes_out_exactly_as_it_went_in(capfd):
    model = conv_model([], [numpy_helper.from_array(rand(4, 3, 3, 3), "w"), numpy_helper.from_array(rand(4), "b")])
    model.graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 8, 8]))
    out, notes = canonical(model, capfd)
    assert out is not model and out.SerializeToString() == model.SerializeToString() and notes == []


def test_ir3_initializers_listed_as_inputs_become_plain_initializers(capfd):
    inits = [numpy_helper.from_array(rand(4, 3, 3, 3), "w"), numpy_helper.from_array(rand(4), "b")]
    model = conv_model([], inits, opset=8, ir_version=3, listed=True)
    out, notes = canonical(model, capfd)
    assert [i.name for i in out.graph.input] == ["x"] and initializer_names(out) == {"w", "b"}
    assert notes == ["2 initializers removed from the graph inputs (they are weights)",
                     "IR version 3 -> 4 (IR < 4 requires every initializer to be a graph input)"]
    assert out.ir_version == 4 and out.opset_import == model.opset_import
    onnx.checker.check_model(out)
    shapes = {v.name: v for v in onnx.shape_inference.infer_shapes(out, strict_mode=True).graph.value_info}
    assert [d.dim_value for d in shapes["c"].type.tensor_type.shape.dim] == [1, 4, 8, 8]
    assert_same_outputs(model, out)


def test_canonicalize_is_idempotent(capfd):
    model = conv_model([const("w", rand(4, 3, 3, 3)), const("b", rand(4))], opset=9, ir_version=3)
    out, _ = canonical(model, capfd)
    again, notes = canonical(out, capfd)
    assert again.SerializeToString() == out.SerializeToString() and notes == []


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_model_zoo_topologies(name, capfd):
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"this onnx package ships no {path.name}")
    model = onnx.load(str(path))
    out, notes = canonical(model, capfd)
    inits = initializer_names(out)
    for node in out.graph.node:
        if node.op_type in ("Conv", "Gemm", "BatchNormalization"):
            assert all(i in inits for i in node.input[1:] if i), node
    assert not any(n.op_type in ("Constant", "ConstantOfShape", "Unsqueeze") for n in out.graph.node)
    assert {n.name for n in out.graph.node} <= {n.name for n in model.graph.node}
    assert {o for n in out.graph.node for o in n.output} <= {o for n in model.graph.node for o in n.output}
    assert [i.name for i in out.graph.input] == [i.name for i in real_inputs(model)]
    assert out.ir_version == 4 and out.opset_import == model.opset_import
    assert " constant nodes folded into initializers (ConstantOfShape " in notes[0]
    listed = len(model.graph.initializer)  # all of them are graph inputs too
    assert notes[1:] == [f"{listed} initializers removed from the graph inputs (they are weights)",
                         "IR version 3 -> 4 (IR < 4 requires every initializer to be a graph input)"]
    onnx.checker.check_model(out)
    if name not in HUGE:
        assert_same_outputs(model, out)


def test_only_models_a_pass_would_miss_something_in_need_the_canonical_form():
    from gkp_onnx.graph.canonical import needs_canonical

    w, b = numpy_helper.from_array(rand(4, 3, 3, 3), "w"), numpy_helper.from_array(rand(4, seed=1), "b")
    assert not needs_canonical(conv_model([], [w, b]))
    assert needs_canonical(conv_model([const("w", rand(4, 3, 3, 3))], [b]))
    assert needs_canonical(conv_model([], [w, b], ir_version=3, listed=True))
    stored = numpy_helper.from_array(rand(4, 3, 3, 3).astype(np.float16), "w16")  # read through a Cast: stored
    cast = helper.make_node("Cast", ["w16"], ["w"], name="cast", to=TensorProto.FLOAT)
    assert not needs_canonical(conv_model([cast], [stored, b]))


def test_the_pass_fires_only_where_needed_and_reports_its_notes():
    from gkp_onnx.passes.canonicalize import Canonicalize
    from gkp_onnx.plan import Plan

    w, b = numpy_helper.from_array(rand(4, 3, 3, 3), "w"), numpy_helper.from_array(rand(4, seed=1), "b")
    plain = conv_model([], [w, b])
    result = Canonicalize()(plain, Plan(ratio=0.0, method="leanflex", seed=0))
    assert result.model is plain and not result.modified and result.details == {"canonical": []}
    folded = conv_model([const("w", rand(4, 3, 3, 3))], [b])
    given = folded.SerializeToString()
    result = Canonicalize()(folded, Plan(ratio=0.0, method="leanflex", seed=0))
    assert result.modified and result.details["canonical"] and folded.SerializeToString() == given
    assert initializer_names(result.model) == {"w", "b"}
