"""conv_budget: per-Conv ratios for a target speed-up, from the damage each layer's pruning does
at the model output on calibration data."""

import numpy as np
import onnx
import pytest

from conftest import masked_reference, random_feed, run
from fixtures import TOPOLOGIES

from gkp_onnx import optimize
from gkp_onnx.cli import main
from gkp_onnx.graph import input_specs, model_stats
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.passes.conv_budget import RATIO_LEVELS, ConvBudget, output_damage
from gkp_onnx.pipeline import run_passes
from gkp_onnx.plan import Plan
from gkp_onnx.validate import Dataset


def images(model: onnx.ModelProto, rows: int = 32, seed: int = 0) -> np.ndarray:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal([rows, *shape]).astype(np.float32)


def test_output_damage_is_kl_for_logits_and_one_minus_cosine_otherwise():
    logits = np.random.default_rng(0).standard_normal((16, 10))
    assert output_damage([logits], [logits]) == pytest.approx(0.0, abs=1e-12)
    assert output_damage([logits], [logits + 5.0]) == pytest.approx(0.0, abs=1e-9)  # softmax ignores a shift
    assert output_damage([logits], [logits * 0.5]) > 0
    features = np.random.default_rng(1).standard_normal((4, 8, 3, 3))
    assert output_damage([features], [2 * features]) == pytest.approx(0.0, abs=1e-12)
    assert output_damage([features], [-features]) == pytest.approx(2.0)


def test_analyze_takes_a_ratio_per_layer_and_keeps_the_budget_s_zeros_dense():
    model = TOPOLOGIES["residual_stream"]()
    specs = input_specs(model, {})
    plan = Plan(ratio=0.0, method="leanflex", seed=0)
    run_passes([Analyze(specs)], model, plan)
    nodes = [layer.node for layer in plan.layers]
    chosen = Plan(ratio=0.0, method="leanflex", seed=0, layer_ratios={nodes[1]: 0.5, nodes[2]: 0.75, nodes[3]: 0.0})
    run_passes([Analyze(specs)], model, chosen)
    kept = {layer.node: layer.kept_per_group for layer in chosen.layers}
    ins = {layer.node: layer.in_channels for layer in plan.layers}
    assert kept == {nodes[1]: ins[nodes[1]] // 2, nodes[2]: ins[nodes[2]] // 4}
    reasons = {s.node: s.reason for s in chosen.skipped}
    assert all("budget keeps it whole" in reasons[node] for node in nodes if node not in kept)


def test_the_budget_measures_each_layer_at_each_level_and_meets_the_target_it_is_measured_against():
    model = TOPOLOGIES["residual_stream"]()
    data = Dataset({"x": images(model)})
    specs = input_specs(model, {})
    stats = model_stats(model, specs)
    decided = {}

    def decide(ratio):
        _, report = optimize(model, ratio=ratio, validate=False, min_group_width=1)
        decided[ratio] = report.plan
        return model, report.plan, {}  # no shared streams in this call: the plan is on the model as given

    measured = []

    def measure(allocation):  # a stand-in for the timing: the speed-up the MACs promise
        saved = sum(options[("convs", node)][[level["keep"] for level in options[("convs", node)]].index(ratio)]
                    ["saved"] for node, ratio in allocation["convs"].items())
        measured.append(stats.macs / (stats.macs - saved))
        return measured[-1]

    budget = ConvBudget(1.3, data, decide, stats.macs, measure)
    options = budget._options()
    assert set(decided) == set(RATIO_LEVELS)
    for (kind, node), levels in options.items():
        assert kind == "convs" and levels[0] == {"keep": 0.0, "saved": 0, "damage": 0.0}
        assert all(level["damage"] >= 0 and level["saved"] > 0 for level in levels[1:])
    deepest = [levels[-1]["damage"] for levels in options.values() if len(levels) > 1]
    assert max(deepest) > 0  # pruning a layer changes the output
    budget.levels = options
    result = budget(model, Plan(ratio=0, method="x", seed=0))
    summary = result.details["structured_budget"]
    assert summary["met"] and summary["speedup"] >= 1.3 and summary["speedup"] in measured
    assert set(result.details["allocation"]["convs"]) == {node for _, node in options}


def test_optimize_with_a_target_gives_each_conv_its_ratio_and_stays_exact(tmp_path):
    model = TOPOLOGIES["residual_stream"]()
    np.savez(tmp_path / "calib.npz", x=images(model, 48))
    optimized, report = optimize(model, target_speedup=1.3, calib=str(tmp_path / "calib.npz"), min_group_width=1,
                                 bench_repeats=3, bench_min_time_s=0.0)
    onnx.checker.check_model(optimized, full_check=True)
    budget = report.structured_budget
    assert budget["target_speedup"] == 1.3 and budget["rounds"] and budget["speedup"] > 0
    assert set(report.plan.layer_ratios) and all(r in (0.0, *RATIO_LEVELS) for r in report.plan.layer_ratios.values())
    assert {layer.node for layer in report.plan.layers} \
        == {node for node, ratio in report.plan.layer_ratios.items() if ratio > 0} - {s.node for s in report.plan.skipped}
    assert report.after.macs < report.before.macs
    table = report.table()
    assert "ratio per layer (--target-speedup)" in table and ("met" if budget["met"] else "MISSED") in table
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-4, atol=1e-4)


