import json

from gkp_onnx.cli import main


def test_demo_runs_on_the_carried_assets(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "top-1 on 500 exact-pixel CIFAR-10 test images: dense 94.00%" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fidelity"]["accuracy_reference"] == 0.94
    assert len(report["layers"]) == 54 and (tmp_path / "resnet56.gkp.onnx").exists()
