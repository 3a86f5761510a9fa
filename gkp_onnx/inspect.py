"""`gkp-onnx inspect`: what the model holds and what the passes could change, layer by layer."""

from __future__ import annotations

import numpy as np

from gkp_onnx.graph_stats import MAC_OPS, ensure_node_names, infer_shapes, input_specs, model_stats
from gkp_onnx.model_io import load_model
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.pipeline import run_passes
from gkp_onnx.plan import Plan


def inspect_model(path: str, input_shapes: dict[str, list[int]] | None = None, include_stem: bool = False) -> str:
    model = load_model(path)
    ensure_node_names(model)
    specs = input_specs(model, input_shapes)
    shapes = infer_shapes(model, specs)
    plan = Plan(ratio=0.0, method="-", seed=0)
    run_passes([Analyze(specs, include_stem=include_stem)], model, plan)
    prunable = {layer.node for layer in plan.layers}
    skipped = {s.node: s.reason for s in plan.skipped}
    stats = model_stats(model, specs, shapes)
    initializers = {t.name: t for t in model.graph.initializer}

    rows = []
    for node in model.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        weight = next((initializers[name] for name in node.input[1:2] if name in initializers), None)
        params = sum(int(np.prod(initializers[name].dims)) for name in node.input[1:] if name in initializers)
        if node.name in prunable:
            status = "prunable (GKP)"
        elif node.name in skipped:
            status = "skipped: " + skipped[node.name]
        else:
            status = "not a Conv: GKP leaves it dense"
        rows.append((node.name, node.op_type, _shape(list(weight.dims)) if weight is not None else "dynamic",
                     _shape(shapes.get(node.output[0])), stats.node_macs.get(node.name), params, status))

    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{path}: inputs " + ", ".join(f"{s.name} {_shape(s.shape)} {s.dtype}" for s in specs), "",
             f"{'node':<{width}}  {'op':<7} {'weight':<16} {'output':<18} {'MACs':>13} {'params':>10}  status"]
    for name, op, weight, output, macs, params, status in rows:
        lines.append(f"{name:<{width}}  {op:<7} {weight:<16} {output:<18} "
                     f"{'?' if macs is None else f'{macs:,}':>13} {params:>10,}  {status}")
    pruned_macs = sum(layer.macs for layer in plan.layers)
    lines += ["", f"total: {stats.params:,} params, {stats.macs:,} MACs per sample; "
                  f"{len(plan.layers)} prunable Conv holding {pruned_macs:,} MACs "
                  f"({100 * pruned_macs / max(stats.macs, 1):.1f}%)"]
    return "\n".join(lines)


def _shape(shape) -> str:
    return "?" if shape is None else "[" + ",".join(map(str, shape)) + "]"
