"""prune_heads: attention heads removed; the pruned model equals the dense one with those heads' output rows zeroed."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import cli_error, run
from gkp_onnx import optimize
from gkp_onnx.cli import main
from gkp_onnx.passes.prune_heads import PruneHeads, attention_blocks
from gkp_onnx.structured import kept_units
from gkp_onnx.plan import Plan
from gkp_onnx.validate import Dataset

D, S, WIDTH = 32, 6, 8
PLAN = Plan(ratio=0, method="x", seed=0)
LLAMA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyllama-aidreams260K" / "aidreams260K_derived.onnx"


def attention(heads: int = 4, kv_heads: int = 4, explicit: bool = True, fused: bool = False,
              misread: bool = False, gemm: bool = False, bias_2d: bool = False, batch="N") -> onnx.ModelProto:
    """x [N, S, D] -> multi-head attention -> y [N, S, D], as exporters write it: projections (+ bias),
    Reshape to [N, S, heads, WIDTH] (`explicit`: the head count spelled in the shape constants, else -1),
    Transpose, scores / sqrt(WIDTH), Softmax, P V, Transpose, Reshape, output projection (+ bias).
    kv_heads < heads: grouped-query attention (K/V repeated with Unsqueeze + Tile). `fused`: one QKV
    projection split in three. `misread`: the merged heads go through a Reshape whose head count
    no rule rewrites (the pass must find this and keep the block). `gemm`: the projections are Gemm
    (transB) on [N * S, D] rows, as older exporters write them; `bias_2d`: biases of shape [1, W]."""
    rng = np.random.default_rng(0)
    inits = []

    def const(name, value, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def weight(name, shape):
        return const(name, rng.standard_normal(shape) / np.sqrt(shape[0]))

    nodes = []

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    rep = heads // kv_heads
    if fused:
        qkv = node("MatMul", ["x", weight("w_qkv", (D, (heads + 2 * kv_heads) * WIDTH))], "qkv")
        sizes = const("sizes", [heads * WIDTH, kv_heads * WIDTH, kv_heads * WIDTH], np.int64)
        nodes.append(helper.make_node("Split", [qkv, sizes], ["q", "k", "v"], name="split", axis=-1))
        q, k, v = "q", "k", "v"
    elif gemm:
        rows = node("Reshape", ["x", const("rows_shape", [-1, D], np.int64)], "rows")
        q, k, v = (node("Gemm", [rows, const(f"w_{p}", rng.standard_normal((n * WIDTH, D)) / np.sqrt(D)),
                                 const(f"b_{p}", rng.standard_normal(n * WIDTH))], p, transB=1)
                   for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)))
    else:
        q, k, v = (node("Add", [node("MatMul", ["x", weight(f"w_{p}", (D, n * WIDTH))], p),
                                const(f"b_{p}", rng.standard_normal([1, n * WIDTH] if bias_2d else n * WIDTH))],
                        f"{p}_bias")
                   for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)))

    def split_heads(t, count, name):
        shape = const(f"{name}_shape", [-1, S, count, WIDTH] if gemm else [0, 0, count if explicit else -1, WIDTH],
                      np.int64)
        t = node("Reshape", [t, shape], f"{name}_heads")
        if count < heads:  # repeat each key/value head for its query heads
            t = node("Tile", [node("Unsqueeze", [t, const(f"{name}_axis", [3], np.int64)], f"{name}_unsq"),
                              const(f"{name}_reps", [1, 1, 1, rep, 1], np.int64)], f"{name}_tile")
            t = node("Reshape", [t, const(f"{name}_flat", [0, 0, -1, WIDTH], np.int64)], f"{name}_repeated")
        return t

    qt = node("Transpose", [split_heads(q, heads, "q")], "qt", perm=[0, 2, 1, 3])
    kt = node("Transpose", [split_heads(k, kv_heads, "k")], "kt", perm=[0, 2, 3, 1])
    vt = node("Transpose", [split_heads(v, kv_heads, "v")], "vt", perm=[0, 2, 1, 3])
    scores = node("Div", [node("MatMul", [qt, kt], "qk"), const("scale", np.sqrt(WIDTH))], "scaled")
    context = node("MatMul", [node("Softmax", [scores], "softmax", axis=-1), vt], "pv")
    if misread:  # [N, H, S, W] -> [N, H, S * W] -> back: the H here is not followed by one head's width
        flat = node("Reshape", [context, const("flat_shape", [0, heads, -1], np.int64)], "flat")
        context = node("Reshape", [flat, const("unflat_shape", [0, heads, S, WIDTH], np.int64)], "unflat")
    merged = node("Transpose", [context], "merge_t", perm=[0, 2, 1, 3])
    if gemm:
        merged = node("Reshape", [merged, const("merge_shape", [-1, heads * WIDTH], np.int64)], "merged")
        out = node("Gemm", [merged, const("w_o", rng.standard_normal((D, heads * WIDTH)) / np.sqrt(heads * WIDTH)),
                            const("b_o", np.zeros(D))], "o", transB=1)
        node("Reshape", [out, const("out_shape", [-1, S, D], np.int64)], "y")
    else:
        merged = node("Reshape", [merged, const("merge_shape", [0, 0, heads * WIDTH if explicit else -1], np.int64)],
                      "merged")
        node("Add", [node("MatMul", [merged, weight("w_o", (heads * WIDTH, D))], "o"), const("b_o", np.zeros(D))], "y")
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, S, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, S, D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def sample(rows: int = 3, seed: int = 1) -> Dataset:
    return Dataset({"x": np.random.default_rng(seed).standard_normal((rows, S, D)).astype(np.float32)})


def weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def masked_like(model: onnx.ModelProto, pruned: onnx.ModelProto, heads: int, gemm: bool = False) -> onnx.ModelProto:
    """The dense model with the output-projection rows of the heads pruning removed set to zero."""
    before, after = weights(model)["w_o"], weights(pruned)["w_o"]
    if gemm:
        before, after = before.T, after.T
    kept = [h for h in range(heads) if any(np.array_equal(before[h * WIDTH:(h + 1) * WIDTH], after[i:i + WIDTH])
                                           for i in range(0, len(after), WIDTH))]
    assert len(kept) * WIDTH == len(after)
    zeroed = before.copy()
    for h in set(range(heads)) - set(kept):
        zeroed[h * WIDTH:(h + 1) * WIDTH] = 0
    masked = onnx.ModelProto.FromString(model.SerializeToString())
    next(t for t in masked.graph.initializer if t.name == "w_o").CopyFrom(
        numpy_helper.from_array(np.ascontiguousarray(zeroed.T if gemm else zeroed), "w_o"))
    return masked


@pytest.mark.parametrize("heads, kv_heads, explicit", [(4, 4, True), (4, 4, False), (4, 2, True), (8, 2, False)])
def test_pruned_heads_equal_the_masked_dense_model(heads, kv_heads, explicit):
    model = attention(heads, kv_heads, explicit)
    result = PruneHeads(0.5, sample())(onnx.ModelProto.FromString(model.SerializeToString()), PLAN)
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    (block,) = result.details["heads"]
    assert block == {"output": "o", "heads": heads, "kept": heads // 2, "kv_heads": kv_heads, "kept_kv": kv_heads // 2}
    w = weights(pruned)
    assert w["w_q"].shape == (D, heads // 2 * WIDTH) and w["b_q"].shape == (heads // 2 * WIDTH,)
    assert w["w_k"].shape == w["w_v"].shape == (D, kv_heads // 2 * WIDTH) and w["w_o"].shape == (heads // 2 * WIDTH, D)
    shapes = {n.name: w[n.input[1]].tolist() for n in pruned.graph.node if n.op_type == "Reshape"}
    if explicit:  # the head counts and the merged width spelled in the shapes follow the kept heads
        assert shapes["q_heads"] == [0, 0, heads // 2, WIDTH] and shapes["k_heads"] == [0, 0, kv_heads // 2, WIDTH]
        assert shapes["merged"] == [0, 0, heads // 2 * WIDTH]
    x = sample(4, seed=7).inputs
    np.testing.assert_allclose(run(pruned, x)[0], run(masked_like(model, pruned, heads), x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gemm", "bias_2d", "value_info", "fixed_batch"])
def test_exporter_variants_prune_to_the_masked_dense_model(variant):
    model = attention(gemm=variant == "gemm", bias_2d=variant == "bias_2d", batch=3 if variant == "fixed_batch" else "N")
    if variant == "value_info":  # shapes recorded with the dense head count (onnxsim, shape-inferred exports)
        model = onnx.shape_inference.infer_shapes(model)
        assert len(model.graph.value_info) > 10
    pruned, report = optimize(model, gkp=False, head_ratio=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    assert [(b["heads"], b["kept"]) for b in report.heads] == [(4, 2)] and not report.heads_skipped
    if variant == "bias_2d":
        assert weights(pruned)["b_q"].shape == (1, 2 * WIDTH)
    x = sample(3, seed=7).inputs
    np.testing.assert_allclose(run(pruned, x)[0], run(masked_like(model, pruned, 4, gemm=variant == "gemm"), x)[0],
                               rtol=1e-5, atol=1e-5)


def test_at_ratio_0_nothing_changes_and_counts_round_up():
    assert [kept_units(12, r) for r in (0.0, 0.25, 0.5, 0.7, 0.99)] == [12, 9, 6, 4, 1]
    result = PruneHeads(0.0, sample())(attention(), PLAN)
    assert not result.modified and result.details["heads"] == []


def test_a_layout_the_walk_misreads_is_found_by_running_it_and_left_whole():
    model = attention(misread=True)
    result = PruneHeads(0.5, sample())(onnx.ModelProto.FromString(model.SerializeToString()), PLAN)
    assert result.details["heads"] == []
    (node, reason), = result.details["heads_skipped"]
    assert node == "o" and "does not equal the masked dense" in reason
    assert weights(result.model)["w_o"].shape == (4 * WIDTH, D)
    np.testing.assert_array_equal(run(result.model, sample().inputs)[0], run(model, sample().inputs)[0])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_fused_qkv_projection_loses_its_heads_part_by_part(kv_heads):
    model = attention(4, kv_heads, fused=True)
    (block,), skipped = attention_blocks(model, sample())
    assert block.split == "split" and block.sizes == [4 * WIDTH, kv_heads * WIDTH, kv_heads * WIDTH] and not skipped
    result = PruneHeads(0.5, sample())(onnx.ModelProto.FromString(model.SerializeToString()), PLAN)
    assert [(b["heads"], b["kept"]) for b in result.details["heads"]] == [(4, 2)]
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert weights(pruned)["w_qkv"].shape == (D, (2 + kv_heads) * WIDTH)
    assert weights(pruned)[next(n for n in pruned.graph.node if n.name == "split").input[1]].tolist() == \
        [2 * WIDTH, kv_heads // 2 * WIDTH, kv_heads // 2 * WIDTH]
    x = sample(4, seed=7).inputs
    np.testing.assert_allclose(run(pruned, x)[0], run(masked_like(model, pruned, 4), x)[0], rtol=1e-5, atol=1e-5)


def test_a_projection_shared_without_a_split_is_left_whole_with_its_reason():
    model = attention(fused=True)
    split = next(n for n in model.graph.node if n.name == "split")  # K taken from Q's part: not three parts
    for node in model.graph.node:
        node.input[:] = [split.output[0] if name == split.output[1] else name for name in node.input]
    blocks, skipped = attention_blocks(model, sample())
    assert blocks == [] and skipped == [("o", "Q, K and V share a projection but not through one Split into three")]


def test_calibration_scores_and_refit_bring_the_output_closer(tmp_path):
    model = attention(8, 8, explicit=False)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, S, D)) * np.linspace(0.2, 2, D)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    errors = {}
    for name, options in {"weights": {}, "refit": dict(calib=str(tmp_path / "calib.npz"), reconstruct=True)}.items():
        pruned, report = optimize(model, gkp=False, head_ratio=0.5, **options)
        assert [(b["heads"], b["kept"]) for b in report.heads] == [(8, 4)]
        assert report.after.macs < report.before.macs
        errors[name] = float(np.mean((run(pruned, {"x": x})[0] - run(model, {"x": x})[0]) ** 2))
    assert errors["refit"] < errors["weights"]
    assert "o (structured)" in report.reconstruction


def test_heads_and_neurons_then_n_m_compose(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).standard_normal((16, S, D)).astype(np.float32))
    pruned, report = optimize(attention(), gkp=False, head_ratio=0.5, nm="2:4", calib=str(tmp_path / "calib.npz"),
                              reconstruct=True)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.heads and {"q", "k", "v", "o"} <= {layer.node for layer in report.nm.layers}
    assert all(after <= before * (1 + 1e-6) for before, after in report.reconstruction.values())


def test_command_line_head_ratio(tmp_path, capsys):
    path, out = tmp_path / "attention.onnx", tmp_path / "out.onnx"
    onnx.save(attention(), path)
    before = path.read_bytes()
    assert main(["optimize", str(path), str(out), "--no-gkp", "--head-ratio", "0.25"]) == 0
    assert "attention heads: 1 block keeps 3 of 4" in capsys.readouterr().out
    assert weights(onnx.load(out))["w_o"].shape == (3 * WIDTH, D)
    for bad in ("1", "-0.1", "nan", "x"):
        line = cli_error(capsys, ["optimize", str(path), str(tmp_path / "bad.onnx"), "--no-gkp", "--head-ratio", bad],
                         usage=bad == "x")
        assert "--head-ratio" in line
    assert not (tmp_path / "bad.onnx").exists() and path.read_bytes() == before
    onnx.save(attention(misread=True), path)
    line = cli_error(capsys, ["optimize", str(path), str(tmp_path / "bad.onnx"), "--no-gkp", "--head-ratio", "0.5"])
    assert "nothing to optimize" in line and "attention block" in line


@pytest.mark.skipif(not LLAMA.exists(), reason="needs ../shared/data/tinyllama-aidreams260K")
def test_the_real_tiny_llama_loses_half_its_heads_in_every_layer():
    pruned, report = optimize(str(LLAMA), gkp=False, head_ratio=0.5)
    assert [(b["heads"], b["kept"]) for b in report.heads] == [(4, 2)] * 4 and not report.heads_skipped
    onnx.checker.check_model(pruned, full_check=True)


def test_a_timm_style_vit_export_loses_heads_through_its_qkv_split_and_run_time_widths(tmp_path):
    """models.vit: qkv -> Reshape [b, t, 3, H, d] -> Transpose -> Split on the 3 -> Squeeze, and the
    merged heads reshaped to a width read from the input's Shape at run time."""
    torch = pytest.importorskip("torch")
    from gkp_onnx.models.export import export
    from gkp_onnx.models.vit import ViT

    torch.manual_seed(0)
    model = onnx.load(export(ViT(image=32, patch=8, dim=64, depth=2, heads=4, mlp=128).eval(), (1, 3, 32, 32),
                             tmp_path / "vit.onnx"))
    pruned, report = optimize(model, gkp=False, head_ratio=0.5)
    assert [(b["heads"], b["kept"]) for b in report.heads] == [(4, 2)] * 2 and not report.heads_skipped
    onnx.checker.check_model(pruned, full_check=True)


