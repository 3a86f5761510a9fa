"""Channel permutations that raise the weight magnitude N:M sparsity keeps, folded at no run-time cost.

Before                                          After (P: a permutation of the K hidden channels)

    X ─MatMul(W1 [D, K])─ H1 ─┐                  X ─MatMul(W1[:, P])─ H1' ─┐
    X ─MatMul(W3 [D, K])─ H3 ─┴─ f ─ Z           X ─MatMul(W3[:, P])─ H3' ─┴─ f ─ Z'
    Z ─MatMul(W2 [K, D])─ Y                      Z' ─MatMul(W2[P, :])─ Y        (Y unchanged)

N:M keeps N of every M consecutive weights along the reduction axis, so which channels share a run
of M decides what can be kept. Reordering the reduction channels of a consumer is free when the
same order is applied where those channels are produced: the output channels (columns, bias) of
the MatMul/Gemm producers, through element-wise ops in between (their per-channel constants
permuted too). Every consumer reading the region gets the same order (siblings share one P).

A region qualifies when every tensor in it is produced by a MatMul/Gemm with a constant,
unshared weight or by an element-wise op, and read only by element-wise ops or as the A input of
a MatMul/Gemm with a constant, unshared weight; nothing in it is a graph output.

Search (`search_permutation`): iterated local search over channel swaps between runs (steepest
ascent over all swaps, evaluated vectorised and updated incrementally; random kicks at local
optima) within a work budget; the objective is the sum over rows of the N best scores of every run.
The budget is counted in work (elements of the swap tables evaluated), not in wall time, so a
search gives the same order on every run and machine; WORK_PER_SECOND converts the caller's seconds
(about that long on a 2-core AVX-512 machine).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph import (BINARY_PER_CHANNEL, UNARY_ELEMENTWISE, initializer_map, node_attr, pinned, reader_lists,
                            reduction_axis)

MAX_BLOCK_ELEMENTS = 20_000_000  # bounds the memory of one vectorised swap evaluation
TABLE_ELEMENTS = 8_000_000  # R * K^2 * m of one searched window: bounds the time of a swap table
WORK_PER_SECOND = 2e7  # swap-table elements per second of budget: measured 8-15e6/s on a loaded 2-core AVX-512 machine


class _Budget:
    """Work left to a search; `spend` says whether any was left before this step."""

    def __init__(self, seconds: float):
        self.left = seconds * WORK_PER_SECOND

    def spend(self, work: float) -> bool:
        self.left -= work
        return self.left + work > 0

    @property
    def spent(self) -> bool:
        return self.left <= 0


def _top_sum(values: np.ndarray, n: int) -> np.ndarray:
    """Sum of the n largest entries along the last axis."""
    return np.sort(values, axis=-1)[..., -n:].sum(axis=-1)


def kept_score(scores: np.ndarray, perm: np.ndarray, n: int, m: int) -> float:
    """What N:M keeps of `scores` [R, K] when the columns are taken in the order `perm`."""
    r, k = scores.shape
    return float(_top_sum(scores[:, perm].reshape(r, k // m, m), n).sum())


def _replacement_values(x: np.ndarray, runs: np.ndarray, columns: np.ndarray, n: int) -> np.ndarray:
    """[len(runs), m, len(columns)]: value of run g with its slot i replaced by column c."""
    r, _, m = x.shape
    cols = x.reshape(r, -1)[:, columns]  # [R, C]
    out = np.empty((len(runs), m, len(columns)))
    chunk = max(1, MAX_BLOCK_ELEMENTS // max(1, r * m * len(columns) * m))
    for start in range(0, len(runs), chunk):
        part = runs[start:start + chunk]
        blocks = np.broadcast_to(x[:, part, None, None, :], (r, len(part), m, len(columns), m)).copy()
        for slot in range(m):
            blocks[:, :, slot, :, slot] = cols[:, None, :]
        out[start:start + chunk] = _top_sum(blocks, n).sum(axis=0)
    return out


def search_permutation(scores: np.ndarray, n: int, m: int, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """A column order of `scores` [R, K] (K a multiple of m) keeping more under N:M than the identity.

    Small problems are searched whole (`_local_search`). Large ones are searched in windows: the
    runs are dealt at random into windows whose swap table stays within TABLE_ELEMENTS, each
    window is searched to a local optimum, and the deal is redone each round so channels can
    travel between windows, until the work budget is spent.
    """
    scores = np.abs(np.asarray(scores, dtype=np.float64))
    r, k = scores.shape
    runs_count = k // m
    perm = np.arange(k)
    if runs_count < 2:
        return perm
    budget = _Budget(seconds)
    rng = np.random.default_rng(seed)
    window = max(2, int(np.sqrt(TABLE_ELEMENTS / (r * m))) // m)  # runs per window
    if runs_count <= window:
        return _local_search(scores, n, m, budget, rng, kicks=True)
    while not budget.spent:
        order = rng.permutation(runs_count)
        for chunk in np.array_split(order, int(np.ceil(runs_count / window))):
            positions = (chunk[:, None] * m + np.arange(m)).ravel()
            local = _local_search(scores[:, perm[positions]], n, m, budget, rng, kicks=False)
            perm[positions] = perm[positions][local]
            if budget.spent:
                break
    return perm


def _local_search(scores: np.ndarray, n: int, m: int, budget: _Budget, rng: np.random.Generator,
                  kicks: bool) -> np.ndarray:
    """Steepest ascent over swaps of two channels in different runs.

    The value of every "run g with slot i replaced by column c" is kept in a table; a swap only
    recomputes the two runs and two columns it touches. With `kicks`, a local optimum is left by
    two random swaps (iterated local search) and the best order seen is returned.
    """
    r, k = scores.shape
    runs_count = k // m
    perm = np.arange(k)
    all_runs, all_cols = np.arange(runs_count), np.arange(k)
    same_run = np.kron(np.eye(runs_count, dtype=bool), np.ones((m, m), dtype=bool))
    same_run = same_run.reshape(runs_count, m, runs_count, m)

    x = scores.copy()  # columns in the current order
    view = x.reshape(r, runs_count, m)
    current = _top_sum(view, n).sum(axis=0)
    values = _replacement_values(view, all_runs, all_cols, n)
    best_perm, best_value = perm.copy(), current.sum()

    def swap(p: int, q: int) -> None:
        perm[[p, q]] = perm[[q, p]]
        x[:, [p, q]] = x[:, [q, p]]
        touched = np.unique([p // m, q // m])
        current[touched] = _top_sum(view[:, touched], n).sum(axis=0)
        values[touched] = _replacement_values(view, touched, all_cols, n)
        values[:, :, [p, q]] = _replacement_values(view, all_runs, np.array([p, q]), n)

    step = 4 * k * k + 10 * r * k * m  # the swap table, and the runs and columns a swap updates
    while budget.spend(step):
        gain = (values - current[:, None, None]).reshape(runs_count, m, runs_count, m)
        gain = gain + gain.transpose(2, 3, 0, 1)
        gain[same_run] = -np.inf
        a, i, b, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[a, i, b, j] > 1e-12 * best_value:
            swap(a * m + i, b * m + j)
            continue
        if current.sum() > best_value:
            best_perm, best_value = perm.copy(), current.sum()
        if not kicks:
            return best_perm
        for _ in range(2):
            p, q = rng.choice(k, size=2, replace=False)
            if p // m != q // m:
                swap(p, q)
    return perm.copy() if current.sum() > best_value else best_perm


@dataclass
class Region:
    """Tensors sharing one channel order (the last axis), with where that order is produced and read."""

    tensors: set[str] = field(default_factory=set)
    sources: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)  # (MatMul/Gemm, output channel axis)
    consumers: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)  # (MatMul/Gemm, reduction axis)
    constants: set[str] = field(default_factory=set)  # element-wise operands with a per-channel last axis


def find_region(model: onnx.ModelProto, tensor: str, channels: int) -> Region | None:
    """The region around `tensor` (K = `channels`), or None when the order cannot be changed for free."""
    initializers = initializer_map(model.graph)
    producers = {o: node for node in model.graph.node for o in node.output}
    readers = defaultdict(list, reader_lists(model.graph))
    outputs = pinned(model.graph)

    def plain_weight(node) -> str | None:
        name = node.input[1] if len(node.input) > 1 else ""
        return name if name in initializers and len(readers[name]) == 1 else None

    region, todo = Region(), [tensor]
    while todo:
        t = todo.pop()
        if t in region.tensors:
            continue
        if t in outputs or t in initializers:
            return None
        region.tensors.add(t)
        node = producers.get(t)
        if node is None:
            return None
        if node.op_type == "Constant":  # a scalar / broadcast operand of an element-wise op
            region.tensors.discard(t)
            value = node_attr(node, "value")
            if value is None or (value.dims and value.dims[-1] != 1):
                return None
            continue
        if node.op_type in ("MatMul", "Gemm"):
            weight = plain_weight(node)
            if weight is None:
                return None
            rank = len(initializers[weight].dims)
            axis = 1 - reduction_axis(node, rank) if node.op_type == "Gemm" else rank - 1
            if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                bias = initializers.get(node.input[2])
                if bias is None or list(bias.dims) not in ([channels],) or len(readers[bias.name]) > 1:
                    return None
                region.constants.add(bias.name)
            region.sources.append((node, axis))
        elif node.op_type in UNARY_ELEMENTWISE or node.op_type in BINARY_PER_CHANNEL:
            for name in node.input[:1] if node.op_type in UNARY_ELEMENTWISE else node.input:
                if name in initializers:
                    dims = list(initializers[name].dims)
                    if dims and dims[-1] == channels:
                        if len(readers[name]) > 1:
                            return None
                        region.constants.add(name)
                    elif dims and dims[-1] != 1:
                        return None
                else:
                    todo.append(name)
        else:
            return None
        for reader in readers[t]:
            if reader.op_type in ("MatMul", "Gemm") and reader.input[0] == t and t not in reader.input[1:]:
                trans_a = node_attr(reader, "transA", 0)
                weight = plain_weight(reader)
                if trans_a or weight is None:
                    return None
                if all(reader is not c for c, _ in region.consumers):
                    region.consumers.append((reader, reduction_axis(reader, len(initializers[weight].dims))))
            elif reader.op_type in UNARY_ELEMENTWISE or reader.op_type in BINARY_PER_CHANNEL:
                todo.extend(reader.output)
            else:
                return None
    return region if region.sources and region.consumers else None


def channel_rows(weight: np.ndarray, axis: int) -> np.ndarray:
    """[R, K] view of a weight with the reduction axis last."""
    moved = np.moveaxis(weight, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def permute_reduction_channels(model: onnx.ModelProto, refs, n: int, m: int, input_norms: dict,
                               seconds: float, seed: int = 0) -> tuple[set[str], dict[str, np.ndarray]]:
    """Search and fold a channel order per region of the given N:M layers; return the consumers
    permuted and, per source MatMul/Gemm, the order its output channels now come in.

    `input_norms` (node -> per-channel RMS) of permuted consumers are permuted in place.
    """
    initializers = initializer_map(model.graph)
    targets = {ref.node for ref in refs if not ref.path}  # plain initializer weights only
    nodes = {node.name: node for node in model.graph.node}
    done: set[str] = set()
    orders: dict[str, np.ndarray] = {}
    for ref in refs:
        if ref.node not in targets or ref.node in done:
            continue
        channels = initializers[ref.initializer].dims[ref.axis]
        region = find_region(model, nodes[ref.node].input[0], channels)
        if region is None or any(c.name not in targets for c, _ in region.consumers):
            continue
        blocks = []
        for consumer, axis in region.consumers:
            rows = np.abs(channel_rows(numpy_helper.to_array(initializers[consumer.input[1]]).astype(np.float64), axis))
            norms = input_norms.get(consumer.name)
            blocks.append(rows * norms[None, :] if norms is not None else rows)
        budget = seconds * len(region.consumers)
        perm = search_permutation(np.concatenate(blocks), n, m, budget, seed)
        if np.array_equal(perm, np.arange(channels)):
            continue
        for consumer, axis in region.consumers:
            take_channels(initializers[consumer.input[1]], perm, axis)
            if consumer.name in input_norms:
                input_norms[consumer.name] = input_norms[consumer.name][perm]
            done.add(consumer.name)
        for source, axis in region.sources:
            take_channels(initializers[source.input[1]], perm, axis)
            orders[source.name] = perm
        for name in region.constants:
            take_channels(initializers[name], perm, -1)
    return done, orders


def take_channels(init: onnx.TensorProto, index: np.ndarray, axis: int) -> None:
    """Replace the initializer by its slices `index` along `axis` (a reordering, or a subset)."""
    init.CopyFrom(numpy_helper.from_array(np.take(numpy_helper.to_array(init), index, axis=axis), init.name))
