"""The library's entry point: `optimize` (load, GKP, N:M, the latency guard, check, validate,
report) and `build_pipeline`, which builds the passes from the options.

    load -> shortcut_convs -> analyze [-> partition_streams] -> cluster -> choose_groups
         -> select_kernels -> permute_streams -> rewrite_conv [-> reconstruct] -> fold_gathers
         [-> prune_neurons [-> reconstruct_nm]] -> nm_sparsify [-> reconstruct_nm] [-> nm_budget]
         -> check (onnx.checker + shape inference) -> validate (onnxruntime) -> report
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx

from gkp_onnx.bench import bench
from gkp_onnx.cache import cache_dir
from gkp_onnx.choice import GroupScore
from gkp_onnx.cost import AnalyticCpuCost, CostModel, MeasuredCost, nchwc_block_size
from gkp_onnx.errors import GkpError
from gkp_onnx.graph import (InputSpec, assumed_note, clear_marks, ensure_node_names, graph_inputs, input_specs,
                            model_stats)
from gkp_onnx.guard import never_slower, slower
from gkp_onnx.model_io import check_finite, check_model, load_model
from gkp_onnx.nm import NM_OPS, NmResult, nm_candidates, parse_nm, share_of_macs
from gkp_onnx.options import OptimizeOptions, check_targets, flag
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.passes.canonicalize import Canonicalize
from gkp_onnx.passes.choose_groups import ChooseGroups
from gkp_onnx.passes.conv_budget import ConvBudget, dense_refit
from gkp_onnx.passes.cluster import ClusterFilters
from gkp_onnx.passes.fold_gathers import FoldGathers
from gkp_onnx.passes.nm_budget import NmBudget
from gkp_onnx.passes.nm_sparsify import NmSparsify
from gkp_onnx.passes.partition_streams import PartitionStreams, PermuteStreams
from gkp_onnx.passes.prune_heads import PruneHeads, attention_blocks, attention_cores, head_inputs
from gkp_onnx.passes.prune_neurons import PruneNeurons, ffn_regions
from gkp_onnx.passes.reconstruct import Reconstruct, ReconstructNm
from gkp_onnx.passes.rewrite_conv import RewriteConv
from gkp_onnx.passes.select_kernels import SelectKernels
from gkp_onnx.passes.shortcut_convs import shortcuts_as_convs
from gkp_onnx.passes.structured_budget import StructuredBudget
from gkp_onnx.pipeline import Pass, PassContractError, run_passes
from gkp_onnx.plan import Plan
from gkp_onnx.report import Report
from gkp_onnx.validate import (HOLDOUT_MIN, RANDOM_BATCH, Dataset, channel_covariances, channel_rms, compare,
                               data_shapes, load_dataset, make_session, random_dataset, run_model)

log = logging.getLogger(__name__)
REFIT_CHECK_ROWS = 256  # --reconstruct: samples the refit model is compared with the one-shot one on
BUDGET_REFIT_ROWS = 256  # --target-speedup on Convs with --reconstruct: samples each level's model is refit on
HEAD_CHECK_ROWS = 2  # samples each pruned attention block is checked on against the masked dense model


@dataclass
class Pipeline:
    """The GKP passes of one run, built once from the options (`build_pipeline`)."""

    analyze: list[Pass]  # analyze
    partition: list[Pass]  # partition_streams, when offered: it reorders the model the decisions are made on
    decide: list[Pass]  # cluster -> choose_groups -> select_kernels (on the plan)
    finish: list[Pass]  # permute_streams -> rewrite_conv [-> reconstruct] [-> fold_gathers] (on the model)

    def run(self, model: onnx.ModelProto, plan: Plan, details: dict, replay: bool = False
            ) -> tuple[onnx.ModelProto, Plan]:
        """Decide on `model` and fill `plan` (or, with `replay`, take `plan` as decided), then build
        the optimized model; what the passes find beyond the plan goes into `details`."""
        if replay:
            return run_passes(self.finish, model, plan, details)
        _, plan = self.decisions(model, plan)
        if not plan.layers or not self.decide:
            return model, plan
        return run_passes(self.finish, model, plan, details)

    def decisions(self, model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, Plan]:
        """Analyze `model` and decide each layer's form: (the model the decisions were made on, which
        partition_streams may have reordered; the plan). Nothing is built."""
        run_passes(self.analyze, model, plan)
        if not plan.layers or not self.decide:
            return model, plan
        analysed, plan = run_passes(self.partition, model, plan)
        return analysed, run_passes(self.decide, analysed, plan)[1]


def build_pipeline(opts: OptimizeOptions, specs: list[InputSpec], patterns: list[re.Pattern] = (),
                   reference: onnx.ModelProto | None = None, data: Dataset | None = None) -> Pipeline:
    """The passes `opts` asks for; `reference` and `data` feed reconstruction (opts.reconstruct)."""
    finish = [PermuteStreams(), RewriteConv()] + ([Reconstruct(reference, data)] if opts.reconstruct else []) \
        + ([FoldGathers()] if opts.fold else [])
    if not opts.gkp:
        return Pipeline(analyze=[], partition=[], decide=[], finish=finish)
    scorer = GroupScore(_cost_model(opts), opts.speed_weight, opts.method, opts.seed)
    decide = [ClusterFilters(opts.min_group_width, opts.groups, opts.seed, viable=scorer.viable_group_counts,
                             cache=cache_dir() if opts.cache else None, method=opts.method),
              ChooseGroups(scorer, never_slower=opts.groups is None), SelectKernels(opts.method, opts.seed)]
    partition = [PartitionStreams(opts.seed)] if opts.share_streams and opts.groups is None else []
    analyze = [Analyze(specs, list(patterns), opts.include_stem, _channel_multiple(opts))]
    return Pipeline(analyze=analyze, partition=partition, decide=decide, finish=finish)


def optimize(model: onnx.ModelProto | str | os.PathLike, **options) -> tuple[onnx.ModelProto, Report]:
    """Prune every eligible Conv with Grouped Kernel Pruning (with ffn_ratio=R / head_ratio=R, remove
    transformer feed-forward neurons and attention heads; with target_speedup=X and calib, choose per
    Conv, or per transformer block, what to remove for that measured speed-up; with nm="2:4",
    sparsify MatMul/Gemm weights N:M); return the new model and its report.

    `model` is never modified. Keyword options are the fields of `OptimizeOptions`
    (ratio, groups, method, exclude, seed, calib, nm, ...).
    """
    return _optimize(model, OptimizeOptions(**options), {})


def sweep(model: onnx.ModelProto | str | os.PathLike, targets, **options) -> list[tuple[onnx.ModelProto, Report]]:
    """One analysis, a family: the model optimized for each target speed-up in `targets` (Conv
    channels, or transformer heads and neurons; with calib; see optimize's target_speedup). The
    damage of every option is measured once and shared; each target is allocated, timed and refit
    on its own."""
    targets = check_targets(targets)
    for name in ("target_speedup", "ffn_ratio", "head_ratio"):
        if options.get(name) is not None:
            raise GkpError(f"sweep chooses what each layer or block keeps per target: {flag(name)} does not apply")
    analysis: dict = {}
    return [_optimize(model, OptimizeOptions(**{**options, "target_speedup": target}), analysis) for target in targets]


def _optimize(model: onnx.ModelProto | str | os.PathLike, opts: OptimizeOptions, analysis: dict
              ) -> tuple[onnx.ModelProto, Report]:
    """optimize; `analysis`: what a sweep measures once for all its targets (filled on first use)."""
    patterns = opts.checked()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    source = str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<model>")
    original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    details: dict = {}
    given, _ = run_passes([Canonicalize()], original, Plan(ratio=opts.ratio, method=opts.method, seed=opts.seed),
                          details)  # the input in canonical form: the reference of every comparison
    input_notes = details.pop("canonical")
    if given is original:
        given = onnx.ModelProto()
        given.CopyFrom(original)
    ensure_node_names(given)
    check_finite(given, "input model")
    working = shortcuts_as_convs(given) if opts.gkp else given  # exact; what the passes work on
    specs = _specs_from_data(given, opts) if opts.calib else input_specs(given, opts.input_shapes)
    input_notes += [assumed_note(spec) for spec in specs if spec.assumed]
    data = load_dataset(opts.calib, specs, images=opts.images) if opts.calib else None
    held = None  # what the data chose or fit (refits, N:M and OBS scores, the budgets) is validated on samples
    # it did not see; the N:M fidelity budget (--nm with --min-cosine) is kept, as documented, on all of --calib
    fits = opts.reconstruct or opts.target_speedup or opts.nm or opts.ffn_ratio or opts.head_ratio
    if data is not None and fits and opts.validate and not _nm_budget(opts):  # nothing to validate: fit on all
        split = data.held_out(1 if _dynamic_batch(given) else specs[0].shape[0])
        if split is None:
            input_notes.append(f"--calib has {len(data)} samples: fidelity is measured on the samples the fit saw "
                               f"(give at least {4 * HOLDOUT_MIN} to hold some out)")
        else:
            data, held = split
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    pipeline = build_pipeline(opts, specs, patterns, working, data)
    one_shot = build_pipeline(replace(opts, reconstruct=False), specs, patterns, working, data) \
        if opts.reconstruct else pipeline  # the same passes without the refit
    conv_target = bool(opts.target_speedup) and opts.gkp and not _transformer(working, patterns, pipeline.analyze)
    if opts.plan:
        optimized, plan = _replay(pipeline, working, Plan.load(opts.plan), details)
    elif conv_target:
        optimized, plan = _budget_convs(pipeline, one_shot, opts, specs, working, given, data, details, analysis)
    else:
        optimized, plan = pipeline.run(working, Plan(ratio=opts.ratio, method=opts.method, seed=opts.seed), details)
    if opts.reconstruct and data is not None and plan.layers:  # never below the one-shot model
        plain = _refit_or_one_shot(optimized, plan, one_shot, working, given, data, details)
        if plain is not None:
            optimized, pipeline = plain, one_shot  # rebuilds (the latency guard) leave the refit out too
    timings["optimize"] = time.perf_counter() - start
    structured = opts.ffn_ratio or opts.head_ratio or (opts.target_speedup and not conv_target)
    if structured:
        start = time.perf_counter()
        optimized = _prune_transformer(optimized, opts, patterns, data, working, details, specs, analysis=analysis)
        timings["prune_transformer"] = time.perf_counter() - start
    chosen = {key: details[key] for key in ("allocation", "structured_budget", "notes") if key in details}  # rebuilds keep it
    nm_result = None
    check = held or data or random_dataset(specs, opts.seed, batch=RANDOM_BATCH if _dynamic_batch(given) else None) \
        if opts.validate or _nm_budget(opts) else None  # what fidelity is measured on
    if opts.nm:
        start = time.perf_counter()
        budget = (given, check, model_stats(optimized, specs).node_macs) if _nm_budget(opts) else None
        optimized, nm_result = _nm_sparsity(optimized, opts, patterns, data, working, budget,
                                            details.get("neuron_orders"))
        timings["nm_sparsify"] = time.perf_counter() - start
    if not plan.layers and not (nm_result and nm_result.layers) and not details.get("neurons") \
            and not details.get("heads") and (opts.ratio > 0 or opts.nm or structured):
        raise GkpError("nothing to optimize: " + _nothing_done(plan, nm_result, opts))
    latency = None
    if opts.bench_batches:  # latency is measured, never assumed: slower layers are reverted
        start = time.perf_counter()

        def rebuild(reverted: Plan) -> onnx.ModelProto:
            nonlocal nm_result
            details.clear()
            rebuilt, _ = pipeline.run(working, reverted, details, replay=True)
            if structured:
                rebuilt = _prune_transformer(rebuilt, opts, patterns, data, working, details, specs,
                                             chosen.get("allocation"))  # a rebuild keeps what the budget chose
            details.update(chosen)
            if opts.nm:  # the report describes the model returned: the N:M result of this build
                rebuilt, nm_result = _nm_sparsity(rebuilt, opts, patterns, data, working, budget,
                                                  details.get("neuron_orders"))
            return rebuilt

        optimized, latency = never_slower(given, optimized, plan, opts, rebuild)
        timings["bench"] = time.perf_counter() - start

    clear_marks(optimized)  # the marks are for the passes; the output carries none
    check_model(optimized, what="(optimized)")
    check_finite(optimized, "optimized model")
    try:
        onnx.shape_inference.infer_shapes(optimized, strict_mode=True)
    except Exception as exc:  # a rewrite that breaks shape inference is a gkp-onnx bug; say so plainly
        raise GkpError(f"optimized model fails shape inference: {str(exc).splitlines()[0]}") from None
    report = Report(source=source, plan=plan, before=model_stats(given, specs),
                    after=model_stats(optimized, specs), timings=timings, nm=nm_result, input_notes=input_notes,
                    neurons=details.get("neurons", []), heads=details.get("heads", []),
                    heads_skipped=details.get("heads_skipped", []), structured_budget=details.get("structured_budget"),
                    structured_totals=details.get("totals", {}), notes=details.get("notes", []))
    if nm_result:
        nm_result.eligible_mac_share = share_of_macs(report.after.node_macs, {layer.node for layer in nm_result.layers})
    if opts.reconstruct or (nm_result and nm_result.reconstruction):
        report.reconstruction = {**details.get("reconstruction", {}),
                                 **(nm_result.reconstruction if nm_result else {})}
    if opts.validate:
        start = time.perf_counter()
        report.fidelity = compare(given, optimized, check)
        report.failures = opts.thresholds.failures(report.fidelity)
        timings["validate"] = time.perf_counter() - start
    budget = details.get("structured_budget")
    if budget and not budget["met"]:
        report.failures.append(f"--target-speedup {budget['target_speedup']:g} missed: the fastest allocation "
                               f"measured {budget['speedup']:.2f}x")
    if latency is not None:
        report.latency = latency
        report.failures += [f"optimized model is slower than the input on {t.provider} at batch {t.batch} "
                            f"({t.speedup:.2f}x)" for t in slower(latency)]
    return optimized, report


def _channel_multiple(opts: OptimizeOptions) -> int:
    """The multiple kept channels are rounded to: as given, or onnxruntime CPU's NCHWc block."""
    return nchwc_block_size() if opts.channel_multiple == "auto" else opts.channel_multiple


def _replay(pipeline: Pipeline, model: onnx.ModelProto, plan: Plan, details: dict):
    """A saved plan on `model`: whatever in it does not fit the model is one line, not a traceback."""
    try:
        return pipeline.run(model, plan, details, replay=True)
    except GkpError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError, PassContractError) as exc:
        raise GkpError(f"the plan does not fit this model ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); was it saved for another model?") from None


