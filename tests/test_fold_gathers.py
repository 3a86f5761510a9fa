import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import masked_reference, random_feed, run
from fixtures import TOPOLOGIES, GraphBuilder

from gkp_onnx import optimize
from gkp_onnx.passes.fold_gathers import FoldGathers
from gkp_onnx.plan import Plan


def gathers(model):
    return [n for n in model.graph.node if n.op_type == "Gather"]


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_g1_gather_becomes_filter_pruning_of_the_producer():
    model = TOPOLOGIES["chain"]()
    folded, report = optimize(model, ratio=0.5, groups=1)
    unfolded, _ = optimize(model, ratio=0.5, groups=1, fold=False)
    assert len(gathers(unfolded)) == 2 and len(gathers(folded)) == 1  # the one on the graph input stays
    first = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert weights(folded)[first.input[1]].shape[0] == 8  # 16 filters -> the 8 the next Conv reads
    assert report.after.macs < sum(layer.pruned_macs for layer in report.plan.layers)


def test_folding_through_batchnorm_mul_add_clip_is_exact():
    model = TOPOLOGIES["bn_chain"]()
    folded, report = optimize(model, ratio=0.5, groups=1)
    assert len(gathers(folded)) == 1
    feed = random_feed(model)
    np.testing.assert_allclose(run(folded, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)


def test_no_fold_when_the_producer_would_grow_or_the_tensor_is_shared():
    model = TOPOLOGIES["chain"]()
    grown, report = optimize(model, ratio=0.25, groups=2, min_group_width=1)  # G*n = 24 > 16
    first = next(n for n in grown.graph.node if n.op_type == "Conv")
    assert weights(grown)[first.input[1]].shape[0] == 16  # the producer keeps its 16 filters
    # but conv1's output permutation is composed into conv3's Gather: 3 Gathers instead of 4
    assert len(gathers(grown)) == 3
    feed = random_feed(model)
    np.testing.assert_allclose(run(grown, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)
    fan_out, _ = optimize(TOPOLOGIES["fan_out"](), ratio=0.5, groups=1)
    assert len(gathers(fan_out)) == 3  # the shared activation is read by two Gathers
    pinned, _ = optimize(TOPOLOGIES["graph_output_inside"](), ratio=0.5, groups=1)
    assert len(gathers(pinned)) == 2


def test_repeated_indices_duplicate_filters_exactly():
    model = TOPOLOGIES["chain"]()
    folded, report = optimize(model, ratio=0.5, groups=2, min_group_width=1)  # G*n = 16 = Co: folds
    assert len(gathers(folded)) < len(gathers(optimize(model, ratio=0.5, groups=2, min_group_width=1,
                                                       fold=False)[0]))
    feed = random_feed(model)
    np.testing.assert_allclose(run(folded, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)


def first_conv(model):
    return next(n for n in model.graph.node if n.op_type == "Conv")


def test_grouped_producer_computes_only_the_filters_read():
    model = TOPOLOGIES["chain"]()  # conv1 (G=2) feeds conv2's Gather, which reads 4 of its 16 outputs
    folded, report = optimize(model, ratio=0.75, groups=2, min_group_width=1)
    assert weights(folded)[first_conv(folded).input[1]].shape[0] < 16
    assert report.after.macs < sum(layer.pruned_macs for layer in report.plan.layers)
    feed = random_feed(model)
    np.testing.assert_allclose(run(folded, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)


def test_output_permutation_is_absorbed_by_a_dense_conv():
    model = TOPOLOGIES["bn_chain"]()  # conv4 (G=2) -> Mul -> Add -> Clip -> conv8 kept dense
    folded, report = optimize(model, ratio=0.5, groups=2, min_group_width=1, exclude=["conv8"])
    last = [n for n in folded.graph.node if n.op_type == "Conv"][-1]
    assert "gkp" not in last.name and not any(g.output[0] in last.input for g in gathers(folded))
    assert len(gathers(folded)) < len(gathers(optimize(model, ratio=0.5, groups=2, min_group_width=1,
                                                       exclude=["conv8"], fold=False)[0]))
    feed = random_feed(model)
    np.testing.assert_allclose(run(folded, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)


def test_output_permutation_is_absorbed_by_the_classifier_after_global_pool():
    model = TOPOLOGIES["classifier"]()  # conv2 (G=2) -> GlobalAveragePool -> Flatten -> Gemm
    folded, report = optimize(model, ratio=0.5, groups=2, min_group_width=1)
    producers = {o: n for n in folded.graph.node for o in n.output}
    pool = next(n for n in folded.graph.node if n.op_type == "GlobalAveragePool")
    assert producers[pool.input[0]].op_type == "Conv"
    feed = random_feed(model)
    np.testing.assert_allclose(run(folded, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exclude", [[], ["conv3"], ["conv4"], ["conv8"]])
@pytest.mark.parametrize("topology", [t for t in TOPOLOGIES if t not in ("depthwise", "shared_weight", "fp16")])
def test_shrinking_and_sinking_are_exact_on_every_topology(topology, exclude):
    model = TOPOLOGIES[topology]()
    for groups, ratio in [(2, 0.5), (4, 0.75)]:
        folded, report = optimize(model, ratio=ratio, groups=groups, min_group_width=1, exclude=exclude)
        unfolded, _ = optimize(model, ratio=ratio, groups=groups, min_group_width=1, exclude=exclude, fold=False)
        assert len(gathers(folded)) <= len(gathers(unfolded))
        assert report.after.macs <= sum(layer.pruned_macs for layer in report.plan.layers) \
            + sum(report.before.node_macs[n] or 0 for n in report.before.node_macs
                  if n not in {layer.node for layer in report.plan.layers})
        feed = random_feed(model)
        for expected, actual in zip(run(masked_reference(model, report.plan), feed), run(folded, feed)):
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_pass_folds_a_constant_channel_gather_into_the_producing_conv_exactly():
    b = GraphBuilder()  # conv1 (16 filters) -> Relu -> Gather(axis=1, 6 of its channels, one twice) -> conv4
    indices = [5, 0, 11, 3, 3, 14]
    b.inits.append(numpy_helper.from_array(np.array(indices, np.int64), "indices"))
    picked = b.op("Gather", [b.op("Relu", [b.conv("x", 16)]), "indices"], channels=len(indices), axis=1)
    model = b.build(b.conv(picked, 8))
    folded = onnx.ModelProto()
    folded.CopyFrom(model)  # in_place = True: the pass edits what it is given
    result = FoldGathers()(folded, Plan(ratio=0.0, method="l2", seed=0))
    assert result.modified and not gathers(result.model)
    onnx.checker.check_model(result.model, full_check=True)
    first = first_conv(result.model)
    np.testing.assert_array_equal(weights(result.model)[first.input[1]], weights(model)["conv1.weight"][indices])
    np.testing.assert_array_equal(weights(result.model)[first.input[2]], weights(model)["conv1.bias"][indices])
    feed = random_feed(model)
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
