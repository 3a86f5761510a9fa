import itertools

import numpy as np
import pytest
from onnx import numpy_helper
from scipy.optimize import minimize

from fixtures import TOPOLOGIES

from gkp_onnx.passes.select_kernels import SelectKernels
from gkp_onnx.plan import LayerPlan, Plan
from gkp_onnx.scoring import (BALANCER, KEPT_SHARE, geometric_median, grouped_kernels, keep_top, kernel_scores,
                               retained_importance, roughness, select, tmi_cost)


def test_geometric_median_minimises_sum_of_distances():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((3, 11, 5))
    medians = geometric_median(points)
    for pts, median in zip(points, medians):
        objective = lambda y: np.linalg.norm(pts - y, axis=1).sum()  # noqa: E731
        best = minimize(objective, pts.mean(0), method="Nelder-Mead",
                        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
        assert objective(median) <= objective(best) + 1e-7


def test_geometric_median_of_a_point_cloud_with_an_outlier_is_robust():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    assert np.linalg.norm(geometric_median(points) - [0.5, 0.5]) < 0.6


def test_grouped_kernels_layout():
    weight = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)
    kernels = grouped_kernels(weight, [[0, 2], [1, 3]])
    assert kernels.shape == (2, 3, 8)
    np.testing.assert_array_equal(kernels[1, 2], np.concatenate([weight[1, 2].ravel(), weight[3, 2].ravel()]))


def test_l2_keeps_the_largest_grouped_kernels():
    weight = np.ones((4, 6, 3, 3), np.float32)
    weight[:2, 4] *= 5  # group 0's strongest channel
    weight[2:, 1] *= 3  # group 1's strongest channel
    kept = keep_top(kernel_scores(weight, [[0, 1], [2, 3]], "l2"), 1)
    assert kept == [[4], [1]]


def test_leanflex_prefers_kernels_far_from_the_median():
    rng = np.random.default_rng(0)
    weight = np.repeat(rng.standard_normal((2, 1, 3, 3)), 8, axis=1)  # 8 identical channels
    weight[:, 5] = -weight[:, 5]  # same norm, far from the median
    scores = kernel_scores(weight, [[0, 1]], "leanflex")
    assert keep_top(scores, 1) == [[5]]


def test_keep_top_ties_go_to_lower_index_and_sets_are_sorted():
    scores = np.array([[1.0, 1.0, 1.0, 2.0], [0.0, 3.0, 2.0, 1.0]])
    assert keep_top(scores, 2) == [[0, 3], [1, 2]]


def test_random_method_is_seeded():
    weight = np.random.default_rng(0).standard_normal((4, 8, 3, 3))
    a = kernel_scores(weight, [[0, 1], [2, 3]], "random", seed=1)
    assert np.array_equal(a, kernel_scores(weight, [[0, 1], [2, 3]], "random", seed=1))
    assert not np.array_equal(a, kernel_scores(weight, [[0, 1], [2, 3]], "random", seed=2))


def test_retained_importance():
    weight = np.zeros((2, 4, 1, 1))
    weight[0, 0] = 3.0
    weight[1, 3] = 4.0
    assert retained_importance(weight, [[0], [1]], [[0], [3]]) == pytest.approx(1.0)
    assert retained_importance(weight, [[0], [1]], [[0], [0]]) == pytest.approx(9 / 25)


def test_tmi_cost_matches_its_definition():
    rng = np.random.default_rng(0)
    sim = rng.random((7, 7))
    sim = (sim + sim.T) / 2
    sets = [set(c) for c in itertools.combinations(range(7), 5)][:6]
    chosen = np.array([[i in kept for i in range(7)] for kept in sets])
    m = max(1, int(KEPT_SHARE * 5))
    for kept, cost in zip(sets, tmi_cost(sim, chosen)):
        pairs = sum(sim[i, j] for i, j in itertools.combinations(sorted(kept), 2))
        represented = sum(sum(sorted((sim[i, j] for j in kept), reverse=True)[:m]) for i in set(range(7)) - kept)
        assert cost == pytest.approx(pairs - BALANCER * represented)


@pytest.mark.parametrize("method", ["tmi", "sr"])
def test_set_methods_drop_a_duplicate_kernel_first(method):
    # channels 0 and 1 carry the same grouped kernel: keeping 3 of 4 must keep only one of them
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((4, 4, 3, 3))
    weight[:, 1] = weight[:, 0]
    kept = select(weight, [[0, 1], [2, 3]], 3, method)
    assert [len(set(k) & {0, 1}) for k in kept] == [1, 1]
    assert all(k == sorted(k) and len(set(k)) == 3 for k in kept)
    assert kept == select(weight, [[0, 1], [2, 3]], 3, method)  # deterministic


def test_sr_prefers_the_smoother_of_two_interchangeable_kernels():
    smooth = np.ones((3, 3))
    rough = np.sqrt(np.indices((3, 3)).sum(0) % 2 + 0.5)  # checkerboard of squared values 0.5 / 1.5
    weight = np.zeros((1, 3, 3, 3))
    weight[0, 0], weight[0, 1], weight[0, 2] = 10 * smooth, smooth, rough
    assert roughness(np.stack([smooth, rough])[None])[0, 0] == 0 < roughness(np.stack([smooth, rough])[None])[0, 1]
    assert roughness(np.ones((1, 1, 1, 1)))[0, 0] == 0  # 1x1: no neighbours
    assert select(weight, [[0]], 2, "sr") == [[0, 1]]


@pytest.mark.parametrize("kernel", [(5,), (3, 3), (2, 3, 3)])
def test_roughness_sums_every_neighbouring_pair_once_in_any_dimension(kernel):
    """Conv1d / 2d / 3d: the sum over position pairs at Chebyshev distance 1 of |w_a^2 - w_b^2|."""
    weight = np.random.default_rng(0).standard_normal((2, 3, *kernel))
    positions = list(np.ndindex(*kernel))
    expected = sum(np.abs(weight[(..., *a)] ** 2 - weight[(..., *b)] ** 2)
                   for i, a in enumerate(positions) for b in positions[i + 1:]
                   if max(abs(p - q) for p, q in zip(a, b)) == 1)
    np.testing.assert_allclose(roughness(weight), expected)


def test_pass_keeps_n_sorted_channels_of_largest_grouped_kernel_norm_per_group():
    # the pass on its own, with groups chosen by hand (interleaved filters: 4 groups of 4)
    model = TOPOLOGIES["chain"]()  # conv1 8 -> 16, Relu, conv3 16 -> 16
    before = model.SerializeToString()
    groups = [list(range(g, 16, 4)) for g in range(4)]
    layer = LayerPlan(node="conv3", weight="conv3.weight", out_channels=16, in_channels=16, kernel_shape=[3, 3],
                      macs=0, kept_per_group=5, group_count=4, groups=groups)
    result = SelectKernels(method="l2")(model, Plan(ratio=0.7, method="l2", seed=0, layers=[layer]))
    assert not result.modified and model.SerializeToString() == before  # in_place = False
    weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "conv3.weight")
    kept = result.plan.layers[0].kept_channels
    assert len(kept) == 4
    for filters, channels in zip(groups, kept):
        assert len(set(channels)) == 5 and channels == sorted(channels)
        norms = np.linalg.norm(weight[filters].transpose(1, 0, 2, 3).reshape(16, -1), axis=1)  # per input channel
        assert channels == sorted(np.argsort(-norms)[:5].tolist())
    assert 0 < result.plan.layers[0].retained_importance < 1
