"""Argument groups the subcommands share (a flag means the same thing everywhere), the value
parsers, and the mapping from parsed arguments to the library's options. Defaults come from
gkp_onnx.options, where they are written once, and so do the checks: a value parser applies the
option's rule, so a bad value is a usage error with the words the library would use."""

from __future__ import annotations

import argparse
import functools
from dataclasses import fields

from gkp_onnx.errors import GkpError
from gkp_onnx.options import (COST_MODELS, DEFAULT_SPEED_WEIGHT, DEFAULTS, NM_METHODS, RULES, SELECTION_METHODS,
                              OptimizeOptions, Thresholds, check, check_batches, check_floats, check_shape, flag)


def _usage(convert):
    """A value parser whose GkpError (the option's rule) becomes argparse's usage error."""
    @functools.wraps(convert)
    def parse(text: str):
        try:
            return convert(text)
        except GkpError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def option(name: str, parse=None):
    """The value parser of option `name`: int or float (after its rule), then the rule's check."""
    parse = parse or (int if RULES[name].integer else float)

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag(name)} must be "
                                             f"{'an integer' if parse is int else 'a number'}, got {text!r}") from None
        return check(name, value)

    convert.__name__ = name  # argparse names the parser in some messages
    return _usage(convert)


@_usage
def input_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape:
        raise argparse.ArgumentTypeError(f"expected NAME:D0,D1,... with positive dims, got {text!r}")
    return name, check_shape(name, shape)


