"""gkp-onnx inspect: per layer, op, shapes, MACs, params, and whether it can be pruned or why not."""

from __future__ import annotations

import argparse

from gkp_onnx.cli import args as shared


def register(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer table: op, shapes, MACs, params, prunable or why not")
    p.add_argument("model")
    p.add_argument("--include-stem", action="store_true")
    p.add_argument("--nm", default="2:4", metavar="N:M", help="pattern to check weights against (default 2:4)")
    shared.add_shapes(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gkp_onnx.inspect import inspect_model

    print(inspect_model(args.model, dict(args.input_shape), include_stem=args.include_stem, nm=args.nm))
    return 0
