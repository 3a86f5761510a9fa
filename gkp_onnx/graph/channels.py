"""The channel-dependency graph: which ops act on each channel separately (the one op table),
the walks along a channel axis (up to the Conv that produces it, down to the layer that
contracts it), and the channel spaces whose order can be changed for free.

The walks also cross activations that exporters spell as small element-wise graphs reading
their input more than once (SiLU x * sigmoid(x), GELU x * 0.5 * (1 + erf(x / sqrt 2)) and its
tanh form, Swish): `activation_region`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph.index import initializer_map, node_attr, pinned


GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}


# Element-wise ops of one tensor input (Clip's min/max are scalars): they act on each channel alone
# whatever the channel axis, so the Conv walks (axis 1) and the N:M regions (last axis) share them.
UNARY_ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu",
                     "Softplus", "Mish", "Identity", "Erf", "Gelu", "Neg", "Abs", "Exp", "Cast"}


BINARY_PER_CHANNEL = {"Add", "Sub", "Mul", "Div"}
MAX_REGION = 12  # nodes of one activation_region


def _elementwise(node, initializers) -> bool:
    """An op of an activation_region: unary element-wise, or binary whose constants are scalars."""
    if node.op_type in UNARY_ELEMENTWISE or node.op_type in ("Sqrt", "Reciprocal"):
        return True
    return (node.op_type in BINARY_PER_CHANNEL or node.op_type == "Pow") and len(node.input) == 2 \
        and all(n not in initializers or channel_constant(n, initializers) == "broadcast" for n in node.input)


def activation_region(node, producers, readers, outputs, initializers) -> tuple[str, list] | None:
    """(x, nodes) when `node` ends an element-wise function of one tensor x that reads x more than
    once, every tensor inside read only inside and none of them in `outputs` (x may be read
    elsewhere too: the walks check); `nodes` starts with `node`. `readers`: tensor -> how many node
    inputs read it. None otherwise."""
    if not _elementwise(node, initializers) or sum(n not in initializers for n in node.input) < 2:
        return None
    region = [node]
    while len(region) <= MAX_REGION:
        produced = {o for n in region for o in n.output}
        inside = Counter(n for member in region for n in member.input if n and n not in initializers)
        leaves = [t for t in inside if t not in produced]
        if any(readers[t] != inside[t] or t in outputs for t in produced - {node.output[0]}):
            return None
        if len(leaves) == 1:
            return (leaves[0], region) if inside[leaves[0]] > 1 else None
        # grow through a leaf read only inside: the function's own intermediate, not its input
        up = next((producers[t] for t in leaves if readers[t] == inside[t] and t in producers), None)
        if up is None or not _elementwise(up, initializers):
            return None
        region.append(up)
    return None


def region_below(tensor, consumers, producers, readers, outputs, initializers) -> tuple[str, list] | None:
    """(output, nodes) of the activation_region whose input is `tensor` and that reads every use of it."""
    node = consumers.get(tensor)
    for _ in range(MAX_REGION):
        if node is None:
            return None
        region = activation_region(node, producers, readers, outputs, initializers)
        if region is not None and region[0] == tensor:
            inside = sum(name == tensor for member in region[1] for name in member.input)
            return (node.output[0], region[1]) if inside == readers[tensor] else None
        if len(node.output) != 1 or readers[node.output[0]] != 1:
            return None
        node = consumers.get(node.output[0])
    return None


def is_per_channel(node, initializers) -> bool:
    """An op acting on each channel separately (its constants per-channel or broadcast)."""
    if node.op_type in POOLS:
        return len(node.output) == 1 or not node.output[1]  # MaxPool's Indices output: channel-indexed
    if node.op_type in UNARY_ELEMENTWISE:
        return True
    if node.op_type == "PRelu":
        return channel_constant(node.input[1], initializers) is not None
    if node.op_type == "BatchNormalization":
        return all(name in initializers for name in node.input[1:5])
    if node.op_type in BINARY_PER_CHANNEL:
        return node.input[0] not in initializers and channel_constant(node.input[1], initializers) is not None
    return is_depthwise(node, initializers)


def is_depthwise(node, initializers) -> bool:
    """A depthwise Conv (one filter per channel, group = channels), its weight and bias constant:
    a per-channel op, so channel Gathers move across it (its filters re-indexed)."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in initializers:
        return False
    dims = initializers[node.input[1]].dims
    bias = node.input[2] if len(node.input) > 2 else ""
    return len(dims) >= 3 and dims[1] == 1 and node_attr(node, "group", 1) == dims[0] > 1 \
        and (not bias or bias in initializers)


