"""Edits of a model in place: re-indexing initializers along a channel axis (a shared initializer
gets a private copy), reordering a channel space, dropping what nothing reads."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.errors import GkpError
from gkp_onnx.graph.channels import (BINARY_PER_CHANNEL, Component, channel_constant, channel_position, components,
                                     reduction_axis)
from gkp_onnx.graph.index import initializer_map, subgraph_reads


def replace_initializer(model, initializers, name, transform, node, slot) -> None:
    """Transform the initializer `node` reads at `slot`; a shared one gets a private copy instead."""
    values = transform(numpy_helper.to_array(initializers[name]))
    readers = sum(name == i for n in model.graph.node for i in n.input)
    if readers <= 1:
        initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values), name))
        return
    new_name = f"{name}_{node.name}_folded"
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), new_name))
    initializers[new_name] = model.graph.initializer[-1]
    node.input[slot] = new_name


def reindex_params(model, node, index, initializers) -> None:
    """Re-index the per-channel parameters of a per-channel `node` by `index` (channel axis)."""
    if node.op_type == "BatchNormalization":
        for slot in range(1, 5):
            replace_initializer(model, initializers, node.input[slot], lambda v: v[index], node, slot)
    elif node.op_type == "Conv":  # depthwise: its filters follow the channels, one group each
        for slot in (1, 2):
            if slot < len(node.input) and node.input[slot]:
                replace_initializer(model, initializers, node.input[slot], lambda v: v[index], node, slot)
        next(a for a in node.attribute if a.name == "group").i = len(index)
    elif node.op_type in BINARY_PER_CHANNEL or node.op_type == "PRelu":
        if channel_constant(node.input[1], initializers) == "per_channel":
            axis = channel_position(list(initializers[node.input[1]].dims))
            replace_initializer(model, initializers, node.input[1], lambda v: np.take(v, index, axis=axis), node, 1)


def take_rows(model, node, index, initializers) -> None:
    """Re-index what makes `node`'s output channels by `index` on axis 0: a Conv's weight and bias,
    or a Gather's indices."""
    for slot in range(1, 3 if node.op_type == "Conv" else 2):
        if slot < len(node.input) and node.input[slot]:
            replace_initializer(model, initializers, node.input[slot], lambda v: v[index], node, slot)


def drop_unread(model: onnx.ModelProto) -> None:
    """Delete initializers nothing reads, in place (rebuilding the list would copy every weight)."""
    read = {name for node in model.graph.node for name in node.input} | subgraph_reads(model.graph)
    for index in reversed(range(len(model.graph.initializer))):
        if model.graph.initializer[index].name not in read:
            del model.graph.initializer[index]


def reorder(model: onnx.ModelProto, component: Component, order: np.ndarray) -> None:
    """Reorder the channels of `component` in place: channel k becomes the old channel order[k]."""
    initializers = initializer_map(model.graph)
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


def initializers_as_inputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` in which the named initializers are graph inputs of their dtype and dims
    (fed at run time, or for shape inference: dims without data)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    names = set(names)
    moved = [init for init in copy.graph.initializer if init.name in names]
    kept = [init for init in copy.graph.initializer if init.name not in names]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(kept)
    listed = {value.name for value in copy.graph.input}
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                            for init in moved if init.name not in listed)
    return copy
