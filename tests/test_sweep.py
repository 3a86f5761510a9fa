"""sweep: one damage analysis, a family of models for several target speed-ups; its files and its refusals."""

import json

import numpy as np
import onnx
import pytest

from conftest import cli_error
from gkp_onnx.api import sweep
from gkp_onnx.cli import main
from gkp_onnx.errors import GkpError
from gkp_onnx.passes.structured_budget import StructuredBudget
from gkp_onnx.sweep_report import plot_available
from test_structured_budget import calibration, encoder

FAST = dict(bench_repeats=3, bench_min_time_s=0.0)


@pytest.fixture
def files(tmp_path):
    path = tmp_path / "encoder.onnx"
    onnx.save(encoder(), path)
    np.savez(tmp_path / "calib.npz", attn_x=calibration(16).inputs["attn_x"])
    return path, tmp_path / "calib.npz"


def test_one_analysis_serves_every_target(files, monkeypatch):
    path, calib = files
    measured = []
    original = StructuredBudget._options
    monkeypatch.setattr(StructuredBudget, "_options", lambda self, model: measured.append(1) or original(self, model))
    results = sweep(str(path), [1.5, 1.2], gkp=False, calib=str(calib), bench_batches=[1], **FAST)
    assert len(measured) == 1  # the damage table is measured once
    assert [report.structured_budget["target_speedup"] for _, report in results] == [1.2, 1.5]  # sorted
    for model, report in results:
        onnx.checker.check_model(model, full_check=True)
        assert report.after.macs < report.before.macs and report.latency


def test_sweep_refuses_what_it_chooses_itself(files):
    path, calib = files
    for name in ("ffn_ratio", "head_ratio", "target_speedup"):
        with pytest.raises(GkpError, match="sweep chooses"):
            sweep(str(path), [1.2], gkp=False, calib=str(calib), **{name: 0.5 if "ratio" in name else 1.5})
    for bad in ([], [1.0], [1.2, 1.2], ["x"], list(np.linspace(1.1, 3, 17))):
        with pytest.raises(GkpError, match="--targets|--target-speedup"):
            sweep(str(path), bad, gkp=False, calib=str(calib))


def test_command_line_writes_the_family_and_its_table(files, capsys):
    path, calib = files
    before = path.read_bytes()
    outdir = path.parent / "family"
    # exit 1 would say a pruned model measured slower than the input: a 64-wide model may, by noise
    assert main(["sweep", str(path), str(outdir), "--targets", "1.2,1.5", "--calib", str(calib), "--no-gkp",
                 "--bench-repeats", "3", "--bench-min-time", "0"]) in (0, 1)
    written = sorted(p.name for p in outdir.iterdir())
    assert written == sorted(["encoder-1.2x.onnx", "encoder-1.5x.onnx", "sweep.json", "sweep.md"]
                             + (["sweep.png"] if plot_available() else []))
    rows = json.loads((outdir / "sweep.json").read_text())["rows"]
    assert [row["target_speedup"] for row in rows] == [1.2, 1.5]
    assert all(row["heads_of"] == 4 and row["neurons_of"] == 128 and row["neurons"] <= 128 for row in rows)
    assert "| 1.5x |" in (outdir / "sweep.md").read_text() and "| 1.5x |" in capsys.readouterr().out
    if plot_available():
        assert (outdir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.read_bytes() == before


@pytest.mark.parametrize("argv, needle", [
    (["--targets", "x"], "--targets"),
    (["--targets", ""], "--targets"),
    (["--targets", "1"], "--targets"),
    (["--targets", "1.5,1.5"], "--targets"),
    (["--targets", ",".join(["1.5"] * 2 + [str(1.1 + i / 10) for i in range(16)])], "--targets"),
    (["--targets", "1.5", "--ffn-ratio", "0.5"], "unrecognized arguments: --ffn-ratio"),
])
def test_command_line_refusals_leave_nothing(files, capsys, argv, needle):
    path, calib = files
    outdir = path.parent / "family"
    line = cli_error(capsys, ["sweep", str(path), str(outdir), "--calib", str(calib), "--no-gkp"] + argv,
                     usage=needle.startswith(("--targets", "unrecognized")))
    assert needle in line
    assert not outdir.exists()


def test_command_line_refuses_bad_folders(files, capsys):
    path, calib = files
    common = ["--targets", "1.5", "--calib", str(calib), "--no-gkp"]
    assert "not a folder" in cli_error(capsys, ["sweep", str(path), str(path)] + common)
    assert "does not exist" in cli_error(capsys, ["sweep", str(path), str(path.parent / "a" / "b")] + common)
    assert "--calib" in cli_error(capsys, ["sweep", str(path), str(path.parent / "x"), "--targets", "1.5"])
    (path.parent / "dangling").symlink_to(path.parent / "nowhere" / "x")
    assert "cannot make it" in cli_error(capsys, ["sweep", str(path), str(path.parent / "dangling")] + common)
    assert "empty" in cli_error(capsys, ["sweep", str(path), ""] + common)
    assert not (path.parent / "x").exists() and not (path.parent / "a").exists()
