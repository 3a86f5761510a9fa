import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import run

from gkp_onnx.graph import ensure_node_names
from gkp_onnx.nm_permutation import find_region, kept_score, permute_reduction_channels, search_permutation
from gkp_onnx.nm import nm_candidates


def ffn(extra_consumer=False, output_inside=False):
    """x -> (x W1 + b1) and x W3 -> silu(h1) * h3 -> W2 (and W4) -> y: a SwiGLU block."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", [16, 32]), ("b1", [32]), ("w3", [16, 32]), ("w2", [32, 16]), ("w4", [32, 16])]]
    inits.append(numpy_helper.from_array(np.float32(0.5), "half"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "b1"], ["h1"], name="bias1"),
             helper.make_node("MatMul", ["x", "w3"], ["h3"], name="fc3"),
             helper.make_node("Sigmoid", ["h1"], ["s"], name="sig"),
             helper.make_node("Mul", ["h1", "s"], ["silu"], name="silu"),
             helper.make_node("Mul", ["silu", "h3"], ["g"], name="gate"),
             helper.make_node("Mul", ["g", "half"], ["gh"], name="scale"),
             helper.make_node("MatMul", ["gh", "w2"], ["y"], name="fc2")]
    outputs = ["y"]
    if extra_consumer:
        nodes.append(helper.make_node("MatMul", ["gh", "w4"], ["z"], name="fc4"))
        outputs.append("z")
    else:
        inits.pop(4)
    if output_inside:
        outputs.append("g")
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])], [],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend(inferred[o] for o in outputs)
    ensure_node_names(model)
    return model


def test_search_gives_a_valid_permutation_that_never_loses():
    for seed in range(3):
        scores = np.abs(np.random.default_rng(seed).standard_normal((32, 64)))
        perm = search_permutation(scores, 2, 4, seconds=0.2, seed=seed)
        assert sorted(perm) == list(range(64))
        assert kept_score(scores, perm, 2, 4) > kept_score(scores, np.arange(64), 2, 4)


def test_search_is_reproducible_whatever_the_machine_load(monkeypatch):
    # the budget is work, not wall time: a slowed-down search finds the same order
    import time

    import gkp_onnx.nm_permutation as nm_permutation
    scores = np.abs(np.random.default_rng(0).standard_normal((32, 64)))
    first = search_permutation(scores, 2, 4, seconds=0.05)
    top_sum = nm_permutation._top_sum
    monkeypatch.setattr(nm_permutation, "_top_sum", lambda *a: (time.sleep(0.001), top_sum(*a))[1])
    np.testing.assert_array_equal(search_permutation(scores, 2, 4, seconds=0.05), first)


def test_windowed_search_on_a_large_matrix_stays_valid():
    scores = np.abs(np.random.default_rng(0).standard_normal((512, 1024)))
    perm = search_permutation(scores, 2, 4, seconds=0.3)
    assert sorted(perm) == list(range(1024))
    assert kept_score(scores, perm, 2, 4) >= kept_score(scores, np.arange(1024), 2, 4)


def test_region_of_a_swiglu_block():
    model = ffn(extra_consumer=True)
    region = find_region(model, "gh", 32)
    assert sorted(n.name for n, _ in region.sources) == ["fc1", "fc3"]
    assert sorted(n.name for n, _ in region.consumers) == ["fc2", "fc4"]
    assert region.constants == {"b1"}
    assert find_region(ffn(output_inside=True), "gh", 32) is None  # a graph output pins the order
    assert find_region(model, "x", 16) is None  # a graph input is nobody's output


def test_permutation_folding_is_exact_and_siblings_share_it():
    model = ffn(extra_consumer=True)
    permuted = onnx.ModelProto()
    permuted.CopyFrom(model)
    refs, _ = nm_candidates(permuted, 2, 4, include_head=True)
    done, orders = permute_reduction_channels(permuted, refs, 2, 4, {}, seconds=0.2)
    assert done == {"fc2", "fc4"}
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in permuted.graph.initializer}
    assert not np.array_equal(before["w2"], after["w2"])
    perm = [int(np.flatnonzero((before["w2"] == row).all(axis=1))[0]) for row in after["w2"]]
    np.testing.assert_array_equal(after["w4"], before["w4"][perm])  # one order for both consumers
    np.testing.assert_array_equal(after["b1"], before["b1"][perm])
    assert set(orders) == {"fc1", "fc3"} and all(np.array_equal(order, perm) for order in orders.values())
    x = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    for expected, actual in zip(run(model, x), run(permuted, x)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