def test_a_whisper_style_encoder_loses_heads_and_neurons_behind_its_conv1d_front(tmp_path):
    """models.whisper: a Conv1d front (GKP prunes it too), attention with a bias-free key and q / k
    scaled separately, GELU MLP."""
    torch = pytest.importorskip("torch")
    from gkp_onnx.models.export import export
    from gkp_onnx.models.whisper import WhisperEncoder

    torch.manual_seed(0)
    model = onnx.load(export(WhisperEncoder(mels=16, frames=40, dim=64, depth=2, heads=4, mlp=128).eval(),
                             (1, 16, 40), tmp_path / "whisper.onnx"))
    pruned, report = optimize(model, head_ratio=0.5, ffn_ratio=0.5)
    assert [(b["heads"], b["kept"]) for b in report.heads] == [(4, 2)] * 2 and not report.heads_skipped
    assert [(b["neurons"], b["kept"]) for b in report.neurons] == [(128, 64)] * 2
    assert [(layer.kernel_shape, layer.group_count) for layer in report.plan.layers] == [([3], 1)] * 2, report.plan.skipped
    assert report.passed and report.after.macs < report.before.macs
    onnx.checker.check_model(pruned, full_check=True)


def test_inspect_names_each_projection_s_part_in_its_block(tmp_path):
    from gkp_onnx.inspect import inspect_model
    from test_prune_neurons import ffn

    path = tmp_path / "attention.onnx"
    onnx.save(attention(), path)
    text = inspect_model(str(path))
    assert "attention query: 4 heads (--head-ratio)" in text and "attention output: 4 heads" in text
    assert "transformer: 1 attention block(s), 0 feed-forward block(s)" in text
    onnx.save(ffn(), path)
    assert "feed-forward block: neurons (--ffn-ratio)" in inspect_model(str(path))
    onnx.save(attention(misread=False, fused=True), path)
    assert "attention query/key/value: 4 heads" in inspect_model(str(path))


