"""prune_neurons: remove feed-forward neurons of transformers (--ffn-ratio R): a smaller dense model.

Before                                      After
    x ──MatMul(W1 [D, F])──Add(b1)──act── h     x ──MatMul(W1[:, S])──Add(b1[S])──act── h_S
    h ──MatMul(W2 [F, D])── y                   h_S ──MatMul(W2[S, :])── y'

The regions are those the N:M permutation reorders (gkp_onnx.nm_permutation.find_region): hidden
channels written by MatMul/Gemm with constant weights (with their biases), carried through
element-wise ops (GELU, also decomposed into Div/Erf/Add/Mul; SiLU; a SwiGLU gate * up) with
per-channel or scalar constants, and read only by MatMul/Gemm with constant weights. S keeps
(1 - R) * F neurons rounded up to a multiple of structured.ROUND_TO (or, per block, the count
`keep` gives: --target-speedup): with calibration data, those greedy Optimal Brain Surgeon keeps
on the covariance of the neurons' activations and the rows they feed (gkp_onnx.structured.obs_kept:
the output error after the refit, padding positions left out); without, the best by the norms of
the weights that write each neuron times those of the rows it feeds. The kept neurons compute
exactly what they did; every tensor outside the regions keeps its shape. With --reconstruct, the
consumers' weights are refit to the dense model's outputs (reconstruct_nm, dense masks).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph import initializer_map, reduction_axis
from gkp_onnx.nm_permutation import channel_rows, find_region, take_channels
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan
from gkp_onnx.structured import kept_neurons, obs_kept


class PruneNeurons(Pass):
    name = "prune_neurons"
    in_place = True  # edits the model's weights in place

    def __init__(self, ratio: float, exclude=(), covariances: dict[str, np.ndarray] | None = None,
                 keep: dict[str, int] | None = None):
        self.ratio = ratio
        self.keep = keep or {}  # the tensor a block's consumers read -> neurons it keeps (else by `ratio`)
        self.exclude = list(exclude)
        self.covariances = covariances or {}  # a consumer's input tensor -> covariance of its channels

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        regions = ffn_regions(model, self.exclude)
        initializers = initializer_map(model.graph)
        pruned, orders, total = [], {}, 0  # orders: per source MatMul/Gemm, the original output channels it keeps
        for tensor, region in regions:
            width = initializers[region.consumers[0][0].input[1]].dims[region.consumers[0][1]]
            total += width
            keep = self.keep.get(tensor, kept_neurons(width, self.ratio))
            if keep >= width:
                continue
            fed = np.concatenate([channel_rows(numpy_helper.to_array(initializers[consumer.input[1]]), axis).T
                                  for consumer, axis in region.consumers], axis=1)  # [F, the rows each feeds]
            if tensor in self.covariances:
                kept = obs_kept(self.covariances[tensor], fed, keep)
            else:
                written = np.zeros(width)
                for source, axis in region.sources:
                    written += _norms(numpy_helper.to_array(initializers[source.input[1]]), axis) ** 2
                score = np.linalg.norm(fed.astype(np.float64), axis=1) * np.sqrt(written)
                kept = np.sort(np.argsort(-score, kind="stable")[:keep])
            for node, axis in region.sources + region.consumers:
                take_channels(initializers[node.input[1]], kept, axis)
            for name in region.constants:
                take_channels(initializers[name], kept, -1)
            stale = set(region.tensors)
            for value in list(model.graph.value_info):
                if value.name in stale:
                    model.graph.value_info.remove(value)
            pruned.append({"consumers": [c.name for c, _ in region.consumers], "neurons": width, "kept": keep})
            orders.update({source.name: kept for source, _ in region.sources})
        return PassResult(model, plan, modified=bool(pruned), details={"neurons": pruned, "output_orders": orders,
                                                                      "neurons_total": total})


def ffn_regions(model: onnx.ModelProto, exclude=()) -> list:
    """(the tensor the consumers read, its region) for every prunable feed-forward region."""
    initializers = initializer_map(model.graph)
    found, seen = [], set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        if node.input[0] in seen or any(p.search(node.name) or p.search(node.input[1]) for p in exclude):
            continue
        weight = initializers[node.input[1]]
        if node.op_type == "MatMul" and len(weight.dims) != 2:
            continue
        region = find_region(model, node.input[0], weight.dims[reduction_axis(node, len(weight.dims))])
        if region is None or any(p.search(c.name) for c, _ in region.consumers for p in exclude):
            continue
        seen.update(region.tensors)  # a block reaches its consumers through several tensors: prune it once
        found.append((node.input[0], region))
    return found


def _norms(weight: np.ndarray, axis: int) -> np.ndarray:
    """L2 norm of the weights of each channel along `axis`."""
    return np.linalg.norm(channel_rows(weight.astype(np.float64), axis), axis=0)