def _cost_model(opts: OptimizeOptions) -> CostModel:
    if opts.cost_model in (None, "analytic"):
        return AnalyticCpuCost(block=nchwc_block_size())
    if opts.cost_model != "measured":
        return opts.cost_model
    return MeasuredCost(provider=opts.bench_providers[0], threads=opts.bench_threads,
                        batch=opts.bench_batches[0] if opts.bench_batches else 1)


def _refit_or_one_shot(refit: onnx.ModelProto, plan: Plan, one_shot: Pipeline, working: onnx.ModelProto,
                       given: onnx.ModelProto, data: Dataset, details: dict) -> onnx.ModelProto | None:
    """None when the refit model is at least as close to the input's outputs on the calibration
    data as the one-shot one (`one_shot`: the pipeline without the refit; top-1 agreement for
    classifiers, then the lowest cosine), else the one-shot model, with a note. The per-layer least
    squares never raise a layer's error, but layers refit one after another can still add up worse."""
    sample = data.first(min(len(data), REFIT_CHECK_ROWS))
    plain, _ = one_shot.run(working, plan, {}, replay=True)
    measured = [compare(given, model, sample) for model in (refit, plain)]
    scores = [(m.top1_agreement if m.top1_agreement is not None else 1.0, m.min_cosine) for m in measured]
    if scores[0] >= scores[1]:
        return None
    (top1, cosine), (plain_top1, plain_cosine) = scores
    agreement = f"top-1 agreement {top1:.4f} vs {plain_top1:.4f}, " if measured[0].top1_agreement is not None else ""
    details.setdefault("notes", []).append(
        f"--reconstruct left the outputs further from the input's on the calibration data ({agreement}cosine "
        f"{cosine:.4f} vs {plain_cosine:.4f} one-shot): the one-shot model is kept")
    return plain


