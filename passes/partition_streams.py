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
NCHWc layout, the copy and a reorder back (docs/cost-model.md).

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


import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph import components, initializer_map, permuted, reorder
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import Plan
from gkp_onnx.scoring import balanced_assign, block_sums, energy

MAX_ROUNDS = 20
POWER_STEPS = 20


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


class PartitionStreams(Pass):
    name = "partition_streams"
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

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
            initializers = initializer_map(result.graph)
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
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        if not plan.permutations:
            return PassResult(model, plan, modified=False)
        return PassResult(permuted(model, plan.permutations), plan, modified=True)
