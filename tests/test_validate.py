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


def _masked_encoder(sequence="sequence") -> onnx.ModelProto:
    """ids, attention_mask [batch, sequence] -> y [batch, sequence, 8]: each token's embedding plus
    the masked mean of the sentence's embeddings (the tokens see each other, never the padding)."""
    from onnx import helper, numpy_helper
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["maskf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
             helper.make_node("Mul", ["emb", "mask3"], ["kept"]),
             helper.make_node("ReduceSum", ["kept", "one"], ["total"], keepdims=1),
             helper.make_node("ReduceSum", ["mask3", "one"], ["count"], keepdims=1),
             helper.make_node("Div", ["total", "count"], ["mean"]),
             helper.make_node("Add", ["emb", "mean"], ["y"])]
    dims = ["batch", sequence]
    graph = helper.make_graph(
        nodes, "masked", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, dims),
                          helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, dims + [8])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([-1], np.int64), "last"),
         numpy_helper.from_array(np.array([1], np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _padded_tokens(samples=150, length=40, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, samples)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    return Dataset({"ids": rng.integers(1, 50, (samples, length)) * mask, "attention_mask": mask})


def test_runs_cut_the_padding_and_give_every_token_its_value_in_order(monkeypatch):
    import gkp_onnx.validate as validate

    data = _padded_tokens()
    session = validate.make_session(_masked_encoder())
    full = session.run(None, data.inputs)[0]
    lengths = []
    run = validate.run_session
    monkeypatch.setattr(validate, "run_session",
                        lambda s, feed: lengths.append(feed["ids"].shape[1]) or run(s, feed))
    cut = validate.run_model(session, data)[0]
    tokens = data.inputs["attention_mask"] != 0
    np.testing.assert_allclose(cut[tokens], full[tokens], rtol=1e-6, atol=1e-6)
    # shortest sentences first, CUT_BATCH at a time, each run cut after its longest
    assert len(lengths) == -(-150 // validate.CUT_BATCH) and lengths == sorted(lengths) and lengths[-1] == 40
    assert lengths[0] < 10
    assert fidelity([full], [cut], ["y"], data).min_cosine == pytest.approx(1.0)  # padding is not measured


def test_feeds_are_cut_only_along_a_dynamic_sequence_axis():
    import gkp_onnx.validate as validate

    data = _padded_tokens()
    fixed = validate.make_session(_masked_encoder(sequence=40))
    assert validate.sequence_axis(fixed) is None
    assert {feed["ids"].shape[1] for feed in validate.batches(fixed, data)} == {40}
    dynamic = validate.make_session(_masked_encoder())
    assert min(feed["ids"].shape[1] for feed in validate.batches(dynamic, data)) < 40
    assert {feed["ids"].shape[1] for feed in validate.batches(dynamic, data, cut=False)} == {40}


def test_fidelity_of_a_token_output_leaves_the_padding_out():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    ref = np.random.default_rng(1).standard_normal((2, 3, 4))
    new = ref.copy()
    new[mask == 0] = 100.0  # whatever a model computes at padding positions
    result = fidelity([ref], [new], ["hidden"], Dataset({"attention_mask": mask}))
    assert result.max_abs_diff == 0.0 and result.min_cosine == pytest.approx(1.0) and result.top1_agreement == 1.0


def test_a_random_padding_mask_marks_every_position_a_token():
    specs = input_specs(_masked_encoder(), {"ids": [1, 12], "attention_mask": [1, 12]})
    data = random_dataset(specs, seed=0, batch=4)
    assert data.inputs["attention_mask"].shape == (4, 12) and (data.inputs["attention_mask"] == 1).all()
    assert data.inputs["ids"].max() < 50  # the embedding table's rows


def test_samples_without_a_token_sort_first_and_cut_nothing_else():
    from gkp_onnx.validate import _last_token

    mask = np.array([[0, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert _last_token(mask).tolist() == [-1, 1, 0, 3]


def test_an_embedding_output_is_compared_pooled_and_a_classifier_by_top1():
    from onnx import helper, numpy_helper

    from gkp_onnx.validate import compare, describe_measures, output_kinds

    model = _masked_encoder()
    assert output_kinds(model) == {"y": "pooled"}
    data = _padded_tokens(samples=40)
    same = compare(model, model, data).outputs[0]
    assert same.top1_agreement is None  # an argmax over an embedding means nothing
    assert same.pooled_cosine == pytest.approx(1.0) and same.pooled_worst == pytest.approx(1.0)
    assert same.neighbour_agreement == 1.0
    noisy = onnx.ModelProto.FromString(model.SerializeToString())
    table = numpy_helper.to_array(noisy.graph.initializer[0])
    noise = np.random.default_rng(1).standard_normal(table.shape).astype(np.float32)
    noisy.graph.initializer[0].CopyFrom(numpy_helper.from_array(table + noise, "table"))
    far = compare(model, noisy, data).outputs[0]
    assert far.pooled_cosine < 0.99 and far.pooled_worst <= far.pooled_cosine and 0 <= far.neighbour_agreement < 1
    assert "pooled embedding" in describe_measures(model)[0]
    # a classifier head over the tokens (MatMul + bias) keeps its top-1 agreement
    head = onnx.ModelProto.FromString(model.SerializeToString())
    head.graph.initializer.extend([numpy_helper.from_array(np.ones((8, 5), np.float32), "w"),
                                   numpy_helper.from_array(np.zeros(5, np.float32), "b")])
    head.graph.node.extend([helper.make_node("MatMul", ["y", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"])])
    head.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "sequence", 5]))
    assert output_kinds(head) == {"logits": "values"}
    assert compare(head, head, data).outputs[0].top1_agreement == 1.0
    assert "top-1" in describe_measures(head)[0]


def test_a_sample_without_a_token_is_refused(tmp_path):
    from gkp_onnx.graph import input_specs
    from gkp_onnx.validate import load_dataset

    data = _padded_tokens(samples=8)
    mask = data.inputs["attention_mask"].copy()
    mask[3] = 0
    np.savez(tmp_path / "calib.npz", ids=data.inputs["ids"], attention_mask=mask)
    with pytest.raises(GkpError, match="attention_mask of sample 3 has no token"):
        load_dataset(tmp_path / "calib.npz", input_specs(_masked_encoder(), {"ids": [1, 40], "attention_mask": [1, 40]}))


def test_a_plan_cannot_replay_heads_or_neurons():
    from gkp_onnx.options import OptimizeOptions

    for extra in (dict(ffn_ratio=0.5), dict(head_ratio=0.5), dict(target_speedup=1.5, calib="c.npz")):
        with pytest.raises(GkpError, match="--plan replays"):
            OptimizeOptions(plan="plan.json", **extra).checked()
