"""partition_streams: give the Convs that read one tensor a shared channel partition, so that
their GKP Gathers vanish.

Before: the plan of analyze; the model dense.
After:  the model with the channels of every partitioned tensor group reordered (exact: the same
        function), each order in `plan.permutations`, and the planned Convs reading such a group
        marked `shared_group_count = G`: choose_groups may then give them the shared form.

Why. A GKP Gather folds into the Conv producing its input only when that Conv feeds nothing else
(fold_gathers). A residual stream (read by every block's first Conv and by the next stage's
projection shortcut, and added to) and any fan-out tensor keep their Gathers: on ResNet-50 at
ratio 0.5, 17 of them, 13% of the run on onnxruntime CPU, where each costs a reorder out of the
NCHWc layout, the copy and a reorder back (DESIGN.md).

The shared form. When G * n = Ci, a grouped Conv whose group b reads exactly block b of a
partition of its Ci input channels into G blocks of n is GKP with disjoint kept sets; once the
tensor's channels are ordered block by block (block 0's channels first), it reads its input as
it is: no Gather. Reordering is free when it is done to a whole channel space:

    component: the tensors joined by per-channel ops (BatchNormalization, Relu, ..., pools,
    Add/Mul/... by per-channel constants) and by element-wise Add/Sub/Mul/Div of two computed
    tensors. It can be reordered when every tensor of it is computed by such an op or by a Conv
    (group 1, constant weight and bias: its filters are reordered), and read by such an op, by a
    Conv (group 1, constant weight: its input-channel axis is reordered) or by Flatten after a
    global pool into a Gemm/MatMul (its weight's input axis is reordered); no tensor of it is a
    graph input or output. Every tensor then has the producers' channel count (by induction).

Partition. For the planned Convs L_i reading the component, with energies
E_i[f, c] = sum over the kernel of W_i[f, c]^2 / sum W_i^2, the blocks B_0..B_G-1 and, per
Conv, an assignment A_i of its filters to blocks (Co_i / G each) maximise the kept energy

    sum_i sum_f sum_{c in B_A_i(f)} E_i[f, c]

by alternating steps that are each exact balanced assignments (the filters given the blocks, the
channels given the filters' assignments), from a balanced split of the channels along the main
axis of their energy profiles: the objective never decreases. A Conv that reads a partitioned
component and produces another one (a projection shortcut starting a stage) has its filters
grouped by the blocks of the component it produces, so its output needs no permutation either:
its filter f in block b reads block b of its input, a term of that component's channel step
(components go in graph order).

Only components with a planned Conv whose input Gather would not fold are partitioned, and only
when their planned readers keep the same n with G = Ci / n >= 2 (e.g. ratio 0.5 on even widths:
G = 2; 0.75: G = 4). Whether a reader takes the shared form is choose_groups' decision (its cost:
no Gather; its retained importance: lower than a free selection's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.optimize import linear_sum_assignment

from gkp_onnx.errors import GkpError
from gkp_onnx.graph_stats import node_attr
from gkp_onnx.passes.fold_gathers import BINARY_PER_CHANNEL, is_per_channel, reindex_params, replace_initializer, \
    take_rows
from gkp_onnx.passes.nm_sparsify import reduction_axis
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import LayerPlan, Plan

GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
MAX_ROUNDS = 20
POWER_STEPS = 20


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
    initializers = {t.name: t for t in graph.initializer}
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
    outside = {v.name for v in graph.output} | {v.name for v in graph.input}
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
    if not component.producers or len(set(widths)) != 1:
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


def reorder(model: onnx.ModelProto, component: Component, order: np.ndarray) -> None:
    """Reorder the channels of `component` in place: channel k becomes the old channel order[k]."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node in component.producers:
        take_rows(model, node, order, initializers)
    for node in component.inner:
        reindex_params(model, node, order, initializers)
    for node in component.consumers + component.heads:
        weight = initializers[node.input[1]]
        axis = reduction_axis(node, len(weight.dims))
        replace_initializer(model, initializers, node.input[1], lambda v: np.take(v, order, axis=axis), node, 1)


def permuted(model: onnx.ModelProto, permutations: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of `model` with `permutations` (plan.permutations) applied, in their order."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    found = components(result)  # reordering changes weights only, never which spaces there are
    for key, order in permutations.items():
        component = next((c for c in found if key in c.tensors), None)
        if component is None or component.channels != len(order):
            raise GkpError(f"the plan reorders the channels of '{key}', which this model cannot "
                           f"(a plan made for another model?)")
        reorder(result, component, np.asarray(order, dtype=np.int64))
    return result


def balanced_assign(score: np.ndarray) -> np.ndarray:
    """Labels [m] putting m / G rows of `score` [m, G] in each block, maximising the summed score."""
    m, blocks = score.shape
    size = m // blocks
    if blocks == 1:
        return np.zeros(m, dtype=np.int64)
    if blocks == 2:  # exact by sorting: the rows that gain most from block 0 go there
        labels = np.ones(m, dtype=np.int64)
        labels[np.argsort(score[:, 1] - score[:, 0], kind="stable")[:size]] = 0
        return labels
    _, slots = linear_sum_assignment(-np.repeat(score, size, axis=1))
    return slots // size


def block_sums(energy: np.ndarray, labels: np.ndarray, blocks: int) -> np.ndarray:
    """[rows, G]: each row's energy summed over the columns of each block."""
    return energy @ np.eye(blocks)[labels]


def energy(weight: np.ndarray) -> np.ndarray:
    """[Co, Ci] kernel energies sum(W^2) over the kernel, normalised to sum 1."""
    e = (weight.astype(np.float64) ** 2).reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)
    total = e.sum()
    return e / total if total > 0 else e


