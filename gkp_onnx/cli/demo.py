"""gkp-onnx demo: optimize the built-in pretrained CIFAR-10 ResNet-56 and report."""

from __future__ import annotations

import argparse

from gkp_onnx.cli import args as shared
from gkp_onnx.optional import require_torch


def register(sub) -> None:
    p = sub.add_parser("demo", help="optimize the built-in pretrained CIFAR-10 ResNet-56 and report")
    p.add_argument("--out-dir", default="gkp-demo")
    shared.add_pruning(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_torch("the demo")
    from gkp_onnx.demo import run_demo
    from gkp_onnx.options import OptimizeOptions

    options = shared.optimize_options(args)
    OptimizeOptions(**options).checked()  # bad options fail before the demo writes anything
    return run_demo(args.out_dir, **options)
