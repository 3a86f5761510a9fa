"""gkp-onnx optimize: prune a model, validate it, write it (and the report and plan)."""

from __future__ import annotations

import argparse

from gkp_onnx.cli import args as shared
from gkp_onnx.options import DEFAULTS

ONE_SHOT_RISK = 0.25  # from this ratio up, one-shot pruning is known to destroy accuracy
BENCH_FIELDS = ("bench_batches", "bench_repeats", "bench_min_time_s", "bench_providers", "bench_threads")


def register(sub) -> None:
    p = sub.add_parser("optimize", help="prune an ONNX model and validate the result")
    p.add_argument("input")
    p.add_argument("output")
    shared.add_pruning(p)
    shared.add_shapes(p)
    p.add_argument("--calib", metavar="DATA.npz|DIR", help="inputs (and labels) to validate on; else random inputs")
    p.add_argument("--reconstruct", action="store_true",
                   help="refit the kept kernels (and N:M-kept weights) layer by layer on the --calib inputs "
                        "(no labels needed)")
    p.add_argument("--report", metavar="REPORT.json", help="write the report (with the plan) as JSON")
    p.add_argument("--save-plan", metavar="PLAN.json", help="write the per-layer plan for replay")
    p.add_argument("--plan", metavar="PLAN.json", help="replay a saved plan instead of analysing")
    shared.add_thresholds(p)
    shared.add_images(p)
    group = p.add_argument_group("latency (--bench: measure input vs optimized with onnxruntime)")
    group.add_argument("--bench", action="store_true")
    group.add_argument("--bench-batch", dest="bench_batches", type=shared.batches, default=[1], metavar="B1,B2,..")
    group.add_argument("--bench-repeats", type=int, default=DEFAULTS.bench_repeats)
    group.add_argument("--bench-min-time", dest="bench_min_time_s", type=float, default=DEFAULTS.bench_min_time_s,
                       metavar="S", help=f"more rounds until the timed ones last at least S seconds per batch "
                                         f"(default {DEFAULTS.bench_min_time_s:g})")
    group.add_argument("--providers", dest="bench_providers", nargs="+", default=DEFAULTS.bench_providers,
                       choices=["cpu", "cuda"])
    group.add_argument("--threads", dest="bench_threads", type=int, help="onnxruntime intra-op threads (CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gkp_onnx.api import optimize
    from gkp_onnx.model_io import write_model
    from gkp_onnx.outputs import Outputs
    from gkp_onnx.streaming import streaming_writer

    with Outputs() as outputs:  # checked before any work, written together at the end
        outputs.read_model(args.input)
        outputs.read(args.calib, "--calib data")
        outputs.read(args.plan, "--plan")
        out = outputs.add(args.output, "output", model=True)
        report_path = outputs.add(args.report, "--report")
        plan_path = outputs.add(args.save_plan, "--save-plan")
        options = shared.optimize_options(args)
        if not args.bench:  # without --bench the guard measures nothing; --target-speedup times with these flags
            for name in BENCH_FIELDS if options.get("target_speedup") is None else ("bench_batches",):
                del options[name]
        if not args.calib and options["gkp"] and options["ratio"] >= ONE_SHOT_RISK and not args.plan:
            print(f"note: without --calib data, pruning at ratio {options['ratio']:g} is one-shot: accuracy usually "
                  f"falls far (the CIFAR ResNets keep ~20% top-1 at 0.4375); --calib DATA --reconstruct "
                  f"recovers most of it", flush=True)
        stream = streaming_writer(args.input, images=shared.images(args), **options)
        if stream is not None:  # a model larger than memory, weight by weight
            reports = []
            outputs.stage(out, lambda path: reports.append(stream(path)))
            report = reports[0]
        else:
            optimized, report = optimize(args.input, images=shared.images(args), **options)
            outputs.stage(out, lambda path: write_model(optimized, path))
        outputs.stage(report_path, report.save)
        outputs.stage(plan_path, report.plan.save)
    print(report.table())
    print(f"wrote {out}")
    return 0 if report.passed else 1
