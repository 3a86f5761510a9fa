import json
import re

import pytest

from gkp_onnx.cli import main


def test_demo_runs_on_the_carried_assets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GKP_ONNX_NCHWC_BLOCK", "16")  # the default path on an AVX512 machine, wherever it runs
    assert main(["demo", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    match = re.search(r"top-1 on 300 exact-pixel CIFAR-10 test images \(not used for calibration\): "
                      r"dense ([\d.]+)% -> one-shot ([\d.]+)% -> reconstructed ([\d.]+)%", out)
    assert match, out[-2000:]
    dense, one_shot, reconstructed = map(float, match.groups())
    assert dense == 94.0
    assert reconstructed > one_shot + 30  # the refit is the big lever: measured 16% -> 89%
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fidelity"]["accuracy_candidate"] == pytest.approx(reconstructed / 100, abs=5e-5)  # printed to 0.01%
    kept_dense = [s for s in report["skipped"] if s["reason"].startswith("kept dense")]  # rounding, cost model
    assert len(report["layers"]) + len(kept_dense) == 54  # every Conv but the stem is considered
    assert len(report["layers"]) >= 40 and len(report["reconstruction"]) == len(report["layers"])
    assert (tmp_path / "resnet56.gkp.onnx").exists()
    # latency is measured, not assumed: both models timed at batch 1 and 64, the speed-ups printed
    latency = report["latency"]
    assert [(t["model"], t["batch"]) for t in latency] == [("input", 1), ("optimized", 1), ("input", 64),
                                                            ("optimized", 64)]
    printed = re.search(r"measured speed-up over dense on this machine: ([\d.]+)x at batch 1, ([\d.]+)x at batch 64",
                        out)
    assert printed and float(printed[2]) == pytest.approx(latency[3]["speedup"], abs=6e-3)
