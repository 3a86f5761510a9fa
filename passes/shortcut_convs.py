"""shortcut_convs: a zero-padding shortcut becomes a 1x1 Conv (exact), so its residual streams
can be reordered, and it runs faster.

Before                                                   After (C = channels of x)

    x ─Slice(H, ::s)─Slice(W, ::s)─Pad(channels a, b)─ y    x ─Conv(E [a+C+b, C, 1, 1], strides s)─ y

E[a + c, c] = 1, every other entry 0: y[:, a + c] = x[:, c, ::s, ::s], the padded channels 0. This
is the "option A" shortcut of the CIFAR ResNets (He et al. 2016; akamaster's ResNet-20..110): the
Pad is not a Conv, so the residual streams on both sides of it could not be reordered
(partition_streams), and Slice/Pad leave onnxruntime's NCHWc layout (reorders around them). As a
Conv the shortcut stays in NCHWc: ResNet-20 dense ran 1.06x / 1.08x faster at batch 1 / 64
(onnxruntime CPU, 2 threads, side by side), for 0.2% more MACs.

Matched: Pad in constant mode with value 0 (or none), pads constant (after folding the constant
subgraph exporters compute them with) and zero but on the channel axis of a 4-D tensor, reading
x directly or through Slices on the spatial axes with start 0, an open end (>= 2^31 - 1) and
steps s >= 1. The Slices go when nothing else reads them; the pads' constant subgraph with them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gkp_onnx.graph import SHORTCUT_CONV, drop_unread, fold_constants, mark, node_attr, pinned

OPEN_END = 2**31 - 1


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor, constant subgraphs evaluated."""
    values = {t.name: numpy_helper.to_array(t) for t in fold_constants(model).graph.initializer}
    values.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _strided_source(tensor, producers, constants):
    """(x, strides, slices): walk up the spatial Slices [::s] from `tensor`."""
    strides, slices = [1, 1], []
    while tensor in producers and producers[tensor].op_type == "Slice":
        node = producers[tensor]
        args = [constants.get(name) if name else None for name in node.input[1:5]]
        if len(args) < 3 or any(a is None for a in args[:3]):
            break
        starts, ends, axes = args[:3]
        steps = args[3] if len(args) > 3 and args[3] is not None else np.ones_like(starts)
        axes = [int(a) % 4 for a in axes]
        if any(a not in (2, 3) for a in axes) or np.any(starts != 0) or np.any(ends < OPEN_END) or np.any(steps < 1):
            break
        for axis, step in zip(axes, steps):
            strides[axis - 2] *= int(step)
        slices.append(node)
        tensor = node.input[0]
    return tensor, strides, slices


SUFFIX = "/shortcut_conv"


def shortcuts_as_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every zero-padding shortcut a 1x1 Conv (the model itself when none)."""
    if not any(node.op_type == "Pad" for node in model.graph.node):
        return model  # nothing to match: skip the constant folding and shape inference
    constants = _constants(model)
    producers = {o: node for node in model.graph.node for o in node.output}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    found = []
    for pad in model.graph.node:
        if pad.op_type != "Pad" or node_attr(pad, "mode", b"constant") not in (b"constant", "constant") \
                or len(pad.input) < 2 or pad.input[1] not in constants:
            continue
        value = pad.input[2] if len(pad.input) > 2 else ""
        pads = constants[pad.input[1]].astype(np.int64).ravel()
        if (value and (value not in constants or np.any(constants[value] != 0))) or pads.shape != (8,) \
                or np.any(pads[[0, 2, 3, 4, 6, 7]] != 0) or np.any(pads < 0):
            continue
        x, strides, slices = _strided_source(pad.input[0], producers, constants)
        tensor = types.get(x)
        if tensor is None or len(tensor.shape.dim) != 4 or not tensor.shape.dim[1].HasField("dim_value"):
            continue
        found.append((pad, x, strides, slices, int(pads[1]), int(pads[5]), tensor))
    if not found:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    nodes = {node.name: node for node in result.graph.node}
    for pad, x, strides, slices, before, after, tensor in found:
        channels = tensor.shape.dim[1].dim_value
        embed = np.zeros((before + channels + after, channels, 1, 1), helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        embed[before + np.arange(channels), np.arange(channels)] = 1
        weight = f"{pad.name}{SUFFIX}.weight"
        result.graph.initializer.append(numpy_helper.from_array(embed, weight))
        conv = helper.make_node("Conv", [x, weight], [pad.output[0]], name=f"{pad.name}{SUFFIX}",
                                kernel_shape=[1, 1], strides=strides)
        mark(conv, SHORTCUT_CONV)  # analyze keeps it dense: pruning it would drop the shortcut
        old = nodes[pad.name]
        result.graph.node.insert(list(result.graph.node).index(old), conv)
        result.graph.node.remove(old)
    _drop_dead_nodes(result)
    del result.graph.value_info[:]
    return result


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove the nodes whose outputs nothing reads (the Slices and the pads' subgraph) and the
    initializers only they read, in place."""
    while True:
        read = {name for node in model.graph.node for name in node.input} | pinned(model.graph)
        dead = [node for node in model.graph.node if not any(o in read for o in node.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    drop_unread(model)