def fits_rank(nodes, rank: int | None, initializers) -> bool:
    """Whether every per-channel constant of `nodes` (Mul/Add/.. and PRelu) is laid out per channel
    for activations of `rank` (the rank of the Conv weights around them): channel_constant reads
    [C, 1, 1] as 4-D's layout, which on a Conv3d's 5-D tensor is a constant along depth and on a
    Conv1d's 3-D one does not broadcast on the channel axis. None: unknown, nothing may be such."""
    for node in nodes:
        if (node.op_type in BINARY_PER_CHANNEL or node.op_type == "PRelu") and len(node.input) > 1 \
                and channel_constant(node.input[1], initializers) == "per_channel":
            dims = list(initializers[node.input[1]].dims)
            if rank is None or rank - len(dims) + channel_position(dims) != 1:  # broadcast aligns from the right
                return False
    return True


def channel_position(dims: list[int]) -> int:
    """The axis of a per-channel constant's one dimension above 1."""
    return next(axis for axis, size in enumerate(dims) if size > 1)


def channel_constant(name, initializers) -> str | None:
    """'broadcast' when the constant has size 1 on the channel axis, 'per_channel' for a [C, 1, ..]
    or [1, C, 1, ..] layout (which of these is the channel axis depends on the activation's rank:
    fits_rank), None otherwise."""
    if name not in initializers:
        return None
    dims = list(initializers[name].dims)
    if all(d == 1 for d in dims):
        return "broadcast"
    if len(dims) >= 2 and sum(d > 1 for d in dims) == 1 and channel_position(dims) <= 1:
        return "per_channel"
    return None


def gather_index(node, initializers) -> np.ndarray | None:
    """The constant 1-D indices of a channel Gather (axis 1), else None."""
    if node.op_type != "Gather" or node_attr(node, "axis", 0) != 1 or node.input[1] not in initializers:
        return None
    index = numpy_helper.to_array(initializers[node.input[1]])
    return index if index.ndim == 1 and (index >= 0).all() else None


def chain_index(chain, index, initializers) -> list[np.ndarray]:
    """The index each chain node (nearest first) is re-indexed with, then the one for the top:
    crossing a Gather with indices P upward maps I to P[I]."""
    indices = []
    for node in chain:
        indices.append(index)
        gathered = gather_index(node, initializers)
        if gathered is not None:
            index = gathered[index]
    return indices + [index]


def channel_count(tensor, producers, initializers) -> int | None:
    """Channels of `tensor` when a Conv or channel Gather above it (through per-channel ops) says."""
    node = producers.get(tensor)
    while node is not None and is_per_channel(node, initializers):
        node = producers.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "Conv" and node.input[1] in initializers:
        return initializers[node.input[1]].dims[0]
    index = gather_index(node, initializers)
    return None if index is None else len(index)


def walk_to_producer(tensor, producers, readers, outputs, initializers):
    """Walk up from `tensor` through per-channel ops, activation_regions and axis-1 Gathers, each
    tensor read once (a region's input: only by the region).

    Returns (top, chain): chain lists the nodes passed, nearest first; top is the Conv where the
    walk ended (its weight and bias constants read by nothing else; any group count), or None."""
    chain, reads = [], 1  # reads: the uses of `tensor` the walk accounts for
    while True:
        node = producers.get(tensor)
        if node is None or readers[tensor] != reads or tensor in outputs:
            return None, chain
        if node.op_type == "Conv" and not is_depthwise(node, initializers):
            params = [name for name in node.input[1:] if name]
            if any(p not in initializers or readers[p] != 1 for p in params) \
                    or not fits_rank(chain, len(initializers[node.input[1]].dims), initializers):
                return None, chain
            return node, chain
        if gather_index(node, initializers) is not None or is_per_channel(node, initializers):
            chain.append(node)
            tensor, reads = node.input[0], 1
            continue
        region = activation_region(node, producers, readers, outputs, initializers)
        if region is None:
            return None, chain
        tensor, nodes = region
        chain += nodes
        reads = sum(name == tensor for member in nodes for name in member.input)


