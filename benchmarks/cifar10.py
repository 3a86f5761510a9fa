"""CIFAR-10 accuracy: GKP vs L1 filter pruning, one-shot and after layer-wise reconstruction.

    python benchmarks/cifar10.py [--models resnet56] [--images 64,256,1024] [--ratio 0.4375]
                                 [--variants gkp-auto,gkp-G8,l1-filter,gkp-auto=L1-MACs] (also gkp-G16)
                                 [--latency]

Real pretrained ResNets and CIFAR-10 from ../shared/data. Top-1 on the 932 exact-pixel test
images (and on the 10k JPEG test set); reconstruction uses unlabeled JPEG test images 932.. (disjoint
from the exact-pixel ones). Conditions: GKP with the default pipeline (auto G), GKP with G = 8,
classic L1 filter pruning (same passes), and auto G at the ratio that brings its MACs down to L1's
("gkp-auto=L1-MACs"; auto G folds more than the ratio alone removes), each one-shot and
reconstructed with each image count. --latency also times each variant beside the dense model
(onnxruntime CPU, 2 threads, batch 1 and 64, interleaved; reconstruction leaves the structure, so
the one-shot models stand for all image counts) into results/cifar10_latency.json and .md.
Distillation fine-tuning (conditions c/d) is benchmarks/cifar10_recover.py. Writes
benchmarks/results/cifar10.json and .md after every row, keeping the rows of other models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from gkp_onnx import optimize
from baselines import l1_filter_pruning  # benchmarks/baselines.py, beside this script
from gkp_onnx.bench import bench, describe_provider
from gkp_onnx.graph import input_specs, model_stats
from gkp_onnx.models.cifar_resnet import load_akamaster, preprocess
from gkp_onnx.models.export import export
from gkp_onnx.validate import Dataset, make_session, run_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).parent / "results"
LATENCY_BATCHES = (1, 64)


def top1(model: onnx.ModelProto, data: Dataset) -> float:
    return float((run_model(make_session(model), data)[0].argmax(1) == data.labels).mean())


def test_sets() -> dict[str, Dataset]:
    """The 932 exact-pixel test images and the 10k JPEG test set, preprocessed, with labels."""
    exact = np.load(SHARED / "cifar10" / "cifar10_test_exact_first932.npz")
    jpeg = np.load(SHARED / "cifar10" / "cifar10_test_jpeg_decoded.npz")
    return {"exact932": Dataset({"input": preprocess(exact["x"])}, exact["y"]),
            "jpeg10k": Dataset({"input": preprocess(jpeg["x"])}, jpeg["y"])}


def dense_model(name: str, tmp: Path) -> onnx.ModelProto:
    """The derived ONNX file when ../shared has one, else exported from the akamaster checkpoint."""
    folder = SHARED / "cifar10-resnet-akamaster"
    derived = folder / "derived_onnx" / f"{name}_cifar10.onnx"
    if derived.exists():
        return onnx.load(derived)
    checkpoint = next(folder.glob(f"{name}-*.th"))
    return onnx.load(export(load_akamaster(name, str(checkpoint)), (1, 3, 32, 32), tmp / f"{name}.onnx"))


def l1_filter(dense: onnx.ModelProto, ratio: float, calib: Dataset | None) -> onnx.ModelProto:
    return l1_filter_pruning(dense, ratio, calib=calib)[0]


def ratio_for_macs(dense: onnx.ModelProto, target: float, steps: int = 10) -> float:
    """The smallest default-pipeline ratio (to 0.9 / 2**steps) whose model has at most `target`
    x the dense MACs, by bisection (MACs fall as the ratio grows; one-shot, the cache makes it cheap)."""
    specs = input_specs(dense)
    dense_macs = model_stats(dense, specs).macs
    low, high = 0.0, 0.9
    for _ in range(steps):
        middle = (low + high) / 2
        macs = model_stats(optimize(dense, ratio=middle, validate=False)[0], specs).macs / dense_macs
        low, high = (middle, high) if macs > target else (low, middle)
    return high


def l1_equal_macs_ratio(dense: onnx.ModelProto, ratio: float) -> float:
    """The default-pipeline ratio whose model has the MACs of L1 filter pruning at `ratio`."""
    specs = input_specs(dense)
    l1_macs = model_stats(l1_filter(dense, ratio, None), specs).macs / model_stats(dense, specs).macs
    return ratio_for_macs(dense, l1_macs)


def timing_columns(timings, label: str) -> dict:
    """The speed-up and median of `label` per batch beside the dense model's median (batch keys as
    JSON stores them)."""
    return {"speedup": {str(t.batch): t.speedup for t in timings if t.model == label},
            "median_ms": {str(t.batch): t.median_ms for t in timings if t.model == label},
            "dense_ms": {str(t.batch): t.median_ms for t in timings if t.model == "dense"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet56")
    parser.add_argument("--images", default="64,256,1024")
    parser.add_argument("--ratio", type=float, default=0.4375)
    parser.add_argument("--variants", default="gkp-auto,gkp-G8,l1-filter,gkp-auto=L1-MACs")
    parser.add_argument("--latency", action="store_true", help="also time the variants against dense")
    args = parser.parse_args()
    methods = args.variants.split(",")
    evaluation = test_sets()
    unlabeled = evaluation["jpeg10k"].inputs["input"]  # reconstruction images: JPEG test images 932..
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            dense = dense_model(name, Path(tmp))
            specs = input_specs(dense)
            dense_macs = model_stats(dense, specs).macs
            rows.append({"model": name, "method": "dense", "images": 0, "mac_ratio": 1.0, "seconds": 0.0,
                         **{k: top1(dense, d) for k, d in evaluation.items()}})
            print(rows[-1], flush=True)
            equal_macs_ratio = l1_equal_macs_ratio(dense, args.ratio) if "gkp-auto=L1-MACs" in methods else None
            one_shot = {}
            for images in [0] + [int(i) for i in args.images.split(",") if i]:
                calib_path = None
                if images:
                    calib_path = Path(tmp) / f"calib{images}.npz"
                    np.savez(calib_path, x=unlabeled[932:932 + images])
                calib = Dataset({"input": unlabeled[932:932 + images]}) if images else None
                def gkp(ratio, groups=None):  # a forced G is the prior art's uniform setting: no channel rounding
                    return lambda: optimize(dense, ratio=ratio, groups=groups, validate=False,
                                            channel_multiple="auto" if groups is None else 1,
                                            calib=calib_path and str(calib_path), reconstruct=bool(images))[0]
                variants = {  # method -> (ratio, build)
                    "gkp-auto": (args.ratio, gkp(args.ratio)),
                    "gkp-G8": (args.ratio, gkp(args.ratio, groups=8)),
                    "gkp-G16": (args.ratio, gkp(args.ratio, groups=16)),
                    "l1-filter": (args.ratio, lambda: l1_filter(dense, args.ratio, calib)),
                    "gkp-auto=L1-MACs": (equal_macs_ratio, gkp(equal_macs_ratio)),
                }
                for method in methods:
                    ratio, build = variants[method]
                    start = time.perf_counter()
                    model = build()
                    seconds = time.perf_counter() - start
                    rows.append({"model": name, "method": method, "ratio": ratio, "images": images,
                                 "seconds": seconds, "mac_ratio": model_stats(model, specs).macs / dense_macs,
                                 **{k: top1(model, d) for k, d in evaluation.items()}})
                    print(rows[-1], flush=True)
                    write(rows, args.ratio)
                    if not images:
                        one_shot[method] = model
            if args.latency:
                time_variants(name, dense, one_shot, rows)


def time_variants(name: str, dense: onnx.ModelProto, models: dict[str, onnx.ModelProto],
                  rows: list[dict]) -> None:
    """Each variant's median latency beside the dense model's, written as cifar10_latency."""
    timings = bench([dense, *models.values()], names=["dense", *models], batches=LATENCY_BATCHES,
                    threads=2, repeats=20, min_time_s=2.0)
    found = []
    for method in models:
        one_shot = next(r for r in rows if r["model"] == name and r["method"] == method and not r["images"])
        found.append({"model": name, "method": method, "mac_ratio": one_shot["mac_ratio"],
                      **timing_columns(timings, method)})
        print(found[-1], flush=True)
    found = save_rows("cifar10_latency", found, lambda r: (r["model"], r["method"]),
                      provider=describe_provider("cpu", 2))
    lines = ["# CIFAR-10 variants: latency beside the dense model", "",
             f"{describe_provider('cpu', 2)}; interleaved rounds (at least 20 and 2 s per batch), medians. "
             "Speed-up = dense median / variant median (reconstruction does not change the structure).", "",
             "| model | method | MAC ratio | " + " | ".join(f"speed-up b{b}" for b in LATENCY_BATCHES) + " |",
             "|---|---|---|" + "---|" * len(LATENCY_BATCHES)]
    for r in found:
        speed = " | ".join(f"{r['speedup'][str(b)]:.2f}x" for b in LATENCY_BATCHES)
        lines.append(f"| {r['model']} | {r['method']} | {r['mac_ratio']:.3f} | {speed} |")
    (RESULTS / "cifar10_latency.md").write_text("\n".join(lines) + "\n")


def save_rows(name: str, rows: list[dict], key, **setting) -> list[dict]:
    """Write RESULTS/<name>.json: this run's rows after the earlier rows of the same setting that it
    did not measure again (so runs of other models or conditions are kept); returns them all."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    new = {key(r) for r in rows}
    if all(earlier.get(k) == v for k, v in setting.items()):
        rows = [r for r in earlier.get("rows", []) if key(r) not in new] + rows
    path.write_text(json.dumps({**setting, "rows": rows}, indent=1))
    return rows


