"""The output guard: no output overwrites an input or another output, bad output paths are
refused before any work, and a failed run leaves nothing behind."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import cli_error
from fixtures import TOPOLOGIES

from gkp_onnx import model_io
from gkp_onnx.cli import main
from gkp_onnx.errors import GkpError
from gkp_onnx.outputs import TMP_PREFIX, Outputs


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refused(capsys, argv, words: str) -> None:
    line = cli_error(capsys, argv)
    assert words in line, line


@pytest.mark.parametrize("flag", ["--report", "--save-plan"])
def test_no_side_output_overwrites_the_input(capsys, model_path, tmp_path, flag):
    before, listing = digest(model_path), files(tmp_path)
    refused(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), flag, str(model_path)],
            "would overwrite the input model")
    assert digest(model_path) == before and files(tmp_path) == listing


def test_bench_json_does_not_overwrite_a_model(capsys, model_path):
    before = digest(model_path)
    refused(capsys, ["bench", str(model_path), "--json", str(model_path)], "would overwrite the model")
    assert digest(model_path) == before


def test_the_output_model_does_not_overwrite_the_inputs_external_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    (tmp_path / "ext").mkdir()
    path = model_io.save_model(TOPOLOGIES["residual"](), tmp_path / "ext" / "model.onnx")
    data = tmp_path / "ext" / "model.onnx.data"
    before = digest(data)
    refused(capsys, ["optimize", str(path), str(data)], "external data of the input model")
    refused(capsys, ["optimize", str(path), str(tmp_path / "ext" / "model.onnx.data")[:-5]], "input model")
    assert digest(data) == before
    assert model_io.load_model(path).graph.node


def test_two_outputs_cannot_be_one_file(capsys, model_path, tmp_path):
    out = tmp_path / "o.onnx"
    refused(capsys, ["optimize", str(model_path), str(out), "--report", str(out)], "is also given as output")
    refused(capsys, ["optimize", str(model_path), str(out), "--report", str(tmp_path / "r.json"),
                     "--save-plan", str(tmp_path / "r.json")], "is also given as --report")
    assert not out.exists()


def test_links_to_the_input_are_the_input(capsys, model_path, tmp_path):
    (tmp_path / "hard.onnx").hardlink_to(model_path)
    (tmp_path / "soft.onnx").symlink_to(model_path)
    before = digest(model_path)
    for name in ("hard.onnx", "soft.onnx"):
        refused(capsys, ["optimize", str(model_path), str(tmp_path / name)], "would overwrite the input model")
    assert digest(model_path) == before


@pytest.mark.parametrize("target, words", [("dir/", "ends with a slash"), ("dir", "is a directory"),
                                            ("/dev/null", "not a regular file"),
                                            ("missing/o.onnx", "does not exist"),
                                            ("dangling", "symbolic link to nothing"), ("loop", "loop"),
                                            ("x" * 300 + ".json", "too long")])
def test_bad_output_paths_are_refused_before_any_work(capsys, model_path, tmp_path, target, words):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    listing = files(tmp_path)
    path = target if target.startswith("/") else str(tmp_path / target) + ("/" if target.endswith("/") else "")
    refused(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), "--report", path], words)
    assert files(tmp_path) == listing


def test_a_run_that_fails_after_the_start_leaves_nothing(capsys, model_path, tmp_path):
    """The plan is refused only once the model is loaded: the outputs are not written, no
    temporary file stays."""
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text('{"ratio": 0.5, "method": "leanflex", "seed": 0, "layers": [{"node": "nope"}]}')
    listing = files(tmp_path)
    assert main(["optimize", str(model_path), str(tmp_path / "o.onnx"), "--plan", str(bad_plan),
                 "--report", str(tmp_path / "r.json")]) != 0
    capsys.readouterr()
    assert files(tmp_path) == listing


def test_outputs_are_written_together_or_not_at_all(tmp_path):
    outputs = Outputs()
    a, b = outputs.add(tmp_path / "a.txt", "a"), outputs.add(tmp_path / "b.txt", "b")
    with pytest.raises(RuntimeError):
        with outputs:
            outputs.stage(a, lambda path: path.write_text("a"))
            raise RuntimeError("fails after a was staged")
    assert files(tmp_path) == []
    with Outputs() as outputs:
        outputs.stage(a, lambda path: path.write_text("a"))
        outputs.stage(b, lambda path: path.write_text("b"))
        assert not a.exists()  # nothing in place before the end
    assert files(tmp_path) == ["a.txt", "b.txt"]


def test_temporaries_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{TMP_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{TMP_PREFIX}{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"partial")
    Outputs().add(tmp_path / "o.onnx", "output")
    assert not stale.exists() and live.exists()


def test_sigterm_removes_what_was_staged(tmp_path, model_path):
    """A run stopped by SIGTERM while writing exits 143 and leaves no file."""
    script = f"""
import os, signal
from gkp_onnx import outputs
from gkp_onnx.cli import main
real = outputs.Outputs.stage
def stage(self, target, write):
    real(self, target, write)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the outputs are staged
outputs.Outputs.stage = stage
raise SystemExit(main(["optimize", r"{model_path}", r"{tmp_path / 'o.onnx'}", "--ratio", "0.5"]))
"""
    listing = files(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    assert "Traceback" not in result.stderr and files(tmp_path) == listing


def test_nan_weights_are_named_and_nothing_is_written(capsys, tmp_path):
    model = TOPOLOGIES["residual"]()
    weight = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    refused(capsys, ["optimize", str(path), str(tmp_path / "o.onnx")], f"weight '{weight.name}' holds NaN")
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(GkpError, match="holds NaN"):
        from gkp_onnx import optimize
        optimize(model)