def walk_to_consumer(tensor, consumers, producers, readers, outputs, initializers):
    """Walk down from `tensor` through per-channel ops (and Flatten after a global pool) to the
    layer that contracts its channel axis: a Conv with group 1, or a Gemm/MatMul after the Flatten,
    its weight a constant read by nothing else. Each tensor read once (or only by one
    activation_region, crossed whole), none a graph output.

    Returns (chain, consumer): the nodes passed, nearest first, and the layer, or None."""
    chain, flat, start = [], False, tensor
    while tensor not in outputs and tensor in consumers:
        if readers[tensor] != 1 or consumers[tensor].input[0] != tensor:
            below = None if flat else region_below(tensor, consumers, producers, readers, outputs, initializers)
            if below is None:
                break
            tensor, nodes = below
            chain += nodes[::-1]
            continue
        node = consumers[tensor]
        weight = node.input[1] if len(node.input) > 1 else ""
        if (node.op_type == ("MatMul" if flat else "Conv") or (flat and node.op_type == "Gemm")) \
                and not is_depthwise(node, initializers):
            ok = weight in initializers and readers[weight] == 1 and node_attr(node, "group", 1) == 1 \
                and not node_attr(node, "transA", 0) and (node.op_type != "MatMul" or len(initializers[weight].dims) == 2)
            rank = len(initializers[weight].dims) if ok and not flat else _rank_above(start, producers, initializers)
            return chain, (node if ok and fits_rank(chain, rank, initializers) else None)
        if node.op_type == "Flatten" and node_attr(node, "axis", 1) == 1 and chain \
                and chain[-1].op_type.startswith("Global") and not flat:
            flat = True
        elif flat or not is_per_channel(node, initializers):
            break
        chain.append(node)
        tensor = node.output[0]
    return chain, None


def _rank_above(tensor, producers, initializers) -> int | None:
    """The rank of the Conv weight that computes `tensor` (through Gathers and per-channel ops)."""
    node = producers.get(tensor)
    while node is not None and node.op_type != "Conv" and (gather_index(node, initializers) is not None
                                                           or is_per_channel(node, initializers)):
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Conv" or node.input[1] not in initializers:
        return None
    return len(initializers[node.input[1]].dims)


def reduction_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Gemm":
        trans_b = node_attr(node, "transB", 0)
        return 1 if trans_b else 0
    if node.op_type == "Conv":
        return 1
    return rank - 2  # MatMul B [..., K, N]


def weight_rows(node: onnx.NodeProto, initializers) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """A 2-D MatMul/Gemm weight as rows [input channels, outputs] (float64: y = x @ rows), and the
    function that puts such rows back into the weight's layout and dtype."""
    weight = numpy_helper.to_array(initializers[node.input[1]])
    axis = reduction_axis(node, 2)
    rows = (weight if axis == 0 else weight.T).astype(np.float64)
    return rows, lambda new: np.ascontiguousarray(new if axis == 0 else new.T).astype(weight.dtype)




@dataclass
class Component:
    """One channel space: its tensors and the nodes a reordering touches."""

    tensors: set[str]
    channels: int = 0
    producers: list[onnx.NodeProto] = field(default_factory=list)  # Convs writing it: rows reordered
    inner: list[onnx.NodeProto] = field(default_factory=list)  # per-channel nodes inside: parameters reordered
    consumers: list[onnx.NodeProto] = field(default_factory=list)  # Convs reading it: input axis reordered
    heads: list[onnx.NodeProto] = field(default_factory=list)  # Gemm/MatMul after global pool + Flatten

    @property
    def key(self) -> str:
        """The tensor that names the component in `plan.permutations`: its first producer's output."""
        return self.producers[0].output[0]


