"""conv_budget: how many input channels each prunable Conv keeps, for a target speed-up
(--target-speedup X with --calib on a model whose Convs GKP prunes).

1. Options: per prunable Conv, its pruning ratio from RATIO_LEVELS. At each level the form is the
   one the pipeline decides for that uniform ratio (`decide`: channel rounding, group count, kept
   grouped kernels, the channel order partition_streams picks). The MACs a level saves: the
   layer's MACs times the share of input channels each output no longer reads.
2. Damage, measured at the model output on calibration samples (SAMPLES, fewer for large models:
   SAMPLE_MACS): with that Conv alone at that level, every other Conv dense; its pruned grouped
   kernels zeroed and, where the pipeline refits (--reconstruct), its kept ones as the refit of that
   level's model left them (`decide` gives them: the refit is what the damage must be measured
   after, or layers that refit well look as fragile as those that do not); for a classifier output
   [batch, classes] the mean KL divergence of its softmax from the dense model's, for other outputs
   1 - cosine; summed over the outputs. The weights and biases are inputs of one onnxruntime
   session per level: each option is one run.
3. Allocation and measured rounds as structured_budget's: the least damage per MAC saved first,
   until the MAC share the target asks for; the model pruned so is timed against the input and the
   share rescaled by the miss. The allocation is {"convs": {node: ratio}}; plan.layer_ratios
   carries it into analyze.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import initializer_map, initializers_as_inputs
from gkp_onnx.budget import measured_rounds
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan
from gkp_onnx.validate import Dataset, make_session, run_model, whole_batches

RATIO_LEVELS = (0.25, 0.375, 0.5, 0.625, 0.75)
SAMPLES = 128
SAMPLE_MACS = 2e10  # multiply-adds one option's run may take: fewer samples for large models, at least 8


def output_damage(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Summed over the outputs: the mean KL(softmax(reference) || softmax(output)) of a [batch,
    classes] output, 1 - cosine of any other."""
    total = 0.0
    for ref, out in zip(reference, outputs):
        ref, out = ref.astype(np.float64), out.astype(np.float64)
        if ref.ndim == 2 and ref.shape[1] > 1:
            p = np.exp(ref - ref.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            log_q = out - out.max(axis=1, keepdims=True)
            log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
            total += float(np.mean(np.sum(p * (np.log(np.maximum(p, 1e-300)) - log_q), axis=1)))
        else:
            norm = np.linalg.norm(ref) * np.linalg.norm(out)
            total += 1.0 - (float(ref.ravel() @ out.ravel()) / norm if norm > 0 else 0.0)
    return max(total, 0.0)


def with_biases(model: onnx.ModelProto, nodes: list[str]) -> onnx.ModelProto:
    """`model`, or a copy in which each named Conv without a bias reads one of zeros (a refit's
    intercept is then an input like its weight)."""
    wanted = set(nodes)

    def unbiased(node) -> bool:
        return node.name in wanted and (len(node.input) < 3 or not node.input[2])

    if not any(unbiased(node) for node in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = initializer_map(copy.graph)
    for node in copy.graph.node:
        if unbiased(node):
            weight = initializers[node.input[1]]
            name = f"{node.input[1]}_budget_bias"
            copy.graph.initializer.append(numpy_helper.from_array(
                np.zeros(weight.dims[0], helper.tensor_dtype_to_np_dtype(weight.data_type)), name))
            node.input[:] = [node.input[0], node.input[1], name]
    return copy


def dense_refit(model: onnx.ModelProto, layer) -> tuple[np.ndarray, np.ndarray]:
    """The weight and bias of `layer`'s grouped Conv in `model` (rewrite_conv's, as a refit left
    them) in the dense layout: [Co, Ci, *kernel] with the pruned kernels zero, and [Co]."""
    node = next(n for n in model.graph.node if n.name == layer.grouped_node)
    initializers = initializer_map(model.graph)
    grouped = numpy_helper.to_array(initializers[node.input[1]])
    bias = numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2] \
        else np.zeros(len(grouped), grouped.dtype)
    weight = np.zeros((layer.out_channels, layer.in_channels, *grouped.shape[2:]), grouped.dtype)
    dense_bias, start = np.zeros(layer.out_channels, grouped.dtype), 0
    for filters, channels in zip(layer.groups, layer.kept_channels):
        weight[np.ix_(filters, channels)] = grouped[start:start + len(filters)]
        dense_bias[filters] = bias[start:start + len(filters)]
        start += len(filters)
    return weight, dense_bias


class ConvBudget(Pass):
    name = "conv_budget"
    in_place = False  # measures; the model is not edited

    def __init__(self, target: float, data: Dataset, decide: Callable[[float], tuple[onnx.ModelProto, Plan, dict]],
                 total_macs: int, measure: Callable[[dict], float], levels: dict | None = None):
        self.target = target
        self.data = data
        self.decide = decide  # ratio -> (the model the decisions were made on, their plan, refit weights
        # per layer: node -> (weight, bias) in the dense layout, pruned kernels zero; {}: no refit)
        self.total_macs = total_macs
        self.measure = measure  # {"convs": {node: ratio}} -> measured speed-up
        self.levels = levels  # the options measured before on this model (a sweep measures them once)

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        options = self.levels if self.levels is not None else self._options()
        if not options:
            raise GkpError("nothing to optimize: --target-speedup found no Conv that GKP can prune and no "
                           "transformer attention head or feed-forward neuron (inspect says why)")
        allocation, summary = measured_rounds(options, self.target, self.total_macs, self.measure)
        return PassResult(model, plan, modified=False, details={"allocation": {"convs": allocation["convs"]},
                                                                "structured_budget": summary, "levels": options})

    def _options(self) -> dict[tuple[str, str], list[dict]]:
        """("convs", node) -> its levels, dense first: {"keep" (the ratio), "saved" MACs, "damage"}."""
        options: dict[tuple[str, str], list[dict]] = {}
        for ratio in RATIO_LEVELS:
            decided, plan, refits = self.decide(ratio)
            for layer in plan.layers:
                options.setdefault(("convs", layer.node), [{"keep": 0.0, "saved": 0, "damage": 0.0}])
            if not plan.layers:
                continue
            decided = with_biases(decided, [layer.node for layer in plan.layers])
            initializers = initializer_map(decided.graph)
            nodes = {node.name: node for node in decided.graph.node}
            biases = {layer.node: nodes[layer.node].input[2] for layer in plan.layers}
            weights = [layer.weight for layer in plan.layers] + list(biases.values())
            session = make_session(initializers_as_inputs(decided, weights))
            wanted = int(min(SAMPLES, max(8, SAMPLE_MACS / max(self.total_macs, 1))))
            sample = self.data.first(whole_batches(session, wanted))
            dense = {name: numpy_helper.to_array(initializers[name]) for name in weights}
            reference = run_model(session, sample, dense)
            for layer in plan.layers:
                weight, bias = refits.get(layer.node, (None, None))
                if weight is None:
                    weight, bias = dense[layer.weight].copy(), dense[biases[layer.node]]
                    weight[~layer.mask()] = 0
                feed = {**dense, layer.weight: weight.astype(dense[layer.weight].dtype),
                        biases[layer.node]: bias.astype(dense[biases[layer.node]].dtype)}
                damage = output_damage(reference, run_model(session, sample, feed))
                options[("convs", layer.node)].append(
                    {"keep": ratio, "saved": int(round(layer.macs * (1 - layer.kept_per_group / layer.in_channels))),
                     "damage": damage})
        return options