def test_a_decoder_with_a_kv_cache_keeps_its_cache_interface(tmp_path):
    """models.llama_kv: past keys/values in, present out. Removing heads would change the cache's
    shape, so the attention blocks stay whole (with that reason); neurons go, and the pruned model
    still runs a generation step on a cache of the original shape."""
    pytest.importorskip("torch")
    from gkp_onnx.models.llama_kv import export_llama_kv

    model = onnx.load(export_llama_kv(tmp_path / "decoder.onnx"))
    pruned, report = optimize(model, gkp=False, head_ratio=0.5, ffn_ratio=0.5)
    assert report.heads == [] and [node for node, _ in report.heads_skipped] == ["/blocks.0/wo/MatMul",
                                                                                 "/blocks.1/wo/MatMul"]
    assert all("cache" in reason for _, reason in report.heads_skipped)
    assert [b["kept"] for b in report.neurons] == [96, 96]
    rng = np.random.default_rng(0)
    feed = {"input_ids": np.array([[5, 7, 9]], np.int64)}
    feed |= {i.name: rng.standard_normal((1, 2, 4, 16)).astype(np.float32) for i in model.graph.input[1:]}
    before, after = run(model, feed), run(pruned, feed)
    assert [a.shape for a in after] == [b.shape for b in before]  # logits and the presents: [1, 2, 7, 16]


