import numpy as np
import pytest
from onnx import numpy_helper

from fixtures import GraphBuilder

from gkp_onnx import optimize
from gkp_onnx.errors import GkpError
from gkp_onnx.graph import ensure_node_names, input_specs
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.cost import AnalyticCpuCost
from gkp_onnx.choice import GroupScore
from gkp_onnx.passes.choose_groups import ChooseGroups
from gkp_onnx.scoring import max_retained_importance
from gkp_onnx.passes.cluster import ClusterFilters
from gkp_onnx.scoring import shared_view
from gkp_onnx.scoring import keep_top, kernel_scores, retained_importance
from gkp_onnx.plan import LayerPlan, Plan


def model_64():
    b = GraphBuilder(in_channels=64, size=8)
    return b.build(b.conv("x", 64))


def test_speed_weight_zero_picks_the_most_retained_importance_not_slower_than_dense():
    _, report = optimize(model_64(), ratio=0.5, speed_weight=0.0, validate=False)
    layer = report.plan.layers[0]
    assert [c.group_count for c in layer.candidates] == [1, 2, 4, 8]
    assert any(c.relative_cost >= 1 for c in layer.candidates), "the case must include a form slower than dense"
    best = max((c for c in layer.candidates if c.relative_cost < 1), key=lambda c: c.retained_importance)
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
    cost = AnalyticCpuCost(move_cost=0.0)
    times = [cost.relative_time(layer, g) for g in (1, 2, 4, 8)]
    assert times[0] == pytest.approx(0.5)
    assert times == sorted(times)
    assert cost.efficiency(128) == pytest.approx(0.96) and cost.efficiency(8) == pytest.approx(0.35)


@pytest.mark.parametrize("speed_weight", [0.0, 0.02, 0.1, 0.25, 1.0])
def test_dropping_unwinnable_candidates_never_changes_the_choice(speed_weight):
    b = GraphBuilder(in_channels=32, size=6, seed=1)
    model = b.build(b.conv(b.conv(b.conv("x", 64), 128, kernel=1), 64))
    ensure_node_names(model)

    def choose(prune: bool) -> list[int]:
        plan = Plan(ratio=0.5, method="leanflex", seed=0)
        Analyze(input_specs(model))(model, plan)
        scorer = GroupScore(speed_weight=speed_weight)
        chooser = ChooseGroups(scorer)
        ClusterFilters(min_group_width=4, viable=scorer.viable_group_counts if prune else None)(model, plan)
        chooser(model, plan)
        return [layer.group_count for layer in plan.layers]

    assert choose(prune=True) == choose(prune=False)


def test_max_retained_importance_bounds_every_grouping():
    weight = np.random.default_rng(0).standard_normal((16, 12, 3, 3))
    bound = max_retained_importance(weight, 6)
    for g in (1, 2, 4, 8, 16):
        groups = [list(range(i, 16, g)) for i in range(g)]
        kept = keep_top(kernel_scores(weight, groups, "l2"), 6)
        assert retained_importance(weight, groups, kept) <= bound + 1e-12


def test_unfoldable_gathers_are_charged_and_a_1x1_conv_on_a_residual_stream_stays_dense():
    shape = dict(node="c", weight="w", out_channels=64, in_channels=256, kernel_shape=[1, 1], macs=1,
                 kept_per_group=128)
    cost = AnalyticCpuCost()
    inner = LayerPlan(**shape, input_folds=True, output_sinks=True)
    stream = LayerPlan(**shape)
    assert cost.relative_time(inner, 1) == pytest.approx(0.5)  # the Gather folds into the producer
    assert cost.relative_time(stream, 1) > 1.0  # reorder + copy of a 256-channel input costs more than it saves
    assert cost.relative_time(stream, 2) - cost.relative_time(LayerPlan(**shape, output_sinks=True), 2) \
        == pytest.approx(25 * 3 * 64 / (256 * 64))  # the output permutation that cannot sink
    b = GraphBuilder(in_channels=256, size=4)
    with pytest.raises(GkpError, match="kept dense: every group count is estimated slower than the dense Conv"):
        optimize(b.build(b.conv("x", 64, kernel=1)), ratio=0.5, validate=False)


