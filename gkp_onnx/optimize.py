"""The GKP pipeline from a model (or a path) to an optimized model and its report.

    load -> analyze -> cluster -> choose_groups -> select_kernels -> rewrite_conv
         -> check (onnx.checker + shape inference) -> validate (onnxruntime) -> report
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import onnx

from gkp_onnx.errors import GkpError
from gkp_onnx.graph_stats import ensure_node_names, graph_inputs, input_specs, model_stats
from gkp_onnx.model_io import check_model, load_model
from gkp_onnx.pipeline import run_passes
from gkp_onnx.plan import Plan
from gkp_onnx.report import Report
from gkp_onnx.validate import Thresholds, compare, load_dataset, random_dataset, RANDOM_BATCH
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.passes.choose_groups import DEFAULT_SPEED_WEIGHT, ChooseGroups, CostModel
from gkp_onnx.passes.cluster import ClusterFilters
from gkp_onnx.passes.rewrite_conv import RewriteConv
from gkp_onnx.passes.select_kernels import SELECTION_METHODS, SelectKernels


@dataclass
class OptimizeOptions:
    ratio: float = 0.4375
    groups: int | None = None  # None: chosen per layer
    method: str = "leanflex"
    exclude: list[str] = field(default_factory=list)
    include_stem: bool = False
    seed: int = 0
    min_group_width: int = 8
    speed_weight: float = DEFAULT_SPEED_WEIGHT
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calib: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    validate: bool = True
    plan: str | None = None  # replay a saved plan instead of analysing
    cost_model: CostModel | None = None

    def checked(self) -> list[re.Pattern]:
        """Check the options; return the compiled --exclude patterns."""
        if not 0.0 <= self.ratio < 1.0:
            raise GkpError(f"--ratio must be in [0, 1), got {self.ratio:g}")
        if self.method not in SELECTION_METHODS:
            raise GkpError(f"unknown --method {self.method!r} (choose from {', '.join(SELECTION_METHODS)})")
        if self.groups is not None and self.groups < 1:
            raise GkpError(f"--groups must be a positive integer or 'auto', got {self.groups}")
        patterns = []
        for text in self.exclude:
            try:
                patterns.append(re.compile(text))
            except re.error as exc:
                raise GkpError(f"--exclude '{text}' is not a valid regular expression: {exc}") from None
        return patterns


def optimize(model: onnx.ModelProto | str | os.PathLike, **options) -> tuple[onnx.ModelProto, Report]:
    """Prune every eligible Conv with Grouped Kernel Pruning; return the new model and its report.

    `model` is never modified. Keyword options are the fields of `OptimizeOptions`
    (ratio, groups, method, exclude, seed, calib, ...).
    """
    opts = options.pop("options", None) or OptimizeOptions(**options)
    patterns = opts.checked()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source = str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<model>")
    original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    working = onnx.ModelProto()
    working.CopyFrom(original)
    ensure_node_names(working)
    specs = input_specs(working, opts.input_shapes)
    data = load_dataset(opts.calib, specs) if opts.calib else None
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    if opts.plan:
        plan = Plan.load(opts.plan)
        passes = [RewriteConv()]
    else:
        plan = Plan(ratio=opts.ratio, method=opts.method, seed=opts.seed)
        run_passes([Analyze(specs, patterns, opts.include_stem)], working, plan)
        if not plan.layers:
            reasons = "; ".join(sorted({s.reason for s in plan.skipped})) or "the model has no Conv"
            raise GkpError(f"nothing to optimize: no Conv the GKP passes can prune ({reasons})")
        choose = ChooseGroups(opts.cost_model, opts.speed_weight, opts.method, opts.seed)
        passes = [ClusterFilters(opts.min_group_width, opts.groups, opts.seed, viable=choose.viable_group_counts),
                  choose,
                  SelectKernels(opts.method, opts.seed),
                  RewriteConv()]
    optimized, plan = run_passes(passes, working, plan)
    timings["optimize"] = time.perf_counter() - start

    check_model(optimized, what="(optimized)")
    try:
        onnx.shape_inference.infer_shapes(optimized, strict_mode=True)
    except Exception as exc:  # a rewrite that breaks shape inference is a gkp-onnx bug; say so plainly
        raise GkpError(f"optimized model fails shape inference: {str(exc).splitlines()[0]}") from None
    report = Report(source=source, plan=plan, before=model_stats(working, specs),
                    after=model_stats(optimized, specs), timings=timings)
    if opts.validate:
        start = time.perf_counter()
        data = data or random_dataset(specs, opts.seed, batch=RANDOM_BATCH if _dynamic_batch(working) else None)
        report.fidelity = compare(working, optimized, data)
        report.failures = opts.thresholds.failures(report.fidelity)
        timings["validate"] = time.perf_counter() - start
    return optimized, report


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    dims = graph_inputs(model)[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")