def test_a_fit_is_validated_on_calibration_samples_it_did_not_see(tmp_path):
    x = np.random.default_rng(3).standard_normal((96, S, D)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    _, report = optimize(attention(), gkp=False, head_ratio=0.5, calib=str(tmp_path / "calib.npz"), reconstruct=True)
    assert report.fidelity.samples == 16 and "last 16 samples (not fitted on)" in report.fidelity.data
    np.savez(tmp_path / "small.npz", x=x[:20])
    _, report = optimize(attention(), gkp=False, head_ratio=0.5, calib=str(tmp_path / "small.npz"), reconstruct=True)
    assert report.fidelity.samples == 20 and any("the samples the fit saw" in note for note in report.input_notes)


def test_dynamic_dims_take_their_sizes_from_the_calibration_data(tmp_path):
    model = attention()
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[1].dim_param = "sequence"
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 5, D)).astype(np.float32))
    _, report = optimize(model, gkp=False, head_ratio=0.5, calib=str(tmp_path / "calib.npz"))
    assert not any("dynamic dimensions" in note for note in report.input_notes)
    _, given = optimize(model, gkp=False, head_ratio=0.5, input_shapes={"x": [1, 5, D]})
    assert report.before.macs == given.before.macs  # counted at the data's 5 tokens


def test_head_and_ffn_ratios_on_a_model_without_such_blocks_say_so():
    from fixtures import TOPOLOGIES

    _, report = optimize(TOPOLOGIES["chain"](), head_ratio=0.5, ffn_ratio=0.3)  # GKP prunes the Convs
    assert report.notes == ["--head-ratio 0.5: the model has no attention block whose heads can be removed",
                            "--ffn-ratio 0.3: the model has no feed-forward block whose neurons can be removed"]
    assert "note: --head-ratio 0.5" in report.table()