def test_the_shared_form_of_a_stream_reader_costs_no_gather_and_wins_where_the_gather_would_not_pay():
    shape = dict(node="c", weight="w", out_channels=64, in_channels=256, kernel_shape=[1, 1], macs=1,
                 kept_per_group=128, producer_macs=3.0)
    cost = AnalyticCpuCost()
    stream = LayerPlan(**shape, shared_group_count=2, output_sinks=True)
    view = shared_view(stream)  # no input Gather, no producer pruned: the grouped Conv's compute alone
    assert cost.relative_time(view, 2) == pytest.approx(0.5 / cost.efficiency(32))
    assert cost.relative_time(stream, 1) > 1.0 > cost.relative_time(view, 2)
    projection = LayerPlan(**shape, shared_group_count=2, shared_output=True)  # its filters follow the next blocks
    assert cost.moves(shared_view(projection), 2) == 0.0 < cost.moves(projection, 2)
    choose = ChooseGroups(GroupScore(cost), never_slower=True)
    weight = np.random.default_rng(0).standard_normal((64, 256, 1, 1))
    stream.candidate_groups = {1: [list(range(64))]}
    plan = Plan(ratio=0.5, method="leanflex", seed=0, layers=[stream])
    b = GraphBuilder(in_channels=256, size=4)
    b.inits.append(numpy_helper.from_array(weight.astype(np.float32), "w"))
    choose(b.build(), plan)
    assert stream.shared and stream.group_count == 2
    assert [c.shared for c in stream.candidates] == [False, True]
    assert sorted(f for group in stream.groups for f in group) == list(range(64))


def test_nchwc_block_pads_channel_counts_and_sends_unaligned_grouped_convs_to_the_slow_path():
    def layer(ci, co, n):
        return LayerPlan("c", "w", out_channels=co, in_channels=ci, kernel_shape=[3, 3], macs=1, kept_per_group=n,
                         input_folds=True, output_sinks=True)

    plain, nchwc = AnalyticCpuCost(move_cost=0.0), AnalyticCpuCost(move_cost=0.0, block=16)
    assert nchwc.relative_time(layer(64, 64, 36), 1) == pytest.approx(48 / 64)  # 36 channels cost 48
    assert nchwc.relative_time(layer(64, 64, 32), 1) == pytest.approx(0.5)  # a multiple costs what it reads
    assert nchwc.relative_time(layer(16, 16, 12), 1) == pytest.approx(1.0)  # below a block: half blocks
    assert nchwc.relative_time(layer(16, 16, 8), 1) == pytest.approx(0.5)
    assert plain.relative_time(layer(64, 64, 36), 1) == pytest.approx(36 / 64)  # block 1: no NCHWc rule
    # grouped: aligned (n and Co/G multiples of 16) as the table says; otherwise the NCHW path
    assert nchwc.relative_time(layer(64, 64, 32), 2) == pytest.approx(plain.relative_time(layer(64, 64, 32), 2))
    assert nchwc.relative_time(layer(64, 64, 36), 2) == pytest.approx(
        plain.relative_time(layer(64, 64, 36), 2) / AnalyticCpuCost.SLOW_PATH)
    assert nchwc.relative_time(layer(64, 64, 36), 2) > 1.0  # measured 1.03-1.11 of the dense time
    # widths below a block were measured on the NCHW path: not penalised twice
    assert nchwc.relative_time(layer(64, 64, 32), 8) == pytest.approx(plain.relative_time(layer(64, 64, 32), 8))


def test_a_folding_producer_makes_a_larger_group_count_cost_what_it_keeps_of_the_producer():
    shape = dict(node="c", weight="w", out_channels=512, in_channels=512, kernel_shape=[3, 3], macs=1000,
                 kept_per_group=128, input_folds=True, output_sinks=True)
    cost = AnalyticCpuCost(move_cost=0.0)
    alone, paired = LayerPlan(**shape), LayerPlan(**shape, producer_macs=1000)
    assert cost.relative_time(paired, 1) == pytest.approx(0.25)  # both Convs at a quarter
    # G = 4 reads 4 * 128 = all 512 producer channels: the producer stays whole
    assert cost.relative_time(paired, 4) == pytest.approx((cost.relative_time(alone, 4) + 1.0) / 2)
    assert cost.relative_time(paired, 4) - cost.relative_time(paired, 1) > 2 * (
        cost.relative_time(alone, 4) - cost.relative_time(alone, 1))
    stream = LayerPlan(**{**shape, "input_folds": False}, producer_macs=0)
    assert cost.relative_time(stream, 2) == cost.relative_time(LayerPlan(**{**shape, "input_folds": False}), 2)