def shared_partition(energies: list[np.ndarray], blocks: int, extra: np.ndarray | None = None,
                     seed: int = 0) -> np.ndarray:
    """Block labels [Ci] for the channels the Convs with `energies` ([Co_i, Ci] each) read;
    `extra` [Ci, G]: energy a channel keeps in each block beyond theirs (see the module doc)."""
    channels = energies[0].shape[1]
    extra = np.zeros((channels, blocks)) if extra is None else extra
    profile = np.concatenate([e.T for e in energies], axis=1)
    profile -= profile.mean(axis=0)
    direction = np.random.default_rng(seed).standard_normal(profile.shape[1])
    for _ in range(POWER_STEPS):  # the channels' main axis of variation: a balanced first split along it
        direction = profile.T @ (profile @ direction)
        direction /= max(float(np.linalg.norm(direction)), 1e-300)
    labels = np.empty(channels, dtype=np.int64)
    labels[np.argsort(profile @ direction, kind="stable")] = np.arange(channels) * blocks // channels
    for _ in range(MAX_ROUNDS):
        score = extra.copy()
        for e in energies:
            assignment = balanced_assign(block_sums(e, labels, blocks))
            score += e.T @ np.eye(blocks)[assignment]
        updated = balanced_assign(score)
        if np.array_equal(updated, labels):
            break
        labels = updated
    return labels


def shared_blocks(layer: LayerPlan) -> list[list[int]]:
    """The kept channels of a layer in the shared form: block b = channels b*n .. (b+1)*n - 1."""
    n = layer.kept_per_group
    return [list(range(b * n, (b + 1) * n)) for b in range(layer.shared_group_count)]


def shared_groups(layer: LayerPlan, weight: np.ndarray, needed: list[int] | None = None) -> list[list[int]]:
    """The filters of each block of a layer in the shared form: the balanced assignment keeping
    most energy, or the blocks of the component it produces (`shared_output`). `needed`: the
    filters a later Conv reads (its Gather folds into this one); they are spread evenly over the
    blocks when they can be, so that this layer computes only them (fold_gathers.shrink_grouped)."""
    blocks, co = layer.shared_group_count, layer.out_channels
    if layer.shared_output:
        return [list(range(b * co // blocks, (b + 1) * co // blocks)) for b in range(blocks)]
    sums = block_sums(energy(weight), np.repeat(np.arange(blocks), layer.kept_per_group), blocks)
    labels = np.empty(co, dtype=np.int64)
    parts = [np.arange(co)]
    if needed is not None and 0 < len(needed) < co and len(needed) % blocks == 0:
        parts = [np.asarray(needed), np.setdiff1d(np.arange(co), needed)]
    for rows in parts:
        labels[rows] = balanced_assign(sums[rows])
    return [np.flatnonzero(labels == b).tolist() for b in range(blocks)]


def shared_view(layer: LayerPlan) -> LayerPlan:
    """The layer as the cost models see its shared form: no input Gather, no producer pruned, no
    output permutation where its filters follow the blocks of the component it produces."""
    return replace(layer, input_folds=True, producer_macs=0.0, output_sinks=layer.output_sinks or layer.shared_output)


class PartitionStreams(Pass):
    name = "partition_streams"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        if plan.permutations or any(layer.group_count is not None for layer in plan.layers):
            raise PassContractError("partition_streams runs once, on the plan of analyze")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        result = onnx.ModelProto()
        result.CopyFrom(model)
        layers = {layer.node: layer for layer in plan.layers}
        shared_in: dict[str, int] = {}  # layer -> G of the component it reads in the shared form
        for component in components(result):
            planned = [layers[c.name] for c in component.consumers if c.name in layers]
            kept = {layer.kept_per_group for layer in planned}
            if len(kept) != 1 or all(layer.input_folds for layer in planned):
                continue
            n = kept.pop()
            blocks = component.channels // n
            sharing = [layer for layer in planned if layer.out_channels % blocks == 0]
            if component.channels % n or blocks < 2 or not sharing:
                continue
            initializers = {t.name: t for t in result.graph.initializer}
            energies = [energy(numpy_helper.to_array(initializers[layer.weight])) for layer in sharing]
            extra = np.zeros((component.channels, blocks))
            for producer in component.producers:  # a shared reader of an earlier component: filters follow these blocks
                if shared_in.get(producer.name) == blocks:
                    upstream = layers[producer.name]
                    weight = energy(numpy_helper.to_array(initializers[producer.input[1]]))
                    extra += block_sums(weight, np.repeat(np.arange(blocks), upstream.kept_per_group), blocks)
                    upstream.shared_output = True
            labels = shared_partition(energies, blocks, extra, self.seed)
            order = np.concatenate([np.flatnonzero(labels == b) for b in range(blocks)])
            reorder(result, component, order)
            plan.permutations[component.key] = order.tolist()
            for layer in sharing:
                layer.shared_group_count = blocks
                shared_in[layer.node] = blocks
        return PassResult(result, plan, modified=bool(plan.permutations))


class PermuteStreams(Pass):
    """Apply `plan.permutations` to the dense model (the first finishing pass; nothing when empty)."""

    name = "permute_streams"

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        if not plan.permutations:
            return PassResult(model, plan, modified=False)
        return PassResult(permuted(model, plan.permutations), plan, modified=True)
