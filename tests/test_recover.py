"""Distillation fine-tuning: trains, keeps what was pruned pruned, keeps the graph, resumes exactly."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import random_feed
from fixtures import TOPOLOGIES

from gkp_onnx import optimize
from gkp_onnx.cli import main
from gkp_onnx.errors import GkpError
from gkp_onnx.nm import satisfies_nm
from gkp_onnx.recover import recover
from gkp_onnx.validate import Dataset, compare


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def structure(model: onnx.ModelProto):
    return ([n.SerializeToString() for n in model.graph.node],
            [(t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer],
            [v.SerializeToString() for v in (*model.graph.input, *model.graph.output)])


@pytest.fixture(scope="module")
def teacher() -> onnx.ModelProto:
    return TOPOLOGIES["bn_chain"]()


@pytest.fixture(scope="module")
def pruned(teacher) -> onnx.ModelProto:
    """Grouped kernels with Gathers, and 2:4 zeros in the Conv weights on top."""
    model, _ = optimize(teacher, ratio=0.5, groups=2, min_group_width=1, validate=False)
    model, _ = optimize(model, gkp=False, nm="2:4", nm_conv=True, nm_include_head=True, validate=False)
    return model


@pytest.fixture(scope="module")
def data(teacher) -> Dataset:
    return Dataset(random_feed(teacher, batch=16, seed=1), labels=np.arange(16) % 10)


def test_one_step_trains_keeps_zeros_and_the_graph(pruned, teacher, data):
    out, report = recover(pruned, teacher, data, epochs=1, batch=16, lr=1e-3, progress=False)
    assert report.steps == 1 and report.finished
    assert structure(out) == structure(pruned)
    before, after = weights(pruned), weights(out)
    changed = [name for name in before if not np.array_equal(before[name], after[name])]
    assert changed, "one step must move the weights"
    zero_weights = [n for n in before if before[n].ndim >= 2 and (before[n] == 0).any()]
    assert zero_weights, "the fixture must carry N:M zeros"
    for name in zero_weights:
        assert (after[name][before[name] == 0] == 0).all(), f"{name}: a pruned weight came back"
        assert satisfies_nm(after[name], 1, 2, 4) or not satisfies_nm(before[name], 1, 2, 4)
    gathers = {n.input[1] for n in out.graph.node if n.op_type == "Gather"}
    assert gathers and all(np.array_equal(before[g], after[g]) for g in gathers if g in before)
    onnx.checker.check_model(out, full_check=True)


def test_distillation_moves_the_student_towards_the_teacher(pruned, teacher, data):
    out, report = recover(pruned, teacher, data, epochs=10, batch=8, lr=1e-2, augment=False, progress=False)
    assert report.epoch_losses[-1] < 0.8 * report.epoch_losses[0]
    assert compare(teacher, out, data).outputs[0].mean_abs_diff < compare(teacher, pruned, data).outputs[0].mean_abs_diff


def test_labels_add_cross_entropy_on_a_classifier():
    teacher = TOPOLOGIES["classifier"]()
    pruned, _ = optimize(teacher, ratio=0.5, groups=2, min_group_width=1, validate=False)
    data = Dataset(random_feed(teacher, batch=32, seed=2), labels=np.arange(32) % 10)
    distilled, _ = recover(pruned, teacher, data, epochs=20, batch=16, lr=1e-2, progress=False)
    supervised, _ = recover(pruned, teacher, data, epochs=20, batch=16, lr=1e-2, labels=True, progress=False)
    accuracy = [compare(teacher, model, data).accuracy_candidate for model in (pruned, distilled, supervised)]
    assert accuracy[2] > max(accuracy[:2]), accuracy


def test_runs_are_deterministic_and_a_resumed_run_equals_an_uninterrupted_one(pruned, teacher, data, tmp_path):
    options = dict(epochs=2, batch=4, lr=1e-3, progress=False)
    whole, report = recover(pruned, teacher, data, **options)
    assert report.steps == 8
    again, _ = recover(pruned, teacher, data, **options)
    assert weights(again).keys() == weights(whole).keys()
    assert all(np.array_equal(weights(again)[k], v) for k, v in weights(whole).items())

    partial, stopped = recover(pruned, teacher, data, checkpoint=str(tmp_path), max_steps=3, **options)
    assert not stopped.finished and stopped.steps == 3
    resumed, finished = recover(pruned, teacher, data, checkpoint=str(tmp_path), checkpoint_every=2, **options)
    assert finished.finished and finished.resumed_from_step == 3
    assert all(np.array_equal(weights(resumed)[k], v) for k, v in weights(whole).items())
    assert finished.epoch_losses == pytest.approx(report.epoch_losses)


def test_a_checkpoint_of_another_run_is_refused(pruned, teacher, data, tmp_path):
    recover(pruned, teacher, data, epochs=1, batch=8, checkpoint=str(tmp_path), progress=False)
    with pytest.raises(GkpError, match="belongs to another run"):
        recover(pruned, teacher, data, epochs=1, batch=8, lr=1e-3, checkpoint=str(tmp_path), progress=False)


def test_bad_requests_are_one_line_errors(pruned, teacher, data):
    with pytest.raises(GkpError, match="--labels needs labels"):
        recover(pruned, teacher, Dataset(data.inputs), labels=True, progress=False)
    with pytest.raises(GkpError, match="not one row of logits per label"):
        recover(pruned, teacher, data, labels=True, progress=False)
    with pytest.raises(GkpError, match="inputs"):
        recover(pruned, TOPOLOGIES["padding_variants"](), data, progress=False)
    with pytest.raises(GkpError, match="--epochs"):
        recover(pruned, teacher, data, epochs=0)
    with pytest.raises(GkpError, match="--device"):
        recover(pruned, teacher, data, device="tpu")


def test_cli_recover_end_to_end(pruned, teacher, data, tmp_path, capsys):
    paths = {}
    for name, model in (("pruned", pruned), ("teacher", teacher)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(model, paths[name])
    npz = tmp_path / "data.npz"
    np.savez(npz, x=data.inputs["x"], y=data.labels)
    out = tmp_path / "recovered.onnx"
    pruned_bytes = paths["pruned"].read_bytes()
    code = main(["recover", str(paths["pruned"]), str(out), "--teacher", str(paths["teacher"]), "--data", str(npz),
                 "--eval", str(npz), "--epochs", "2", "--batch", "8", "--checkpoint",
                 str(tmp_path / "ck")])
    printed = capsys.readouterr().out
    assert code == 0 and "before recovery" in printed and "after recovery" in printed and "finished" in printed
    assert structure(onnx.load(out)) == structure(pruned)
    assert paths["pruned"].read_bytes() == pruned_bytes
    assert (tmp_path / "ck" / "recover.pt").exists()
    code = main(["recover", str(paths["pruned"]), str(out), "--teacher", str(paths["teacher"]),
                 "--data", str(tmp_path / "missing.npz")])
    assert code == 2 and "cannot read data file" in capsys.readouterr().err
