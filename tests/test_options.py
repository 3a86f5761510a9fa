"""One set of checks for option values and data (gkp_onnx.options, gkp_onnx.validate): the library
and the command line refuse the same bad values with the same words, in one line with exit code 2
(never 1, which means a missed fidelity threshold, nor 3, an internal error)."""

import re

import numpy as np
import onnx
import pytest

import conftest
from fixtures import TOPOLOGIES

from gkp_onnx.cli import main
from gkp_onnx.errors import GkpError
from gkp_onnx.graph import InputSpec
from gkp_onnx.options import MAX_ELEMENTS, OptimizeOptions, RecoverOptions, Thresholds
from gkp_onnx.validate import Dataset, fidelity, load_dataset, random_dataset

NAN, INF = float("nan"), float("inf")


def cli_error(capsys, argv) -> str:
    """Ours or argparse's one-line usage error, exit 2."""
    return conftest.cli_error(capsys, argv, usage=True)


def save_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def images(n=4):
    return np.random.default_rng(0).standard_normal((n, 8, 10, 10)).astype(np.float32)


# -- option values: the library --------------------------------------------------------------

BAD_OPTIMIZE = [
    (dict(ratio=1.5), r"--ratio must be in \[0, 1\), got 1.5"),
    (dict(ratio=-0.1), r"--ratio must be in \[0, 1\), got -0.1"),
    (dict(ratio=NAN), r"--ratio must be a finite number, got nan"),
    (dict(ratio=INF), r"--ratio must be a finite number, got inf"),
    (dict(ratio="0.5"), r"--ratio must be a number, got '0.5'"),
    (dict(speed_weight=-1.0), r"--speed-weight must be at least 0, got -1"),
    (dict(speed_weight=NAN), r"--speed-weight must be a finite number"),
    (dict(min_group_width=0), r"--min-group-width must be at least 1, got 0"),
    (dict(groups=0), r"--groups must be a positive integer or 'auto', got 0"),
    (dict(groups=-2), r"--groups must be a positive integer or 'auto', got -2"),
    (dict(seed=-1), r"--seed must be an integer in \[0, 2\*\*32\), got -1"),
    (dict(seed=2 ** 32), r"--seed must be an integer in \[0, 2\*\*32\), got 4294967296"),
    (dict(seed=1.5), r"--seed must be an integer in \[0, 2\*\*32\), got 1.5"),
    (dict(bench_threads=-1), r"--threads must be in \[1, 1024\], got -1"),
    (dict(bench_threads=0), r"--threads must be in \[1, 1024\], got 0"),
    (dict(bench_repeats=0), r"--bench-repeats must be at least 1, got 0"),
    (dict(bench_min_time_s=-1.0), r"--bench-min-time must be at least 0, got -1"),
    (dict(bench_min_time_s=NAN), r"--bench-min-time must be a finite number, got nan"),
    (dict(bench_batches=[1, 0]), r"--bench-batch: batch sizes must be integers in \[1, 4096\], got 0"),
    (dict(bench_batches=[5000]), r"--bench-batch: batch sizes must be integers in \[1, 4096\], got 5000"),
    (dict(input_shapes={"x": [0, 8, 10, 10]}), r"--input-shape x:0,8,10,10: dims must be integers of at least 1"),
    (dict(input_shapes={"x": [2 ** 24, 8, 10, 10]}),
     r"--input-shape x:16777216,8,10,10: 13421772800 elements, more than the 268435456 \(2\*\*28\)"),
]

