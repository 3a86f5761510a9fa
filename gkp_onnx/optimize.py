"""The pipeline from a model (or a path) to an optimized model and its report.

    load -> shortcut_convs -> analyze [-> partition_streams] -> cluster -> choose_groups
         -> select_kernels -> permute_streams -> rewrite_conv [-> reconstruct] -> fold_gathers
         -> nm_sparsify -> check (onnx.checker + shape inference) -> validate (onnxruntime) -> report
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field

import onnx

from gkp_onnx.bench import bench
from gkp_onnx.cache import cache_dir
from gkp_onnx.cost_model import MeasuredCost, nchwc_block_size
from gkp_onnx.errors import GkpError
from gkp_onnx.graph_stats import ensure_node_names, graph_inputs, input_specs, model_stats
from gkp_onnx.model_io import check_model, load_model
from gkp_onnx.pipeline import run_passes
from gkp_onnx.images import ImageSpec
from gkp_onnx.plan import LayerPlan, Plan, SkippedLayer
from gkp_onnx.report import Report
from gkp_onnx.validate import RANDOM_BATCH, Dataset, Thresholds, channel_rms, compare, load_dataset, random_dataset
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.passes.choose_groups import DEFAULT_SPEED_WEIGHT, AnalyticCpuCost, ChooseGroups, CostModel
from gkp_onnx.passes.cluster import ClusterFilters
from gkp_onnx.passes.fold_gathers import FoldGathers
from gkp_onnx.passes.partition_streams import PartitionStreams, PermuteStreams
from gkp_onnx.passes.nm_sparsify import NM_OPS, NmResult, NmSparsify, nm_candidates, parse_nm
from gkp_onnx.passes.reconstruct import Reconstruct, ReconstructNm
from gkp_onnx.passes.rewrite_conv import RewriteConv
from gkp_onnx.passes.select_kernels import SELECTION_METHODS, SelectKernels
from gkp_onnx.passes.shortcut_convs import shortcuts_as_convs


log = logging.getLogger(__name__)
COST_MODELS = ("analytic", "measured")
MAX_REVERT_ROUNDS = 4  # --bench: each round reverts the quarter of the pruned layers estimated slowest


@dataclass
class OptimizeOptions:
    ratio: float = 0.4375
    groups: int | None = None  # None: chosen per layer
    method: str = "leanflex"
    exclude: list[str] = field(default_factory=list)
    include_stem: bool = False
    seed: int = 0
    min_group_width: int = 8
    channel_multiple: int | str = "auto"  # round kept channels to multiples of this; auto: the NCHWc block
    speed_weight: float = DEFAULT_SPEED_WEIGHT
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calib: str | None = None  # .npz or image folder
    images: ImageSpec | None = None  # preprocessing when calib is an image folder
    thresholds: Thresholds = field(default_factory=Thresholds)
    validate: bool = True
    plan: str | None = None  # replay a saved plan instead of analysing
    cost_model: CostModel | str | None = None  # "analytic" (default), "measured", or a CostModel
    gkp: bool = True  # False: skip Grouped Kernel Pruning (e.g. N:M only)
    fold: bool = True  # fold channel Gathers into their producing Convs
    share_streams: bool = True  # offer the shared form to Convs reading residual streams / fan-outs (auto G only)
    cache: bool = True  # reuse clusterings from the on-disk cache (gkp_onnx.cache)
    reconstruct: bool = False  # refit the kept kernels on the calibration data (needs calib)
    bench_batches: list[int] = field(default_factory=list)  # measure input vs optimized latency
    bench_providers: list[str] = field(default_factory=lambda: ["cpu"])
    bench_threads: int | None = None
    bench_repeats: int = 30
    bench_min_time_s: float = 1.0  # more rounds until the timed ones last this long per batch
    nm: str | None = None  # "2:4": N:M sparsity for MatMul/Gemm weights
    nm_conv: bool = False
    nm_include_head: bool = False
    nm_permute: bool = True

    def checked(self) -> list[re.Pattern]:
        """Check the options; return the compiled --exclude patterns."""
        if not 0.0 <= self.ratio < 1.0:
            raise GkpError(f"--ratio must be in [0, 1), got {self.ratio:g}")
        if self.method not in SELECTION_METHODS:
            raise GkpError(f"unknown --method {self.method!r} (choose from {', '.join(SELECTION_METHODS)})")
        if self.nm is not None:
            parse_nm(self.nm)
        if self.reconstruct and not self.calib:
            raise GkpError("--reconstruct needs calibration data: give --calib data.npz")
        multiple = self.channel_multiple
        if multiple != "auto" and (not isinstance(multiple, int) or multiple < 1):
            raise GkpError(f"--channel-multiple must be a positive integer or 'auto', got {multiple}")
        if isinstance(self.cost_model, str) and self.cost_model not in COST_MODELS:
            raise GkpError(f"unknown --cost-model {self.cost_model!r} (choose from {', '.join(COST_MODELS)})")
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
    """Prune every eligible Conv with Grouped Kernel Pruning (and, with nm="2:4", sparsify
    MatMul/Gemm weights N:M); return the new model and its report.

    `model` is never modified. Keyword options are the fields of `OptimizeOptions`
    (ratio, groups, method, exclude, seed, calib, nm, ...).
    """
    opts = OptimizeOptions(**options)
    patterns = opts.checked()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source = str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<model>")
    original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    given = onnx.ModelProto()  # the input as given (node names filled in): the reference of every comparison
    given.CopyFrom(original)
    ensure_node_names(given)
    working = shortcuts_as_convs(given) if opts.gkp else given  # exact; what the passes work on
    specs = input_specs(given, opts.input_shapes)
    data = load_dataset(opts.calib, specs, images=opts.images) if opts.calib else None
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    reconstruct = Reconstruct(working, data) if opts.reconstruct else None
    optimized, plan = _grouped_kernel_pruning(working, specs, opts, patterns, reconstruct)
    timings["optimize"] = time.perf_counter() - start
    nm_result = None
    if opts.nm:
        start = time.perf_counter()
        optimized, nm_result = _nm_sparsity(optimized, opts, patterns, data, working)
        timings["nm_sparsify"] = time.perf_counter() - start
    if not plan.layers and not (nm_result and nm_result.layers):
        raise GkpError("nothing to optimize: " + _nothing_done(plan, nm_result, opts))
    latency = None
    if opts.bench_batches:  # latency is measured, never assumed: slower layers are reverted
        start = time.perf_counter()
        optimized, latency, reconstruct = _never_slower(given, working, optimized, plan, opts, data, patterns,
                                                        reconstruct)
        timings["bench"] = time.perf_counter() - start

    check_model(optimized, what="(optimized)")
    try:
        onnx.shape_inference.infer_shapes(optimized, strict_mode=True)
    except Exception as exc:  # a rewrite that breaks shape inference is a gkp-onnx bug; say so plainly
        raise GkpError(f"optimized model fails shape inference: {str(exc).splitlines()[0]}") from None
    report = Report(source=source, plan=plan, before=model_stats(given, specs),
                    after=model_stats(optimized, specs), timings=timings, nm=nm_result)
    if nm_result:
        nm_result.eligible_mac_share = _share_of_macs(report.after.node_macs, {layer.node for layer in nm_result.layers})
    if opts.reconstruct:
        report.reconstruction = {**(reconstruct.errors if reconstruct else {}),
                                 **(nm_result.reconstruction if nm_result else {})}
    if opts.validate:
        start = time.perf_counter()
        data = data or random_dataset(specs, opts.seed, batch=RANDOM_BATCH if _dynamic_batch(given) else None)
        report.fidelity = compare(given, optimized, data)
        report.failures = opts.thresholds.failures(report.fidelity)
        timings["validate"] = time.perf_counter() - start
    if latency is not None:
        report.latency = latency
        report.failures += [f"optimized model is slower than the input on {t.provider} at batch {t.batch} "
                            f"({t.speedup:.2f}x)" for t in _slower(latency)]
    return optimized, report


def _slower(latency: list) -> list:
    return [t for t in latency if t.model == "optimized" and t.speedup < 1]


def _never_slower(given, working, optimized, plan: Plan, opts: OptimizeOptions, data, patterns, reconstruct):
    """Measure input (`given`) vs optimized; while slower, revert the pruned layers the cost model
    rates slowest (a quarter per round) and rebuild from the same plan and `working`. Returns the
    model kept, its latency, and the reconstruction that built it."""
    def measure(candidate):
        return bench([given, candidate], names=["input", "optimized"], batches=opts.bench_batches,
                     providers=opts.bench_providers, threads=opts.bench_threads,
                     input_shapes=opts.input_shapes, repeats=opts.bench_repeats, min_time_s=opts.bench_min_time_s)

    latency = measure(optimized)
    for _ in range(MAX_REVERT_ROUNDS):
        if not _slower(latency) or not plan.layers:
            break
        ranked = sorted(plan.layers, key=_estimated_cost, reverse=True)
        worst = {layer.node for layer in ranked[:max(1, len(ranked) // 4)]}
        log.info("optimized model measured slower than the input: reverting %d layer(s) to dense", len(worst))
        plan.skipped += [SkippedLayer(layer.node, "Conv", "reverted to dense: the optimized model measured "
                                      "slower than the input") for layer in plan.layers if layer.node in worst]
        plan.layers = [layer for layer in plan.layers if layer.node not in worst]
        reconstruct = Reconstruct(working, data) if reconstruct else None
        optimized, _ = run_passes(_finishing_passes(opts, reconstruct), working, plan)
        if opts.nm:
            optimized, _ = _nm_sparsity(optimized, opts, patterns, data, working)
        latency = measure(optimized)
    return optimized, latency, reconstruct


def _estimated_cost(layer: LayerPlan) -> tuple[float, int]:
    """The cost model's relative time of the chosen form (then the group count, for replayed plans)."""
    cost = next((c.relative_cost for c in layer.candidates if c.group_count == layer.group_count), 0.0)
    return cost, layer.group_count or 0


