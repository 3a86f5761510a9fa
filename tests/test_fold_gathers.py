import numpy as np
from onnx import numpy_helper

from conftest import masked_reference, random_feed, run
from fixtures import TOPOLOGIES

from gkp_onnx import optimize


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