@_usage
def group_count(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None
    return check("groups", value)


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.485,0.456,0.406, got {text!r}") from None


def channel_values(name: str, nonzero: bool = False):
    """The parser of --mean / --std: comma-separated finite numbers (not 0 with `nonzero`)."""

    def convert(text: str) -> tuple[float, ...]:
        return check_floats(name, floats(text), nonzero)

    convert.__name__ = name
    return _usage(convert)


def multiple(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return int(text)


@_usage
def batches(text: str) -> list[int]:
    try:
        values = [int(b) for b in text.split(",")]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes like 1,8,64, got {text!r}")
    return check_batches(values, name=None)  # shared by --bench-batch and bench --batch: argparse names the flag


def add_shapes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", action="append", type=input_shape, default=[], metavar="NAME:D0,D1,..",
                        help="concrete shape for an input with dynamic dims (repeatable); "
                             "a dynamic batch dim defaults to 1")


def add_images(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("image folders (DIR/<class>/<image> as data: preprocessing)")
    group.add_argument("--resize", type=option("resize"), metavar="PX",
                       help="resize the shorter side to PX (default: --crop)")
    group.add_argument("--crop", type=option("crop"), metavar="PX",
                       help="centre crop PX x PX (default: the model's input size)")
    group.add_argument("--mean", type=channel_values("mean"), default=(0.0, 0.0, 0.0), metavar="R,G,B",
                       help="subtracted after scaling pixels to [0, 1] (default 0)")
    group.add_argument("--std", type=channel_values("std", nonzero=True), default=(1.0, 1.0, 1.0), metavar="R,G,B",
                       help="divided by after subtracting the mean (default 1)")
    group.add_argument("--bgr", action="store_true", help="the model takes BGR channel order")


def images(args: argparse.Namespace):
    from gkp_onnx.images import ImageSpec

    return ImageSpec(args.resize, args.crop, args.mean, args.std, args.bgr)


def add_thresholds(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fidelity thresholds (exit code 1 when missed)")
    group.add_argument("--max-abs-diff", type=option("max_abs_diff"), help="at least 0")
    group.add_argument("--min-cosine", type=option("min_cosine"),
                       help="in [-1, 1]; with --nm also the budget: layers whose N:M sparsity would take the "
                            "cosine below it stay dense")
    group.add_argument("--min-top1-agreement", type=option("min_top1_agreement"), help="fraction in [0, 1]")


def thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(getattr(args, "max_abs_diff", None), getattr(args, "min_cosine", None),
                      getattr(args, "min_top1_agreement", None))


def add_pruning(parser: argparse.ArgumentParser, structured: bool = True) -> None:
    """The options of `optimize` that choose what is pruned (optimize and demo; sweep, which chooses
    the heads and neurons itself, without `structured`)."""
    group = parser.add_argument_group("pruning")
    group.add_argument("--ratio", type=float, default=DEFAULTS.ratio,  # checked by OptimizeOptions.checked()
                       help=f"share of input channels each filter group drops, in [0, 1) (default {DEFAULTS.ratio})")
    group.add_argument("--groups", type=group_count, default=DEFAULTS.groups, metavar="auto|N",
                       help="group count for every layer, or 'auto' to choose per layer (default)")
    group.add_argument("--method", default=DEFAULTS.method, choices=SELECTION_METHODS,
                       help=f"kernel selection: leanflex, l2, random, or the prior art tmi (TMI-GKP), "
                            f"sr (SR-GKP, also groups filters by smoothness) (default {DEFAULTS.method})")
    group.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                       help="leave Convs whose node or weight name matches dense (repeatable)")
    group.add_argument("--include-stem", action="store_true", help="also prune the stem Conv")
    if structured:
        group.add_argument("--ffn-ratio", type=float, metavar="R",
                           help="transformers: share of feed-forward neurons to remove, in [0, 1) (MatMul -> "
                                "activation -> MatMul blocks; kept counts are multiples of 16; a smaller dense model)")
        group.add_argument("--head-ratio", type=float, metavar="R",
                           help="transformers: share of attention heads to remove, in [0, 1) (Q/K/V columns and "
                                "output projection rows per head; with grouped-query attention whole key/value groups)")
        group.add_argument("--target-speedup", type=float, metavar="X",
                           help="with --calib: a pruning ratio per Conv (CNNs) or per attention / feed-forward "
                                "block (transformers), the least output damage per MAC first, until the model "
                                "measures X times faster than the input (onnxruntime, the first --bench provider "
                                "and batch; --reconstruct: damage measured after the refit)")
    group.add_argument("--min-group-width", type=option("min_group_width"), default=DEFAULTS.min_group_width,
                       help=f"smallest output channels per group considered by auto (default {DEFAULTS.min_group_width})")
    group.add_argument("--speed-weight", type=option("speed_weight"), default=DEFAULTS.speed_weight,
                       help=f"weight of estimated latency vs kept importance in the auto choice "
                            f"(default {DEFAULT_SPEED_WEIGHT})")
    group.add_argument("--cost-model", choices=COST_MODELS, default=DEFAULTS.cost_model,
                       help="latency estimate for the auto group count: analytic (onnxruntime-CPU rules) or "
                            "measured (micro-benchmarks on this machine and provider, cached on disk)")
    group.add_argument("--channel-multiple", type=multiple, default=DEFAULTS.channel_multiple, metavar="K|auto",
                       help="from K channels up, keep a multiple of K per layer (1: no rounding; auto, the "
                            "default: onnxruntime CPU's NCHWc block, 16 with AVX512, 8 with AVX2); the ratio "
                            "holds over the model, not per layer")
    group.add_argument("--no-share-streams", dest="share_streams", action="store_false",
                       help="auto: do not offer Convs reading a residual stream or fan-out tensor the shared "
                            "channel partition (G = Ci / n, no Gather; the stream's channels are reordered)")
    group.add_argument("--seed", type=option("seed"), default=DEFAULTS.seed)
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
    nm.add_argument("--nm-method", choices=NM_METHODS, default=DEFAULTS.nm_method,
                    help="wanda: keep the largest |w| (times the input's RMS with --calib), refit the kept weights "
                         "with --reconstruct; sparsegpt: second-order mask and weight update on the calibration "
                         "data, layer by layer (needs --calib)")


def optimize_options(args: argparse.Namespace) -> dict:
    """The OptimizeOptions fields the parsed arguments set (an argument's dest is the field's name)."""
    given = {f.name: getattr(args, f.name) for f in fields(OptimizeOptions) if hasattr(args, f.name)}
    return dict(given, input_shapes=dict(getattr(args, "input_shape", [])), thresholds=thresholds(args))


def print_fidelity(result) -> None:
    for output in result.outputs:
        top1 = f"  top-1 agreement {100 * output.top1_agreement:.2f}%" if output.top1_agreement is not None else ""
        pooled = f"  pooled cosine {output.pooled_cosine:.4f} (worst {output.pooled_worst:.4f})" \
            if output.pooled_cosine is not None else ""
        if output.neighbour_agreement is not None:
            pooled += f"  nearest-neighbour agreement {100 * output.neighbour_agreement:.1f}%"
        print(f"{output.name}: max|diff| {output.max_abs_diff:.4g}  mean|diff| {output.mean_abs_diff:.4g}  "
              f"cosine {output.cosine:.6f}{top1}{pooled}")
    if result.accuracy_reference is not None:
        print(f"accuracy: {100 * result.accuracy_reference:.2f}% -> {100 * result.accuracy_candidate:.2f}% "
              f"({result.samples} samples)")