def _channel_multiple(opts: OptimizeOptions) -> int:
    """The multiple kept channels are rounded to: as given, or onnxruntime CPU's NCHWc block."""
    return nchwc_block_size() if opts.channel_multiple == "auto" else opts.channel_multiple


def _cost_model(opts: OptimizeOptions) -> CostModel:
    if opts.cost_model in (None, "analytic"):
        return AnalyticCpuCost(block=nchwc_block_size())
    if opts.cost_model != "measured":
        return opts.cost_model
    return MeasuredCost(provider=opts.bench_providers[0], threads=opts.bench_threads,
                        batch=opts.bench_batches[0] if opts.bench_batches else 1)


def _finishing_passes(opts: OptimizeOptions, reconstruct: Reconstruct | None) -> list:
    return [PermuteStreams(), RewriteConv()] + ([reconstruct] if reconstruct else []) \
        + ([FoldGathers()] if opts.fold else [])


def _grouped_kernel_pruning(model: onnx.ModelProto, specs, opts: OptimizeOptions, patterns: list[re.Pattern],
                            reconstruct: Reconstruct | None) -> tuple[onnx.ModelProto, Plan]:
    """analyze [-> partition_streams] -> cluster -> choose_groups -> select_kernels, then the
    finishing passes on the input model (permute_streams -> rewrite_conv [-> reconstruct]
    [-> fold_gathers]); or those alone for a saved plan."""
    finish = _finishing_passes(opts, reconstruct)
    if opts.plan:
        return run_passes(finish, model, Plan.load(opts.plan))
    plan = Plan(ratio=opts.ratio, method=opts.method, seed=opts.seed)
    if not opts.gkp:
        return model, plan
    run_passes([Analyze(specs, patterns, opts.include_stem, _channel_multiple(opts))], model, plan)
    if not plan.layers:
        return model, plan
    analysed = model  # the decisions are made on the model with its channel spaces reordered
    if opts.share_streams and opts.groups is None:
        analysed, plan = run_passes([PartitionStreams(opts.seed)], model, plan)
    choose = ChooseGroups(_cost_model(opts), opts.speed_weight, opts.method, opts.seed,
                          never_slower=opts.groups is None)
    passes = [ClusterFilters(opts.min_group_width, opts.groups, opts.seed, viable=choose.viable_group_counts,
                             cache=cache_dir() if opts.cache else None, method=opts.method),
              choose, SelectKernels(opts.method, opts.seed)]
    _, plan = run_passes(passes, analysed, plan)
    return run_passes(finish, model, plan)