def _transformer(model: onnx.ModelProto, patterns: list[re.Pattern], analyze: list[Pass]) -> bool:
    """Whether --target-speedup budgets transformer blocks: the model has attention, or feed-forward
    blocks and no Conv GKP prunes (a CNN's MLP classifier is no reason to leave its Convs alone)."""
    if attention_cores(model, patterns)[0]:
        return True
    if not ffn_regions(model, patterns):
        return False
    probe = Plan(ratio=0.5, method="-", seed=0)
    run_passes(analyze, model, probe)
    return not probe.layers


def _budget_convs(pipeline: Pipeline, fast: Pipeline, opts: OptimizeOptions, specs: list[InputSpec],
                  working: onnx.ModelProto, given: onnx.ModelProto, data: Dataset, details: dict, analysis: dict
                  ) -> tuple[onnx.ModelProto, Plan]:
    """--target-speedup on Convs: the ratio of every prunable Conv from passes/conv_budget.py (the
    damage of each layer at each level on --calib, allocations timed against the input), then the
    model built with them (`fast`: the pipeline without the refit, for the decisions and timings)."""

    def decide(ratio: float) -> tuple[onnx.ModelProto, Plan, dict]:
        analysed, plan = fast.decisions(working, Plan(ratio=ratio, method=opts.method, seed=opts.seed))
        if not plan.layers or not opts.reconstruct:
            return analysed, plan, {}
        refit, _ = run_passes([PermuteStreams(), RewriteConv(), Reconstruct(working, data.first(BUDGET_REFIT_ROWS))],
                              working, plan, {})  # each level's model refit as the final one will be
        return analysed, plan, {layer.node: dense_refit(refit, layer) for layer in plan.layers}

    def planned(allocation: dict) -> Plan:
        return Plan(ratio=0.0, method=opts.method, seed=opts.seed, layer_ratios=dict(allocation["convs"]))

    provider, batch = opts.bench_providers[0], opts.bench_batches[0] if opts.bench_batches else specs[0].shape[0]

    def measure(allocation: dict) -> float:
        trial, _ = fast.run(working, planned(allocation), {})
        timings = bench([given, trial], batches=[batch], providers=[provider], threads=opts.bench_threads,
                        input_shapes=opts.input_shapes, repeats=opts.bench_repeats,
                        min_time_s=opts.bench_min_time_s, seed=opts.seed)
        return timings[1].speedup

    found: dict = {}
    budget = ConvBudget(opts.target_speedup, data, decide, model_stats(working, specs).macs, measure,
                        analysis.get("conv_levels"))
    run_passes([budget], working, Plan(ratio=0.0, method=opts.method, seed=opts.seed), found)
    analysis["conv_levels"] = found["levels"]
    details["allocation"], details["structured_budget"] = found["allocation"], found["structured_budget"]
    return pipeline.run(working, planned(found["allocation"]), details)


