"""select_kernels: choose, per filter group, the n input channels whose grouped kernels survive.

Before: every layer has `group_count` and `groups` (choose_groups; a selection it already made is kept).
After:  the model is unchanged; every layer has `kept_channels` (G sorted lists of n distinct
        input channels, n = kept_per_group) and `retained_importance`. A layer in the shared
        form (partition_streams) keeps its component's blocks, and its filter groups are redone
        so that the filters a later layer reads (its Gather folding into this one) are spread
        evenly over the groups: the layer then computes only those.
The scores and the methods: gkp_onnx/scoring.py.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from gkp_onnx.graph import graph_index, initializer_map, walk_to_producer
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import Plan
from gkp_onnx.scoring import retained_importance, select, shared_blocks, shared_groups


def read_outputs(model: onnx.ModelProto, plan: Plan) -> dict[str, list[int]]:
    """Per layer whose outputs a later layer's Gather folds into (fold_gathers), the sorted
    output channels that layer reads."""
    initializers = initializer_map(model.graph)
    producers, _, readers, outputs = graph_index(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    read = {}
    for layer in plan.layers:
        if layer.input_folds and layer.kept_channels is not None:
            top = walk_to_producer(nodes[layer.node].input[0], producers, readers, outputs, initializers)[0]
            if top is not None:
                read[top.name] = sorted({c for kept in layer.kept_channels for c in kept})
    return read


class SelectKernels(Pass):
    name = "select_kernels"
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

    def __init__(self, method: str = "leanflex", seed: int = 0):
        self.method = method
        self.seed = seed

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        if any(layer.groups is None for layer in plan.layers):
            raise PassContractError("select_kernels needs the groups chosen by choose_groups")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        weights = initializer_map(model.graph)
        for layer in plan.layers:
            if not layer.shared:
                weight = numpy_helper.to_array(weights[layer.weight])
                if layer.kept_channels is None:  # choose_groups keeps the selection it scored
                    layer.kept_channels = select(weight, layer.groups, layer.kept_per_group, self.method, self.seed)
                layer.retained_importance = retained_importance(weight, layer.groups, layer.kept_channels)
        needed = read_outputs(model, plan)
        for layer in plan.layers:  # the shared form: blocks; filters spread so that later Gathers fold
            if layer.shared:
                weight = numpy_helper.to_array(weights[layer.weight])
                layer.groups = shared_groups(layer, weight, needed.get(layer.node))
                layer.kept_channels = shared_blocks(layer)
                layer.retained_importance = retained_importance(weight, layer.groups, layer.kept_channels)
        return PassResult(model, plan, modified=False)

    def ensures(self, model: onnx.ModelProto, plan: Plan) -> None:
        for layer in plan.layers:
            for channels in layer.kept_channels:
                if len(channels) != layer.kept_per_group or len(set(channels)) != len(channels) \
                        or not all(0 <= c < layer.in_channels for c in channels):
                    raise PassContractError(f"select_kernels: bad kept set in layer {layer.node}")
