"""partition_streams: reorderable channel spaces, exact reordering, the shared partition, and the
shared form end to end (no Gather on a stream, exact against the masked dense model)."""

import itertools

import numpy as np
import onnx
import pytest

from conftest import masked_reference, random_feed, run
from fixtures import TOPOLOGIES, concat, graph_output_inside, residual, residual_stream

from gkp_onnx import optimize
from gkp_onnx.errors import GkpError
from gkp_onnx.graph import components, permuted, reorder
from gkp_onnx.passes.partition_streams import PartitionStreams, PermuteStreams, shared_partition
from gkp_onnx.scoring import balanced_assign, block_sums
from gkp_onnx.plan import LayerPlan, Plan


def gathered(model):
    """The tensors that Gathers read."""
    return [n.input[0] for n in model.graph.node if n.op_type == "Gather"]


def kept_energy(energies, labels, blocks):
    """The partition objective: each Conv's filters in their best balanced blocks."""
    total = 0.0
    for e in energies:
        sums = block_sums(e, labels, blocks)
        total += np.take_along_axis(sums, balanced_assign(sums)[:, None], 1).sum()
    return total


def test_streams_and_fan_outs_are_found_with_what_reordering_touches():
    found = {c.key: c for c in components(residual_stream())}
    first = found["conv1"]  # stem -> two identity blocks: read by both first Convs and stage 2's two
    assert first.channels == 16
    assert [n.name for n in first.producers] == ["conv1", "conv8", "conv16"]
    assert [n.name for n in first.consumers] == ["conv4", "conv12", "conv20", "conv26"]
    second = found["conv24"]  # started by the block's last Conv and the projection; squeeze-excite; head
    assert [n.name for n in second.producers] == ["conv24", "conv26", "conv34", "conv41"]
    assert [n.name for n in second.consumers] == ["conv30", "conv39"]
    assert [n.op_type for n in second.heads] == ["Gemm"]
    assert {n.op_type for n in second.inner} == {"BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Sigmoid", "Mul"}


@pytest.mark.parametrize("fixture", [residual, concat, graph_output_inside])
def test_spaces_reaching_an_output_or_a_concat_are_not_reorderable(fixture):
    model = fixture()
    outputs = {o.name for o in model.graph.output}
    concats = {name for n in model.graph.node if n.op_type == "Concat" for name in n.input}
    for component in components(model):
        assert not component.tensors & (outputs | concats)


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_reordering_any_space_is_exact(topology):
    model = TOPOLOGIES[topology]()
    feed = random_feed(model)
    expected = run(model, feed)
    rng = np.random.default_rng(0)
    permutations = {c.key: rng.permutation(c.channels).tolist() for c in components(model)}
    reordered = permuted(model, permutations)
    onnx.checker.check_model(reordered, full_check=True)
    tolerance = 2e-2 if topology == "fp16" else 1e-5
    for want, got in zip(expected, run(reordered, feed)):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    if permutations:  # and the weights really moved
        assert any(not np.array_equal(a.raw_data, b.raw_data)
                   for a, b in zip(model.graph.initializer, reordered.graph.initializer))


def test_reorder_leaves_its_input_alone_through_permuted():
    model = residual_stream()
    before = model.SerializeToString()
    component = components(model)[0]
    permuted(model, {component.key: list(reversed(range(component.channels)))})
    assert model.SerializeToString() == before
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    reorder(copy, component, np.arange(component.channels)[::-1])
    assert copy.SerializeToString() != before