def _prune_transformer(model: onnx.ModelProto, opts: OptimizeOptions, patterns: list[re.Pattern],
                       data: Dataset | None, original: onnx.ModelProto, details: dict,
                       specs: list[InputSpec], allocation: dict | None = None, analysis: dict | None = None
                       ) -> onnx.ModelProto:
    """Attention heads and / or feed-forward neurons removed (by the ratios, or per block as the
    budget for --target-speedup allocates them) [-> the layers that read them refit towards
    `original`'s outputs]."""
    heads, neurons = bool(opts.head_ratio or opts.target_speedup), bool(opts.ffn_ratio or opts.target_speedup)
    analysis = {} if analysis is None else analysis
    covariances = analysis.get("covariances", {})
    if data is not None and not covariances:  # the choice: the covariance of the channels the pruned units feed
        tensors = {tensor: -1 for tensor, _ in ffn_regions(model, patterns)} if neurons else {}
        tensors.update({tensor: -1 for tensor in head_inputs(model, patterns)} if heads else {})
        covariances = analysis["covariances"] = channel_covariances(model, tensors, data)
    rows = HEAD_CHECK_ROWS if _dynamic_batch(model) else specs[0].shape[0]  # a fixed batch takes whole batches
    sample = data.first(rows) if data else random_dataset(specs, opts.seed, batch=rows)
    found: dict = {}
    plan = Plan(ratio=0.0, method="structured", seed=opts.seed)
    chosen = {name: covariance for name, (_, covariance) in covariances.items()}

    def pruning(allocation: dict | None) -> list[Pass]:
        keep = allocation or {"heads": {}, "neurons": {}}
        return ([PruneHeads(opts.head_ratio or 0.0, sample, patterns, chosen, keep["heads"])] if heads else []) \
            + ([PruneNeurons(opts.ffn_ratio or 0.0, patterns, chosen, keep["neurons"])] if neurons else [])

    if opts.target_speedup and allocation is None:
        stats = model_stats(model, specs)
        provider, batch = opts.bench_providers[0], opts.bench_batches[0] if opts.bench_batches else specs[0].shape[0]

        def measure(trial_allocation: dict) -> float:
            trial, _ = run_passes(pruning(trial_allocation), model, plan, {}, keep=True)
            timings = bench([original, trial], batches=[batch], providers=[provider], threads=opts.bench_threads,
                            input_shapes=opts.input_shapes, repeats=opts.bench_repeats,
                            min_time_s=opts.bench_min_time_s, seed=opts.seed)
            return timings[1].speedup

        blocks, regions = attention_blocks(model, sample, patterns)[0], ffn_regions(model, patterns)
        if not blocks and not regions:
            raise GkpError("--target-speedup allocates transformer attention heads and feed-forward neurons (and "
                           "Conv channels, with GKP on), and this model has none that can be removed")
        budget = StructuredBudget(opts.target_speedup, data, covariances, blocks, regions,
                                  stats.node_macs, stats.macs, measure, analysis.get("levels"))
        run_passes([budget], model, plan, found)
        analysis["levels"] = found["levels"]
        allocation = found["allocation"]
        details["allocation"], details["structured_budget"] = allocation, found["structured_budget"]
    model, _ = run_passes(pruning(allocation), model, plan, found, keep=True)
    details["neurons"], details["heads"] = found.get("neurons", []), found.get("heads", [])
    details["heads_skipped"] = found.get("heads_skipped", [])
    details["totals"] = {"heads": found.get("heads_total", 0), "neurons": found.get("neurons_total", 0)}
    notes = details.setdefault("notes", [])  # the rebuilds of the latency guard say them once
    for note in ([f"--head-ratio {opts.head_ratio:g}: the model has no attention block whose heads can be removed"]
                 if opts.head_ratio and not details["heads"] and not details["heads_skipped"] else []) \
            + ([f"--ffn-ratio {opts.ffn_ratio:g}: the model has no feed-forward block whose neurons can be removed"]
               if opts.ffn_ratio and not details["totals"]["neurons"] else []):
        if note not in notes:
            notes.append(note)
    details["neuron_orders"] = {**found.get("output_orders", {}), **found.get("head_orders", {})}
    layers = [name for region in details["neurons"] for name in region["consumers"]] \
        + [block["output"] for block in details["heads"]]
    if opts.reconstruct and layers:
        model, _ = run_passes([ReconstructNm(original, data, layers, intercept=True, residual=True)], model, plan,
                              found)
        details.setdefault("reconstruction", {}).update(
            {f"{name} (structured)": errors for name, errors in found["reconstruction"].items()})
    return model