def _nm_sparsity(model: onnx.ModelProto, opts: OptimizeOptions, patterns: list[re.Pattern],
                 data: Dataset | None, original: onnx.ModelProto) -> tuple[onnx.ModelProto, NmResult]:
    """N:M sparsity [-> refit of the kept weights towards `original`'s layer outputs]."""
    n, m = parse_nm(opts.nm)
    copy = onnx.ModelProto()  # the pass edits weights in place; `model` may still be the reference
    copy.CopyFrom(model)
    model = copy
    ops = NM_OPS + (("Conv",) if opts.nm_conv else ())
    norms = {}
    if data is not None:  # calibration-aware scores: |w| * RMS of the input channel
        refs, _ = nm_candidates(model, n, m, ops, patterns, opts.nm_include_head)
        nodes = {node.name: node for node in model.graph.node}
        axes = {nodes[ref.node].input[0]: (1 if ref.op == "Conv" else -1) for ref in refs}
        rms = channel_rms(model, axes, data)
        norms = {ref.node: rms[nodes[ref.node].input[0]] for ref in refs}
    sparsify = NmSparsify(n, m, opts.nm_conv, opts.nm_include_head, patterns, norms, opts.nm_permute, seed=opts.seed)
    plan = Plan(ratio=0.0, method="nm", seed=opts.seed)
    model, _ = run_passes([sparsify], model, plan)
    if opts.reconstruct:
        refit = ReconstructNm(original, data, [layer.node for layer in sparsify.result.layers], sparsify.output_orders)
        model, _ = run_passes([refit], model, plan)
        sparsify.result.reconstruction = refit.errors
    return model, sparsify.result


def _nothing_done(plan: Plan, nm_result: NmResult | None, opts: OptimizeOptions) -> str:
    why = []
    if opts.gkp:
        reasons = "; ".join(sorted({s.reason for s in plan.skipped})) or "the model has no Conv"
        why.append(f"no Conv the GKP passes can prune ({reasons})")
    if nm_result is not None:
        reasons = "; ".join(sorted({reason for _, reason in nm_result.skipped})) or "the model has no MatMul/Gemm"
        why.append(f"no weight N:M can sparsify ({reasons})")
    elif opts.gkp:
        why.append("for MatMul/Gemm models use --nm 2:4")
    return ", ".join(why) or "GKP and N:M are both off"


def _share_of_macs(node_macs: dict[str, int | None], nodes: set[str]) -> float:
    known = {name: macs for name, macs in node_macs.items() if macs}
    total = sum(known.values())
    return sum(macs for name, macs in known.items() if name in nodes) / total if total else 0.0


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    dims = graph_inputs(model)[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")
