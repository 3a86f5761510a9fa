import numpy as np
import onnx
import pytest
import torch

from conftest import run

from gkp_onnx.demo import WEIGHTS, asset
from gkp_onnx.models.cifar_resnet import load_akamaster
from gkp_onnx.models.export import OPSET, build, export


def test_carried_resnet56_weights_export_and_match_torch(tmp_path):
    model = load_akamaster("resnet56", str(asset(WEIGHTS)))
    path = export(model, (1, 3, 32, 32), tmp_path / "r56.onnx")
    exported = onnx.load(path)
    onnx.checker.check_model(exported, full_check=True)
    assert exported.opset_import[0].version == OPSET
    assert not [n for n in exported.graph.node if n.op_type == "BatchNormalization"]  # folded
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)  # dynamic batch
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(exported, {"input": x})[0], expected, atol=1e-4, rtol=1e-4)


def test_resnet50_shapes():
    model, shape = build("resnet50")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert shape == (1, 3, 224, 224) and len(convs) == 53
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision's resnet50


def test_vgg16_is_a_plain_chain_whose_gathers_all_fold(tmp_path):
    from gkp_onnx import optimize

    model, shape = build("vgg16")
    assert shape == (1, 3, 32, 32) and sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 13
    exported = onnx.load(export(model, shape, tmp_path / "vgg16.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(run(exported, {"input": x})[0], model(torch.from_numpy(x)).numpy(), atol=1e-4)
    for ratio in (0.5, 0.75):  # 0.75: a larger G keeps G times more of the producer, which the cost model sees
        optimized, report = optimize(exported, ratio=ratio, validate=False)
        assert len(report.plan.layers) == 12 and {layer.group_count for layer in report.plan.layers} == {1}
        assert not [n for n in optimized.graph.node if n.op_type == "Gather"]  # no residual stream: filter pruning


def test_llama2c_checkpoint_matches_the_onnx_export_and_tokenizer_decodes():
    from onnx import numpy_helper

    from conftest import shared_file
    from gkp_onnx.models.llama2c import decode, load_checkpoint, load_tokenizer

    config, weights = load_checkpoint(shared_file("tinyllama-aidreams260K/aidreams260K.bin"))
    assert (config.dim, config.hidden_dim, config.n_layers, config.vocab_size) == (64, 172, 4, 512)
    assert config.shared_classifier
    exported = onnx.load(shared_file("tinyllama-aidreams260K/aidreams260K_derived.onnx"))
    w2 = next(n for n in exported.graph.node if n.name == "/layers.0/w2/MatMul").input[1]
    onnx_w2 = numpy_helper.to_array(next(t for t in exported.graph.initializer if t.name == w2))
    np.testing.assert_array_equal(onnx_w2, weights["w2"][0].T)  # MatMul B = W^T
    pieces = load_tokenizer(shared_file("tinyllama-aidreams260K/tok512.bin"), config.vocab_size)
    assert len(pieces) == 512
    assert decode(pieces, [1, *[pieces.index(p) for p in pieces[300:303]]]) == \
        b"".join(pieces[300:303]).decode("utf-8", errors="replace").lstrip()


def test_mobilenet_v2_exports_and_its_pruned_form_equals_the_masked_dense_model(tmp_path):
    from conftest import masked_reference

    from gkp_onnx import optimize

    model, shape = build("mobilenet_v2")
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2
    exported = onnx.load(export(model, shape, tmp_path / "mobilenet_v2.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(run(exported, {"input": x})[0], model(torch.from_numpy(x)).numpy(), atol=1e-3)
    optimized, report = optimize(exported, ratio=0.5, validate=False)
    assert report.after.macs < 0.5 * report.before.macs
    assert sum(n.op_type == "Gather" for n in optimized.graph.node) <= 2  # the rest fold through the depthwise Convs
    expected = run(masked_reference(exported, report.plan), {"input": x})[0]
    np.testing.assert_allclose(run(optimized, {"input": x})[0], expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnext26", "unet", "yolo_style", "speech_conv1d"])
def test_modern_exports_prune_exactly(name, tmp_path):
    """Each family's graph patterns (SiLU as x*sigmoid(x) and squeeze-excite; grouped 3x3 Convs;
    ConvTranspose, Resize and Concat skips; channel Split, Concat and SPPF; Conv1d) at a small
    input: exported as users do, pruned at 0.5, equal to the masked dense model."""
    from conftest import masked_reference

    from gkp_onnx import optimize
    from gkp_onnx.graph.canonical import canonicalize
    from gkp_onnx.models import modern

    small = {"efficientnet_b0": (lambda: modern._seeded(modern.EfficientNet(10, modern.B0_STAGES[:4]), 0, 64),
                                 (1, 3, 64, 64)),
             "resnext26": (lambda: modern._seeded(modern.ResNeXt(1, 10, ((64, 128), (128, 256))), 0, 64),
                           (1, 3, 64, 64)),
             "unet": (lambda: modern._seeded(modern.UNet(widths=(8, 16, 32, 64)), 0, 64), (1, 3, 64, 64)),
             "yolo_style": (lambda: modern._seeded(modern.YoloStyle(widths=(8, 16, 32, 64, 128)), 0, 64),
                            (1, 3, 64, 64)),
             "speech_conv1d": (lambda: build("speech_conv1d")[0], (1, 64, 64))}
    make, shape = small[name]
    torch.manual_seed(0)
    model = make()
    exported = onnx.load(export(model, shape, tmp_path / f"{name}.onnx"))
    x = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(run(exported, {"input": x})[0], model(torch.from_numpy(x)).numpy(),
                                   atol=1e-3, rtol=1e-3)
    optimized, report = optimize(exported, ratio=0.5, validate=False)
    onnx.checker.check_model(optimized, full_check=True)
    assert report.after.macs < 0.9 * report.before.macs
    # the plan names the canonical model's tensors (torch writes shared weights as Identity nodes)
    expected = run(masked_reference(canonicalize(exported)[0], report.plan), {"input": x})[0]
    np.testing.assert_allclose(run(optimized, {"input": x})[0], expected, atol=1e-3, rtol=1e-3)