def _specs_from_data(model: onnx.ModelProto, opts: OptimizeOptions) -> list[InputSpec]:
    """Input specs whose dynamic dims (beyond the batch) take their sizes from the --calib .npz."""
    shapes = data_shapes(opts.calib) if str(opts.calib).endswith(".npz") else {}
    inputs = graph_inputs(model)
    if len(inputs) == 1 and "x" in shapes:
        shapes[inputs[0].name] = shapes["x"]
    given = {}
    for value in inputs:
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in value.type.tensor_type.shape.dim]
        found = shapes.get(value.name, [])
        if value.name not in opts.input_shapes and len(found) == len(declared) > 1 and None in declared[1:]:
            given[value.name] = [declared[0] or 1] + found[1:]
    try:
        return input_specs(model, {**given, **opts.input_shapes})
    except GkpError:  # the data does not fit the model's declared dims: load_dataset says so
        return input_specs(model, opts.input_shapes)


def _nm_budget(opts: OptimizeOptions) -> bool:
    """--min-cosine with --nm is also the budget N:M sparsifies to (passes/nm_budget.py)."""
    return bool(opts.nm) and opts.thresholds.min_cosine is not None


def _nm_sparsity(model: onnx.ModelProto, opts: OptimizeOptions, patterns: list[re.Pattern],
                 data: Dataset | None, original: onnx.ModelProto,
                 budget: tuple[onnx.ModelProto, Dataset, dict] | None = None,
                 kept_columns: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, NmResult]:
    """N:M sparsity [-> refit of the kept weights towards `original`'s layer outputs] [-> the layers
    the fidelity budget cannot afford put back dense; `budget`: (the reference model, the data
    fidelity is measured on, MACs per node)]. `kept_columns`: per MatMul/Gemm prune_neurons
    narrowed, the original output columns it kept."""
    n, m = parse_nm(opts.nm)
    ops = NM_OPS + (("Conv",) if opts.nm_conv else ())
    norms = {}
    if data is not None:  # calibration-aware scores: |w| * RMS of the input channel
        refs, _ = nm_candidates(model, n, m, ops, patterns, opts.nm_include_head)
        nodes = {node.name: node for node in model.graph.node}
        axes = {nodes[ref.node].input[0]: (1 if ref.op == "Conv" else -1) for ref in refs}
        rms = channel_rms(model, axes, data)
        norms = {ref.node: rms[nodes[ref.node].input[0]] for ref in refs}
    sparsify = NmSparsify(n, m, opts.nm_conv, opts.nm_include_head, patterns, norms, opts.nm_permute, seed=opts.seed,
                          keep_dense=budget is not None)
    plan, details = Plan(ratio=0.0, method="nm", seed=opts.seed), {}
    model, _ = run_passes([sparsify], model, plan, details, keep=True)  # `model` may still be the reference
    result = details["nm"]

    orders = dict(kept_columns or {})  # a layer's output column k is the original's column orders[k]
    for name, perm in details["output_orders"].items():
        orders[name] = orders[name][perm] if name in orders else perm

    def refit(model: onnx.ModelProto, layers: list[str]) -> tuple[onnx.ModelProto, dict]:
        found: dict = {}
        model, _ = run_passes([ReconstructNm(original, data, layers, orders, nm=(n, m),
                                             method="sparsegpt" if opts.nm_method == "sparsegpt" else "refit")],
                              model, plan, found)
        return model, found["reconstruction"]

    refits = opts.reconstruct or opts.nm_method == "sparsegpt"
    if refits:
        model, result.reconstruction = refit(model, [layer.node for layer in result.layers])
    if budget is not None and result.layers:
        reference, check, macs = budget
        outputs = run_model(make_session(reference), check)
        model, _ = run_passes([NmBudget(result, details["nm_dense"], outputs, check, opts.thresholds.min_cosine,
                                        macs, refit if refits else None)], model, plan)
    return model, result


