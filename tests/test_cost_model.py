"""The measured cost model, the never-slower group choice, and the end-to-end revert under --bench."""

import importlib

import numpy as np
import onnx
import pytest

from conftest import masked_reference, random_feed, run
from fixtures import TOPOLOGIES

from gkp_onnx import optimize
from gkp_onnx.bench import Timing
from gkp_onnx.cost import AnalyticCpuCost
from gkp_onnx.cost.measured import MeasuredCost, layer_models
from gkp_onnx.graph import node_attr
from gkp_onnx.plan import LayerPlan

LAYER = LayerPlan(node="conv", weight="w", out_channels=16, in_channels=16, kernel_shape=[3, 3], macs=0,
                  kept_per_group=8, input_size=[8, 8], conv_attrs={"pads": [1, 1, 1, 1], "strides": [2, 2]})


def test_layer_models_are_valid_and_agree_in_shape():
    dense, grouped = layer_models(LAYER, 4, batch=2)
    for model in (dense, grouped):
        onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in grouped.graph.node] == ["Conv", "Conv", "Conv"]  # depthwise, grouped, depthwise
    assert [node_attr(n, "group") for n in grouped.graph.node][1] == 4
    assert run(dense, random_feed(dense))[0].shape == run(grouped, random_feed(grouped))[0].shape == (2, 16, 4, 4)
    assert grouped.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 4 * LAYER.kept_per_group


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_are_measured_and_estimated_off_the_nchwc_path(dims):
    """onnxruntime runs only 2-D Convs in NCHWc: a grouped Conv1d / Conv3d takes the plain path
    (G = 1 is their fastest form, measured), and its layer models time the right Conv."""
    layer = LayerPlan(**{**LAYER.__dict__, "kernel_shape": [3] * dims, "input_size": [8] * dims,
                         "conv_attrs": {"pads": [1] * 2 * dims, "strides": [2] * dims}})
    dense, grouped = layer_models(layer, 2, batch=1)
    assert run(dense, random_feed(dense))[0].shape == run(grouped, random_feed(grouped))[0].shape == (1, 16, *[4] * dims)
    analytic = AnalyticCpuCost(block=16)
    wide = {"in_channels": 64, "out_channels": 64, "kept_per_group": 32, "input_folds": True, "output_sinks": True}
    flat, shaped = LayerPlan(**{**LAYER.__dict__, **wide}), LayerPlan(**{**layer.__dict__, **wide})
    assert analytic.relative_time(shaped, 1) == analytic.relative_time(flat, 1) == 0.5
    # in 2-D the grouped Conv is aligned to the block and runs in NCHWc; in 1-D / 3-D it does not
    assert analytic.relative_time(flat, 2) < 1 < analytic.relative_time(shaped, 2)


def test_the_gathers_left_are_charged_by_the_analytic_move_term(tmp_path):
    measured = MeasuredCost(repeats=3, cache=tmp_path)
    folds = LayerPlan(**{**LAYER.__dict__, "input_folds": True, "output_sinks": True})
    stays = measured.relative_time(LAYER, 2)  # neither Gather can go
    assert measured.key(folds, 2) == measured.key(LAYER, 2) and measured.measured == 1  # the same grouped Conv
    conv = measured.entries[measured.key(LAYER, 2)]
    assert measured.relative_time(folds, 2) == pytest.approx(conv)  # G * n = 16 <= Ci: both Gathers fold
    assert stays == pytest.approx(conv + measured.fallback.moves(LAYER, 2)) and stays > conv


