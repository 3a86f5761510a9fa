"""Corpus run: does `optimize(model, ratio=0.5)` work, and how fast is its output, across topologies?

    python benchmarks/corpus.py [--only resnet50,mobilenet_v2] [--skip-large] [--ratio 0.5]
                                [--min-time 1.0] [--bench-runs 1] [--threads N] [--out corpus]

The corpus: the 9 model-zoo topologies shipped with the onnx package
(onnx/backend/test/data/light/light_<name>.onnx: bvlc_alexnet, densenet121, inception_v1,
inception_v2, resnet50, shufflenet, squeezenet, vgg19, zfnet512; "light": each weight is a
ConstantOfShape fill of one value, not the trained one) and the models of gkp_onnx.models.export exported with
seeded random weights (mobilenet_v2, mobilenet_v3, resnet50, efficientnet_b0, resnext26 at 224x224;
resnet20 and vgg16 at CIFAR 32x32; unet 256x256; yolo_style 320x320; speech_conv1d, Conv1d over
64 mel bins x 400 frames). Each is passed to `optimize` with the defaults (validation on random inputs on);
the zoo models as file paths, the exports as files in a temporary folder.

Per model: works (yes, or the error in one line), MACs before -> after, Gather nodes left in the
output, the speed-up at batch 1 (gkp_onnx.bench.bench: input and optimized loaded together,
warmed up, timed interleaved for at least --min-time seconds, medians; the optimized row's
speed-up, the median over --bench-runs such runs), the ideal speed-up (MACs before / after), the
share of it the measured one reaches, the fidelity (min cosine over the outputs, random inputs),
and optimize's wall time (loading, passes and validation). --skip-large leaves out the three
zoo models with huge fully connected heads (bvlc_alexnet, vgg19, zfnet512: 30-60 s each).

GKP_ONNX_NCHWC_BLOCK is not set: the kept-channel rounding uses the block onnxruntime CPU uses on
this machine (probed), which is what the timed runs here use too.

Writes benchmarks/results/<out>.json and .md, keeping rows of models this run did not measure
when the settings (ratio, min time, runs, threads) are the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

from gkp_onnx import optimize
from gkp_onnx.bench import bench, describe_provider
from gkp_onnx.cost import nchwc_block_size
from gkp_onnx.models.export import build, export

RESULTS = Path(__file__).parent / "results"
ZOO_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
       "vgg19", "zfnet512"]
EXPORTS = ["mobilenet_v2", "mobilenet_v3", "resnet50", "resnet20", "speech_conv1d", "vgg16", "efficientnet_b0",
           "resnext26", "unet", "yolo_style"]
LARGE = {"zoo/bvlc_alexnet", "zoo/vgg19", "zoo/zfnet512"}
# why a model is expected not to be pruned (shown beside its error)
EXPECTED = {"zoo/shufflenet": "every Conv of this ShuffleNet is grouped (group 4) or depthwise, and its only dense "
                              "Conv is the stem on the 3-channel input, kept dense by default; GKP prunes dense Convs"}


def corpus() -> list[str]:
    return [f"zoo/{name}" for name in ZOO] + [f"export/{name}" for name in EXPORTS]


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def input_path(key: str, tmp: Path) -> Path:
    kind, name = key.split("/")
    if kind == "zoo":
        return ZOO_DIR / f"light_{name}.onnx"
    model, shape = build(name)
    return export(model, shape, tmp / f"{name}.onnx")


def run_one(key: str, tmp: Path, args) -> dict:
    row = {"model": key, "works": None}
    try:
        path = input_path(key, tmp)
    except Exception as exc:  # an export failure is a row too
        row["works"] = "export failed: " + one_line(exc)
        return row
    start = time.perf_counter()
    try:
        optimized, report = optimize(path, ratio=args.ratio)
    except Exception as exc:
        row["works"] = one_line(exc)
        row["optimize_s"] = time.perf_counter() - start
        if key in EXPECTED:
            row["note"] = EXPECTED[key]
        return row
    row["optimize_s"] = time.perf_counter() - start
    row["works"] = "yes" if report.passed else "fidelity failures: " + "; ".join(report.failures)
    row["macs_before"], row["macs_after"] = report.before.macs, report.after.macs
    row["ideal"] = report.before.macs / report.after.macs
    row["pruned_layers"] = len(report.plan.layers)
    row["skipped_layers"] = len(report.plan.skipped)
    row["groups"] = sorted({layer.group_count for layer in report.plan.layers})
    row["gathers"] = sum(node.op_type == "Gather" for node in optimized.graph.node)
    row["gathers_input"] = sum(node.op_type == "Gather" for node in onnx.load(path, load_external_data=False).graph.node)
    row["min_cosine"] = report.fidelity.min_cosine if report.fidelity else None
    row["top1_agreement"] = report.fidelity.top1_agreement if report.fidelity else None
    row["warnings"] = report.warnings
    row["timings_s"] = report.timings
    speedups, timings = [], []
    for _ in range(args.bench_runs):
        rows = bench([str(path), optimized], names=["input", "optimized"], batches=[1], threads=args.threads,
                     min_time_s=args.min_time)
        opt = next(t for t in rows if t.model == "optimized")
        inp = next(t for t in rows if t.model == "input")
        speedups.append(opt.speedup)
        timings.append({"input_ms": inp.median_ms, "optimized_ms": opt.median_ms, "rounds": opt.rounds,
                        "speedup": opt.speedup})
    row["speedup_b1"] = statistics.median(speedups)
    row["speedup_runs"] = speedups
    row["bench"] = timings
    row["share_of_ideal"] = row["speedup_b1"] / row["ideal"]
    return row


def describe(row: dict) -> str:
    if row["works"] != "yes" and "macs_after" not in row:
        return f"{row['model']:<20} {row['works']}"
    runs = ", ".join(f"{s:.2f}" for s in row["speedup_runs"])
    return (f"{row['model']:<20} {row['works']}  MACs {row['macs_after'] / 1e6:.1f}M/{row['macs_before'] / 1e6:.1f}M "
            f"(ideal {row['ideal']:.2f}x)  b1 {row['speedup_b1']:.2f}x [{runs}] ({row['share_of_ideal']:.2f} of ideal)  "
            f"gathers {row['gathers']}  cosine {row['min_cosine']:.4f}  optimize {row['optimize_s']:.1f}s")


def save(rows: list[dict], setting: dict, out: str) -> list[dict]:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{out}.json"
    earlier = json.loads(path.read_text()) if path.exists() else {}
    order = {key: i for i, key in enumerate(corpus())}
    if all(earlier.get(k) == v for k, v in setting.items()):
        new = {r["model"] for r in rows}
        rows = [r for r in earlier.get("rows", []) if r["model"] not in new] + rows
    rows.sort(key=lambda r: order.get(r["model"], len(order)))
    path.write_text(json.dumps({**setting, "rows": rows}, indent=1))
    return rows


def markdown(rows: list[dict], setting: dict) -> str:
    lines = [f"# Corpus: optimize(model, ratio={setting['ratio']:g}) with the defaults", "",
             f"{setting['provider']}; NCHWc block here: {setting['nchwc_block']} (probed; GKP_ONNX_NCHWC_BLOCK unset). "
             f"Speed-up: batch 1, input vs optimized timed interleaved (at least {setting['min_time_s']:g} s of rounds), "
             f"medians; the median of {setting['bench_runs']} such run(s). Ideal = MACs before / after; "
             "share = speed-up / ideal. Cosine: min over the outputs of optimize's validation on random inputs. "
             "Optimize: wall time of the call (load, passes, validation). zoo/: onnx's bundled model-zoo "
             "topologies (light weights); export/: gkp_onnx.models exports with seeded random weights "
             "(resnet20 and vgg16 CIFAR-shaped 32x32, unet 256x256, yolo_style 320x320, speech_conv1d 64 mel "
             "bins x 400 frames, the rest 224x224). The zoo files' weights are ConstantOfShape fills (one value per tensor), so every "
             "kernel of a layer is alike: their cosine says nothing about accuracy, only that the rewrite is exact in structure; with random or constant "
             "weights the cosine is no accuracy figure either way.", "",
             "| model | works | MACs after / before | Gathers | speed-up b1 | ideal | share of ideal | cosine | optimize |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if "macs_after" not in r:
            works = r["works"].replace("|", "\\|")
            if r.get("note"):
                works += f" (not pruned: {r['note']})"
            optimize_s = f"{r['optimize_s']:.1f} s" if "optimize_s" in r else "-"
            lines.append(f"| {r['model']} | {works} | - | - | - | - | - | - | {optimize_s} |")
            continue
        runs = "" if len(r["speedup_runs"]) == 1 else " (" + ", ".join(f"{s:.2f}" for s in r["speedup_runs"]) + ")"
        lines.append(f"| {r['model']} | {r['works']} | {_m(r['macs_after'])} / {_m(r['macs_before'])} "
                     f"({r['macs_after'] / r['macs_before']:.3f}) | {r['gathers']} | {r['speedup_b1']:.2f}x{runs} | "
                     f"{r['ideal']:.2f}x | {r['share_of_ideal']:.2f} | {r['min_cosine']:.4f} | {r['optimize_s']:.1f} s |")
        notes += [f"- {r['model']}: {w}" for w in r.get("warnings", [])]
    if notes:
        lines += ["", "Warnings from the reports:", ""] + notes
    return "\n".join(lines) + "\n"


def _m(macs: int) -> str:
    return f"{macs / 1e9:.2f}G" if macs >= 1e9 else f"{macs / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated models: zoo/NAME, export/NAME, or a bare NAME (both kinds)")
    parser.add_argument("--skip-large", action="store_true", help="leave out " + ", ".join(sorted(LARGE)))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed rounds per bench run, at least")
    parser.add_argument("--bench-runs", type=int, default=1, help="bench runs per model; the median speed-up is reported")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    parser.add_argument("--out", default="corpus", help="results file stem under benchmarks/results")
    args = parser.parse_args(argv)
    keys = corpus()
    if args.only:
        wanted = args.only.split(",")
        keys = [k for k in keys if k in wanted or k.split("/")[1] in wanted]
        unknown = [w for w in wanted if not any(w in (k, k.split("/")[1]) for k in corpus())]
        if unknown:
            parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(corpus())}")
    if args.skip_large:
        keys = [k for k in keys if k not in LARGE]
    setting = {"ratio": args.ratio, "min_time_s": args.min_time, "bench_runs": args.bench_runs,
               "provider": describe_provider("cpu", args.threads), "nchwc_block": nchwc_block_size()}
    print(setting["provider"], f"NCHWc block {setting['nchwc_block']}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            row = run_one(key, Path(tmp), args)
            rows.append(row)
            print(describe(row), flush=True)
            all_rows = save(rows, setting, args.out)  # after every model: a long run leaves what it measured
            (RESULTS / f"{args.out}.md").write_text(markdown(all_rows, setting))
    print(f"\nwrote {RESULTS / (args.out + '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