def _nothing_done(plan: Plan, nm_result: NmResult | None, opts: OptimizeOptions) -> str:
    why = []
    if opts.gkp:
        reasons = "; ".join(sorted({s.reason for s in plan.skipped})) or "the model has no Conv"
        why.append(f"no Conv the GKP passes can prune ({reasons})")
    if nm_result is not None:
        reasons = "; ".join(sorted({reason for _, reason in nm_result.skipped})) or "the model has no MatMul/Gemm"
        why.append(f"no weight N:M can sparsify ({reasons})")
    elif opts.gkp:
        why.append("for MatMul/Gemm models use --nm 2:4" + ("" if opts.ffn_ratio else " or --ffn-ratio R"))
    if opts.ffn_ratio:
        why.append("no feed-forward block whose neurons can be removed (MatMul -> element-wise -> MatMul with "
                   "constant weights, read by nothing else), or --ffn-ratio keeps them all")
    if opts.target_speedup:
        why.append(f"no attention head or feed-forward neuron that --target-speedup {opts.target_speedup:g} could "
                   "remove (each block's measured damage and the report's skipped blocks say why)")
    if opts.head_ratio:
        why.append("no attention block whose heads can be removed (Q/K/V and output MatMul/Gemm with constant "
                   "weights around softmax(Q K^T) V), or --head-ratio keeps them all")
    return ", ".join(why) or "GKP and N:M are both off"


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    dims = graph_inputs(model)[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")