def test_measurements_are_cached_per_machine(tmp_path):
    first = MeasuredCost(repeats=3, cache=tmp_path)
    times = [first.relative_time(LAYER, g) for g in (1, 2)]
    assert first.measured == 2 and all(t > 0 for t in times)
    second = MeasuredCost(repeats=3, cache=tmp_path)
    assert [second.relative_time(LAYER, g) for g in (1, 2)] == times and second.measured == 0
    other_machine = MeasuredCost(repeats=3, cache=tmp_path, threads=7)  # another tag, another file
    assert other_machine.path != first.path
    no_shape = LayerPlan(**{**LAYER.__dict__, "input_size": None})
    assert second.relative_time(no_shape, 2) == second.fallback.relative_time(no_shape, 2)
    # a producer the input Gather folds into weighs in as in the analytic model (its outputs are not timed)
    paired = LayerPlan(**{**LAYER.__dict__, "input_folds": True, "macs": 100, "producer_macs": 100})
    measured_pair = second.relative_time(paired, 1)
    own = second.entries[second.key(paired, 1)]
    assert measured_pair == pytest.approx((own + LAYER.kept_per_group / LAYER.in_channels) / 2)


class FixedCost:
    def __init__(self, costs):
        self.costs = costs

    def relative_time(self, layer, group_count):
        return self.costs.get(group_count, 2.0)


def test_auto_choice_never_picks_a_form_estimated_slower_than_dense():
    model = TOPOLOGIES["chain"]()
    _, report = optimize(model, ratio=0.5, min_group_width=1, cost_model=FixedCost({1: 1.2, 2: 0.7}),
                         speed_weight=0.0, validate=False)
    assert {layer.group_count for layer in report.plan.layers} == {2}
    with pytest.raises(Exception, match="nothing to optimize.*estimated slower"):
        optimize(model, ratio=0.5, min_group_width=1, cost_model=FixedCost({}), validate=False)
    _, forced = optimize(model, ratio=0.5, groups=4, min_group_width=1, cost_model=FixedCost({}), validate=False)
    assert forced.plan.layers, "an explicit --groups is the user's choice, kept even when estimated slower"


def test_bench_reverts_the_slowest_layers_until_not_slower(monkeypatch):
    model = TOPOLOGIES["residual"]()
    speedups = iter([0.8, 0.9, 1.1])
    calls = []

    def fake_bench(models, names, batches, **_):
        calls.append(len(models))
        return [Timing("input", "cpu", 1, 1.0, 1.0, 1.0), Timing("optimized", "cpu", 1, 1.0, 1.0, next(speedups))]

    monkeypatch.setattr(importlib.import_module("gkp_onnx.guard"), "bench", fake_bench)
    costs = FixedCost({1: 0.9, 2: 0.5})
    _, full = optimize(model, ratio=0.5, min_group_width=1, cost_model=costs, validate=False, fold=False)
    optimized, report = optimize(model, ratio=0.5, min_group_width=1, cost_model=costs, fold=False, bench_batches=[1])
    assert len(calls) == 3 and report.passed and report.latency[1].speedup == 1.1
    reverted = [s for s in report.plan.skipped if s.reason.startswith("reverted to dense")]
    assert len(reverted) == 2 and len(report.plan.layers) == len(full.plan.layers) - 2
    onnx.checker.check_model(optimized, full_check=True)
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)


def test_nchwc_block_comes_from_onnxruntime_or_the_environment(monkeypatch):
    from gkp_onnx.cost import nchwc_block_size, probe_nchwc_block
    from gkp_onnx.errors import GkpError

    probed = probe_nchwc_block()
    assert probed >= 1 and probed & (probed - 1) == 0  # a power of two: 16 with AVX512, 8 with AVX2, 1 without
    monkeypatch.delenv("GKP_ONNX_NCHWC_BLOCK")
    assert nchwc_block_size() == probed
    monkeypatch.setenv("GKP_ONNX_NCHWC_BLOCK", "8")
    assert nchwc_block_size() == 8
    monkeypatch.setenv("GKP_ONNX_NCHWC_BLOCK", "sixteen")
    with pytest.raises(GkpError, match="GKP_ONNX_NCHWC_BLOCK must be a positive integer"):
        nchwc_block_size()
