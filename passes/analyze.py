"""analyze: find every Conv that Grouped Kernel Pruning can rewrite, and say why the others not.

Before: any ONNX model.
After:  the model is unchanged; `plan.layers` holds one `LayerPlan` per prunable Conv (shapes,
        dense MACs, n = kept input channels per group, rounded to multiples of `channel_multiple`
        when it is > 1: round_to_multiple), `plan.skipped` every other Conv with the reason.

A Conv is prunable when all of these hold:
- its weight (input 1) is a constant initializer read by this node only, its bias (if any) too;
- group == 1 (Conv1d, 2d and 3d alike);
- it is in the main graph (Convs in If / Loop / Scan subgraphs are skipped, and so are
  ConvTranspose and QDQ Convs, whose weight is a DequantizeLinear of an integer tensor);
- its name and its weight's name match none of the --exclude regexes;
- it is not the stem: a Conv reading a graph input with <= 4 channels is skipped unless
  `include_stem` (the prior art keeps the stem dense);
- it is not a zero-padding shortcut that shortcut_convs made a Conv (kept exact);
- onnx shape inference knows its output shape (needed for MACs).

For the cost models it also records where the layer's Gathers can go (fold_gathers' rules on the
input graph): `input_folds` when the Conv producing the input feeds nothing else (the input Gather
folds into it), `output_sinks` when the output reaches a dense Conv or Gemm through per-channel ops
(an output permutation is absorbed there). A residual stream does neither.
"""

from __future__ import annotations

import re

import onnx

from gkp_onnx.graph import (SHORTCUT_CONV, InputSpec, graph_index, graph_inputs, infer_shapes, initializer_map,
                            marked, node_attr, node_macs, subgraphs, walk_to_consumer, walk_to_producer)
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import LayerPlan, Plan, SkippedLayer

STEM_MAX_CHANNELS = 4
CONV_GEOMETRY = ("strides", "pads", "dilations", "auto_pad")


def _subgraph_convs(graph: onnx.GraphProto) -> list[SkippedLayer]:
    """The Convs inside If branches and Loop / Scan bodies, at any depth: only the main graph is
    rewritten (what the subgraphs read from it is left as it is: graph.pinned)."""
    found = []
    for node in graph.node:
        for name, sub in subgraphs(node):
            where = f"inside the '{name}' subgraph of {node.op_type} '{node.name}'"
            found += [SkippedLayer(f"{node.name}/{name}/{inner.name or f'{inner.op_type}_{i}'}", inner.op_type,
                                   f"{where}: only the main graph is rewritten")
                      for i, inner in enumerate(sub.node) if inner.op_type in ("Conv", "ConvTranspose")]
            found += _subgraph_convs(sub)
    return found


def kept_per_group(in_channels: int, ratio: float) -> int:
    """n = round((1 - ratio) * Ci), half rounded up, at least one channel."""
    return max(1, int((1.0 - ratio) * in_channels + 0.5))