def test_command_line_target_speedup_on_convs(tmp_path, capsys):
    path, out = tmp_path / "cnn.onnx", tmp_path / "out.onnx"
    model = TOPOLOGIES["residual_stream"]()
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", x=images(model, 24))
    code = main(["optimize", str(path), str(out), "--target-speedup", "1.2", "--calib", str(tmp_path / "calib.npz"),
                 "--min-group-width", "1", "--report", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert code in (0, 1) and out.exists() and "--target-speedup 1.2: measured" in text
    assert ("MISSED" in text) == (code == 1)


def test_dense_refit_puts_the_refit_grouped_weights_back_in_the_dense_layout(tmp_path):
    """What the damage of a refit level is measured with: the grouped Conv's weights after
    reconstruct, as a dense weight whose pruned kernels are zero, giving the same outputs."""
    from gkp_onnx.passes.conv_budget import dense_refit
    from gkp_onnx.passes.reconstruct import Reconstruct
    from gkp_onnx.passes.rewrite_conv import RewriteConv

    model = TOPOLOGIES["residual"]()
    x = images(model, 24)
    _, report = optimize(model, ratio=0.5, groups=2, min_group_width=1, validate=False)
    plan = report.plan
    refit, _ = run_passes([RewriteConv(), Reconstruct(model, Dataset({"x": x}))], model, plan, {})
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    initializers = {t.name: t for t in dense.graph.initializer}
    nodes = {n.name: n for n in dense.graph.node}
    for layer in plan.layers:
        weight, bias = dense_refit(refit, layer)
        assert not weight[~layer.mask()].any()
        initializers[layer.weight].CopyFrom(onnx.numpy_helper.from_array(weight, layer.weight))
        initializers[nodes[layer.node].input[2]].CopyFrom(onnx.numpy_helper.from_array(bias, nodes[layer.node].input[2]))
    np.testing.assert_allclose(run(dense, {"x": x})[0], run(refit, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_a_sweep_of_conv_targets_measures_the_damage_once(tmp_path, monkeypatch):
    from gkp_onnx.api import sweep
    from gkp_onnx.passes import conv_budget

    calls = []
    original = conv_budget.ConvBudget._options
    monkeypatch.setattr(conv_budget.ConvBudget, "_options", lambda self: calls.append(1) or original(self))
    model = TOPOLOGIES["residual_stream"]()
    np.savez(tmp_path / "calib.npz", x=images(model, 24))
    results = sweep(model, [1.2, 1.5], calib=str(tmp_path / "calib.npz"), min_group_width=1, bench_repeats=3,
                    bench_min_time_s=0.0, validate=False)
    assert len(calls) == 1 and [r.structured_budget["target_speedup"] for _, r in results] == [1.2, 1.5]


def test_a_cnn_with_an_mlp_classifier_budgets_its_convs(tmp_path):
    """Gemm -> Relu -> Gemm is a feed-forward block, but the Convs hold the model's MACs: the
    target goes to them, not to the classifier's neurons."""
    from fixtures import GraphBuilder

    b = GraphBuilder()
    y = b.op("Relu", [b.conv(b.op("Relu", [b.conv("x", 16)]), 32)])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    hidden = b.op("Relu", [b.op("Gemm", [flat, b.weight("fc1.w", [64, 32]), b.weight("fc1.b", [64])], channels=64,
                                transB=1)])
    model = b.build(b.op("Gemm", [hidden, b.weight("fc2.w", [10, 64]), b.weight("fc2.b", [10])], channels=10,
                         transB=1))
    np.savez(tmp_path / "calib.npz", x=images(model, 16))
    _, report = optimize(model, target_speedup=1.2, calib=str(tmp_path / "calib.npz"), min_group_width=1,
                         bench_repeats=3, bench_min_time_s=0.0, validate=False)
    assert report.plan.layer_ratios and not report.neurons


def test_a_latency_guard_revert_keeps_what_the_conv_budget_chose_and_measured(tmp_path, monkeypatch):
    import importlib

    from gkp_onnx.bench import Timing

    speedups = iter([0.8, 1.1])

    def fake_bench(models, names, batches, **_):  # the guard's timings: slower first, then not
        return [Timing("input", "cpu", 1, 1.0, 1.0, 1.0), Timing("optimized", "cpu", 1, 1.0, 1.0, next(speedups))]

    monkeypatch.setattr(importlib.import_module("gkp_onnx.guard"), "bench", fake_bench)
    model = TOPOLOGIES["residual_stream"]()
    np.savez(tmp_path / "calib.npz", x=images(model, 16))
    _, report = optimize(model, target_speedup=1.2, calib=str(tmp_path / "calib.npz"), min_group_width=1,
                         bench_batches=[1], bench_repeats=3, bench_min_time_s=0.0, validate=False)
    assert any(s.reason.startswith("reverted to dense") for s in report.plan.skipped)
    assert report.structured_budget and report.structured_budget["target_speedup"] == 1.2
    assert ("--target-speedup 1.2 missed" in " ".join(report.failures)) == (not report.structured_budget["met"])


def test_with_biases_gives_bias_free_convs_a_zero_bias_and_leaves_the_rest():
    from gkp_onnx.passes.conv_budget import with_biases

    model = TOPOLOGIES["no_bias"]()
    nodes = [n.name for n in model.graph.node if n.op_type == "Conv"]
    biased = with_biases(model, nodes[:1])
    assert [len(n.input) for n in biased.graph.node] == [3, 2] and [len(n.input) for n in model.graph.node] == [2, 2]
    feed = random_feed(model)
    np.testing.assert_array_equal(run(biased, feed)[0], run(model, feed)[0])
    chain = TOPOLOGIES["chain"]()  # its Convs have biases: nothing to add, no copy
    assert with_biases(chain, ["conv1"]) is chain and with_biases(biased, nodes[:1]) is biased
