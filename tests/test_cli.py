"""The command line: happy paths, and one-line errors with exit code 2 for every kind of bad input."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import cli_error
from fixtures import TOPOLOGIES

from gkp_onnx.cli import main


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_optimize_writes_model_report_and_plan_and_leaves_input_alone(model_path, tmp_path, capsys):
    before = digest(model_path)
    out, report, plan = tmp_path / "out.onnx", tmp_path / "report.json", tmp_path / "plan.json"
    code = main(["optimize", str(model_path), str(out), "--ratio", "0.5", "--report", str(report),
                 "--save-plan", str(plan)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert digest(model_path) == before
    onnx.checker.check_model(onnx.load(out), full_check=True)
    data = json.loads(report.read_text())
    assert data["passed"] and data["after"]["macs"] < data["before"]["macs"]
    assert len(data["layers"]) == 3 and data["plan"]["layers"][0]["kept_channels"]
    assert "PASSED" in stdout and "MACs" in stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gkp-")]  # no temp files left

    replayed = tmp_path / "replayed.onnx"
    assert main(["optimize", str(model_path), str(replayed), "--plan", str(plan)]) == 0
    assert onnx.load(replayed).graph == onnx.load(out).graph


def test_threshold_missed_gives_exit_code_1(model_path, tmp_path, capsys):
    code = main(["optimize", str(model_path), str(tmp_path / "o.onnx"), "--ratio", "0.5", "--max-abs-diff", "1e-9"])
    assert code == 1
    assert "FAILED: max abs diff" in capsys.readouterr().out


def test_compare_and_inspect(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    main(["optimize", str(model_path), str(out), "--ratio", "0", "--groups", "1"])
    capsys.readouterr()
    assert main(["compare", str(model_path), str(out), "--max-abs-diff", "1e-4"]) == 0
    assert "PASSED" in capsys.readouterr().out
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 8, 10, 10)).astype(np.float32))
    assert main(["compare", str(model_path), str(out), "--data", str(data)]) == 0
    assert main(["inspect", str(model_path)]) == 0
    text = capsys.readouterr().out
    assert "GKP: prunable" in text and "total:" in text
    assert "onnxruntime CPU NCHWc block here: none" in text  # the tests pin the block to 1 (conftest)


@pytest.mark.parametrize("topology,node,reason", [
    ("subgraph", "if/then_branch/branch_conv", "inside the 'then_branch' subgraph of If 'if'"),
    ("conv_transpose", "convtranspose", "ConvTranspose: GKP rewrites Conv only"),
    ("qdq", "conv", "weight is quantized (QDQ"),
    ("conv1d", "conv1", "GKP: prunable")])
def test_inspect_says_why_a_layer_kind_is_kept(topology, node, reason, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(TOPOLOGIES[topology](), path)
    assert main(["inspect", str(path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(node)]
    assert any(reason in row for row in rows), rows


def test_missing_file(capsys, tmp_path):
    assert "no such file" in cli_error(capsys, ["optimize", str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx")])


def test_not_an_onnx_file(capsys, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 10)
    assert "ONNX" in cli_error(capsys, ["inspect", str(path)])


def test_truncated_file(capsys, tmp_path, model_path):
    data = model_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert "ONNX" in cli_error(capsys, ["optimize", str(path), str(tmp_path / "o.onnx")])


def test_nothing_to_optimize(capsys, tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", 1, [1, 4])],
                              [helper.make_tensor_value_info("y", 1, [1, 4])], [w])
    path = tmp_path / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert "nothing to optimize" in cli_error(capsys, ["optimize", str(path), str(tmp_path / "o.onnx")])


def test_output_equals_input(capsys, model_path):
    before = digest(model_path)
    assert "would overwrite the input model" in cli_error(capsys, ["optimize", str(model_path), str(model_path)])
    assert digest(model_path) == before


def test_output_directory_missing_or_unwritable(capsys, model_path, tmp_path, monkeypatch):
    assert "does not exist" in cli_error(capsys, ["optimize", str(model_path), str(tmp_path / "no" / "o.onnx")])
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # root can write anywhere: simulate
    assert "not writable" in cli_error(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx")])


@pytest.mark.parametrize("ratio", ["-0.1", "1.0", "1.5"])
def test_ratio_out_of_range(capsys, model_path, tmp_path, ratio):
    assert "--ratio must be in [0, 1)" in cli_error(
        capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), "--ratio", ratio])


def test_groups_not_dividing_names_the_layer(capsys, model_path, tmp_path):
    message = cli_error(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), "--groups", "3"])
    assert "--groups 3 does not divide layer 'conv1' (16 output channels)" in message


def test_bad_exclude_regex(capsys, model_path, tmp_path):
    assert "not a valid regular expression" in cli_error(
        capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), "--exclude", "conv[1"])


@pytest.mark.parametrize("arrays,expected", [
    ({"x": np.zeros((4, 3, 10, 10), np.float32)}, "has shape [4, 3, 10, 10]"),
    ({"images": np.zeros((4, 8, 10, 10), np.float32)}, "no array for input 'x'"),
    ({"x": np.zeros((4, 8, 10, 10), np.int32)}, "the model expects float32"),
])
def test_calibration_data_not_matching(capsys, model_path, tmp_path, arrays, expected):
    data = tmp_path / "calib.npz"
    np.savez(data, **arrays)
    assert expected in cli_error(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"),
                                         "--calib", str(data)])


def test_console_script_exit_code_and_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gkp_onnx.cli", "inspect", str(tmp_path / "missing.onnx")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"gkp-onnx: error: no such file: {tmp_path / 'missing.onnx'}"]


def test_a_reader_that_stops_early_ends_the_command_quietly(model_path):
    """`gkp-onnx inspect m.onnx | head`: no traceback, no internal error; exit 141 as for SIGPIPE."""
    process = subprocess.Popen([sys.executable, "-m", "gkp_onnx.cli", "inspect", str(model_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    error = process.stderr.read()
    assert process.wait() == 141 and error == b""


def test_channel_multiple_takes_auto_or_a_positive_integer(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    for value in ("auto", "16", "1"):
        assert main(["optimize", str(model_path), str(out), "--ratio", "0.5", "--channel-multiple", value]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # argparse's own error exit, in one line
        main(["optimize", str(model_path), str(out), "--channel-multiple", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1
    assert err[0] == ("gkp-onnx optimize: error: argument --channel-multiple: expected a positive integer or "
                      "'auto', got '0' (see gkp-onnx optimize -h)")


def test_shared_streams_show_in_the_report_and_can_be_turned_off(tmp_path, capsys):
    from fixtures import residual_stream

    path = tmp_path / "stream.onnx"
    onnx.save(residual_stream(128), path)
    assert main(["optimize", str(path), str(tmp_path / "shared.onnx"), "--ratio", "0.5"]) == 0
    table = capsys.readouterr().out
    assert "   2s " in table and "the shared form: the 2 reordered residual stream(s)" in table
    assert main(["optimize", str(path), str(tmp_path / "plain.onnx"), "--ratio", "0.5", "--no-share-streams"]) == 0
    assert "the shared form" not in capsys.readouterr().out
    gathers = [sum(n.op_type == "Gather" for n in onnx.load(tmp_path / f"{name}.onnx").graph.node)
               for name in ("shared", "plain")]
    assert gathers[0] < gathers[1]


def test_cli_defaults_are_the_library_defaults():
    """Options are defined once: what the CLI passes without flags equals OptimizeOptions()."""
    from gkp_onnx.cli import build_parser
    from gkp_onnx.cli.args import optimize_options
    from gkp_onnx.options import DEFAULTS, RECOVER_DEFAULTS

    args = build_parser().parse_args(["optimize", "in.onnx", "out.onnx"])
    options = optimize_options(args)
    assert len(options) >= 20
    for name, value in options.items():
        if name not in ("bench_batches",):  # the CLI's batch for --bench; without --bench nothing is timed
            assert value == getattr(DEFAULTS, name), name
    args = build_parser().parse_args(["recover", "p.onnx", "o.onnx", "--teacher", "t.onnx", "--data", "d.npz"])
    for name in ("epochs", "lr", "batch", "weight_decay", "temperature", "device", "seed", "checkpoint_every"):
        assert getattr(args, name) == getattr(RECOVER_DEFAULTS, name), name


def test_a_usage_error_loads_no_model_library():
    """The CLI starts without onnx or torch: a usage error answers at once."""
    script = ("import sys\nfrom gkp_onnx.cli import main\ntry:\n    main(['optimize'])\nexcept SystemExit as e:\n"
              "    assert 'onnx' not in sys.modules and 'torch' not in sys.modules\n    sys.exit(e.code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_ratio_zero_is_a_lossless_request(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(model_path), str(out), "--ratio", "0"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["compare", str(model_path), str(out), "--max-abs-diff", "1e-5"]) == 0


def test_a_model_with_constant_node_weights_is_canonicalized_and_says_so(tmp_path, capsys):
    """Weights made by Constant nodes (paddle2onnx, some tf2onnx exports) become initializers."""
    model = TOPOLOGIES["residual"]()
    for init in list(model.graph.initializer):
        model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [init.name], value=init))
    del model.graph.initializer[:]
    path = tmp_path / "constants.onnx"
    onnx.save(model, path)
    given = path.read_bytes()
    assert main(["optimize", str(path), str(tmp_path / "o.onnx"), "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "input: " in out and "constant nodes folded into initializers (Constant" in out
    assert path.read_bytes() == given


def test_a_likely_broken_result_is_called_so_and_one_shot_risk_is_said_before(model_path, tmp_path, capsys):
    assert main(["optimize", str(model_path), str(tmp_path / "o.onnx"), "--ratio", "0.75", "--groups", "1",
                 "--report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("note: without --calib data, pruning at ratio 0.75 is one-shot")
    assert "warning: the optimized model's outputs are far from the input's on random inputs" in out
    assert json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert main(["optimize", str(model_path), str(tmp_path / "z.onnx"), "--ratio", "0"]) == 0
    out = capsys.readouterr().out
    assert "warning:" not in out and "note: without --calib" not in out
