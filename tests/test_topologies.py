"""Exactness of the whole GKP pipeline on one fixture per graph topology.

At ratio 0 the optimized model equals the original; at ratio > 0 it equals the original with
the pruned grouped kernels zeroed in the dense weights. Every optimized model passes
onnx.checker and loads in onnxruntime.
"""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import masked_reference, random_feed, run
from fixtures import TOPOLOGIES, GraphBuilder

from gkp_onnx import optimize
from gkp_onnx.cost import gathers_left

PRUNABLE = [name for name in TOPOLOGIES if name not in ("depthwise", "shared_weight")]


def tolerance(model: onnx.ModelProto) -> dict:
    # fp16 keeps ~3 significant digits; the grouped form sums in another order.
    fp16 = model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    return dict(rtol=2e-2, atol=2e-2) if fp16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("topology", PRUNABLE)
def test_ratio_zero_is_lossless(topology, groups):
    model = TOPOLOGIES[topology]()
    optimized, report = optimize(model, ratio=0.0, groups=groups, min_group_width=1)
    onnx.checker.check_model(optimized, full_check=True)
    assert report.plan.layers, "the fixture must have something to rewrite"
    assert all(layer.kept_per_group == layer.in_channels for layer in report.plan.layers)
    feed = random_feed(model)
    for expected, actual in zip(run(model, feed), run(optimized, feed)):
        np.testing.assert_allclose(actual, expected, **tolerance(model))


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("topology", PRUNABLE)
def test_pruned_equals_masked_dense(topology, groups):
    model = TOPOLOGIES[topology]()
    optimized, report = optimize(model, ratio=0.5, groups=groups, min_group_width=1)
    onnx.checker.check_model(optimized, full_check=True)
    feed = random_feed(model)
    pruned = run(optimized, feed)
    for expected, actual in zip(run(masked_reference(model, report.plan), feed), pruned):
        np.testing.assert_allclose(actual, expected, **tolerance(model))
    # and the pruning really changed the function
    assert any(not np.allclose(a, b) for a, b in zip(run(model, feed), pruned))


@pytest.mark.parametrize("method", ["leanflex", "tmi", "sr"])
def test_auto_group_count_is_exact_on_every_topology(method):
    for name in PRUNABLE:
        model = TOPOLOGIES[name]()
        optimized, report = optimize(model, ratio=0.4375, method=method)
        feed = random_feed(model)
        for expected, actual in zip(run(masked_reference(model, report.plan), feed), run(optimized, feed)):
            np.testing.assert_allclose(actual, expected, **tolerance(model))


@pytest.mark.parametrize("topology,reason", [
    ("depthwise", "depthwise"), ("shared_weight", "shared by 2 nodes"),
    ("conv_transpose", "ConvTranspose: GKP rewrites Conv only"), ("qdq", "weight is quantized (QDQ"),
    ("subgraph", "inside the 'then_branch' subgraph of If 'if'")])
def test_unsupported_convs_are_skipped_and_untouched(topology, reason):
    model = TOPOLOGIES[topology]()
    optimized, report = optimize(model, ratio=0.5, groups=1)
    assert any(reason in s.reason for s in report.plan.skipped)
    skipped = {s.node for s in report.plan.skipped}
    before = {n.name: n for n in model.graph.node if n.name in skipped}
    after = {n.name: n for n in optimized.graph.node if n.name in skipped}
    assert before.keys() == after.keys()
    weights = {t.name: list(t.dims) for t in optimized.graph.initializer}
    for name in before:
        if topology == "depthwise":  # stays depthwise; a Gather folding through it may narrow it
            group = next(a.i for a in after[name].attribute if a.name == "group")
            assert weights[after[name].input[1]][:2] == [group, 1]
        else:
            assert before[name].input == after[name].input and before[name].attribute == after[name].attribute
    branches = [[n.attribute for n in m.graph.node if n.op_type == "If"] for m in (model, optimized)]
    assert branches[0] == branches[1]  # a subgraph, and what it reads (checked exact above), as it was


