"""shortcut_convs: the zero-padding ("option A") shortcut as an exact 1x1 Conv, kept dense, and
its residual streams reorderable."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import masked_reference, random_feed, run, shared_file
from fixtures import GraphBuilder, TOPOLOGIES, option_a_shortcut

from gkp_onnx import optimize
from gkp_onnx.model_io import load_model
from gkp_onnx.graph import components
from gkp_onnx.graph import SHORTCUT_CONV, marked
from gkp_onnx.passes.shortcut_convs import shortcuts_as_convs


def test_the_shortcut_becomes_a_strided_1x1_conv_embedding_the_channels_exactly():
    model = option_a_shortcut()
    before = model.SerializeToString()
    converted = shortcuts_as_convs(model)
    assert model.SerializeToString() == before
    onnx.checker.check_model(converted, full_check=True)
    assert not {"Slice", "Pad", "Concat"} & {n.op_type for n in converted.graph.node}
    conv = next(n for n in converted.graph.node if marked(n, SHORTCUT_CONV))
    assert conv.output[0] == next(n for n in model.graph.node if n.op_type == "Pad").output[0]
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "strides")) == [2, 2]
    weight = numpy_helper.to_array(next(t for t in converted.graph.initializer if t.name == conv.input[1]))
    assert weight.shape == (32, 16, 1, 1) and weight.sum() == 16
    np.testing.assert_array_equal(weight[8:24, :, 0, 0], np.eye(16))
    read = {name for n in converted.graph.node for name in n.input}
    assert all(t.name in read for t in converted.graph.initializer)  # the slices' and pads' constants went
    feed = random_feed(model)
    np.testing.assert_allclose(run(converted, feed)[0], run(model, feed)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("topology", sorted(set(TOPOLOGIES) - {"option_a_shortcut"}))
def test_models_without_such_a_shortcut_are_returned_as_they_are(topology):
    model = TOPOLOGIES[topology]()
    assert shortcuts_as_convs(model) is model


def test_pads_that_are_not_a_channel_zero_pad_stay():
    b = GraphBuilder()
    y = b.conv("x", 16)
    b.inits.append(numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "spatial"))
    b.inits.append(numpy_helper.from_array(np.array([0, 4, 0, 0, 0, 4, 0, 0], np.int64), "channels"))
    b.inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    spatial = b.op("Pad", [y, "spatial"], mode="constant")
    ones = b.op("Pad", [y, "channels", "one"], channels=24, mode="constant")
    reflect = b.op("Pad", [y, "channels"], channels=24, mode="reflect")
    model = b.build(spatial, ones, reflect)
    assert shortcuts_as_convs(model) is model


def test_optimize_keeps_the_shortcut_conv_dense_and_exact_and_its_streams_reorderable():
    model = option_a_shortcut()
    optimized, report = optimize(model, ratio=0.5, groups=2, min_group_width=1)
    shortcut = [s for s in report.plan.skipped if s.node.endswith("/shortcut_conv")]
    assert len(shortcut) == 1 and "kept exact" in shortcut[0].reason
    assert not any(layer.node.endswith("/shortcut_conv") for layer in report.plan.layers)
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)
    assert report.before.op_counts.get("Pad") == 1  # the report's "before" is the model as given
    spaces = {c.key: c for c in components(shortcuts_as_convs(model))}
    assert any(marked(n, SHORTCUT_CONV) for c in spaces.values() for n in c.consumers)
    assert any(marked(n, SHORTCUT_CONV) for c in spaces.values() for n in c.producers)


def test_no_gkp_leaves_the_shortcut_alone():
    optimized, _ = optimize(option_a_shortcut(), gkp=False, nm="2:4", nm_conv=True, validate=False)
    assert "Pad" in {n.op_type for n in optimized.graph.node}


def test_real_resnet20_shortcuts_are_exact():
    path = shared_file("cifar10-resnet-akamaster/derived_onnx/resnet20_cifar10.onnx")
    model = load_model(path)
    converted = shortcuts_as_convs(model)
    assert sum(bool(marked(n, SHORTCUT_CONV)) for n in converted.graph.node) == 2
    assert "Pad" not in {n.op_type for n in converted.graph.node}
    feed = random_feed(model, batch=4)
    np.testing.assert_allclose(run(converted, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