@pytest.mark.parametrize("blocks", [2, 3])
def test_balanced_assign_is_the_best_balanced_labelling(blocks):
    rng = np.random.default_rng(blocks)
    for _ in range(5):
        score = rng.random((6, blocks))
        labels = balanced_assign(score)
        assert (np.bincount(labels, minlength=blocks) == 6 // blocks).all()
        best = max(score[np.arange(6), list(p)].sum()
                   for p in set(itertools.permutations(np.repeat(np.arange(blocks), 6 // blocks))))
        assert score[np.arange(6), labels].sum() == pytest.approx(best)


def test_shared_partition_beats_random_partitions():
    rng = np.random.default_rng(0)
    channels, blocks = 32, 2
    # two Convs whose filters each prefer one half of a hidden channel split
    hidden = rng.permutation(channels)
    energies = []
    for filters in (16, 24):
        e = rng.random((filters, channels)) * 0.1
        for f in range(filters):
            e[f, hidden[(f % 2) * 16:(f % 2) * 16 + 16]] += 1.0
        energies.append(e / e.sum())
    labels = shared_partition(energies, blocks)
    assert (np.bincount(labels) == channels // blocks).all()
    found = kept_energy(energies, labels, blocks)
    planted = np.zeros(channels, dtype=int)
    planted[hidden[16:]] = 1
    assert found == pytest.approx(kept_energy(energies, planted, blocks))
    for _ in range(20):
        assert found >= kept_energy(energies, rng.permutation(labels), blocks)


@pytest.fixture
def shared():
    model = residual_stream(128)
    optimized, report = optimize(model, ratio=0.5)
    return model, optimized, report


def test_shared_form_leaves_no_gather_on_the_streams(shared):
    model, optimized, report = shared
    onnx.checker.check_model(optimized, full_check=True)
    assert set(report.plan.permutations) == {"conv1", "conv24"}
    readers = {layer.node for layer in report.plan.layers if layer.shared}
    assert readers == {"conv4", "conv12", "conv20", "conv26", "conv30", "conv39"}
    assert all(layer.group_count == 2 for layer in report.plan.layers if layer.shared)
    assert gathered(optimized) == ["x"]  # the first Conv's, on the graph input
    unshared, _ = optimize(model, ratio=0.5, share_streams=False)
    assert len(gathered(unshared)) > 1


def test_shared_form_equals_the_masked_dense_model(shared):
    model, optimized, report = shared
    feed = random_feed(model)
    np.testing.assert_allclose(run(optimized, feed)[0], run(masked_reference(model, report.plan), feed)[0],
                               rtol=1e-5, atol=1e-5)
    for layer in report.plan.layers:
        if layer.shared:  # disjoint blocks covering every input channel
            assert sorted(c for kept in layer.kept_channels for c in kept) == list(range(layer.in_channels))


def test_filters_a_later_layer_reads_are_spread_over_the_groups(shared):
    _, _, report = shared
    layers = {layer.node: layer for layer in report.plan.layers}
    conv4, conv6 = layers["conv4"], layers["conv6"]  # conv6's Gather folds into conv4
    read = {c for kept in conv6.kept_channels for c in kept}
    assert [len(read & set(group)) for group in conv4.groups] == [len(read) // 2] * 2
    projection = layers["conv26"]  # its filters follow the blocks of the stream it starts
    assert projection.shared_output and projection.groups == [list(range(128)), list(range(128, 256))]


def test_a_saved_plan_replays_the_reordering(shared, tmp_path):
    model, optimized, report = shared
    report.plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").permutations == report.plan.permutations
    replayed, _ = optimize(model, plan=str(tmp_path / "plan.json"))
    feed = random_feed(model)
    np.testing.assert_array_equal(run(replayed, feed)[0], run(optimized, feed)[0])


def test_a_plan_reordering_what_the_model_lacks_is_a_one_line_error(shared, tmp_path):
    _, _, report = shared
    report.plan.save(tmp_path / "plan.json")
    with pytest.raises(GkpError, match="the plan reorders the channels of 'conv1', which this model cannot"):
        optimize(residual_stream(64), plan=str(tmp_path / "plan.json"))


def test_reconstruction_targets_the_reordered_reference(tmp_path):
    model = residual_stream(128)
    feed = random_feed(model, batch=16, seed=1)
    np.savez(tmp_path / "calib.npz", **feed)
    plain, _ = optimize(model, ratio=0.5)
    refit, report = optimize(model, ratio=0.5, calib=str(tmp_path / "calib.npz"), reconstruct=True)
    assert report.plan.permutations and report.reconstruction
    assert all(after <= before for before, after in report.reconstruction.values())
    test = random_feed(model, batch=16, seed=2)
    reference = run(model, test)[0]
    assert np.abs(run(refit, test)[0] - reference).mean() < np.abs(run(plain, test)[0] - reference).mean()


def test_forced_group_count_does_not_share():
    _, report = optimize(residual_stream(128), ratio=0.5, groups=2)
    assert not report.plan.permutations and not any(layer.shared for layer in report.plan.layers)


def with_outputs(model, *tensors):
    """A copy of `model` that also outputs `tensors`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    return probe


def test_permute_streams_computes_the_same_function_with_the_streams_reordered():
    model = residual_stream()  # two internal streams: conv1's (16 channels) and conv24's (32)
    before = model.SerializeToString()
    rng = np.random.default_rng(0)
    orders = {"conv1": rng.permutation(16).tolist(), "conv24": rng.permutation(32).tolist()}
    result = PermuteStreams()(model, Plan(ratio=0.5, method="l2", seed=0, permutations=orders))
    assert result.modified and model.SerializeToString() == before  # in_place = False
    onnx.checker.check_model(result.model, full_check=True)
    feed = random_feed(model)
    outputs = len(model.graph.output)
    expected = run(with_outputs(model, "conv1", "conv24"), feed)
    got = run(with_outputs(result.model, "conv1", "conv24"), feed)
    for want, have in zip(expected[:outputs], got[:outputs]):  # the graph outputs: unchanged
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
    for order, want, have in zip(orders.values(), expected[outputs:], got[outputs:]):
        np.testing.assert_allclose(have, want[:, order], rtol=1e-5, atol=1e-5)  # channel k = old order[k]


def test_partition_streams_fills_the_plan_with_permutations_of_the_stream():
    model = residual_stream()
    before = model.SerializeToString()
    readers = {"conv4": 8, "conv12": 8, "conv20": 16, "conv26": 32}  # the 1x1 Convs reading conv1's stream
    layers = [LayerPlan(node=name, weight=f"{name}.weight", out_channels=out, in_channels=16, kernel_shape=[1, 1],
                        macs=0, kept_per_group=8) for name, out in readers.items()]  # ratio 0.5: G = 2
    plan = Plan(ratio=0.5, method="l2", seed=0, layers=layers)
    result = PartitionStreams(seed=0)(model, plan)
    assert result.modified and model.SerializeToString() == before  # in_place = False
    assert set(result.plan.permutations) == {"conv1"}  # conv24's stream has no planned reader
    order = result.plan.permutations["conv1"]
    assert sorted(order) == list(range(16)) and order != list(range(16))
    assert [layer.shared_group_count for layer in result.plan.layers] == [2] * 4
    feed = random_feed(model)
    np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)
    replayed = PermuteStreams()(model, result.plan).model  # the plan alone reproduces the reordering
    assert replayed.SerializeToString() == result.model.SerializeToString()
