"""`gkp-onnx demo`: the whole job on a real pretrained model, with nothing to download.

Exports the pretrained CIFAR-10 ResNet-56 carried in gkp_onnx/assets to ONNX and optimizes it
twice with the default pipeline: one-shot (data-free), and with layer-wise reconstruction on the
first 200 carried CIFAR-10 test images (labels unused). Both are validated on the other 300
images (exact pixels, disjoint from the calibration images): accuracy, fidelity, per-layer report;
then the dense and the optimized model are timed side by side on onnxruntime CPU (batch 1 and 64).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from gkp_onnx.errors import GkpError
from gkp_onnx.model_io import save_model

WEIGHTS = "resnet56-4bfd9763.th"
IMAGES = "cifar10_test_exact_first500.npz"


def asset(name: str) -> Path:
    return Path(str(resources.files("gkp_onnx") / "assets" / name))


CALIBRATION_IMAGES = 200
BENCH_BATCHES = (1, 64)


def prepare(out_dir: Path) -> tuple[Path, Path, Path]:
    """Write the dense ResNet-56 ONNX, the calibration and the evaluation data into out_dir."""
    from gkp_onnx.models.cifar_resnet import load_akamaster, preprocess
    from gkp_onnx.models.export import export

    model_path = out_dir / "resnet56.onnx"
    calib_path, eval_path = out_dir / "cifar10_calib200.npz", out_dir / "cifar10_eval300.npz"
    export(load_akamaster("resnet56", str(asset(WEIGHTS))), (1, 3, 32, 32), model_path)
    images = np.load(asset(IMAGES))
    x = preprocess(images["x"])
    np.savez(calib_path, x=x[:CALIBRATION_IMAGES])
    np.savez(eval_path, x=x[CALIBRATION_IMAGES:], y=images["y"][CALIBRATION_IMAGES:])
    return model_path, calib_path, eval_path


def run_demo(out_dir: str = "gkp-demo", bench_min_time_s: float = 1.0, **options) -> int:
    from gkp_onnx.bench import bench
    from gkp_onnx.validate import compare, load_dataset
    from gkp_onnx.graph import input_specs
    from gkp_onnx.model_io import load_model
    from gkp_onnx.api import optimize

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GkpError(f"cannot create demo directory {out}: {exc.strerror}") from None
    print(f"demo: exporting the pretrained CIFAR-10 ResNet-56 to {out}/resnet56.onnx")
    model_path, calib_path, eval_path = prepare(out)
    options.setdefault("ratio", 0.4375)
    one_shot, _ = optimize(model_path, validate=False, **options)
    print(f"demo: optimizing with layer-wise reconstruction on {CALIBRATION_IMAGES} unlabeled images ...", flush=True)
    optimized, report = optimize(model_path, calib=str(calib_path), reconstruct=True, validate=False, **options)
    dense = load_model(model_path)
    evaluation = load_dataset(eval_path, input_specs(dense))
    report.fidelity = compare(dense, optimized, evaluation)
    one_shot_accuracy = compare(dense, one_shot, evaluation).accuracy_candidate
    print("demo: timing dense and optimized side by side (onnxruntime CPU) ...", flush=True)
    report.latency = bench([dense, optimized], names=["input", "optimized"], batches=BENCH_BATCHES,
                           min_time_s=bench_min_time_s)
    optimized_path = save_model(optimized, out / "resnet56.gkp.onnx")
    report.save(out / "report.json")
    print(report.table())
    fidelity = report.fidelity
    print(f"\ntop-1 on {fidelity.samples} exact-pixel CIFAR-10 test images (not used for calibration): "
          f"dense {100 * fidelity.accuracy_reference:.2f}% -> one-shot {100 * one_shot_accuracy:.2f}% "
          f"-> reconstructed {100 * fidelity.accuracy_candidate:.2f}%")
    speed = ", ".join(f"{t.speedup:.2f}x at batch {t.batch}" for t in report.latency if t.model == "optimized")
    print(f"MACs x{report.after.macs / report.before.macs:.3f}; measured speed-up over dense on this machine: {speed}")
    print(f"wrote {optimized_path} and {out / 'report.json'}; time them again with:\n"
          f"  gkp-onnx bench {model_path} {optimized_path} --batch {','.join(map(str, BENCH_BATCHES))}")
    return 0