def components(model: onnx.ModelProto) -> list[Component]:
    """Every channel space of the graph that can be reordered (see the module doc), in graph order."""
    graph = model.graph
    initializers = initializer_map(graph)
    producers = {o: node for node in graph.node for o in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    joined = set()  # id() of the nodes inside channel spaces
    for node in graph.node:
        if is_per_channel(node, initializers):
            tensors = [node.input[0], node.output[0]]
        elif node.op_type in BINARY_PER_CHANNEL and len(node.input) == 2 \
                and not any(name in initializers for name in node.input):
            tensors = [*node.input, node.output[0]]
        else:
            continue
        joined.add(id(node))
        for name in tensors[1:]:
            parent[root(name)] = root(tensors[0])
    members: dict[str, set[str]] = {}
    for name in list(parent):
        members.setdefault(root(name), set()).add(name)
    for node in graph.node:  # every Conv output starts a channel space, joined or not
        if node.op_type == "Conv" and node.output[0] not in parent:
            members[node.output[0]] = {node.output[0]}
    order = {id(node): i for i, node in enumerate(graph.node)}
    outside = pinned(graph) | {v.name for v in graph.input}
    found = [_checked(tensors, producers, readers, joined, initializers, order, outside) for tensors in members.values()]
    return sorted((c for c in found if c is not None), key=lambda c: order[id(c.producers[0])])


def _checked(tensors, producers, readers, joined, initializers, order, outside) -> Component | None:
    """The component of `tensors`, None when it cannot be reordered (`order`: node id -> position)."""
    component = Component(tensors=tensors)
    widths = []
    inner = {}
    for tensor in sorted(tensors, key=lambda t: (order[id(producers[t])] if t in producers else -1, t)):
        node = producers.get(tensor)
        if tensor in outside or tensor in initializers or node is None:
            return None
        if id(node) in joined:
            inner[id(node)] = node
        elif _plain_conv(node, initializers, rows=True):
            component.producers.append(node)
            widths.append(initializers[node.input[1]].dims[0])
        else:
            return None
        for reader in readers.get(tensor, []):
            if id(reader) in joined:
                continue
            if _plain_conv(reader, initializers) and reader.input[0] == tensor and tensor not in reader.input[1:]:
                component.consumers.append(reader)
                widths.append(initializers[reader.input[1]].dims[1])
            elif (head := _head(reader, tensor, producers, readers, initializers, outside)) is not None:
                component.heads.append(head)
                weight = initializers[head.input[1]]
                widths.append(weight.dims[reduction_axis(head, len(weight.dims))])
            else:
                return None
    if not component.producers or len(set(widths)) != 1 \
            or not fits_rank(inner.values(), len(initializers[component.producers[0].input[1]].dims), initializers):
        return None
    component.channels = widths[0]
    component.inner = sorted(inner.values(), key=lambda node: order[id(node)])
    component.consumers.sort(key=lambda node: order[id(node)])
    return component


def _plain_conv(node, initializers, rows: bool = False) -> bool:
    """A Conv with group 1 and a constant weight (and bias, when its filters are reordered)."""
    if node.op_type != "Conv" or node_attr(node, "group", 1) != 1 or node.input[1] not in initializers:
        return False
    return not rows or len(node.input) < 3 or not node.input[2] or node.input[2] in initializers


def _head(flatten, tensor, producers, readers, initializers, outside):
    """The Gemm/MatMul that reads `tensor` through Flatten(axis 1) after a global pool, else None."""
    if flatten.op_type != "Flatten" or node_attr(flatten, "axis", 1) != 1 \
            or producers[tensor].op_type not in GLOBAL_POOLS or flatten.output[0] in outside:
        return None
    heads = readers.get(flatten.output[0], [])
    if len(heads) != 1 or heads[0].input[0] != flatten.output[0] or heads[0].op_type not in ("Gemm", "MatMul"):
        return None
    head = heads[0]
    if len(head.input) < 2 or head.input[1] not in initializers or node_attr(head, "transA", 0) \
            or (head.op_type == "MatMul" and len(initializers[head.input[1]].dims) != 2):
        return None
    return head
