import numpy as np
import pytest

from gkp_onnx.errors import GkpError
from gkp_onnx.passes.cluster import balanced_kmeans, candidate_group_counts, snake_groups
from gkp_onnx.plan import LayerPlan


def planted(groups=4, size=8, dim=18, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim)) * 10
    labels = rng.permutation(np.repeat(np.arange(groups), size))
    return centres[labels] + rng.standard_normal((groups * size, dim)) * 0.1, labels


@pytest.mark.parametrize("g", [1, 2, 4, 8, 32])
def test_balanced_partition(g):
    filters, _ = planted()
    groups = balanced_kmeans(filters, g, seed=0)
    assert len(groups) == g and {len(x) for x in groups} == {32 // g}
    assert sorted(f for x in groups for f in x) == list(range(32))
    assert all(x == sorted(x) for x in groups)


def test_recovers_planted_clusters():
    filters, labels = planted()
    groups = balanced_kmeans(filters, 4, seed=0)
    assert all(len(set(labels[x])) == 1 for x in groups)


def test_balances_unequal_clusters():
    # 12 filters near one centre, 4 near another: 2 groups of 8 must still come out
    rng = np.random.default_rng(1)
    filters = np.concatenate([rng.standard_normal((12, 9)) + 5, rng.standard_normal((4, 9)) - 5])
    groups = balanced_kmeans(filters, 2, seed=0)
    assert [len(x) for x in groups] == [8, 8]
    assert set(range(12, 16)) <= set(groups[1]) or set(range(12, 16)) <= set(groups[0])


def test_deterministic_for_a_seed():
    filters, _ = planted(seed=3)
    assert balanced_kmeans(filters, 4, seed=7) == balanced_kmeans(filters, 4, seed=7)


def test_candidates_respect_width_floor_and_forced_groups():
    layer = LayerPlan("conv", "w", out_channels=64, in_channels=64, kernel_shape=[3, 3], macs=0, kept_per_group=36)
    assert candidate_group_counts(layer, min_group_width=16) == [1, 2, 4]
    assert candidate_group_counts(layer, min_group_width=8, forced=16) == [16]
    with pytest.raises(GkpError, match="--groups 3 does not divide layer 'conv' \\(64 output channels\\)"):
        candidate_group_counts(layer, 8, forced=3)


def test_clusterings_are_cached_and_reused(tmp_path, monkeypatch):
    import gkp_onnx.passes.cluster as cluster
    filters = np.random.default_rng(0).standard_normal((32, 18)).astype(np.float32)
    first = cluster.cached_balanced_kmeans(filters, 4, 0, tmp_path)
    assert first == cluster.balanced_kmeans(filters, 4, 0)
    assert len(list((tmp_path / "clusters").glob("*.i32"))) == 1
    monkeypatch.setattr(cluster, "balanced_kmeans", lambda *a: pytest.fail("not taken from the cache"))
    assert cluster.cached_balanced_kmeans(filters, 4, 0, tmp_path) == first
    with pytest.raises(pytest.fail.Exception):  # another G, seed or weight is another entry
        cluster.cached_balanced_kmeans(filters, 4, 1, tmp_path)
    next((tmp_path / "clusters").glob("*.i32")).write_bytes(b"garbage")  # a damaged entry is recomputed
    monkeypatch.undo()
    assert cluster.cached_balanced_kmeans(filters, 4, 0, tmp_path) == first


def test_snake_groups_deal_filters_by_roughness():
    # filter f has roughness growing with f: snake order 0 1 1 0 | 0 1 1 0 for G = 2
    weight = np.zeros((8, 1, 3, 3))
    weight[:, 0, 0, 0] = np.arange(8)
    assert snake_groups(weight, 2) == [[0, 3, 4, 7], [1, 2, 5, 6]]
    assert snake_groups(weight, 4) == [[0, 7], [1, 6], [2, 5], [3, 4]]


def test_the_pass_groups_every_layer_and_count_as_one_thread_would():
    from fixtures import GraphBuilder

    from gkp_onnx.graph import ensure_node_names, input_specs
    from gkp_onnx.passes.analyze import Analyze
    from gkp_onnx.passes.cluster import ClusterFilters
    from gkp_onnx.pipeline import run_passes
    from gkp_onnx.plan import Plan
    from onnx import numpy_helper

    b = GraphBuilder(in_channels=16, size=6)
    model = b.build(b.conv(b.op("Relu", [b.conv(b.conv("x", 32), 64)]), 32))
    ensure_node_names(model)
    plan = Plan(ratio=0.5, method="leanflex", seed=0)
    run_passes([Analyze(input_specs(model)), ClusterFilters(min_group_width=4)], model, plan)  # several jobs at once
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for layer in plan.layers:
        filters = weights[layer.weight].reshape(layer.out_channels, -1)
        assert list(layer.candidate_groups) == candidate_group_counts(layer, 4)  # in order, none missing
        assert all(groups == balanced_kmeans(filters, g, 0) for g, groups in layer.candidate_groups.items())