def write(rows: list[dict], ratio: float) -> None:
    rows = save_rows("cifar10", rows, lambda r: (r["model"], r["method"], r["images"]), ratio=ratio)
    lines = ["# CIFAR-10: GKP vs L1 filter pruning, one-shot and reconstructed", "",
             f"Ratio {ratio} (gkp-auto=L1-MACs: the ratio in brackets); top-1 on the 932 exact-pixel test "
             "images and the 10k JPEG test set; reconstruction on unlabeled JPEG test images disjoint from the "
             "exact ones (0 = one-shot). "
             "Published for comparison (after long fine-tuning, not comparable to one-shot): "
             "TMI-GKP ResNet-56 93.78 -> 94.00 (300 epochs); TKP ResNet-56 93.58 -> 91.80.", "",
             "| model | method | images | MAC ratio | top-1 exact | top-1 JPEG 10k | time s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["images"])):
        method = f"{r['method']} ({r['ratio']:.3f})" if r["method"] == "gkp-auto=L1-MACs" else r["method"]
        lines.append(f"| {r['model']} | {method} | {r['images']} | {r['mac_ratio']:.3f} | "
                     f"{100 * r['exact932']:.2f}% | {100 * r['jpeg10k']:.2f}% | {r['seconds']:.1f} |")
    (RESULTS / "cifar10.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
