"""`gkp-onnx inspect`: what the model holds and what the passes could change, layer by layer.

Per Conv/ConvTranspose/Gemm/MatMul: weight and output shapes, MACs, params, the reduction axis N:M sparsity
uses, whether the weight already satisfies N:M, whether TensorRT is likely to run it on sparse
tensor cores, and whether GKP can prune it (or why not).

TensorRT rule used here (a heuristic, documented in the README): the weight satisfies 2:4 along
the reduction axis, and both the reduction length and the output channels are >= 256 and
multiples of 16 (the engine must also be built in fp16/int8 with sparsity enabled; smaller
GEMMs run faster on dense kernels, so TensorRT's tactic selection usually keeps them dense).
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from gkp_onnx.cost import nchwc_block_size
from gkp_onnx.graph import (MAC_OPS, assumed_note, ensure_node_names, infer_shapes, initializer_map, input_specs,
                            model_stats)
from gkp_onnx.model_io import load_model
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.passes.canonicalize import Canonicalize
from gkp_onnx.passes.prune_heads import attention_cores
from gkp_onnx.passes.prune_neurons import ffn_regions
from gkp_onnx.nm import TRT_MIN_DIM, WeightRef, find_weight, parse_nm, satisfies_nm, tensorrt_sparse_likely
from gkp_onnx.pipeline import run_passes
from gkp_onnx.plan import Plan
from gkp_onnx.validate import describe_measures


def inspect_model(path: str, input_shapes: dict[str, list[int]] | None = None, include_stem: bool = False,
                  nm: str = "2:4") -> str:
    n, m = parse_nm(nm)
    details: dict = {}
    model, _ = run_passes([Canonicalize()], load_model(path), Plan(ratio=0.0, method="leanflex", seed=0), details)
    ensure_node_names(model)
    specs = input_specs(model, input_shapes)
    shapes = infer_shapes(model, specs)
    plan = Plan(ratio=0.0, method="-", seed=0)
    run_passes([Analyze(specs, include_stem=include_stem)], model, plan)
    prunable = {layer.node for layer in plan.layers}
    skipped = {s.node: s.reason for s in plan.skipped}
    stats = model_stats(model, specs, shapes)
    initializers = initializer_map(model.graph)
    producers = {o: node for node in model.graph.node for o in node.output}

    roles, transformer = _transformer_roles(model, shapes)
    rows = []
    top = {node.name for node in model.graph.node}
    for node in model.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        ref = find_weight(node, producers, initializers) if node.op_type != "ConvTranspose" else None  # no N:M
        params = sum(int(np.prod(initializers[name].dims)) for name in node.input[1:] if name in initializers)
        if node.name in prunable:
            status = "GKP: prunable"
        elif node.name in skipped:
            status = "GKP: " + skipped[node.name]
        else:
            status = roles.get(node.name, "GKP: not a Conv")
        weight, axis, is_nm, trt = "dynamic", "-", "-", "-"
        if isinstance(ref, WeightRef):
            values = numpy_helper.to_array(initializers[ref.initializer])
            weight, axis = _shape(list(values.shape)), str(ref.axis)
            nm_ok = satisfies_nm(values, ref.axis, n, m) and ref.zero_point is None
            is_nm, trt = ("yes" if nm_ok else "no"), ("yes" if tensorrt_sparse_likely(
                list(values.shape), ref.axis, nm_ok, n, m) else "no")
        elif ref is None and node.input[1] in initializers:
            weight = _shape(list(initializers[node.input[1]].dims))
        rows.append((node.name, node.op_type, weight, _shape(shapes.get(node.output[0])), stats.node_macs.get(node.name),
                     params, axis, is_nm, trt, status))

    rows += [(s.node, s.op, "-", "-", None, 0, "-", "-", "-", "GKP: " + s.reason)
             for s in plan.skipped if s.node not in top]  # in subgraphs
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{path}: inputs " + ", ".join(f"{s.name} {_shape(s.shape)} {s.dtype}" for s in specs)]
    notes = details["canonical"] + [assumed_note(spec) for spec in specs if spec.assumed]
    lines += [f"input: {note}" for note in notes] + [""]
    lines += [
             f"{'node':<{width}}  {'op':<7} {'weight':<16} {'output':<18} {'MACs':>13} {'params':>10} "
             f"{'axis':>4} {nm:>4} {'TRT':>3}  status"]
    for name, op, weight, output, macs, params, axis, is_nm, trt, status in rows:
        lines.append(f"{name:<{width}}  {op:<7} {weight:<16} {output:<18} "
                     f"{'?' if macs is None else f'{macs:,}':>13} {params:>10,} {axis:>4} {is_nm:>4} {trt:>3}  {status}")
    pruned_macs = sum(layer.macs for layer in plan.layers)
    lines += ["", f"total: {stats.params:,} params, {stats.macs:,} MACs per sample; "
                  f"{len(plan.layers)} prunable Conv holding {pruned_macs:,} MACs "
                  f"({100 * pruned_macs / max(stats.macs, 1):.1f}%)",
              f"axis: the reduction axis of the weight ({nm} runs along it); TRT: TensorRT likely to use sparse "
              f"kernels ({nm} weight, reduction and outputs >= {TRT_MIN_DIM} and multiples of 16)",
              f"onnxruntime CPU NCHWc block here: {_block()} (optimize rounds kept channels to multiples of it: "
              f"--channel-multiple auto)"]
    lines += transformer + [f"measured (optimize, compare): {line}" for line in describe_measures(model)]
    return "\n".join(lines)


def _transformer_roles(model, shapes) -> tuple[dict[str, str], list[str]]:
    """Per MatMul/Gemm, its part in an attention or feed-forward block (the status column), and a
    summary line; from the graph alone (optimize also checks each pruned block by running it)."""
    roles: dict[str, str] = {}
    cores, skipped = attention_cores(model)
    for block, qk, _ in cores:
        dims = shapes.get(qk.output[0]) or []
        heads = f"{dims[-3]} heads" if len(dims) >= 3 else "heads"
        for node, role in ((block.query, "query"), (block.key, "key"), (block.value, "value"),
                           (block.output, "output")):
            role = "query/key/value" if block.split and role != "output" else role
            roles.setdefault(node.name, f"attention {role}: {heads} (--head-ratio)")
    for node, reason in skipped:
        roles[node] = f"attention output, heads kept: {reason}"
    regions = ffn_regions(model)
    for _, region in regions:
        for node, _ in region.sources + region.consumers:
            roles.setdefault(node.name, "feed-forward block: neurons (--ffn-ratio)")
    if not cores and not regions and not skipped:
        return roles, []
    return roles, [f"transformer: {len(cores)} attention block(s), {len(regions)} feed-forward block(s) "
                   f"(--head-ratio, --ffn-ratio, or per block with --target-speedup and --calib)"]


def _block() -> str:
    block = nchwc_block_size()
    return f"{block} channels" if block > 1 else "none (no NCHWc layout)"


def _shape(shape) -> str:
    return "?" if shape is None else "[" + ",".join(map(str, shape)) + "]"
