"""The gkp-onnx command line: parses arguments and calls the library; no algorithm lives here."""

from __future__ import annotations

import argparse
import logging
import sys

from gkp_onnx.errors import GkpError


def _input_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:D0,D1,... with positive dims, got {text!r}")
    return name, shape


def _groups(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def _add_shapes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", type=_input_shape, default=[], metavar="NAME:D0,D1,..",
                        help="concrete shape for an input with dynamic dims (repeatable); "
                             "a dynamic batch dim defaults to 1")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.485,0.456,0.406, got {text!r}") from None


def _add_images(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image folders (DIR/<class>/<image> as data: preprocessing)")
    group.add_argument("--resize", type=int, metavar="PX", help="resize the shorter side to PX (default: --crop)")
    group.add_argument("--crop", type=int, metavar="PX", help="centre crop PX x PX (default: the model's input size)")
    group.add_argument("--mean", type=_floats, default=(0.0, 0.0, 0.0), metavar="R,G,B",
                       help="subtracted after scaling pixels to [0, 1] (default 0)")
    group.add_argument("--std", type=_floats, default=(1.0, 1.0, 1.0), metavar="R,G,B",
                       help="divided by after subtracting the mean (default 1)")
    group.add_argument("--bgr", action="store_true", help="the model takes BGR channel order")


def _images(args: argparse.Namespace):
    from gkp_onnx.images import ImageSpec

    return ImageSpec(args.resize, args.crop, args.mean, args.std, args.bgr)


def _add_thresholds(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fidelity thresholds (exit code 1 when missed)")
    group.add_argument("--max-abs-diff", type=float)
    group.add_argument("--min-cosine", type=float)
    group.add_argument("--min-top1-agreement", type=float, help="fraction in [0, 1]")


def _add_pruning(parser: argparse.ArgumentParser) -> None:
    from gkp_onnx.cost import DEFAULT_SPEED_WEIGHT
    from gkp_onnx.scoring import SELECTION_METHODS

    group = parser.add_argument_group("pruning")
    group.add_argument("--ratio", type=float, default=0.4375,
                       help="share of input channels each filter group drops, in [0, 1) (default 0.4375)")
    group.add_argument("--groups", type=_groups, default=None, metavar="auto|N",
                       help="group count for every layer, or 'auto' to choose per layer (default)")
    group.add_argument("--method", default="leanflex", choices=SELECTION_METHODS,
                       help="kernel selection: leanflex (default), l2, random, or the prior art tmi (TMI-GKP), "
                            "sr (SR-GKP, also groups filters by smoothness)")
    group.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                       help="leave Convs whose node or weight name matches dense (repeatable)")
    group.add_argument("--include-stem", action="store_true", help="also prune the stem Conv")
    group.add_argument("--min-group-width", type=int, default=8,
                       help="smallest output channels per group considered by auto (default 8)")
    group.add_argument("--speed-weight", type=float, default=DEFAULT_SPEED_WEIGHT,
                       help=f"weight of estimated latency vs kept importance in the auto choice "
                            f"(default {DEFAULT_SPEED_WEIGHT})")
    group.add_argument("--cost-model", choices=["analytic", "measured"], default="analytic",
                       help="latency estimate for the auto group count: analytic (onnxruntime-CPU rules) or "
                            "measured (micro-benchmarks on this machine and provider, cached on disk)")
    group.add_argument("--channel-multiple", type=_multiple, default="auto", metavar="K|auto",
                       help="from K channels up, keep a multiple of K per layer (1: no rounding; auto, the "
                            "default: onnxruntime CPU's NCHWc block, 16 with AVX512, 8 with AVX2); the ratio "
                            "holds over the model, not per layer")
    group.add_argument("--no-share-streams", dest="share_streams", action="store_false",
                       help="auto: do not offer Convs reading a residual stream or fan-out tensor the shared "
                            "channel partition (G = Ci / n, no Gather; the stream's channels are reordered)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-gkp", dest="gkp", action="store_false", help="skip Grouped Kernel Pruning")
    group.add_argument("--no-cache", dest="cache", action="store_false",
                       help="recompute the filter clustering instead of reusing it from $GKP_ONNX_CACHE "
                            "or ~/.cache/gkp-onnx")
    nm = parser.add_argument_group("N:M sparsity (MatMul/Gemm weights; TensorRT sparse tensor cores)")
    nm.add_argument("--nm", metavar="N:M", help="keep N of every M weights along the reduction axis, e.g. 2:4")
    nm.add_argument("--nm-conv", action="store_true", help="also sparsify Conv weights (input-channel axis)")
    nm.add_argument("--nm-include-head", action="store_true",
                    help="also sparsify the layer producing a graph output (classifier / LM head)")
    nm.add_argument("--no-nm-permute", dest="nm_permute", action="store_false",
                    help="skip the channel-permutation search")


def _options(args: argparse.Namespace) -> dict:
    from gkp_onnx.validate import Thresholds

    return dict(ratio=args.ratio, groups=args.groups, method=args.method, exclude=args.exclude,
                include_stem=args.include_stem, min_group_width=args.min_group_width,
                channel_multiple=args.channel_multiple, cost_model=args.cost_model,
                speed_weight=args.speed_weight, share_streams=args.share_streams, seed=args.seed, gkp=args.gkp,
                cache=args.cache, nm=args.nm, nm_conv=args.nm_conv,
                nm_include_head=args.nm_include_head, nm_permute=args.nm_permute,
                input_shapes=dict(getattr(args, "input_shape", [])),
                thresholds=Thresholds(getattr(args, "max_abs_diff", None), getattr(args, "min_cosine", None),
                                      getattr(args, "min_top1_agreement", None)))


def cmd_optimize(args: argparse.Namespace) -> int:
    from gkp_onnx.model_io import check_output_path, save_model
    from gkp_onnx.api import optimize

    out = check_output_path(args.input, args.output)
    bench = dict(bench_batches=args.bench_batch, bench_providers=args.providers, bench_threads=args.threads,
                 bench_repeats=args.bench_repeats, bench_min_time_s=args.bench_min_time) if args.bench else {}
    optimized, report = optimize(args.input, calib=args.calib, images=_images(args), plan=args.plan,
                                 reconstruct=args.reconstruct, **bench, **_options(args))
    save_model(optimized, out)
    if args.report:
        report.save(args.report)
    if args.save_plan:
        report.plan.save(args.save_plan)
    print(report.table())
    print(f"wrote {out}")
    return 0 if report.passed else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from gkp_onnx.inspect import inspect_model

    print(inspect_model(args.model, dict(args.input_shape), include_stem=args.include_stem, nm=args.nm))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gkp_onnx.graph import input_specs
    from gkp_onnx.model_io import load_model
    from gkp_onnx.validate import RANDOM_BATCH, Thresholds, compare, load_dataset, random_dataset

    reference, candidate = load_model(args.reference), load_model(args.candidate)
    specs = input_specs(reference, dict(args.input_shape))
    data = load_dataset(args.data, specs, images=_images(args)) if args.data \
        else random_dataset(specs, args.seed, RANDOM_BATCH)
    result = compare(reference, candidate, data)
    _print_fidelity(result)
    failures = Thresholds(args.max_abs_diff, args.min_cosine, args.min_top1_agreement).failures(result)
    print("PASSED" if not failures else "FAILED: " + "; ".join(failures))
    return 0 if not failures else 1


def _print_fidelity(result) -> None:
    for output in result.outputs:
        top1 = f"  top-1 agreement {100 * output.top1_agreement:.2f}%" if output.top1_agreement is not None else ""
        print(f"{output.name}: max|diff| {output.max_abs_diff:.4g}  mean|diff| {output.mean_abs_diff:.4g}  "
              f"cosine {output.cosine:.6f}{top1}")
    if result.accuracy_reference is not None:
        print(f"accuracy: {100 * result.accuracy_reference:.2f}% -> {100 * result.accuracy_candidate:.2f}% "
              f"({result.samples} samples)")


def cmd_recover(args: argparse.Namespace) -> int:
    from gkp_onnx.graph import input_specs
    from gkp_onnx.model_io import check_output_path, load_model, save_model
    from gkp_onnx.recover import RecoverOptions, recover
    from gkp_onnx.validate import compare, load_dataset

    out = check_output_path(args.pruned, args.output)
    check_output_path(args.teacher, args.output)
    options = RecoverOptions(epochs=args.epochs, lr=args.lr, batch=args.batch, weight_decay=args.weight_decay,
                             temperature=args.temperature, labels=args.labels, augment=args.augment,
                             device=args.device, seed=args.seed, checkpoint=args.checkpoint,
                             checkpoint_every=args.checkpoint_every, max_steps=args.max_steps)
    pruned, teacher = load_model(args.pruned), load_model(args.teacher)
    specs = input_specs(teacher, dict(args.input_shape))
    data = load_dataset(args.data, specs, images=_images(args), limit=args.limit, seed=args.seed)
    evaluation = load_dataset(args.eval, specs, images=_images(args)) if args.eval else None
    if evaluation is not None:
        print("before recovery:")
        _print_fidelity(compare(teacher, pruned, evaluation))
    recovered, report = recover(pruned, teacher, data, options)
    print(report.summary())
    if evaluation is not None:
        print("after recovery:")
        _print_fidelity(compare(teacher, recovered, evaluation))
    save_model(recovered, out)
    print(f"wrote {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from gkp_onnx.bench import bench, format_timings, timings_to_dict

    timings = bench(args.models, batches=args.batch, providers=args.providers, threads=args.threads,
                    input_shapes=dict(args.input_shape), warmup=args.warmup, repeats=args.repeats,
                    min_time_s=args.min_time)
    print(format_timings(timings, args.threads))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(timings_to_dict(timings), handle, indent=1)
    return 0


def _multiple(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return int(text)


def _batches(text: str) -> list[int]:
    try:
        values = [int(b) for b in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 1,8,64, got {text!r}")
    return values


def cmd_demo(args: argparse.Namespace) -> int:
    from gkp_onnx.demo import run_demo

    return run_demo(args.out_dir, **_options(args))


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit code 2), like every other bad input; -h shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gkp-onnx", description="Grouped Kernel Pruning compiler for ONNX models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="prune an ONNX model and validate the result")
    p.add_argument("input")
    p.add_argument("output")
    _add_pruning(p)
    _add_shapes(p)
    p.add_argument("--calib", metavar="DATA.npz|DIR", help="inputs (and labels) to validate on; else random inputs")
    p.add_argument("--reconstruct", action="store_true",
                   help="refit the kept kernels (and N:M-kept weights) layer by layer on the --calib inputs "
                        "(no labels needed)")
    p.add_argument("--report", metavar="REPORT.json", help="write the report (with the plan) as JSON")
    p.add_argument("--save-plan", metavar="PLAN.json", help="write the per-layer plan for replay")
    p.add_argument("--plan", metavar="PLAN.json", help="replay a saved plan instead of analysing")
    _add_thresholds(p)
    _add_images(p)
    group = p.add_argument_group("latency (--bench: measure input vs optimized with onnxruntime)")
    group.add_argument("--bench", action="store_true")
    group.add_argument("--bench-batch", type=_batches, default=[1], metavar="B1,B2,..")
    group.add_argument("--bench-repeats", type=int, default=30)
    group.add_argument("--bench-min-time", type=float, default=1.0, metavar="S",
                       help="more rounds until the timed ones last at least S seconds per batch (default 1)")
    group.add_argument("--providers", nargs="+", default=["cpu"], choices=["cpu", "cuda"])
    group.add_argument("--threads", type=int, help="onnxruntime intra-op threads (CPU)")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("inspect", help="per-layer table: op, shapes, MACs, params, prunable or why not")
    p.add_argument("model")
    p.add_argument("--include-stem", action="store_true")
    p.add_argument("--nm", default="2:4", metavar="N:M", help="pattern to check weights against (default 2:4)")
    _add_shapes(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compare", help="fidelity of a candidate model against a reference")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--data", metavar="DATA.npz|DIR", help="inputs (and labels y); else seeded random inputs")
    p.add_argument("--seed", type=int, default=0)
    _add_shapes(p)
    _add_thresholds(p)
    _add_images(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("recover", help="distillation fine-tuning of a pruned model against the original")
    p.add_argument("pruned")
    p.add_argument("output")
    p.add_argument("--teacher", required=True, metavar="ORIGINAL.onnx")
    p.add_argument("--data", required=True, metavar="DATA.npz|DIR", help="training inputs (.npz or image folder)")
    p.add_argument("--labels", action="store_true", help="add cross-entropy on the data's labels")
    p.add_argument("--limit", type=int, metavar="N", help="train on a seeded random subset of N samples")
    p.add_argument("--eval", metavar="DATA.npz|DIR", help="report fidelity/accuracy before and after on this data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, cosine decay (default 1e-4)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (default 4)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop/flip of image inputs")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", metavar="DIR", help="save progress here; a rerun resumes from it")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps (resume later with --checkpoint)")
    _add_shapes(p)
    _add_images(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("bench", help="latency of models side by side (interleaved, median and p90)")
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=_batches, default=[1], metavar="B1,B2,..")
    p.add_argument("--providers", nargs="+", default=["cpu"], choices=["cpu", "cuda"],
                   help="onnxruntime providers; cuda runs with cudnn_conv_algo_search=EXHAUSTIVE")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (CPU)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30, help="timed rounds, at least (default 30)")
    p.add_argument("--min-time", type=float, default=1.0, metavar="S",
                   help="more rounds until the timed ones last at least S seconds per batch (default 1)")
    p.add_argument("--json", metavar="OUT.json", help="also write the timings as JSON")
    _add_shapes(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="optimize the built-in pretrained CIFAR-10 ResNet-56 and report")
    p.add_argument("--out-dir", default="gkp-demo")
    _add_pruning(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # graph-optimizer warnings are noise on a terminal
    try:
        return args.func(args)
    except GkpError as exc:
        print(f"gkp-onnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gkp-onnx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"gkp-onnx: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
