"""Real pretrained CIFAR-10 ResNets from ../shared/data (skipped where it is absent)."""

import numpy as np
import pytest

from conftest import masked_reference, run, shared_file

from gkp_onnx import optimize
from gkp_onnx.model_io import load_model
from gkp_onnx.models.cifar_resnet import preprocess


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.parametrize("groups", [None, 4])
def test_real_resnet_exact_vs_masked_dense_and_top1(name, groups):
    path = shared_file(f"cifar10-resnet-akamaster/derived_onnx/{name}_cifar10.onnx")
    images = np.load(shared_file("cifar10/cifar10_test_exact_first932.npz"))
    x, y = preprocess(images["x"]), images["y"]
    model = load_model(path)
    optimized, report = optimize(model, ratio=0.4375, groups=groups, validate=False)
    kept_dense = [s for s in report.plan.skipped if "slower" in s.reason]  # auto G: the cost model's verdict
    assert len(report.plan.layers) + len(kept_dense) == {"resnet20": 18, "resnet56": 54}[name]  # not the stem
    assert len(kept_dense) <= (2 if groups is None else 0)  # the stride-2 Convs reading a residual stream
    planned = 1 - sum(layer.macs - layer.pruned_macs for layer in report.plan.layers) / report.before.macs
    assert planned == pytest.approx(0.564, abs=0.01) if groups else 0.56 < planned < 0.6
    # folding a Gather into its producer drops the filters nobody reads (fewer MACs still); it
    # declines where the producer would grow (G * n > Co, e.g. G = 4 here)
    assert report.after.macs <= report.before.macs - planned
    if all(layer.group_count == 1 for layer in report.plan.layers):
        assert report.after.macs < report.before.macs - planned

    pruned = run(optimized, {"input": x})[0]
    reference = run(masked_reference(model, report.plan), {"input": x})[0]
    np.testing.assert_allclose(pruned, reference, rtol=1e-4, atol=1e-4)
    dense = run(model, {"input": x})[0]
    dense_acc, pruned_acc = (dense.argmax(1) == y).mean(), (pruned.argmax(1) == y).mean()
    print(f"\n{name} G={groups or 'auto'} ratio 0.4375 one-shot top-1 on {len(y)} exact-pixel images: "
          f"dense {100 * dense_acc:.2f}% -> pruned {100 * pruned_acc:.2f}%")
    assert dense_acc == pytest.approx({"resnet20": 0.9163, "resnet56": 0.9260}[name], abs=1e-3)


def test_real_resnet56_with_nchwc_rounding_is_exact_and_keeps_the_ratio(monkeypatch):
    path = shared_file("cifar10-resnet-akamaster/derived_onnx/resnet56_cifar10.onnx")
    model = load_model(path)
    _, plain = optimize(model, ratio=0.4375, validate=False)
    monkeypatch.setenv("GKP_ONNX_NCHWC_BLOCK", "16")
    optimized, report = optimize(model, ratio=0.4375, validate=False)
    kept = {layer.kept_per_group for layer in report.plan.layers}
    assert kept <= {8, 16, 32, 48}  # multiples of the block, half a block below it: never the padded 9/18/36
    assert len(report.plan.layers) + sum(s.reason.startswith("kept dense") for s in report.plan.skipped) == 54
    assert report.after.macs == pytest.approx(plain.after.macs, rel=0.05)  # the ratio holds over the model
    x = preprocess(np.load(shared_file("cifar10/cifar10_test_exact_first932.npz"))["x"][:64])
    reference = masked_reference(model, report.plan)
    np.testing.assert_allclose(run(optimized, {"input": x})[0], run(reference, {"input": x})[0], rtol=1e-4, atol=1e-4)
