"""Latency of GKP-optimized models vs dense and vs classic L1 filter pruning (onnxruntime CPU).

    python benchmarks/latency.py [--threads 2] [--repeats 20] [--min-time 2] [--ratios 0.25,0.4375,0.5,0.75]
                                 [--models resnet56,resnet20,resnet50,vgg16] [--cost-model analytic|measured]

Per model and ratio: GKP with the default pipeline (auto group count, Gathers folded) and L1
filter pruning built from the same passes, timed interleaved with the dense model (bench.py:
warm-up, then A B C A B C ..., medians; at least --repeats rounds, more until they last --min-time
seconds: a 1 ms model needs thousands of calls for a median the machine's noise does not move).
Where GKP gives stream readers the shared form (partition_streams), the same GKP without it
(--no-share-streams) is timed in the same rounds as `gkp-unshared`.
Columns: MAC ratio, ideal speed-up (1 / MAC ratio), measured speed-up, measured / ideal, Gathers
left, and for the CIFAR models the one-shot top-1 on the 500 carried exact-pixel test images (no
recovery). ResNet-56/20 use the real pretrained
weights; ResNet-50 (ImageNet shape) and VGG-16 (CIFAR shape, a plain chain: no residual
stream) random weights. Writes benchmarks/results/latency.json and .md
(--out names them), keeping earlier rows of the same settings that this run did not measure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from gkp_onnx import optimize
from baselines import l1_filter_pruning  # benchmarks/baselines.py, beside this script
from gkp_onnx.bench import bench, describe_provider
from gkp_onnx.cost import nchwc_block_size
from gkp_onnx.demo import IMAGES, WEIGHTS, asset
from gkp_onnx.graph import input_specs, model_stats
from gkp_onnx.models.cifar_resnet import load_akamaster, preprocess
from gkp_onnx.models.export import build, export
from gkp_onnx.validate import Dataset, make_session, run_model

from cifar10 import RESULTS, save_rows, timing_columns

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-resnet-akamaster"
BATCHES = {"resnet56": (1, 64), "resnet20": (1, 64), "resnet50": (1, 8), "vgg16": (1, 64)}


def dense_model(name: str, tmp: Path) -> Path | None:
    if name == "resnet56":
        return export(load_akamaster(name, str(asset(WEIGHTS))), (1, 3, 32, 32), tmp / f"{name}.onnx")
    if name == "resnet20":
        checkpoint = SHARED / "resnet20-12fca82f.th"
        return export(load_akamaster(name, str(checkpoint)), (1, 3, 32, 32), tmp / f"{name}.onnx") \
            if checkpoint.exists() else None
    model, shape = build(name)
    return export(model, shape, tmp / f"{name}.onnx")


def accuracy(model: onnx.ModelProto, data: Dataset) -> float:
    return float((run_model(make_session(model), data)[0].argmax(1) == data.labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed rounds per batch, at least")
    parser.add_argument("--ratios", default="0.25,0.4375,0.5,0.75")
    parser.add_argument("--models", default="resnet56,resnet20,resnet50,vgg16")
    parser.add_argument("--channel-multiple", default="auto",
                        help="GKP's channel rounding: auto (the NCHWc block, the default) or K; L1 stays uniform")
    parser.add_argument("--cost-model", default="analytic", choices=["analytic", "measured"],
                        help="GKP's group-count cost model (measured: timed on this machine, cached)")
    parser.add_argument("--out", default="latency", help="results file stem")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    multiple = args.channel_multiple if args.channel_multiple == "auto" else int(args.channel_multiple)
    images = np.load(asset(IMAGES))
    cifar = Dataset({"input": preprocess(images["x"])}, images["y"], "exact-pixel 500")
    rows = []
    print(describe_provider("cpu", args.threads), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = dense_model(name, Path(tmp))
            if path is None:
                print(f"{name}: weights not found, skipped")
                continue
            dense = onnx.load(path)
            specs = input_specs(dense)
            dense_macs = model_stats(dense, specs).macs
            for ratio in ratios:
                start = time.perf_counter()
                gkp, report = optimize(dense, ratio=ratio, validate=False, channel_multiple=multiple,
                                       cost_model=args.cost_model, bench_threads=args.threads)
                optimize_s = time.perf_counter() - start
                l1, _ = l1_filter_pruning(dense, ratio)
                variants, reports = {"gkp": gkp}, {"gkp": report}
                if any(layer.shared for layer in report.plan.layers):  # the same without the shared form
                    variants["gkp-unshared"], reports["gkp-unshared"] = optimize(
                        dense, ratio=ratio, validate=False, channel_multiple=multiple, cost_model=args.cost_model,
                        bench_threads=args.threads, share_streams=False)
                variants["l1-filter"] = l1
                timings = bench([dense, *variants.values()], names=["dense", *variants], batches=BATCHES[name],
                                threads=args.threads, repeats=args.repeats, min_time_s=args.min_time)
                for label, model in variants.items():
                    plan = reports[label].plan if label in reports else None
                    mac_ratio = model_stats(model, specs).macs / dense_macs
                    row = {"model": name, "ratio": ratio, "variant": label, "mac_ratio": mac_ratio,
                           "ideal": 1 / mac_ratio,
                           "gathers": sum(n.op_type == "Gather" for n in model.graph.node),
                           "pruned_layers": len(plan.layers) if plan else None,
                           "optimize_s": optimize_s if label == "gkp" else None,
                           "groups": sorted({layer.group_count for layer in plan.layers}) if plan else [1],
                           "shared_layers": sum(layer.shared for layer in plan.layers) if plan else 0,
                           **timing_columns(timings, label),
                           "rounds": {str(t.batch): t.rounds for t in timings if t.model == label}}
                    if name in ("resnet56", "resnet20"):
                        row["top1_dense"], row["top1"] = accuracy(dense, cifar), accuracy(model, cifar)
                    rows.append(row)
                    speed = "  ".join(f"b{b} {s:.2f}x ({s * mac_ratio:.2f} of ideal)" for b, s in row["speedup"].items())
                    top1 = f"  top-1 {100 * row['top1']:.1f}%" if "top1" in row else ""
                    print(f"{name:<9} p={ratio:<6} {label:<9} MACs x{mac_ratio:.3f} (ideal {1 / mac_ratio:.2f}x)  "
                          f"{speed}  gathers {row['gathers']}{top1}", flush=True)
    rows = save_rows(args.out, rows, lambda r: (r["model"], r["ratio"], r["variant"]),
                     provider=describe_provider("cpu", args.threads), repeats=args.repeats,
                     channel_multiple=args.channel_multiple, cost_model=args.cost_model)
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, args))


def markdown(rows: list[dict], args) -> str:
    lines = ["# Latency: GKP vs dense vs L1 filter pruning (onnxruntime CPU)", "",
             f"{describe_provider('cpu', args.threads)}, interleaved rounds (at least {args.repeats} and "
             f"{args.min_time:g} s per batch), medians; "
             f"GKP: --channel-multiple {args.channel_multiple} (NCHWc block here: {nchwc_block_size()}), cost model "
             f"{args.cost_model}; L1: uniform ratio per layer. "
             "Speed-up = dense median / variant median; 'of ideal' = speed-up x MAC ratio. "
             "Top-1: one-shot (no recovery) on the 500 carried exact-pixel CIFAR-10 test images.", "",
             "| model | ratio | variant | G | MAC ratio | ideal | speed-up (batch) | of ideal | Gathers | top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = ", ".join(f"{s:.2f}x (b{b})" for b, s in r["speedup"].items())
        share = ", ".join(f"{s * r['mac_ratio']:.2f}" for s in r["speedup"].values())
        top1 = f"{100 * r['top1']:.1f}% (dense {100 * r['top1_dense']:.1f}%)" if "top1" in r else "-"
        groups = ",".join(map(str, r["groups"])) + (f" ({r['shared_layers']} shared)" if r.get("shared_layers") else "")
        lines.append(f"| {r['model']} | {r['ratio']} | {r['variant']} | {groups} | "
                     f"{r['mac_ratio']:.3f} | {r['ideal']:.2f}x | {speed} | {share} | {r['gathers']} | {top1} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
