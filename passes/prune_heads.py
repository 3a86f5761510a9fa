"""prune_heads: remove attention heads of transformers (--head-ratio R): a smaller dense model.

Before (H heads of width d)                        After (the heads S kept)
    x ──MatMul(Wq [D, H*d])─(+bq)─Reshape─...─┐        Wq[:, S], bq[S]; the same for K and V
    x ──MatMul(Wk)─(+bk)─Reshape─...── softmax(Q K^T) V ──Reshape── MatMul(Wo [H*d, D]) ── y
    x ──MatMul(Wv)─(+bv)─Reshape─...─┘                 Wo[S, :]; a Reshape constant H -> |S|

An attention block is found from its core: a MatMul of two computed tensors (the scores Q K^T)
whose result reaches, through element-wise ops (scale, mask), a Softmax, itself read (through
Where / Cast) as the left operand of a second such MatMul (P V). From the two score operands and V
the walk goes up (Reshape, Transpose, RoPE's Gather/Slice/Mul/Concat, a scale, a bias Add) to one
MatMul/Gemm with a constant weight each, and from P V down (Transpose, Reshape) to the output
projection. Head count H, key width d and value width come from one onnxruntime run of `sample`.
With grouped-query attention (H_kv < H key/value heads), a unit is one key/value head and the
H / H_kv query heads that read it. Shape constants that spell a head count (or the merged width)
in the block's Reshapes are rewritten, one read at run time from another tensor's Shape becomes
-1; -1 and run-time shapes of the block's own tensors need nothing.

Every pruned block is checked by running `sample`: the pruned model must equal the dense model
with the removed heads' output rows zeroed; a block that does not (a layout this walk misreads)
is left dense, with the reason in the details. Which heads: with calibration data, those greedy
Optimal Brain Surgeon keeps on the covariance of the output projection's input (heads as blocks
of channels; gkp_onnx.structured.obs_kept); without, the best by the norms of their value columns
x their output rows. A fused QKV projection cut by one Split (GPT-2's c_attn) loses its columns part
by part and the Split's sizes follow; a projection shared any other way is left whole (reason given),
and so is a block whose keys and values are a KV cache the graph takes or returns (its interface).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph import (drop_unread, initializer_map, node_attr, output_bias, pinned, reader_lists, reduction_axis,
                            weight_rows)
from gkp_onnx.nm_permutation import take_channels
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan
from gkp_onnx.structured import kept_units, obs_kept
from gkp_onnx.validate import Dataset, make_session, run_model, with_outputs

PATH_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Tile", "Expand", "Mul", "Div", "Add", "Sub", "Neg",
            "Gather", "Slice", "Split", "Concat", "Cast", "Identity"}  # between a projection and the attention core
SCORE_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity"}  # scale and mask between Q K^T and Softmax
PROB_OPS = {"Where", "Cast", "Identity", "Dropout"}  # between Softmax and P V
MERGE_OPS = {"Transpose", "Reshape", "Identity", "Cast"}  # between P V and the output projection
ONE_DATA_INPUT = {"Reshape", "Expand", "Tile", "Slice", "Split", "Gather", "Unsqueeze", "Squeeze", "Dropout"}
AGREE = 1e-4  # the pruned block vs the masked dense one: max |diff| <= AGREE * max |output|


@dataclass
class AttentionBlock:
    query: onnx.NodeProto
    key: onnx.NodeProto
    value: onnx.NodeProto
    output: onnx.NodeProto
    path: list[onnx.NodeProto] = field(default_factory=list)  # nodes between the projections and the output
    core: tuple[str, str] = ("", "")  # the Q K^T and P V MatMuls' names
    split: str = ""  # a fused Q/K/V projection: the Split that cuts its output (else "")
    parts: tuple[int, int, int] = (0, 1, 2)  # the Split outputs Q, K and V come from
    sizes: list[int] = field(default_factory=list)  # the Split's part widths, in output order
    split_columns: bool = True  # the Split cuts the columns (else a [3, ...] axis: the thirds, sizes 1, 1, 1)
    heads: int = 0
    kv_heads: int = 0
    key_width: int = 0
    value_width: int = 0
    shape_edits: list = field(default_factory=list)  # (node, input slot, element, what): see _shape_edits

    @property
    def units(self) -> int:
        return self.kv_heads

    def query_heads(self, units) -> list[int]:
        per = self.heads // self.kv_heads
        return [u * per + i for u in units for i in range(per)]

    def part_columns(self, units) -> list[np.ndarray]:
        """The Q, K and V output columns the kept `units` keep (each from 0 in its part)."""
        return [_columns(self.query_heads(units), self.key_width), _columns(units, self.key_width),
                _columns(units, self.value_width)]

    def projection_columns(self, units) -> list[tuple[onnx.NodeProto, np.ndarray]]:
        """Per Q/K/V projection (one when fused), the output columns the kept `units` keep."""
        kept = self.part_columns(units)
        if not self.split:
            return list(zip((self.query, self.key, self.value), kept))
        offsets, by_output = np.cumsum([0] + self.sizes), dict(zip(self.parts, kept))
        return [(self.query, np.concatenate([offsets[i] + by_output[i] for i in range(3)]))]


class PruneHeads(Pass):
    name = "prune_heads"
    in_place = True  # edits the model's weights in place

    def __init__(self, ratio: float, sample: Dataset, exclude=(), covariances: dict[str, np.ndarray] | None = None,
                 keep: dict[str, int] | None = None):
        self.ratio = ratio
        self.keep = keep or {}  # output projection -> key/value groups it keeps (else by `ratio`)
        self.sample = sample  # a few inputs: the run that gives head counts, and the check of each block
        self.exclude = list(exclude)
        self.covariances = covariances or {}  # the output projection's input tensor -> covariance of its channels

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        blocks, skipped = attention_blocks(model, self.sample, self.exclude)
        dense = onnx.ModelProto()
        dense.CopyFrom(model)
        initializers = initializer_map(model.graph)
        pruned, orders, edits = [], {}, []
        for block in blocks:
            keep = self.keep.get(block.output.name, kept_units(block.units, self.ratio))
            if keep >= block.units:
                continue
            edits.append((block, self._kept(block, keep, initializers)))
        masked = _masked(dense, edits)
        for block, units in edits:
            _prune(model, block, units, initializers)
        if edits and _disagreeing(model, masked, self.sample):  # find the blocks this walk misread; keep them whole
            model.CopyFrom(dense)
            initializers = initializer_map(model.graph)
            good = []
            for block, units in edits:
                trial = onnx.ModelProto()
                trial.CopyFrom(dense)
                _prune(trial, _same_block(trial, block), units, initializer_map(trial.graph))
                if _disagreeing(trial, _masked(dense, [(block, units)]), self.sample):
                    skipped.append((block.output.name, "the pruned block does not equal the masked dense one "
                                                       "(a layout the head walk does not know)"))
                else:
                    good.append((block, units))
            for block, units in good:
                _prune(model, _same_block(model, block), units, initializers)
            if good and _disagreeing(model, _masked(dense, good), self.sample):  # together they do not hold
                model.CopyFrom(dense)
                skipped += [(block.output.name, "pruned with the other blocks, it does not equal the masked dense "
                                                "model") for block, _ in good]
                good = []
            edits = good
        drop_unread(model)  # the replaced shape constants
        for block, units in edits:
            query = block.query_heads(units)
            pruned.append({"output": block.output.name, "heads": block.heads, "kept": len(query),
                           "kv_heads": block.kv_heads, "kept_kv": len(units)})
            orders.update({node.name: columns for node, columns in block.projection_columns(units)})
        return PassResult(model, plan, modified=bool(edits),
                          details={"heads": pruned, "head_orders": orders, "heads_skipped": skipped,
                                   "heads_total": sum(block.heads for block in blocks)})

    def _kept(self, block: AttentionBlock, keep: int, initializers) -> np.ndarray:
        """The `keep` units (a key/value head and its query heads) to keep, sorted."""
        rows = weight_rows(block.output, initializers)[0]  # [H * value_width, D]
        covariance = self.covariances.get(block.output.input[0])
        if covariance is not None:
            return obs_kept(covariance, rows, keep, unit=rows.shape[0] // block.kv_heads)
        values = np.linalg.norm(weight_rows(block.value, initializers)[0], axis=0)
        if block.split:  # the V part of a fused projection
            start = int(np.sum(block.sizes[:block.parts[2]]))
            values = values[start:start + block.sizes[block.parts[2]]]  # [H_kv * value_width]
        per = block.heads // block.kv_heads
        contribution = np.linalg.norm(rows, axis=1) * np.repeat(values.reshape(block.kv_heads, -1), per,
                                                                axis=0).reshape(-1)
        score = np.sqrt((contribution.reshape(block.kv_heads, -1) ** 2).sum(axis=1))
        return np.sort(np.argsort(-score, kind="stable")[:keep])


def head_inputs(model: onnx.ModelProto, exclude=()) -> list[str]:
    """The tensors the output projections of attention blocks read (where the heads' scores are measured)."""
    return [block.output.input[0] for block, _, _ in attention_cores(model, exclude)[0]]


def attention_cores(model: onnx.ModelProto, exclude=()) -> tuple[list, list]:
    """(block without sizes, Q K^T MatMul, P V MatMul) per attention core found; (output, reason) skipped."""
    initializers = initializer_map(model.graph)
    producers = {o: node for node in model.graph.node for o in node.output}
    readers = defaultdict(list, reader_lists(model.graph))
    outputs = pinned(model.graph)
    inputs = {i.name for i in model.graph.input}

    def computed(name: str) -> bool:
        return bool(name) and name not in initializers

    found, skipped = [], []
    for pv in model.graph.node:
        if pv.op_type != "MatMul" or not all(computed(t) for t in pv.input):
            continue
        softmax = _walk_single(pv.input[0], producers, initializers, PROB_OPS)
        if softmax is None or softmax.op_type != "Softmax":
            continue
        scores = _find_up(softmax.input[0], producers, initializers, SCORE_OPS,
                          lambda n: n.op_type == "MatMul" and all(computed(t) for t in n.input))
        output, merge = _walk_down(pv.output[0], readers, outputs, initializers)
        if len(scores) != 1 or output is None:
            continue
        qk = scores[0]
        where = output.name
        if any(p.search(output.name) or p.search(output.input[1]) for p in exclude):
            continue
        sides = [_projection(t, producers, initializers, readers) for t in (qk.input[0], qk.input[1], pv.input[1])]
        if any(side is None for side in sides):
            skipped.append((where, "no single MatMul/Gemm with a constant weight found for Q, K or V"))
            continue
        (query, q_path, q_part), (key, k_path, k_part), (value, v_path, v_part) = sides
        if any(t in inputs for n in k_path + v_path for t in n.input) or \
                any(o in outputs for n in k_path + v_path for o in n.output):
            skipped.append((where, "its keys and values are a cache the graph takes or returns (past / present): "
                                   "removing heads would change that interface (not supported yet)"))
            continue
        path = list({n.name: n for n in q_path + k_path + v_path + merge}.values())  # a fused projection's: once
        block = AttentionBlock(query, key, value, output, path, (qk.name, pv.name))
        if len({query.name, key.name, value.name}) < 3:  # one projection for all: cut by one Split
            parts = (q_part, k_part, v_part)
            if query.name != key.name or key.name != value.name or None in parts \
                    or len({split for split, _ in parts}) != 1 or len({index for _, index in parts}) != 3:
                skipped.append((where, "Q, K and V share a projection but not through one Split into three"))
                continue
            block.split, block.parts = parts[0][0], tuple(index for _, index in parts)
        found.append((block, qk, pv))
    return found, skipped


def attention_blocks(model: onnx.ModelProto, sample: Dataset, exclude=()) -> tuple[list[AttentionBlock], list]:
    """The attention blocks whose heads can be removed, and (output projection, reason) for those that cannot."""
    initializers = initializer_map(model.graph)
    producers = {o: node for node in model.graph.node for o in node.output}
    found, skipped = attention_cores(model, exclude)
    if not found:
        return [], skipped
    splits = {n.name: n for n in model.graph.node if n.op_type == "Split"}
    probe = [t for _, qk, pv in found for t in (qk.output[0], pv.input[1], pv.output[0])]
    probe += [o for block, _, _ in found if block.split for o in [*splits[block.split].output,
                                                                   splits[block.split].input[0]]]
    for block, _, _ in found:
        for node in block.path:
            if node.op_type in ("Reshape", "Expand"):
                concat = producers.get(node.input[1])
                probe += [node.output[0]] + ([t for t in concat.input if t not in initializers]
                                             if concat is not None and concat.op_type == "Concat" else [])
    shapes, values = _probe(model, sorted(set(probe)), sample)
    blocks = []
    for block, qk, pv in found:
        heads = shapes[qk.output[0]][-3] if len(shapes[qk.output[0]]) >= 3 else 0
        block.heads, block.value_width = heads, shapes[pv.output[0]][-1]
        if block.split:
            split, total = splits[block.split], _width(block.query, initializers)
            before = shapes[split.input[0]]
            axis = node_attr(split, "axis", 0) % len(before)
            if axis == len(before) - 1:  # the columns, cut in parts
                block.sizes = [shapes[o][-1] for o in split.output]
            elif before[axis] == 3 and all(shapes[o][axis] == 1 for o in split.output) and total % 3 == 0:
                block.sizes, block.split_columns = [total // 3] * 3, False  # [.., 3, H, d]: Q, K, V the thirds
            if sum(block.sizes) != total:
                skipped.append((block.output.name, "the fused Q/K/V projection is not split into its parts"))
                continue
            widths = [block.sizes[i] for i in block.parts]
        else:
            widths = [_width(n, initializers) for n in (block.query, block.key, block.value)]
        block.key_width = widths[0] // heads if heads else 0
        block.kv_heads = widths[1] // block.key_width if block.key_width else 0
        reason = None
        if not heads or widths[0] != heads * block.key_width:
            reason = "the query projection's width is not heads x key width"
        elif not block.kv_heads or heads % block.kv_heads or widths[1] != block.kv_heads * block.key_width \
                or widths[2] != block.kv_heads * block.value_width:
            reason = "key/value projection widths do not match the head count"
        elif weight_rows(block.output, initializers)[0].shape[0] != heads * block.value_width:
            reason = "the output projection does not read heads x value width"
        if reason:
            skipped.append((block.output.name, reason))
            continue
        block.shape_edits = _shape_edits(block, shapes, values, initializers, producers)
        blocks.append(block)
    return blocks, skipped


def _walk_single(tensor, producers, initializers, ops) -> onnx.NodeProto | None:
    """The first producer up from `tensor` not in `ops`, following the one computed input of each."""
    node = producers.get(tensor)
    while node is not None and node.op_type in ops:
        inputs = [t for t in (node.input[1:] if node.op_type == "Where" else node.input[:1]) if t and t not in initializers]
        if len(inputs) != 1:
            return None
        node = producers.get(inputs[0])
    return node


def _walk_up(tensor, producers, initializers, follow) -> None:
    """Visit each computed tensor up from `tensor` once: `follow(name, its producer)` returns the
    inputs to go on to."""
    seen, todo = set(), [tensor]
    while todo:
        name = todo.pop()
        node = producers.get(name)
        if name in seen or name in initializers or node is None:
            continue
        seen.add(name)
        todo.extend(t for t in follow(name, node) if t)


def _find_up(tensor, producers, initializers, ops, wanted) -> list[onnx.NodeProto]:
    """The nearest producers up from `tensor` that satisfy `wanted`, through nodes in `ops`."""
    found = []

    def follow(name, node):
        if wanted(node):
            found.append(node)
            return []
        return (node.input[1:] if node.op_type == "Where" else node.input) if node.op_type in ops else []

    _walk_up(tensor, producers, initializers, follow)
    return found


def _projection(tensor, producers, initializers, readers):
    """(the one MatMul/Gemm with a constant 2-D weight up from `tensor`, the nodes on the way, the
    (Split, output index) the way came through or None)."""
    path, found, parts, refused = [], [], set(), []

    def follow(name, node):
        if node.op_type == "Split":
            parts.add((node.name, list(node.output).index(name)))
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in initializers:
            shared = len(initializers[node.input[1]].dims) != 2 or len(readers[node.input[1]]) != 1
            (refused if shared or node.op_type == "Gemm" and node_attr(node, "transA", 0) else found).append(node)
            return []
        if node.op_type not in PATH_OPS:
            return []  # a side input (a RoPE table, a position computation): not the data path
        path.append(node)
        return node.input[:1] if node.op_type in ONE_DATA_INPUT else node.input

    _walk_up(tensor, producers, initializers, follow)
    if refused or len(found) != 1 or len(parts) > 1:
        return None
    return found[0], path, next(iter(parts), None)


def _walk_down(tensor, readers, outputs, initializers):
    """(the output projection reading the merged heads, the nodes on the way) or (None, [])."""
    path = []
    while tensor not in outputs:
        data = [n for n in readers[tensor] if n.op_type != "Shape"]  # a Shape reader follows the new size
        if len(data) != 1:
            break
        node = data[0]
        if node.op_type in ("MatMul", "Gemm") and node.input[0] == tensor and len(node.input) > 1 \
                and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2 \
                and len(readers[node.input[1]]) == 1 and not node_attr(node, "transA", 0):
            return node, path
        if node.op_type not in MERGE_OPS or node.input[0] != tensor:
            return None, []
        path.append(node)
        tensor = node.output[0]
    return None, []


def _out_axis(node, initializers) -> int:
    """The weight axis of a projection's output channels."""
    return 1 - reduction_axis(node, len(initializers[node.input[1]].dims))


def _width(node, initializers) -> int:
    return initializers[node.input[1]].dims[_out_axis(node, initializers)]


def _columns(heads, width: int) -> np.ndarray:
    return np.asarray([h * width + i for h in heads for i in range(width)], dtype=np.int64)


def _probe(model: onnx.ModelProto, names: list[str], sample: Dataset) -> tuple[dict, dict]:
    """The shapes the named tensors take on `sample`, and the values of the small integer ones
    (shape pieces computed at run time)."""
    session = make_session(with_outputs(model, names))
    outputs = run_model(session, sample)
    shapes = {o.name: list(v.shape) for o, v in zip(session.get_outputs(), outputs)}
    values = {o.name: v.reshape(-1).tolist() for o, v in zip(session.get_outputs(), outputs)
              if v.size <= 8 and np.issubdtype(v.dtype, np.integer)}
    return shapes, values


def _shape_edits(block: AttentionBlock, shapes, values, initializers, producers) -> list[tuple[str, int, int, str]]:
    """(node, input slot, element, what) for every element of the block's Reshape/Expand shapes that
    spells a head count ("heads", "kv_heads") or a merged width ("merged_q", "merged_v", ...): a
    constant is rewritten; a one-element piece computed at run time (a dim read from another
    tensor's Shape) becomes -1 ("infer"), when the shape has no other -1."""
    counts = {block.heads: "heads", block.kv_heads: "kv_heads"}
    merged = {block.heads * block.value_width: "merged_v", block.heads * block.key_width: "merged_q",
              block.kv_heads * block.key_width: "merged_k", block.kv_heads * block.value_width: "merged_kv"}
    widths = {block.key_width, block.value_width}
    edits = []
    for node in block.path:
        if node.op_type not in ("Reshape", "Expand") or node.output[0] not in shapes:
            continue
        out = shapes[node.output[0]]
        pieces = [(node.name, 1, node.input[1])]
        concat = producers.get(node.input[1])
        if node.input[1] not in initializers and concat is not None and concat.op_type == "Concat":
            pieces = [(concat.name, j, t) for j, t in enumerate(concat.input)]
        position, found, free = 0, [], True
        for owner, slot, name in pieces:
            constant = name in initializers
            spelled = numpy_helper.to_array(initializers[name]).reshape(-1).tolist() if constant else values.get(name)
            if spelled is None:
                break
            free = free and -1 not in spelled
            for k, value in enumerate(spelled):
                i = position + k
                if i >= len(out) or value != out[i]:
                    continue
                if value in counts and int(np.prod(out[i + 1:])) in widths:
                    found.append((owner, slot, k, counts[value] if constant else "infer"))
                elif value in merged and i == len(out) - 1:
                    found.append((owner, slot, k, merged[value] if constant else "infer"))
            position += len(spelled)
        inferred = [edit for edit in found if edit[3] == "infer"]
        edits += [edit for edit in found if edit[3] != "infer"] + (inferred if free and len(inferred) == 1 else [])
    return edits


def _prune(model: onnx.ModelProto, block: AttentionBlock, units, initializers) -> None:
    """Remove the heads outside `units` from `block` in `model` (weights, biases, shape constants)."""
    query = block.query_heads(units)
    if block.split and block.split_columns:  # one projection for Q, K and V: the Split cuts the kept widths
        widths = dict(zip(block.parts, map(len, block.part_columns(units))))
        _set_split_sizes(model, next(n for n in model.graph.node if n.name == block.split),
                         [widths[i] for i in range(3)], initializers)
    for node, columns in block.projection_columns(units):
        bias = output_bias(model, node, initializers)
        take_channels(initializers[node.input[1]], columns, _out_axis(node, initializers))
        if bias is not None:  # [W], or [1, W] / [1, 1, W]: the channels are the last axis
            take_channels(initializers[bias], columns, len(initializers[bias].dims) - 1)
    take_channels(initializers[block.output.input[1]], _columns(query, block.value_width),
                  reduction_axis(block.output, 2))
    new = {"heads": len(query), "kv_heads": len(units), "merged_v": len(query) * block.value_width,
           "merged_q": len(query) * block.key_width, "merged_k": len(units) * block.key_width,
           "merged_kv": len(units) * block.value_width}
    nodes = {n.name: n for n in model.graph.node}
    for owner, slot, element, what in block.shape_edits:
        node = nodes[owner]
        if what == "infer":  # a dim read at run time from another tensor: let Reshape infer it
            values, name = np.array([-1], np.int64), f"{node.input[slot]}_{block.output.name}_inferred"
        else:
            old = initializers[node.input[slot]]
            values = numpy_helper.to_array(old).copy()
            values.reshape(-1)[element] = new[what]
            name = f"{old.name}_{block.output.name}_heads"
        tensor = numpy_helper.from_array(values, name)
        if name in initializers:
            initializers[name].CopyFrom(tensor)
        else:
            model.graph.initializer.append(tensor)
            initializers[name] = model.graph.initializer[-1]
        node.input[slot] = name
    del model.graph.value_info[:]  # head counts in the recorded shapes, down to the core and beyond, are stale


def _set_split_sizes(model: onnx.ModelProto, split: onnx.NodeProto, sizes: list[int], initializers) -> None:
    """Make `split` cut `sizes` (an input from opset 13, an attribute before)."""
    name = f"{split.name}_heads_sizes"
    if len(split.input) > 1 and split.input[1] or next((o.version for o in model.opset_import
                                                        if o.domain in ("", "ai.onnx")), 13) >= 13:
        tensor = numpy_helper.from_array(np.asarray(sizes, np.int64), name)
        if name in initializers:
            initializers[name].CopyFrom(tensor)
        else:
            model.graph.initializer.append(tensor)
            initializers[name] = model.graph.initializer[-1]
        while len(split.input) < 2:
            split.input.append("")
        split.input[1] = name
        for attribute in [a for a in split.attribute if a.name == "num_outputs"]:
            split.attribute.remove(attribute)
    else:
        for attribute in [a for a in split.attribute if a.name == "split"]:
            split.attribute.remove(attribute)
        split.attribute.append(onnx.helper.make_attribute("split", sizes))


def _masked(dense: onnx.ModelProto, edits) -> onnx.ModelProto:
    """The dense model with the output rows of the heads to remove zeroed: what pruning must equal."""
    masked = onnx.ModelProto()
    masked.CopyFrom(dense)
    initializers = initializer_map(masked.graph)
    for block, units in edits:
        init = initializers[block.output.input[1]]
        weight = numpy_helper.to_array(init).copy()
        axis = reduction_axis(block.output, 2)
        removed = np.setdiff1d(np.arange(block.heads * block.value_width),
                               _columns(block.query_heads(units), block.value_width))
        np.moveaxis(weight, axis, 0)[removed] = 0
        init.CopyFrom(numpy_helper.from_array(weight, init.name))
    return masked


def _same_block(model: onnx.ModelProto, block: AttentionBlock) -> AttentionBlock:
    """`block` with its nodes looked up in `model` (a copy of the model it was found in)."""
    nodes = {n.name: n for n in model.graph.node}
    twin = AttentionBlock(*(nodes[n.name] for n in (block.query, block.key, block.value, block.output)),
                          path=[nodes[n.name] for n in block.path], core=block.core, split=block.split,
                          parts=block.parts, sizes=block.sizes, split_columns=block.split_columns, heads=block.heads,
                          kv_heads=block.kv_heads,
                          key_width=block.key_width, value_width=block.value_width, shape_edits=block.shape_edits)
    return twin


def _disagreeing(pruned: onnx.ModelProto, masked: onnx.ModelProto, sample: Dataset) -> bool:
    """Whether the pruned model fails to run or differs from the masked dense one on `sample`."""
    try:
        got = run_model(make_session(pruned), sample)
    except Exception:  # a misread layout: onnxruntime rejects the shapes
        return True
    want = run_model(make_session(masked), sample)
    for a, b in zip(got, want):
        if a.shape != b.shape or not np.issubdtype(a.dtype, np.floating):
            if a.shape != b.shape or not np.array_equal(a, b):
                return True
            continue
        if np.abs(a.astype(np.float64) - b).max() > AGREE * max(1.0, np.abs(b).max()):
            return True
    return False
