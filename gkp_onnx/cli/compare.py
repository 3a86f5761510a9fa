"""gkp-onnx compare: the fidelity of a candidate model against a reference."""

from __future__ import annotations

import argparse

from gkp_onnx.cli import args as shared


def register(sub) -> None:
    p = sub.add_parser("compare", help="fidelity of a candidate model against a reference")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--data", metavar="DATA.npz|DIR", help="inputs (and labels y); else seeded random inputs")
    p.add_argument("--seed", type=int, default=0)
    shared.add_shapes(p)
    shared.add_thresholds(p)
    shared.add_images(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gkp_onnx.graph import input_specs
    from gkp_onnx.model_io import load_model
    from gkp_onnx.validate import RANDOM_BATCH, compare, load_dataset, random_dataset

    reference, candidate = load_model(args.reference), load_model(args.candidate)
    specs = input_specs(reference, dict(args.input_shape))
    data = load_dataset(args.data, specs, images=shared.images(args)) if args.data \
        else random_dataset(specs, args.seed, RANDOM_BATCH)
    result = compare(reference, candidate, data)
    shared.print_fidelity(result)
    failures = shared.thresholds(args).failures(result)
    print("PASSED" if not failures else "FAILED: " + "; ".join(failures))
    return 0 if not failures else 1
