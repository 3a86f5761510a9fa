"""fold_gathers: let the producing Conv compute a channel Gather's output directly.

Before                                               After (I = gather indices, |I| <= Co)

    X ─Conv(W [Co, ..], B)─ Y ─Relu/BN/..─ Z           X ─Conv(W[I], B[I])─ Y' ─Relu/BN[I]/..─ Z'
    Z ─Gather(axis=1, I)─ Z' ─> consumers               Z' ─> consumers

The producer's filters (and every per-channel parameter on the way) are re-indexed by I:
filters no consumer reads are dropped (dead-channel elimination), repeated indices duplicate a
filter. At G = 1 this is filter pruning of the producer: the Gather disappears and the producer
loses MACs too. Exact: the same numbers are computed, in the order the consumer reads them.

Fires when all hold:
- the Gather has axis 1 and constant 1-D indices, |I| <= Co (the producer never gets bigger);
- walking up from the Gather's input passes only per-channel ops (unary element-wise ops, pools,
  BatchNormalization, Add/Sub/Mul/Div with a constant that is per-channel or broadcast on the
  channel axis) and other channel Gathers (crossing one with indices P maps I to P[I]; it is
  removed), each tensor read by exactly one node and none a graph output;
- the chain starts at a Conv with group 1 whose weight and bias are constant initializers read
  by nothing else.

When the walk passes a channel Gather but cannot fold into a Conv (e.g. the producer would
grow), the two Gathers are still composed into one: the output permutation GKP puts after a
grouped Conv is absorbed into the next GKP Gather (indices P[I]), the per-channel ops between
re-indexed.

Grouped producer (G > 1, e.g. a GKP Conv whose consumer reads few of its outputs): groups must
stay equal, so each group computes max_g |I in g| filters (the needed ones, padded by repeats);
the Gather stays, re-indexed into the smaller output, and goes when that is the identity.

Permutation sinking, downward: a Gather whose indices permute all C channels of its input, read
(through per-channel ops, or a global pool + Flatten) by a Conv with group 1 or a Gemm/MatMul,
is absorbed into that layer's weight (input-channel axis permuted by the inverse; the per-channel
ops between re-indexed). Gathers before residual Adds, Concats, graph outputs or grouped Convs stay.
Shapes of the re-indexed tensors change (channel count |I|); stale value_info is dropped.
"""

from __future__ import annotations

import numpy as np
import onnx

from gkp_onnx.graph import (chain_index, channel_count, drop_unread, gather_index, graph_index, initializer_map,
                            node_attr, reduction_axis, reindex_params, replace_initializer, take_rows,
                            walk_to_consumer, walk_to_producer)
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan


