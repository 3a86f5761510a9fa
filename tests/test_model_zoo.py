"""The model-zoo topologies that ship with the onnx package (IR 3, opset 9, weights made by
ConstantOfShape): they load, optimize with defaults at ratio 0 and 0.5, pass the checker, run,
and equal the masked dense model. Their weights are one constant value, which would make the
exactness check vacuous, so each is also run with seeded random weights."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import masked_reference, run

from gkp_onnx import optimize
from gkp_onnx.graph import ensure_node_names
from gkp_onnx.graph.canonical import canonicalize

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SMALL = ["squeezenet", "inception_v1", "inception_v2", "resnet50", "densenet121", "shufflenet"]
LARGE = ["bvlc_alexnet", "zfnet512", "vgg19"]  # hundreds of MB of fully connected weights once folded


def light(name: str) -> Path:
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"the onnx package has no {path.name}")
    return path


def random_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The canonical model with seeded random weights: variances positive, scaled per fan-in."""
    model, _ = canonicalize(model)
    ensure_node_names(model)
    rng = np.random.default_rng(seed)
    variances = {n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization"}
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype.kind != "f":
            continue
        if init.name in variances:
            value = rng.uniform(0.5, 1.5, value.shape)
        else:
            value = rng.standard_normal(value.shape) * (1 / np.sqrt(np.prod(value.shape[1:])) if value.ndim > 1 else 0.1)
        init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
    return model


def feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    return {i.name: np.random.default_rng(1).standard_normal([d.dim_value or 1 for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in model.graph.input if i.name not in inits}


@pytest.mark.parametrize("name", SMALL)
def test_zoo_model_as_it_is_optimizes_and_runs(name):
    path = light(name)
    given = path.read_bytes()
    for ratio in (0.0, 0.5) if name != "shufflenet" else (0.0,):
        optimized, report = optimize(str(path), ratio=ratio)
        onnx.checker.check_model(optimized, full_check=True)
        assert report.passed and report.fidelity.outputs[0].cosine > 0.999
        assert any(note.startswith("IR version 3 -> 4") for note in report.input_notes)
    assert path.read_bytes() == given


@pytest.mark.parametrize("name", [n for n in SMALL if n != "shufflenet"])
def test_zoo_model_with_random_weights_equals_the_masked_dense_model(name):
    model = random_weights(onnx.load(light(name)))
    x = feed(model)
    lossless, report = optimize(model, ratio=0.0, validate=False)
    assert not report.plan.layers
    np.testing.assert_allclose(run(lossless, x)[0], run(model, x)[0], rtol=1e-4, atol=1e-5)
    optimized, report = optimize(model, ratio=0.5, validate=False)
    assert report.plan.layers and report.after.macs < report.before.macs
    expected = run(masked_reference(model, report.plan), x)[0]
    actual = run(optimized, x)[0]
    assert np.abs(actual - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


def test_grouped_and_depthwise_only_model_says_why_nothing_is_pruned():
    """ShuffleNet's Convs are all grouped or depthwise (or the stem): GKP has nothing to prune."""
    from gkp_onnx import GkpError

    with pytest.raises(GkpError, match="nothing to optimize.*already grouped"):
        optimize(str(light("shufflenet")), ratio=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_zoo_model_optimizes_and_runs(name):
    optimized, report = optimize(str(light(name)), ratio=0.5)
    onnx.checker.check_model(optimized)
    assert report.passed and report.plan.layers
