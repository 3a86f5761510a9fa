"""Models larger than memory: N:M weight by weight from external data to external data."""

import hashlib
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import cli_error
from gkp_onnx.cli import main
from gkp_onnx.models.llama_external import LlamaShape, write_llama
from gkp_onnx.nm import nm_candidates, satisfies_nm
from gkp_onnx import streaming
from gkp_onnx.options import OptimizeOptions

SHAPE = LlamaShape(layers=3, hidden=256, ffn=704, heads=8, kv_heads=2, vocab=2048)


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return write_llama(folder / "llama.onnx", SHAPE, "float16")


def test_streamed_output_matches_the_in_memory_pass_and_leaves_the_input(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BYTES", 1)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may be written where the command runs
    before = digest(llama.parent)
    streamed, loaded = tmp_path / "streamed.onnx", tmp_path / "loaded.onnx"
    assert main(["optimize", str(llama), str(streamed), "--nm", "2:4"]) == 0
    monkeypatch.setattr(streaming, "STREAM_BYTES", 1 << 62)
    assert main(["optimize", str(llama), str(loaded), "--nm", "2:4", "--no-nm-permute"]) == 0
    assert digest(llama.parent) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "loaded.onnx", "streamed.onnx", "streamed.onnx.data"]
    assert not any((tmp_path / "cwd").iterdir())
    got, expected, given = weights(streamed), weights(loaded), weights(llama)
    assert got.keys() == expected.keys()
    for name, values in got.items():
        assert values.dtype == np.float16  # fp16 weights stay fp16
        np.testing.assert_array_equal(values, expected[name])
    sparse = [name for name in got if name.endswith("_proj")]
    assert len(sparse) == 7 * SHAPE.layers and all(satisfies_nm(got[name], 0, 2, 4) for name in sparse)
    np.testing.assert_array_equal(got["lm_head"], given["lm_head"])  # the head stays dense
    onnx.checker.check_model(str(streamed), full_check=True)
    out = ort.InferenceSession(str(streamed)).run(None, {"input_ids": np.array([[1, 5, 9]])})[0]
    assert out.shape == (1, 3, SHAPE.vocab) and np.isfinite(out).all()


def test_streaming_holds_one_weight_in_memory_not_the_model(tmp_path):
    path = write_llama(tmp_path / "deep.onnx", LlamaShape(layers=24, hidden=128, ffn=352, heads=4, kv_heads=1,
                                                          vocab=256), "float32")
    model = streaming.load_graph(path)
    total = streaming.external_bytes(model)
    largest = max(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    refs, _ = nm_candidates(model, 2, 4)
    tracemalloc.start()  # numpy's allocations are traced
    try:
        layers = streaming.stream_weights(model, tmp_path, tmp_path / "out.onnx", refs, 2, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(layers) == 7 * 24
    assert total > 80 * largest  # the model is many weights
    assert peak < total / 3 and peak < 16 * largest + (1 << 20), (peak, largest, total)


def test_only_options_that_need_one_weight_at_a_time_stream(llama):
    model = streaming.load_graph(llama)
    big = dict(nm="2:4")
    assert streaming.external_bytes(model) < streaming.STREAM_BYTES and not streaming.streams(model, OptimizeOptions(**big))
    streaming_bytes, streaming.STREAM_BYTES = streaming.STREAM_BYTES, 1
    try:
        assert streaming.streams(model, OptimizeOptions(**big))
        for extra in (dict(calib="data.npz"), dict(bench_batches=[1]), dict(plan="plan.json"), dict(ffn_ratio=0.5)):
            assert not streaming.streams(model, OptimizeOptions(**big, **extra))
        assert not streaming.streams(model, OptimizeOptions())  # no --nm: nothing to stream
    finally:
        streaming.STREAM_BYTES = streaming_bytes


def test_external_data_outside_the_model_folder_is_refused(llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BYTES", 1)
    model = onnx.load(str(llama), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    bad = tmp_path / "bad.onnx"
    onnx.save_model(model, str(bad))
    line = cli_error(capsys, ["optimize", str(bad), str(tmp_path / "out.onnx"), "--nm", "2:4"])
    assert "elsewhere.data" in line and not (tmp_path / "out.onnx").exists()


def test_truncated_external_data_is_a_one_line_error(llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BYTES", 1)
    copy = tmp_path / "llama.onnx"
    copy.write_bytes(llama.read_bytes())
    data = (llama.parent / "llama.onnx.data").read_bytes()
    (tmp_path / "llama.onnx.data").write_bytes(data[:len(data) // 2])
    line = cli_error(capsys, ["optimize", str(copy), str(tmp_path / "out.onnx"), "--nm", "2:4"])
    assert "llama.onnx" in line and not (tmp_path / "out.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gkp-tmp")]