def test_gathers_fold_through_depthwise_convs():
    """MobileNet-style: every GKP Gather moves across the depthwise Convs (narrowing them) and
    folds into the pointwise Conv above, and the result equals the masked dense model."""
    model = TOPOLOGIES["mobilenet_block"]()
    optimized, report = optimize(model, ratio=0.5, groups=1, validate=False)
    gathers = [n for n in optimized.graph.node if n.op_type == "Gather"]
    assert len(report.plan.layers) == 3 and [g.input[0] for g in gathers] == ["x"]  # only the graph input's stays
    depthwise = [n for n in optimized.graph.node if n.op_type == "Conv" and
                 next((a.i for a in n.attribute if a.name == "group"), 1) > 1]
    assert len(depthwise) == 2 and all(next(a.i for a in n.attribute if a.name == "group") == 16 for n in depthwise)
    assert report.after.macs < report.before.macs
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_gathers_fold_through_silu_and_gelu_graphs(groups):
    """x*sigmoid(x) and both GELU forms read their input twice; the walks cross them whole, so each
    GKP Gather folds into the Conv above (G = 1) or into the grouped Conv's output permutation (G = 2:
    one Gather right behind it, as behind a Relu)."""
    model = TOPOLOGIES["activations"]()
    optimized, report = optimize(model, ratio=0.5, groups=groups, min_group_width=1, validate=False)
    assert len(report.plan.layers) == 4
    producers = {o: n for n in optimized.graph.node for o in n.output}
    gathers = [g.input[0] for g in optimized.graph.node if g.op_type == "Gather"]
    assert gathers == ["x"] if groups == 1 else \
        gathers[0] == "x" and all(producers[name].op_type == "Conv" for name in gathers[1:])
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)


def test_fp16_weights_stay_fp16():
    model = TOPOLOGIES["fp16"]()
    optimized, report = optimize(model, ratio=0.5, groups=2, min_group_width=1)
    conv_weights = {n.input[1] for n in optimized.graph.node if n.op_type == "Conv"}
    dtypes = {t.data_type for t in optimized.graph.initializer if t.name in conv_weights}
    assert dtypes == {onnx.TensorProto.FLOAT16}


class PreferNoGather:
    """A cost model under which any form without an input Gather wins: the shared form wherever offered."""

    def relative_time(self, layer, group_count):
        return 0.5 + 0.4 * gathers_left(layer, group_count)[0]


@pytest.mark.parametrize("topology", PRUNABLE)
def test_shared_form_is_exact_on_every_topology(topology):
    model = TOPOLOGIES[topology]()
    optimized, report = optimize(model, ratio=0.5, min_group_width=1, cost_model=PreferNoGather(), speed_weight=10.0)
    onnx.checker.check_model(optimized, full_check=True)
    if topology in ("fan_out", "residual_stream"):
        assert any(layer.shared for layer in report.plan.layers) and report.plan.permutations
    feed = random_feed(model)
    for expected, actual in zip(run(masked_reference(model, report.plan), feed), run(optimized, feed)):
        np.testing.assert_allclose(actual, expected, **tolerance(model))


def test_an_activation_whose_inner_tensor_is_a_graph_output_is_not_crossed():
    """sigmoid(x) of a SiLU is also a graph output: it keeps every channel, so the SiLU is no
    per-channel step the Gather behind it may fold through."""
    b = GraphBuilder()
    x = b.conv(b.op("Relu", [b.conv("x", 16)]), 16)
    gate = b.op("Sigmoid", [x])
    model = b.build(b.conv(b.op("Mul", [x, gate]), 16), gate)
    optimized, report = optimize(model, ratio=0.5, groups=1, validate=False)
    feed = random_feed(model)
    expected, actual = run(masked_reference(model, report.plan), feed), run(optimized, feed)
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims,shape", [(3, [6, 1, 1]), (3, [1, 1, 6, 1, 1]), (1, [16, 1]), (1, [1, 16, 1])])
def test_per_channel_constants_are_read_by_the_rank_of_the_convs_around_them(dims, shape):
    """A [6, 1, 1] constant on a Conv3d's [N, C, D, H, W] tensor scales depth, not channels: no
    Gather may be moved across it as if it were per channel. Conv1d's [C, 1] and [1, C, 1] are
    per channel: the Gathers fold through them."""
    b = GraphBuilder(size=6, dims=dims)
    y = b.op("Relu", [b.conv("x", 16)])
    b.inits.append(numpy_helper.from_array(np.linspace(0.5, 2.0, int(np.prod(shape))).astype(np.float32)
                                           .reshape(shape), "scale"))
    model = b.build(b.conv(b.op("Mul", [y, "scale"]), 16))
    optimized, report = optimize(model, ratio=0.5, groups=1, validate=False)
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)
    gathers = [n.input[0] for n in optimized.graph.node if n.op_type == "Gather" and n.input[0] != "x"]
    assert (gathers == []) == (16 in shape)  # folded through per-channel scales only
