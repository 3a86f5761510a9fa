"""Baselines for honest comparison, built from the same passes as GKP.

Classic L1 filter pruning (Li et al. 2017) at a ratio p: a Conv A whose output reaches Conv B
only through per-channel ops keeps the round((1 - p) * Co) filters with the largest L1 norm, and
B loses the matching input channels. Expressed here as a G = 1 plan for B (kept channels = A's
strongest filters); rewrite_conv then fold_gathers turn it into a filter-pruned A and a narrower
B with no Gather left. Convs whose input is not produced that way (e.g. the first Conv of a
residual block, which reads the residual stream) stay dense, as in the classic method.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph import clear_marks, ensure_node_names, graph_index, input_specs, node_attr
from gkp_onnx.passes.analyze import Analyze
from gkp_onnx.graph import walk_to_producer
from gkp_onnx.passes.fold_gathers import FoldGathers
from gkp_onnx.passes.reconstruct import Reconstruct
from gkp_onnx.passes.rewrite_conv import RewriteConv
from gkp_onnx.passes.shortcut_convs import shortcuts_as_convs
from gkp_onnx.pipeline import run_passes
from gkp_onnx.plan import Plan, SkippedLayer
from gkp_onnx.validate import Dataset


def l1_filter_plan(model: onnx.ModelProto, ratio: float, input_shapes: dict | None = None,
                   channel_multiple: int = 1) -> Plan:
    plan = Plan(ratio=ratio, method="l1-filter", seed=0)
    run_passes([Analyze(input_specs(model, input_shapes), channel_multiple=channel_multiple)], model, plan)
    initializers = {t.name: t for t in model.graph.initializer}
    producers, _, readers, outputs = graph_index(model.graph)
    nodes = {node.name: node for node in model.graph.node}
    layers = []
    for layer in plan.layers:
        top, chain = walk_to_producer(nodes[layer.node].input[0], producers, readers, outputs, initializers)
        if top is None or node_attr(top, "group", 1) != 1 or any(node.op_type == "Gather" for node in chain):
            plan.skipped.append(SkippedLayer(layer.node, "Conv", "input not produced by a prunable Conv"))
            continue
        l1 = np.abs(numpy_helper.to_array(initializers[top.input[1]])).reshape(layer.in_channels, -1).sum(axis=1)
        layer.group_count = 1
        layer.groups = [list(range(layer.out_channels))]
        layer.kept_channels = [sorted(np.argsort(-l1, kind="stable")[:layer.kept_per_group].tolist())]
        layers.append(layer)
    plan.layers = layers
    return plan


def l1_filter_pruning(model: onnx.ModelProto, ratio: float, input_shapes: dict | None = None,
                      channel_multiple: int = 1, calib: Dataset | None = None) -> tuple[onnx.ModelProto, Plan]:
    """The L1 filter-pruned model (refit on `calib` when given) and its plan. Zero-padding shortcuts
    become Convs first, as in optimize, so that a comparison with GKP compares the pruning."""
    working = onnx.ModelProto()
    working.CopyFrom(model)
    ensure_node_names(working)
    working = shortcuts_as_convs(working)
    plan = l1_filter_plan(working, ratio, input_shapes, channel_multiple)
    refit = [Reconstruct(working, calib)] if calib is not None else []
    pruned, plan = run_passes([RewriteConv(), *refit, FoldGathers()], working, plan)
    clear_marks(pruned)
    return pruned, plan
