"""gkp-onnx bench: latency of models side by side (interleaved rounds, median and p90)."""

from __future__ import annotations

import argparse

from gkp_onnx.cli import args as shared


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency of models side by side (interleaved, median and p90)")
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=shared.batches, default=[1], metavar="B1,B2,..")
    p.add_argument("--providers", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
                   help="onnxruntime providers; cuda runs with cudnn_conv_algo_search=EXHAUSTIVE")
    p.add_argument("--threads", type=shared.option("bench_threads"), help="onnxruntime intra-op threads (CPU)")
    p.add_argument("--warmup", type=shared.option("warmup"), default=5)
    p.add_argument("--repeats", type=shared.option("repeats"), default=30, help="timed rounds, at least (default 30)")
    p.add_argument("--min-time", type=shared.option("min_time"), default=1.0, metavar="S",
                   help="more rounds until the timed ones last at least S seconds per batch (default 1)")
    p.add_argument("--json", metavar="OUT.json", help="also write the timings as JSON")
    shared.add_shapes(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from gkp_onnx.bench import bench, format_timings, timings_to_dict
    from gkp_onnx.outputs import Outputs

    with Outputs() as outputs:
        for model in args.models:
            outputs.read_model(model, f"model {model}")
        json_path = outputs.add(args.json, "--json")
        timings = bench(args.models, batches=args.batch, providers=args.providers, threads=args.threads,
                        input_shapes=dict(args.input_shape), warmup=args.warmup, repeats=args.repeats,
                        min_time_s=args.min_time)
        print(format_timings(timings, args.threads))
        outputs.stage(json_path, lambda path: path.write_text(json.dumps(timings_to_dict(timings), indent=1)))
    return 0
