import itertools

import numpy as np
import pytest
from scipy.optimize import minimize

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
