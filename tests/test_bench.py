import json

import onnx
import pytest

from fixtures import TOPOLOGIES

from gkp_onnx.bench import bench, format_timings
from gkp_onnx.cli import main


def test_bench_reports_every_model_and_batch_relative_to_the_first(tmp_path):
    a, b = TOPOLOGIES["chain"](), TOPOLOGIES["residual"]()
    timings = bench([a, b], names=["a", "b"], batches=(1, 4), threads=1, warmup=1, repeats=3)
    assert [(t.model, t.batch) for t in timings] == [("a", 1), ("b", 1), ("a", 4), ("b", 4)]
    assert all(t.median_ms > 0 and t.p90_ms >= t.median_ms for t in timings)
    assert timings[0].speedup == 1.0 and timings[1].speedup == pytest.approx(timings[0].median_ms / timings[1].median_ms)
    assert all(t.rounds == 3 for t in timings)
    text = format_timings(timings, 1)
    assert "CPUExecutionProvider intra_op_num_threads=1, allow_spinning=0; batch 4; 3 interleaved rounds" in text


def test_bench_times_more_rounds_until_min_time_is_reached():
    model = TOPOLOGIES["chain"]()
    timed = bench([model], batches=(1,), threads=1, warmup=2, repeats=2, min_time_s=0.2)[0]
    # a call of this tiny model takes well under 10 ms, so 0.2 s needs more than the 2 rounds asked
    assert timed.rounds > 2 and timed.rounds * timed.median_ms / 1e3 > 0.05


def test_bench_cli_writes_json_and_rejects_unavailable_providers(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(TOPOLOGIES["chain"](), path)
    out = tmp_path / "t.json"
    assert main(["bench", str(path), str(path), "--batch", "1,2", "--repeats", "2", "--min-time", "0",
                 "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 4
    capsys.readouterr()
    assert main(["bench", str(path), "--providers", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDAExecutionProvider is not available" in err[0]


def test_optimize_bench_adds_latency_to_the_report(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(TOPOLOGIES["chain"](), path)
    report = tmp_path / "r.json"
    assert main(["optimize", str(path), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--bench", "--bench-batch",
                 "1,2", "--bench-repeats", "3", "--bench-min-time", "0", "--report", str(report)]) in (0, 1)
    latency = json.loads(report.read_text())["latency"]
    assert [(t["model"], t["batch"]) for t in latency] == [("input", 1), ("optimized", 1), ("input", 2),
                                                            ("optimized", 2)]
    assert "latency" in capsys.readouterr().out


def test_optimize_fails_when_the_result_is_measured_slower(monkeypatch):
    import importlib

    from gkp_onnx import optimize
    guard = importlib.import_module("gkp_onnx.guard")
    from gkp_onnx.bench import Timing

    def slower(models, names, batches, **kw):
        return [Timing(name, "cpu", b, 1.0 if name == "input" else 1.25, 1.3, 1.0 if name == "input" else 0.8)
                for b in batches for name in names]

    monkeypatch.setattr(guard, "bench", slower)
    _, report = optimize(TOPOLOGIES["chain"](), ratio=0.5, bench_batches=[1, 8])
    assert not report.passed
    assert report.failures == ["optimized model is slower than the input on cpu at batch 1 (0.80x)",
                               "optimized model is slower than the input on cpu at batch 8 (0.80x)"]
