"""Who produces and reads each tensor, node attributes and names, initializers by name, and the
marks gkp-onnx leaves on nodes (in `metadata_props`, never in names)."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import onnx
from onnx import helper


class GraphIndex(NamedTuple):
    """Who produces and who reads each tensor: what the graph walks of the passes look up."""
    producers: dict[str, onnx.NodeProto]  # tensor -> the node writing it
    consumers: dict[str, onnx.NodeProto]  # tensor -> a node reading it (the one, where it is read once)
    readers: Counter  # tensor -> how many node inputs read it (a subgraph reading it counts once)
    outputs: set[str]  # pinned(graph): the graph outputs and what subgraphs read


def graph_index(graph: onnx.GraphProto) -> GraphIndex:
    inner = subgraph_reads(graph)
    return GraphIndex({o: node for node in graph.node for o in node.output},
                      {name: node for node in graph.node for name in node.input},
                      Counter(name for node in graph.node for name in node.input) + Counter(inner),
                      {o.name for o in graph.output} | inner)


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of each subgraph of `node`: If branches, Loop and Scan bodies."""
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            yield attr.name, sub


def outer_reads(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """The names that the subgraphs of `nodes` (at any depth) read from the scope around them."""
    names: set[str] = set()
    for node in nodes:
        for _, sub in subgraphs(node):
            defined = ({i.name for i in sub.input} | {t.name for t in sub.initializer}
                       | {o for n in sub.node for o in n.output})
            read = {name for n in sub.node for name in n.input} | {o.name for o in sub.output}
            names |= {name for name in read | outer_reads(sub.node) if name and name not in defined}
    return names


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """What the graph's subgraphs read from it: a rewrite must leave those tensors as they are,
    like graph outputs."""
    return outer_reads(graph.node)


def pinned(graph: onnx.GraphProto) -> set[str]:
    """Tensors whose channels must stay as they are: the graph outputs and what subgraphs read."""
    return {o.name for o in graph.output} | subgraph_reads(graph)


def reader_lists(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor -> every node reading it, in graph order (a node reading it twice, twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of a node attribute, or `default` when the node does not set it."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique name (plans and reports refer to nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


MARK_PREFIX = "gkp_onnx:"
SHORTCUT_CONV = "shortcut_conv"  # a Conv shortcut_convs made of a zero-padding shortcut
GATHER_IN = "gather_in"  # rewrite_conv's input Gather; the value names the layer it serves


def mark(node: onnx.NodeProto, key: str, value: str = "1") -> None:
    """Leave a mark on `node` (a node metadata_props entry) that later passes read with `marked`."""
    entry = next((p for p in node.metadata_props if p.key == MARK_PREFIX + key), None) or node.metadata_props.add()
    entry.key, entry.value = MARK_PREFIX + key, value


def marked(node: onnx.NodeProto, key: str) -> str | None:
    """The value of the mark `key` on `node`, None when it has none. Marks do not survive an
    onnx-graphsurgeon round trip: a pass that rebuilds the graph with it marks its nodes after."""
    return next((p.value for p in node.metadata_props if p.key == MARK_PREFIX + key), None)


def clear_marks(model: onnx.ModelProto) -> None:
    """Remove every gkp-onnx mark, in place: the output model carries none."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if not p.key.startswith(MARK_PREFIX)]
        if len(kept) != len(node.metadata_props):
            node.ClearField("metadata_props")
            node.metadata_props.extend(kept)


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name (the protos themselves: editing one edits the graph)."""
    return {t.name: t for t in graph.initializer}


def output_bias(model: onnx.ModelProto, node: onnx.NodeProto, initializers: dict) -> str | None:
    """The initializer added to the layer's output, one value per output channel, read by nothing
    else: Gemm's C, or the constant of the only Add reading a MatMul's output."""
    readers = [n for n in model.graph.node if any(name in n.input for name in node.output)]
    if node.op_type == "Gemm":
        name = node.input[2] if len(node.input) > 2 and node_attr(node, "beta", 1.0) == 1.0 else ""
    elif len(readers) == 1 and readers[0].op_type == "Add" and node.output[0] not in pinned(model.graph):
        name = next((n for n in readers[0].input if n != node.output[0]), "")
    else:
        return None
    if name not in initializers or sum(name in n.input for n in model.graph.node) != 1:
        return None
    dims = list(initializers[name].dims)
    width = initializers[node.input[1]].dims[0 if node.op_type == "Gemm" and node_attr(node, "transB", 0) else -1]
    return name if dims and dims[-1] == width and int(np.prod(dims)) == width else None
