import sys
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from conftest import masked_reference, random_feed, run
from fixtures import TOPOLOGIES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import l1_filter_pruning  # noqa: E402 (a benchmark module, not part of the package)


def test_l1_filter_pruning_keeps_the_strongest_filters_and_leaves_no_gather():
    model = TOPOLOGIES["residual"]()
    pruned, plan = l1_filter_pruning(model, 0.5)
    assert not [n for n in pruned.graph.node if n.op_type == "Gather"]
    # conv1's activation feeds the residual Add too: only conv5 (fed by conv3 through Relu) is planned
    assert [layer.node for layer in plan.layers] == ["conv5"]
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv3.weight"))
    strongest = sorted(np.argsort(-np.abs(w2).sum(axis=(1, 2, 3)))[:8])
    assert plan.layers[0].kept_channels == [strongest]
    pruned_w2 = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "conv3.weight"))
    np.testing.assert_array_equal(pruned_w2, w2[strongest])
    feed = random_feed(model)
    np.testing.assert_allclose(run(pruned, feed)[0], run(masked_reference(model, plan), feed)[0],
                               rtol=1e-5, atol=1e-5)
