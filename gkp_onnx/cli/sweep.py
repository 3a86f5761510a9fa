"""gkp-onnx sweep: one analysis, a family of models: the input optimized for several target speed-ups."""

from __future__ import annotations

import argparse
from pathlib import Path

from gkp_onnx.cli import args as shared
from gkp_onnx.errors import GkpError
from gkp_onnx.options import DEFAULTS, check_targets


def targets(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected speed-ups like 1.25,1.5,2, got {text!r}") from None
    try:
        return check_targets(values)
    except GkpError as exc:  # argparse names the flag
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--targets: ")) from None


def register(sub) -> None:
    p = sub.add_parser("sweep", help="the input optimized for several target speed-ups at once (one damage "
                                     "analysis of its Conv channels, or of its attention heads and feed-forward "
                                     "neurons; models, a table and a plot in OUTDIR)")
    p.add_argument("input")
    p.add_argument("outdir", help="folder for NAME-<target>x.onnx, sweep.md, sweep.json and sweep.png "
                                  "(made when missing; files of the same names in it are replaced when the run "
                                  "succeeds)")
    p.add_argument("--targets", type=targets, required=True, metavar="X1,X2,..",
                   help="measured speed-ups to reach, each in (1, 10]")
    shared.add_pruning(p, structured=False)
    shared.add_shapes(p)
    p.add_argument("--calib", metavar="DATA.npz|DIR",
                   help="inputs the damage of each block is measured on (and fidelity validated on); needed")
    p.add_argument("--reconstruct", action="store_true", help="refit the pruned Convs / what reads the pruned "
                                                              "heads and neurons")
    shared.add_images(p)
    group = p.add_argument_group("latency (what each target is measured on)")
    group.add_argument("--bench-batch", dest="bench_batches", type=shared.batches, default=[1], metavar="B")
    group.add_argument("--bench-repeats", type=int, default=DEFAULTS.bench_repeats)
    group.add_argument("--bench-min-time", dest="bench_min_time_s", type=float, default=DEFAULTS.bench_min_time_s,
                       metavar="S")
    group.add_argument("--providers", dest="bench_providers", nargs="+", default=DEFAULTS.bench_providers,
                       choices=["cpu", "cuda"])
    group.add_argument("--threads", dest="bench_threads", type=int, help="onnxruntime intra-op threads (CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gkp_onnx.api import sweep
    from gkp_onnx.model_io import write_model
    from gkp_onnx.outputs import Outputs
    from gkp_onnx.sweep_report import plot_available, sweep_rows, sweep_table, write_json, write_plot

    outdir = Path(args.outdir)
    if not args.outdir:
        raise GkpError("sweep OUTDIR is empty: give a folder")
    if outdir.exists() and not outdir.is_dir():
        raise GkpError(f"sweep OUTDIR {outdir} is not a folder")
    if not outdir.parent.is_dir():
        raise GkpError(f"sweep OUTDIR {outdir}: its folder {outdir.parent} does not exist")
    made = not outdir.exists()
    if made:
        try:
            outdir.mkdir()
        except OSError as exc:  # a dangling symlink, a name too long, a folder the system refuses
            raise GkpError(f"sweep OUTDIR {outdir}: cannot make it ({exc.strerror or exc})") from None
    try:
        with Outputs() as outputs:
            outputs.read_model(args.input)
            outputs.read(args.calib, "--calib data")
            stem = Path(args.input).stem
            models = [outputs.add(outdir / f"{stem}-{t:g}x.onnx", "sweep model", model=True) for t in args.targets]
            table_path, json_path = outputs.add(outdir / "sweep.md", "sweep table"), outputs.add(outdir / "sweep.json",
                                                                                               "sweep JSON")
            plot_path = outputs.add(outdir / "sweep.png", "sweep plot") if plot_available() else None
            results = sweep(args.input, args.targets, images=shared.images(args), **shared.optimize_options(args))
            reports = [report for _, report in results]
            rows = sweep_rows(reports)
            for path, (model, _) in zip(models, results):
                outputs.stage(path, lambda target, model=model: write_model(model, target))
            table = f"# gkp-onnx sweep of {Path(args.input).name}\n\n" + sweep_table(rows)
            outputs.stage(table_path, lambda target: Path(target).write_text(table))
            outputs.stage(json_path, lambda target: write_json(rows, reports, target))
            if plot_path is not None:
                outputs.stage(plot_path, lambda target: write_plot(rows, target, f"gkp-onnx sweep: {stem}"))
    except BaseException:
        if made and not any(outdir.iterdir()):
            outdir.rmdir()  # nothing left behind
        raise
    print(table)
    print(f"wrote {len(models)} model{'s' if len(models) > 1 else ''}, sweep.md, sweep.json" + (", sweep.png" if plot_path else
                                                                  " (install gkp-onnx[plot] for sweep.png)")
          + f" in {outdir}")
    return 0 if all(report.passed for report in reports) else 1
