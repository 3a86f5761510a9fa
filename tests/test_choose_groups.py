import numpy as np
import pytest
from onnx import numpy_helper

from fixtures import GraphBuilder

from gkp_onnx import optimize
from gkp_onnx.passes.choose_groups import AnalyticCpuCost
from gkp_onnx.plan import LayerPlan


def model_64():
    b = GraphBuilder(in_channels=64, size=8)
    return b.build(b.conv("x", 64))


def test_speed_weight_zero_picks_the_most_retained_importance():
    _, report = optimize(model_64(), ratio=0.5, speed_weight=0.0, validate=False)
    layer = report.plan.layers[0]
    assert [c.group_count for c in layer.candidates] == [1, 2, 4, 8]
    best = max(layer.candidates, key=lambda c: c.retained_importance)
    assert layer.group_count == best.group_count
    assert layer.retained_importance == pytest.approx(best.retained_importance)


def test_large_speed_weight_picks_the_cheapest():
    _, report = optimize(model_64(), ratio=0.5, speed_weight=100.0, validate=False)
    layer = report.plan.layers[0]
    assert layer.group_count == min(layer.candidates, key=lambda c: c.relative_cost).group_count == 1


def test_ties_prefer_the_smaller_group_count():
    class Flat:
        def relative_time(self, layer, group_count):
            return 0.5

    # all-equal filters and channels: every G keeps the same importance
    b = GraphBuilder(in_channels=16, size=6)
    model = b.build(b.conv("x", 16, bias=False))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((16, 16, 3, 3), np.float32), "conv1.weight"))
    _, report = optimize(model, ratio=0.5, cost_model=Flat(), min_group_width=1, validate=False)
    assert report.plan.layers[0].group_count == 1


def test_custom_cost_model_is_used():
    class PreferFour:
        def relative_time(self, layer, group_count):
            return 0.0 if group_count == 4 else 10.0

    _, report = optimize(model_64(), ratio=0.5, cost_model=PreferFour(), validate=False)
    assert report.plan.layers[0].group_count == 4
    assert {c.group_count: c.relative_cost for c in report.plan.layers[0].candidates}[4] == 0.0


def test_analytic_cost_grows_with_group_count_and_g1_is_the_ideal():
    layer = LayerPlan("c", "w", out_channels=64, in_channels=64, kernel_shape=[3, 3], macs=1, kept_per_group=32)
    cost = AnalyticCpuCost(gather_cost=0.0)
    times = [cost.relative_time(layer, g) for g in (1, 2, 4, 8)]
    assert times[0] == pytest.approx(0.5)
    assert times == sorted(times)
    assert cost.efficiency(128) == pytest.approx(0.96) and cost.efficiency(8) == pytest.approx(0.35)
