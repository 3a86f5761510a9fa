import numpy as np
import onnx
import pytest

from fixtures import TOPOLOGIES

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import input_specs
from gkp_onnx.options import Thresholds
from gkp_onnx.validate import Dataset, fidelity, load_dataset, random_dataset


def test_fidelity_metrics():
    data = Dataset({"x": np.zeros((4, 1))}, labels=np.array([0, 1, 1, 0]))
    ref = np.array([[2.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    new = ref.copy()
    new[3] = [0.0, 1.0]  # the last sample flips
    result = fidelity([ref], [new], ["logits"], data)
    out = result.outputs[0]
    assert out.max_abs_diff == 1.0 and out.mean_abs_diff == pytest.approx(2 / 8)
    assert out.top1_agreement == 0.75
    assert out.cosine == pytest.approx((ref.ravel() @ new.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(new)))
    assert result.accuracy_reference == 1.0 and result.accuracy_candidate == 0.75
    assert Thresholds(max_abs_diff=0.5, min_top1_agreement=0.8).failures(result) == [
        "max abs diff 1 > 0.5", "top-1 agreement 0.7500 < 0.8"]
    assert Thresholds(max_abs_diff=1.0, min_cosine=0.5).failures(result) == []


def test_random_dataset_is_seeded_and_shaped():
    specs = input_specs(TOPOLOGIES["chain"]())
    a, b = random_dataset(specs, seed=3, batch=5), random_dataset(specs, seed=3, batch=5)
    assert a.inputs["x"].shape == (5, 8, 10, 10) and np.array_equal(a.inputs["x"], b.inputs["x"])


def test_load_dataset_accepts_x_and_labels(tmp_path):
    specs = input_specs(TOPOLOGIES["chain"]())
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 8, 10, 10), np.float64), y=np.arange(6))
    data = load_dataset(tmp_path / "d.npz", specs)
    assert data.inputs["x"].dtype == np.float32 and len(data) == 6 and list(data.labels) == list(range(6))


def test_load_dataset_label_count_mismatch(tmp_path):
    specs = input_specs(TOPOLOGIES["chain"]())
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 8, 10, 10), np.float32), y=np.arange(5))
    with pytest.raises(GkpError, match="5 labels for 6 samples"):
        load_dataset(tmp_path / "d.npz", specs)


def test_dynamic_dims_take_documented_defaults_or_the_given_shape():
    from gkp_onnx.graph.shapes import DEFAULT_SEQUENCE, DEFAULT_SPATIAL

    model = TOPOLOGIES["chain"]()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param = "height"
    dims[3].Clear()
    dims[3].dim_value = -1  # some exporters write -1 for a dynamic dim
    spec = input_specs(model)[0]
    assert spec.shape == [1, 8, DEFAULT_SPATIAL, DEFAULT_SPATIAL] and spec.assumed
    assert input_specs(model, {"x": [2, 8, 12, 10]})[0].shape == [2, 8, 12, 10]
    with pytest.raises(GkpError, match="does not match"):
        input_specs(model, {"x": [2, 3, 12, 10]})
    dims[1].Clear()
    dims[1].dim_param = "channels"  # the channel count cannot be assumed: a usable example is given
    with pytest.raises(GkpError, match=r"--input-shape x:1,3,224,224"):
        input_specs(model)
    tokens = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "sequence"])
    model.graph.input[0].CopyFrom(tokens)
    assert input_specs(model)[0].shape == [1, DEFAULT_SEQUENCE]


def test_random_token_ids_stay_inside_the_table_they_index():
    """A token-type table has 2 rows: random validation ids must be 0 or 1 (else onnxruntime fails)."""
    from onnx import TensorProto, helper, numpy_helper

    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    table = numpy_helper.from_array(np.ones((2, 4), np.float32), "table")
    nodes = [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["table", "ids32"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [ids], [out], [table]))
    spec = input_specs(model)[0]
    assert spec.upper == 2
    assert random_dataset([spec], seed=0, batch=64).inputs["ids"].max() == 1
