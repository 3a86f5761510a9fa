"""gkp-onnx recover: distillation fine-tuning of a pruned model against the original (needs torch)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from gkp_onnx.cli import args as shared
from gkp_onnx.optional import require_torch
from gkp_onnx.options import RECOVER_DEFAULTS as D, RecoverOptions


def register(sub) -> None:
    p = sub.add_parser("recover", help="distillation fine-tuning of a pruned model against the original")
    p.add_argument("pruned")
    p.add_argument("output")
    p.add_argument("--teacher", required=True, metavar="ORIGINAL.onnx")
    p.add_argument("--data", required=True, metavar="DATA.npz|DIR", help="training inputs (.npz or image folder)")
    p.add_argument("--labels", action="store_true", help="add cross-entropy on the data's labels")
    p.add_argument("--limit", type=int, metavar="N", help="train on a seeded random subset of N samples")
    p.add_argument("--eval", metavar="DATA.npz|DIR", help="report fidelity/accuracy before and after on this data")
    p.add_argument("--epochs", type=int, default=D.epochs)
    p.add_argument("--lr", type=float, default=D.lr, help=f"AdamW learning rate, cosine decay (default {D.lr:g})")
    p.add_argument("--batch", type=int, default=D.batch)
    p.add_argument("--weight-decay", type=float, default=D.weight_decay)
    p.add_argument("--temperature", type=float, default=D.temperature,
                   help=f"distillation temperature (default {D.temperature:g})")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop/flip of image inputs")
    p.add_argument("--device", choices=["cpu", "cuda"], default=D.device)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--checkpoint", metavar="DIR", help="save progress here; a rerun resumes from it")
    p.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every, metavar="STEPS")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps (resume later with --checkpoint)")
    shared.add_shapes(p)
    shared.add_images(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_torch("recover")
    from gkp_onnx.graph import input_specs
    from gkp_onnx.model_io import load_model, write_model
    from gkp_onnx.outputs import Outputs
    from gkp_onnx.recover import recover
    from gkp_onnx.validate import compare, load_dataset

    outputs = Outputs()
    outputs.read_model(args.pruned, "pruned model")
    outputs.read_model(args.teacher, "teacher model")
    outputs.read(args.data, "--data")
    outputs.read(args.eval, "--eval data")
    outputs.read(args.checkpoint, "--checkpoint folder")
    out = outputs.add(args.output, "output", model=True)
    options = RecoverOptions(**{f.name: getattr(args, f.name) for f in fields(RecoverOptions)})
    pruned, teacher = load_model(args.pruned), load_model(args.teacher)
    specs = input_specs(teacher, dict(args.input_shape))
    data = load_dataset(args.data, specs, images=shared.images(args), limit=args.limit, seed=args.seed)
    evaluation = load_dataset(args.eval, specs, images=shared.images(args)) if args.eval else None
    if evaluation is not None:
        print("before recovery:")
        shared.print_fidelity(compare(teacher, pruned, evaluation))
    recovered, report = recover(pruned, teacher, data, options)
    print(report.summary())
    if evaluation is not None:
        print("after recovery:")
        shared.print_fidelity(compare(teacher, recovered, evaluation))
    with outputs:
        outputs.stage(out, lambda path: write_model(recovered, path))
    print(f"wrote {out}")
    return 0