class FoldGathers(Pass):
    name = "fold_gathers"
    in_place = True  # edits the model's weights or nodes in place

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        folded = 0
        while self._fold_one(model) or self._sink_one(model):
            folded += 1
        if folded:
            del model.graph.value_info[:]
        return PassResult(model, plan, modified=bool(folded))

    def _fold_one(self, model: onnx.ModelProto) -> bool:
        graph = model.graph
        initializers = initializer_map(graph)
        producers, _, readers, outputs = graph_index(graph)
        for gather in graph.node:
            index = gather_index(gather, initializers)
            if index is None:
                continue
            top, chain = walk_to_producer(gather.input[0], producers, readers, outputs, initializers)
            indices = chain_index(chain, index, initializers)
            if top is not None and node_attr(top, "group", 1) == 1:
                if len(indices[-1]) <= initializers[top.input[1]].dims[0]:
                    self._fold(model, gather, top, chain, indices, initializers)
                    return True
            elif top is not None and not any(node.op_type == "Gather" for node in chain):
                shrunk = shrink_grouped(indices[-1], initializers[top.input[1]].dims[0], node_attr(top, "group", 1))
                if shrunk is not None:
                    self._shrink(model, gather, top, chain, *shrunk, initializers)
                    return True
            inner = next((node for node in chain if node.op_type == "Gather"), None)
            if inner is not None:  # compose with the nearest Gather above: one Gather instead of two
                position = chain.index(inner)
                self._fold(model, gather, inner, chain[:position], indices[:position + 1], initializers)
                return True
        return False

    def _fold(self, model, gather, top, chain, indices, initializers) -> None:
        """Make `top` (a Conv, or a Gather to compose with) compute what `gather` reads; drop the
        Gathers in between. `indices`: chain_index of the chain, then the one for `top`."""
        for node, node_index in zip(chain, indices):
            if node.op_type != "Gather":
                reindex_params(model, node, node_index, initializers)
        take_rows(model, top, indices[-1], initializers)
        # rewire: drop the Gathers strictly inside the chain, then the folded Gather itself
        for node in [n for n in chain if n.op_type == "Gather"]:
            _reread(model.graph, node.output[0], node.input[0])
            model.graph.node.remove(node)
        _bypass(model, gather, chain[0] if chain else top)
        drop_unread(model)

    def _sink_one(self, model: onnx.ModelProto) -> bool:
        """Absorb a channel permutation into the weights of the dense layer that reads it."""
        graph = model.graph
        initializers = initializer_map(graph)
        producers, consumers, readers, outputs = graph_index(graph)
        for gather in graph.node:
            index = gather_index(gather, initializers)
            if index is None or not np.array_equal(np.sort(index), np.arange(len(index))) \
                    or channel_count(gather.input[0], producers, initializers) != len(index):
                continue
            chain, consumer = walk_to_consumer(gather.output[0], consumers, producers, readers, outputs, initializers)
            if consumer is None:
                continue
            inverse = np.argsort(index)  # channel j of the Gather's input is read at position inverse[j]
            for node in chain:
                reindex_params(model, node, inverse, initializers)
            axis = reduction_axis(consumer, len(initializers[consumer.input[1]].dims))  # the input-channel axis
            replace_initializer(model, initializers, consumer.input[1], lambda v: np.take(v, inverse, axis=axis), consumer, 1)
            _reread(graph, gather.output[0], gather.input[0])  # the first node below, or an activation's every read
            graph.node.remove(gather)
            drop_unread(model)
            return True
        return False

    def _shrink(self, model, gather, top, chain, keep, index, initializers) -> None:
        """Let grouped `top` compute only the filters in `keep`; `gather` then reads them with `index`
        (and disappears when that is the identity)."""
        for node in chain:
            reindex_params(model, node, keep, initializers)
        take_rows(model, top, keep, initializers)
        if np.array_equal(index, np.arange(len(keep))):
            _bypass(model, gather, chain[0] if chain else top)
        else:
            replace_initializer(model, initializers, gather.input[1], lambda v: index.astype(v.dtype), gather, 1)
        drop_unread(model)


def shrink_grouped(needed: np.ndarray, out_channels: int, group: int):
    """Dead-channel elimination for a grouped Conv whose outputs are read only at `needed`.

    Groups must stay equal, so each keeps max_g |needed in g| filters (a group needing fewer
    repeats one of them). Returns (keep, index): the filters to compute, group by group, and where
    each needed output now sits; None when that computes no fewer filters."""
    if group < 1 or out_channels % group:  # an invalid Conv (onnxruntime will say so): leave it
        return None
    width = out_channels // group
    wanted = [np.unique(needed[needed // width == g]) for g in range(group)]
    size = max(len(w) for w in wanted)
    if size * group >= out_channels:
        return None
    keep = np.concatenate([np.resize(w if len(w) else [g * width], size) for g, w in enumerate(wanted)])
    position = {int(c): g * size + k for g, w in enumerate(wanted) for k, c in enumerate(w)}
    return keep, np.array([position[int(c)] for c in needed], dtype=np.int64)


def _reread(graph, old: str, new: str) -> None:
    """Every node that reads `old` reads `new` instead."""
    for reader in graph.node:
        for slot, name in enumerate(reader.input):
            if name == old:
                reader.input[slot] = new


def _bypass(model, gather, last) -> None:
    """Remove `gather`: `last`, the node that produced its input, now produces its output."""
    last.output[0] = gather.output[0]
    model.graph.node.remove(gather)