BAD_THRESHOLDS = [
    (dict(max_abs_diff=NAN), r"--max-abs-diff must be a finite number, got nan"),
    (dict(max_abs_diff=INF), r"--max-abs-diff must be a finite number, got inf"),
    (dict(max_abs_diff=-1e-3), r"--max-abs-diff must be at least 0, got -0.001"),
    (dict(min_cosine=NAN), r"--min-cosine must be a finite number, got nan"),
    (dict(min_cosine=1.5), r"--min-cosine must be in \[-1, 1\], got 1.5"),
    (dict(min_cosine=-2.0), r"--min-cosine must be in \[-1, 1\], got -2"),
    (dict(min_top1_agreement=2.0), r"--min-top1-agreement must be in \[0, 1\], got 2"),
    (dict(min_top1_agreement=-0.5), r"--min-top1-agreement must be in \[0, 1\], got -0.5"),
    (dict(min_top1_agreement=NAN), r"--min-top1-agreement must be a finite number, got nan"),
]

BAD_RECOVER = [
    (dict(lr=0.0), r"--lr must be greater than 0, got 0"),
    (dict(lr=-1e-3), r"--lr must be greater than 0, got -0.001"),
    (dict(lr=NAN), r"--lr must be a finite number, got nan"),
    (dict(lr=INF), r"--lr must be a finite number, got inf"),
    (dict(temperature=0.0), r"--temperature must be greater than 0, got 0"),
    (dict(temperature=NAN), r"--temperature must be a finite number, got nan"),
    (dict(weight_decay=-0.1), r"--weight-decay must be at least 0, got -0.1"),
    (dict(weight_decay=NAN), r"--weight-decay must be a finite number, got nan"),
    (dict(epochs=0), r"--epochs must be at least 1, got 0"),
    (dict(batch=0), r"--batch must be at least 1, got 0"),
    (dict(checkpoint_every=0), r"--checkpoint-every must be at least 1, got 0"),
    (dict(max_steps=0), r"--max-steps must be at least 1, got 0"),
    (dict(seed=-1), r"--seed must be an integer in \[0, 2\*\*32\), got -1"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIMIZE, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_optimize_refuses_bad_values(options, message):
    from gkp_onnx.api import optimize

    with pytest.raises(GkpError, match=f"^{message}"):
        OptimizeOptions(**options).checked()
    with pytest.raises(GkpError, match=f"^{message}"):
        optimize(TOPOLOGIES["residual"](), **options)


@pytest.mark.parametrize("options,message", BAD_THRESHOLDS, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_thresholds_refuse_bad_values(options, message):
    with pytest.raises(GkpError, match=f"^{message}"):
        Thresholds(**options)
    thresholds = Thresholds()  # changed after it was made: optimize checks again
    for name, value in options.items():
        setattr(thresholds, name, value)
    with pytest.raises(GkpError, match=f"^{message}"):
        OptimizeOptions(thresholds=thresholds).checked()


@pytest.mark.parametrize("options,message", BAD_RECOVER, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_recover_options_refuse_bad_values(options, message):
    with pytest.raises(GkpError, match=f"^{message}"):
        RecoverOptions(**options)


def test_edge_values_pass():
    OptimizeOptions(ratio=0, seed=0, groups=1, min_group_width=1, speed_weight=0, bench_threads=1, bench_repeats=1,
                    bench_min_time_s=0, bench_batches=[1, 4096], input_shapes={"x": [1, 8, 10, 10]},
                    thresholds=Thresholds(max_abs_diff=0, min_cosine=-1, min_top1_agreement=0)).checked()
    OptimizeOptions(ratio=0.999, seed=np.int64(2 ** 32 - 1), groups=np.int64(4), speed_weight=np.float32(0.5),
                    thresholds=Thresholds(min_cosine=1, min_top1_agreement=1)).checked()
    RecoverOptions(lr=1e-9, temperature=1e-9, weight_decay=0, epochs=1, batch=1, checkpoint_every=1, max_steps=1,
                   seed=0)


def test_a_nan_metric_misses_every_threshold_set_on_it():
    from gkp_onnx.validate import Fidelity, OutputFidelity

    data = Dataset({"x": np.zeros((2, 1))})
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    result = fidelity([ref], [np.full_like(ref, np.nan)], ["logits"], data)
    assert Thresholds(max_abs_diff=1.0).failures(result) == ["max abs diff nan > 1"]
    result = Fidelity(2, "random", [OutputFidelity("y", NAN, NAN, NAN, NAN)])
    assert Thresholds(max_abs_diff=1.0, min_cosine=-1, min_top1_agreement=0).failures(result) == [
        "max abs diff nan > 1", "cosine nan < -1", "top-1 agreement nan < 0"]


# -- option values: the command line ---------------------------------------------------------

BAD_FLAGS = [  # (flags, words in the one error line)
    (["--ratio", "1.5"], "--ratio must be in [0, 1), got 1.5"),
    (["--ratio", "nan"], "--ratio must be a finite number, got nan"),
    (["--ratio", "inf"], "--ratio must be a finite number, got inf"),
    (["--max-abs-diff", "nan"], "--max-abs-diff must be a finite number, got nan"),
    (["--max-abs-diff", "-1"], "--max-abs-diff must be at least 0, got -1"),
    (["--min-cosine", "1.5"], "--min-cosine must be in [-1, 1], got 1.5"),
    (["--min-cosine", "nan"], "--min-cosine must be a finite number, got nan"),
    (["--min-top1-agreement", "2"], "--min-top1-agreement must be in [0, 1], got 2"),
    (["--min-top1-agreement", "-0.1"], "--min-top1-agreement must be in [0, 1], got -0.1"),
    (["--speed-weight", "-1"], "--speed-weight must be at least 0, got -1"),
    (["--speed-weight", "inf"], "--speed-weight must be a finite number, got inf"),
    (["--min-group-width", "0"], "--min-group-width must be at least 1, got 0"),
    (["--groups", "0"], "--groups must be a positive integer or 'auto', got 0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    (["--seed", "4294967296"], "--seed must be an integer in [0, 2**32), got 4294967296"),
    (["--seed", "x"], "--seed must be an integer, got 'x'"),
    (["--input-shape", "x:0,8,10,10"], "--input-shape x:0,8,10,10: dims must be integers of at least 1"),
    (["--input-shape", "x:16777216,8,10,10"], "--input-shape x:16777216,8,10,10: 13421772800 elements"),
    (["--bench", "--threads", "-1"], "--threads must be in [1, 1024], got -1"),
    (["--bench", "--bench-repeats", "0"], "--bench-repeats must be at least 1, got 0"),
    (["--bench", "--bench-min-time", "nan"], "--bench-min-time must be a finite number, got nan"),
    (["--bench", "--bench-batch", "1,0"], "batch sizes must be integers in [1, 4096], got 0"),
    (["--bench", "--bench-batch", "8192"], "batch sizes must be integers in [1, 4096], got 8192"),
    (["--resize", "0"], "--resize must be at least 1, got 0"),
    (["--crop", "-3"], "--crop must be at least 1, got -3"),
    (["--mean", "nan,0,0"], "--mean values must be finite numbers, got nan,0,0"),
    (["--std", "0,1,1"], "--std values must not be 0, got 0,1,1"),
    (["--nm", "2:4", "--nm-method", "sparsegpt"], "--nm-method sparsegpt needs calibration data"),
]


@pytest.mark.parametrize("flags,words", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_optimize_flags_refuse_bad_values(capsys, model_path, tmp_path, flags, words):
    line = cli_error(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), *flags])
    assert words in line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flags,words", [
    (["--max-abs-diff", "nan"], "--max-abs-diff must be a finite number, got nan"),
    (["--min-top1-agreement", "2"], "--min-top1-agreement must be in [0, 1], got 2"),
    (["--min-cosine", "-1.5"], "--min-cosine must be in [-1, 1], got -1.5"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),
    (["--input-shape", "x:0,8,10,10"], "dims must be integers of at least 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_compare_flags_refuse_bad_values(capsys, model_path, flags, words):
    assert words in cli_error(capsys, ["compare", str(model_path), str(model_path), *flags])


@pytest.mark.parametrize("flags,words", [
    (["--batch", "0"], "batch sizes must be integers in [1, 4096], got 0"),
    (["--input-shape", "x:16777216,8,10,10"], "more than the 268435456 (2**28) one input may have"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bench_flags_refuse_bad_values(capsys, model_path, flags, words):
    assert words in cli_error(capsys, ["bench", str(model_path), *flags])


@pytest.mark.parametrize("options,message", BAD_RECOVER, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_recover_flags_refuse_bad_values(capsys, model_path, tmp_path, options, message):
    pytest.importorskip("torch")
    data = save_npz(tmp_path / "d.npz", x=images())
    (name, value), = options.items()
    line = cli_error(capsys, ["recover", str(model_path), str(tmp_path / "o.onnx"), "--teacher", str(model_path),
                              "--data", data, f"--{name.replace('_', '-')}", f"{value:g}"])
    assert re.search(message, line)


def test_good_edge_values_pass_the_cli(capsys, model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(model_path), str(out), "--ratio", "0", "--seed", "0", "--min-cosine", "-1",
                 "--min-top1-agreement", "0", "--speed-weight", "0", "--min-group-width", "1"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert main(["compare", str(model_path), str(out), "--seed", str(2 ** 32 - 1), "--min-top1-agreement", "1",
                 "--max-abs-diff", "1e-4"]) == 0
    assert "PASSED" in capsys.readouterr().out


# -- data ------------------------------------------------------------------------------------

SPECS = [InputSpec("x", [1, 8, 10, 10], np.dtype(np.float32))]


def _nan_images():
    x = images()
    x[1, 2, 3, 4] = np.nan
    return x


BAD_DATA = [  # (arrays of the .npz, words)
    (dict(x=_nan_images()), "the float32 input 'x' holds NaN or infinite values (1 of 3200)"),
    (dict(x=np.full((2, 8, 10, 10), np.inf, np.float32)), "holds NaN or infinite values (1600 of 1600)"),
    (dict(x=np.full((2, 8, 10, 10), 1e300)), "holds NaN or infinite values"),  # inf once float32
    (dict(x=np.zeros((0, 8, 10, 10), np.float32)), "holds no samples"),
    (dict(x=images(), y=np.array([0, 1, -1, 2])), "labels y must be class indices of at least 0, got -1"),
    (dict(x=images(), y=np.array([0, 1, 0.5, 2])), "labels y must be integer class indices, got float64"),
    (dict(x=images(), y=np.array([0, 1, np.nan, 2])), "labels y must be integer class indices"),
    (dict(x=images(), y=np.zeros((4, 1), np.int64)), "labels y have shape [4, 1]; expected one class index"),
    (dict(x=images(), y=np.array(["a", "b", "c", "d"])), "labels y must be integer class indices"),
]


@pytest.mark.parametrize("arrays,words", BAD_DATA, ids=range(len(BAD_DATA)))
def test_bad_data_is_a_one_line_error(capsys, model_path, tmp_path, arrays, words):
    with np.errstate(over="ignore"):
        data = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(GkpError, match=re.escape(words)), np.errstate(over="ignore"):
        load_dataset(data, SPECS)
    with np.errstate(over="ignore"):
        assert words in cli_error(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), "--calib", data])
        assert words in cli_error(capsys, ["compare", str(model_path), str(model_path), "--data", data])


def test_integral_float_labels_are_class_indices(tmp_path):
    data = load_dataset(save_npz(tmp_path / "d.npz", x=images(), y=np.array([0.0, 1.0, 2.0, 1.0])), SPECS)
    assert data.labels.dtype == np.float64 and data.labels.tolist() == [0, 1, 2, 1]


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_npz_is_a_one_line_error(capsys, model_path, tmp_path, cut):
    whole = (tmp_path / "whole.npz")
    np.savez_compressed(whole, x=images(16), y=np.arange(16))
    data = tmp_path / "d.npz"
    data.write_bytes(whole.read_bytes()[:int(cut * whole.stat().st_size)])
    with pytest.raises(GkpError, match="cannot read data file"):
        load_dataset(data, SPECS)
    assert "cannot read data file" in cli_error(capsys, ["compare", str(model_path), str(model_path),
                                                         "--data", str(data)])


def test_a_corrupt_npz_member_is_a_one_line_error(tmp_path):
    whole = tmp_path / "whole.npz"
    np.savez(whole, x=images(16))
    raw = bytearray(whole.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # in the middle of x's data: the CRC no longer matches
    (tmp_path / "d.npz").write_bytes(bytes(raw))
    with pytest.raises(GkpError, match="cannot read data file .*CRC"):
        load_dataset(tmp_path / "d.npz", SPECS)


def test_labels_beyond_the_class_count_are_refused():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    with pytest.raises(GkpError, match="the labels go up to 3, but the model's output 'logits' has 3 classes"):
        fidelity([ref], [ref], ["logits"], Dataset({"x": np.zeros((2, 1))}, labels=np.array([0, 3])))
    assert fidelity([ref], [ref], ["logits"], Dataset({"x": np.zeros((2, 1))}, labels=np.array([0, 2]))) \
        .accuracy_reference == 0.5


def test_random_inputs_are_capped(capsys, tmp_path):
    with pytest.raises(GkpError, match=r"random input 'x' of shape \[16777216, 8, 10, 10\] would have 13421772800 "
                                       r"elements, more than the 268435456"):
        random_dataset([InputSpec("x", [2 ** 24, 8, 10, 10], np.dtype(np.float32))])
    assert len(random_dataset([InputSpec("x", [MAX_ELEMENTS // 64, 64], np.dtype(np.int8))])) == MAX_ELEMENTS // 64
    model = TOPOLOGIES["residual"]()
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 2 ** 24  # a static batch of 2^24: 384 GiB of random float32 for validation
    path = tmp_path / "huge.onnx"
    onnx.save(model, path)
    assert "random input 'x' of shape [16777216, 8, 10, 10]" in cli_error(
        capsys, ["optimize", str(path), str(tmp_path / "o.onnx")])
    assert not (tmp_path / "o.onnx").exists()


def test_random_dataset_and_subsets_check_seed_and_limit(tmp_path):
    with pytest.raises(GkpError, match=r"--seed must be an integer in \[0, 2\*\*32\), got -1"):
        random_dataset(SPECS, seed=-1)
    data = save_npz(tmp_path / "d.npz", x=images())
    with pytest.raises(GkpError, match="--limit must be at least 1, got 0"):
        load_dataset(data, SPECS, limit=0)
    assert len(load_dataset(data, SPECS, limit=2)) == 2


def test_image_spec_values_are_checked():
    from gkp_onnx.images import ImageSpec

    with pytest.raises(GkpError, match="--std values must not be 0, got 1,0,1"):
        ImageSpec(std=(1.0, 0.0, 1.0))
    with pytest.raises(GkpError, match="--mean values must be finite numbers, got 0,inf,0"):
        ImageSpec(mean=(0.0, INF, 0.0))
    with pytest.raises(GkpError, match="--crop must be at least 1, got 0"):
        ImageSpec(crop=0)
    ImageSpec(resize=1, crop=1, mean=np.array([0.5, 0.5, 0.5]), std=(0.25,))


def test_nm_method_is_checked_in_the_api_and_the_cli(capsys, model_path, tmp_path):
    with pytest.raises(GkpError, match="unknown --nm-method 'obs' \\(choose from wanda, sparsegpt\\)"):
        OptimizeOptions(nm="2:4", nm_method="obs").checked()
    line = cli_error(capsys, ["optimize", str(model_path), str(tmp_path / "o.onnx"), "--nm", "2:4",
                              "--nm-method", "obs"])
    assert "--nm-method" in line and "invalid choice" in line
    assert not (tmp_path / "o.onnx").exists()
