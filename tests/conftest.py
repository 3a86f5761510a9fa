from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from fixtures import TOPOLOGIES

from gkp_onnx.cli import main
from gkp_onnx.graph import permuted
from gkp_onnx.passes.shortcut_convs import shortcuts_as_convs

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
USAGE = re.compile(r"gkp-onnx \w+: error: argument [-\w]+: ")


def shared_file(relative: str) -> Path:
    """A file from ../shared/data, or a clean skip where the checkout has none."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{relative}")
    return path


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def random_feed(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        shape = [d.dim_value or batch for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feed[value.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def masked_reference(model: onnx.ModelProto, plan) -> onnx.ModelProto:
    """The original graph (its zero-padding shortcuts as Convs and its channel spaces reordered, as
    optimize does) with every pruned grouped kernel set to zero in the dense weight."""
    reference = permuted(shortcuts_as_convs(model), plan.permutations)
    layers = {layer.weight: layer for layer in plan.layers}
    for init in reference.graph.initializer:
        if init.name in layers:
            weight = numpy_helper.to_array(init).copy()
            weight[~layers[init.name].mask()] = 0
            init.CopyFrom(numpy_helper.from_array(weight, init.name))
    return reference


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test session caches (clusterings, measurements) in its own folder, never in ~/.cache."""
    monkeypatch.setenv("GKP_ONNX_CACHE", str(tmp_path_factory.getbasetemp() / "gkp-onnx-cache"))


@pytest.fixture(scope="session", autouse=True)
def nothing_written_where_the_tests_run():
    """No command may leave files in the folder it runs in (a library that dumps its model into the
    working directory once did): the repository root and the working directory stay as they were."""
    folders = {Path.cwd(), Path(__file__).resolve().parents[1]}
    before = {folder: set(folder.iterdir()) for folder in folders}
    yield
    stray = sorted(str(p) for folder in folders for p in set(folder.iterdir()) - before[folder])
    assert not stray, f"files left where the tests ran: {stray}"


@pytest.fixture(autouse=True)
def nchwc_target(monkeypatch):
    """Tests target no NCHWc block (no channel rounding, no padding in the cost model), whatever
    CPU runs them; the tests of those rules, and the demo and real-weights runs, set 16 (AVX512)."""
    monkeypatch.setenv("GKP_ONNX_NCHWC_BLOCK", "1")


@pytest.fixture
def model_path(tmp_path):
    """The residual fixture saved as model.onnx in the test's folder."""
    path = tmp_path / "model.onnx"
    onnx.save(TOPOLOGIES["residual"](), path)
    return path


def cli_error(capsys, argv, usage: bool = False) -> str:
    """The one stderr line of a refused command (exit code 2): ours, `gkp-onnx: error: ...`, or with
    `usage` also argparse's usage error (`gkp-onnx optimize: error: argument --x: ...`, SystemExit 2)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        if not usage:
            raise
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and (lines[0].startswith("gkp-onnx: error: ") or (usage and USAGE.match(lines[0]))), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]