def round_to_multiple(layers: list[tuple[int, int]], ratio: float | list[float], multiple: int) -> list[int]:
    """Kept channels n per layer, (in_channels, MACs) each, for hardware-friendly shapes.

    onnxruntime CPU runs Convs in its NCHWc layout with channel blocks of 8 (AVX2) or 16 (AVX512):
    a Conv reading n >= block channels pays for n rounded up to a multiple of the block, fewer
    than a block for n rounded up to a multiple of half a block (measured, AnalyticCpuCost). So n
    is such a multiple (`multiple` from `multiple` channels up, `multiple` / 2 below): the one below
    or above (1 - ratio) * Ci, whichever keeps the running sum of kept MACs over the rounded layers
    closest to the ratio (error diffusion in graph order; ties keep more). The ratio thus holds
    over the model, not per layer; a layer may round up to all its channels (it stays dense).
    Layers narrower than `multiple`, and every layer when `multiple` is 1, keep the plain
    `kept_per_group`. `ratio`: one for all layers, or one per layer.
    """
    kept, carry = [], 0.0
    ratios = ratio if isinstance(ratio, list) else [ratio] * len(layers)
    for (in_channels, macs), ratio in zip(layers, ratios):
        if ratio <= 0:  # all channels, and no rounding error to carry
            kept.append(in_channels)
            continue
        exact = (1.0 - ratio) * in_channels
        step = multiple if exact >= multiple else multiple // 2
        if multiple <= 1 or in_channels < multiple or exact < step:
            kept.append(kept_per_group(in_channels, ratio))
            continue
        below = step * int(exact // step)
        above = min(in_channels, below + step)
        per_channel = macs / in_channels
        n = min((above, below), key=lambda c: abs(carry + (c - exact) * per_channel))
        carry += (n - exact) * per_channel
        kept.append(n)
    return kept


def _geometry(node: onnx.NodeProto) -> dict:
    """The Conv attributes that shape its computation, JSON-ready (auto_pad as text)."""
    found = {name: node_attr(node, name) for name in CONV_GEOMETRY}
    if isinstance(found["auto_pad"], bytes):
        found["auto_pad"] = found["auto_pad"].decode()
    return {name: value for name, value in found.items() if value is not None}


class Analyze(Pass):
    name = "analyze"
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

    def __init__(self, specs: list[InputSpec], exclude: list[re.Pattern] = (), include_stem: bool = False,
                 channel_multiple: int = 1):
        self.specs = specs
        self.exclude = list(exclude)
        self.include_stem = include_stem
        self.channel_multiple = channel_multiple

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        names = [n.name for n in model.graph.node]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise PassContractError("analyze needs unique node names (call ensure_node_names)")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        shapes = infer_shapes(model, self.specs)
        initializers = initializer_map(model.graph)
        producers, consumers, readers, outputs = graph_index(model.graph)
        input_names = {i.name for i in graph_inputs(model)}
        plan.layers, plan.skipped = [], []
        folds_into = {}  # layer -> the Conv its input Gather folds into (whose outputs it then prunes)
        plan.skipped += _subgraph_convs(model.graph)
        for node in model.graph.node:
            if node.op_type == "ConvTranspose":
                plan.skipped.append(SkippedLayer(node.name, node.op_type, "ConvTranspose: GKP rewrites Conv only"))
            if node.op_type != "Conv":
                continue
            reason = self._skip_reason(node, initializers, producers, readers, input_names, shapes)
            if reason:
                plan.skipped.append(SkippedLayer(node.name, node.op_type, reason))
                continue
            co, ci, *kernel = initializers[node.input[1]].dims
            input_shape = shapes.get(node.input[0])
            top = walk_to_producer(node.input[0], producers, readers, outputs, initializers)[0]
            if top is not None:
                folds_into[node.name] = top
            plan.layers.append(LayerPlan(
                node=node.name, weight=node.input[1], out_channels=co, in_channels=ci,
                kernel_shape=list(kernel), macs=node_macs(node, shapes), kept_per_group=0,
                input_size=input_shape[2:] if input_shape else None,
                conv_attrs=_geometry(node),
                input_folds=top is not None,
                output_sinks=walk_to_consumer(node.output[0], consumers, producers, readers, outputs,
                                              initializers)[1] is not None))
        pruned = {layer.node for layer in plan.layers}

        def keep(node: str) -> float:  # the share of its input channels a layer keeps
            return 1.0 - plan.layer_ratios.get(node, plan.ratio) if node in pruned else 1.0

        for layer in plan.layers:
            top = folds_into.get(layer.node)
            if top is not None:
                layer.producer_macs = (node_macs(top, shapes) or 0) * keep(top.name)
        # the MACs that scale with a layer's kept channels: its own (times what it keeps where a
        # later layer's Gather folds into it and prunes its outputs), and its producer's outputs
        folded = {top.name for top in folds_into.values()}
        scaled = [layer.macs * (keep(layer.node) if layer.node in folded else 1.0) + layer.producer_macs
                  for layer in plan.layers]
        ratios = [plan.layer_ratios.get(layer.node, plan.ratio) for layer in plan.layers]
        kept = round_to_multiple([(layer.in_channels, macs) for layer, macs in zip(plan.layers, scaled)],
                                 ratios, self.channel_multiple)
        for layer, n in zip(plan.layers, kept):
            layer.kept_per_group = n
        whole = [bool(plan.layer_ratios) and ratio == 0 for ratio in ratios]  # a budget's layers at 0 stay dense
        plan.skipped += [SkippedLayer(layer.node, "Conv", "kept dense: the --target-speedup budget keeps it whole")
                         for layer, dense in zip(plan.layers, whole) if dense]
        if self.channel_multiple > 1:  # a layer rounded up to all its channels stays dense
            plan.skipped += [SkippedLayer(layer.node, "Conv", f"kept dense: rounded to multiples of "
                                          f"{self.channel_multiple}, it keeps all {layer.in_channels} channels")
                             for layer, ratio, dense in zip(plan.layers, ratios, whole)
                             if ratio > 0 and not dense and layer.kept_per_group >= layer.in_channels]
        plan.layers = [layer for layer, ratio, dense in zip(plan.layers, ratios, whole) if not dense and
                       (ratio == 0 or self.channel_multiple <= 1 or layer.kept_per_group < layer.in_channels)]
        return PassResult(model, plan, modified=False)

    def _skip_reason(self, node, initializers, producers, readers, input_names, shapes) -> str | None:
        weight = node.input[1]
        if weight in producers and producers[weight].op_type == "DequantizeLinear":
            return "weight is quantized (QDQ: DequantizeLinear of an integer initializer): kept as it is"
        if weight not in initializers:
            return "weight is not a constant initializer (computed at run time)"
        group = node_attr(node, "group", 1)
        dims = list(initializers[weight].dims)
        if group != 1:
            return "depthwise Conv" if group == dims[0] and dims[1] == 1 else f"already grouped (group={group})"
        if len(node.input) > 2 and node.input[2] and node.input[2] not in initializers:
            return "bias is not a constant initializer"
        if readers[weight] > 1:
            return f"weight '{weight}' is shared by {readers[weight]} nodes"
        for pattern in self.exclude:
            if pattern.search(node.name) or pattern.search(weight):
                return f"excluded by --exclude '{pattern.pattern}'"
        if marked(node, SHORTCUT_CONV):
            return "the residual shortcut gkp-onnx made a Conv of (shortcut_convs): kept exact"
        if not self.include_stem and node.input[0] in input_names and dims[1] <= STEM_MAX_CHANNELS:
            return f"stem Conv on a {dims[1]}-channel graph input (kept dense; --include-stem prunes it)"
        if node.output[0] not in shapes:
            return "output shape unknown to onnx shape inference"
        return None
