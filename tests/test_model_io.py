import numpy as np
import onnx
import pytest

from conftest import random_feed, run
from fixtures import TOPOLOGIES

from gkp_onnx import model_io, optimize
from gkp_onnx.errors import GkpError


def test_large_models_are_saved_with_external_data_and_load_back(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)  # pretend the fixture is huge
    model = TOPOLOGIES["chain"]()
    path = model_io.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    loaded = model_io.load_model(path)
    feed = random_feed(model)
    np.testing.assert_array_equal(run(loaded, feed)[0], run(model, feed)[0])
    # and the optimizer accepts a model with external data, validating through a file
    optimized, report = optimize(path, ratio=0.5, groups=2, min_group_width=1)
    assert report.fidelity is not None and report.plan.layers


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    model_io.save_model(TOPOLOGIES["chain"](), target)
    assert onnx.load(target).graph.node
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_load_rejects_models_that_fail_the_checker(tmp_path):
    model = TOPOLOGIES["chain"]()
    model.graph.node[0].input[1] = "undefined_weight"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    with pytest.raises(GkpError, match="invalid ONNX model"):
        model_io.load_model(path)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(GkpError, match="not a file"):
        model_io.load_model(tmp_path)
