"""--target-speedup on a real CNN: per-layer ratios from measured damage vs one uniform --ratio.

    python benchmarks/conv_budget.py [--model resnet56] [--targets 1.25,1.5,2] [--ratios 0.25,0.4375,0.55]
                                     [--l1 0.2,0.3,0.4] [--images 1024] [--batch 64]

The real pretrained CIFAR-10 ResNet from ../shared/data; calibration: --images unlabeled JPEG test
images 932.. (disjoint from the 932 exact-pixel test images top-1 is measured on; the 10k JPEG
test set is the second top-1 column). Every variant is reconstructed on the same images:
- budget X: `sweep(targets, calib, reconstruct=True, bench_batches=[batch])` (one damage analysis,
  each target allocated and timed against the dense model by the budget itself);
- uniform R: `optimize(ratio=R, calib, reconstruct=True)` (the default auto group count);
- L1 R: classic L1-norm filter pruning at ratio R (benchmarks/baselines.py; kept filters rounded to
  onnxruntime's NCHWc block, as GKP's are), refit on the same images.
Then all models are timed together against the dense one (onnxruntime CPU, interleaved, medians,
at batch 1 and --batch), so the speed-ups of the table come from one run. Writes
benchmarks/results/conv_budget.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from baselines import l1_filter_pruning  # noqa: E402  (beside this script)
from cifar10 import dense_model, test_sets, top1  # noqa: E402

from gkp_onnx import optimize  # noqa: E402
from gkp_onnx.api import sweep  # noqa: E402
from gkp_onnx.bench import bench, describe_provider  # noqa: E402
from gkp_onnx.cost import nchwc_block_size  # noqa: E402
from gkp_onnx.graph import input_specs, model_stats  # noqa: E402
from gkp_onnx.validate import Dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--targets", default="1.25,1.5,2")
    parser.add_argument("--ratios", default="0.25,0.4375,0.55")
    parser.add_argument("--l1", default="0.2,0.3,0.4", help="L1 filter-pruning ratios")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    evaluation = test_sets()
    with tempfile.TemporaryDirectory() as tmp:
        dense = dense_model(args.model, Path(tmp))
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, x=evaluation["jpeg10k"].inputs["input"][932:932 + args.images])
        specs = input_specs(dense)
        macs = model_stats(dense, specs).macs
        variants = {}  # label -> (model, seconds, what the budget measured)
        start = time.perf_counter()
        targets = [float(t) for t in args.targets.split(",")]
        results = sweep(dense, targets, calib=str(calib), reconstruct=True, bench_batches=[args.batch],
                        validate=False)
        seconds = (time.perf_counter() - start) / len(targets)
        for target, (model, report) in zip(targets, results):
            variants[f"budget {target:g}x"] = (model, seconds, report.structured_budget)
        for ratio in (float(r) for r in args.ratios.split(",")):
            start = time.perf_counter()
            model, _ = optimize(dense, ratio=ratio, calib=str(calib), reconstruct=True, validate=False)
            variants[f"uniform {ratio:g}"] = (model, time.perf_counter() - start, None)
        images = Dataset({"input": evaluation["jpeg10k"].inputs["input"][932:932 + args.images]})
        for ratio in (float(r) for r in args.l1.split(",") if r):
            start = time.perf_counter()
            model, _ = l1_filter_pruning(dense, ratio, channel_multiple=nchwc_block_size(), calib=images)
            variants[f"L1 {ratio:g}"] = (model, time.perf_counter() - start, None)
        labels = ["dense", *variants]
        timings = bench([dense] + [v[0] for v in variants.values()], names=labels, batches=[1, args.batch],
                        min_time_s=2.0)
        rows = []
        for label, model in zip(labels, [dense] + [v[0] for v in variants.values()]):
            budget = variants[label][2] if label in variants else None
            rows.append({
                "variant": label, "macs": model_stats(model, specs).macs / macs,
                "speedup": {str(t.batch): t.speedup for t in timings if t.model == label},
                **{name: top1(model, data) for name, data in evaluation.items()},
                "seconds": variants[label][1] if label in variants else 0.0,
                "budget_measured": budget and budget["speedup"], "budget_met": budget and budget["met"]})
            print(rows[-1], flush=True)
    setting = {"model": args.model, "images": args.images, "batch": args.batch, "provider": describe_provider("cpu", None)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "conv_budget.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))
    lines = [f"# --target-speedup on {args.model} (CIFAR-10, real weights) vs a uniform --ratio and L1 filter "
             f"pruning", "",
             f"{setting['provider']}. Calibration: {args.images} unlabeled JPEG test images 932.., every variant "
             f"reconstructed on them. Speed-ups: all models timed together against the dense one, interleaved "
             f"medians. Budget rows: one `sweep` (one damage analysis), each target timed by the budget itself "
             f"at batch {args.batch} (its own measurement in 'budget measured'). Top-1: the 932 exact-pixel test "
             f"images and the 10k JPEG test set.", "",
             f"| variant | MACs | speed-up b1 | speed-up b{args.batch} | top-1 exact932 | top-1 jpeg10k | "
             f"budget measured | optimize s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        measured = f"{row['budget_measured']:.2f}x {'met' if row['budget_met'] else 'missed'}" \
            if row["budget_measured"] else "-"
        lines.append(f"| {row['variant']} | x{row['macs']:.3f} | {row['speedup'].get('1', 1.0):.2f}x | "
                     f"{row['speedup'].get(str(args.batch), 1.0):.2f}x | {100 * row['exact932']:.1f}% | "
                     f"{100 * row['jpeg10k']:.1f}% | {measured} | {row['seconds']:.0f} |")
    (RESULTS / "conv_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
