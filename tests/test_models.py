import numpy as np
import onnx
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
