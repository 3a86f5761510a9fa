"""rewrite_conv: replace each planned Conv by channel Gather + grouped Conv + output Gather.

Before (W: [Co, Ci, kh, kw])            After (G groups, n kept channels each)

    X ──Conv(W, B)── Y                   X ──Gather(axis=1, S_0..S_{G-1})── X'   (G*n channels)
                                          X' ──Conv(W', B', group=G)──────── Y'
                                          Y' ──Gather(axis=1, inverse order)─ Y   (Co, original order)

W'[rows of group g] = W[F_g][:, S_g], B' = B[F_0 .. F_{G-1}]; every attribute of the Conv
(strides, pads, dilations, auto_pad) is kept, the weight keeps its dtype (fp32, fp16...).
Y equals the dense Conv whose grouped kernels outside the kept sets are zero; with nothing
pruned it equals the original Conv. Y keeps its name, so consumers and graph outputs are
untouched. A Gather that would be the identity is left out (e.g. G = 1 with the filters in
order needs no output Gather). The old weight and bias are removed when nothing else reads them.

Requires: every planned layer has `kept_channels`; its node is a Conv reading its planned weight.
Ensures:  no initializer is left unread.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from gkp_onnx.graph import GATHER_IN, mark, subgraph_reads
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import LayerPlan, Plan


class _Names:
    """Hands out names that no node or tensor of the graph uses yet."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}

    def __call__(self, wanted: str) -> str:
        name, k = wanted, 1
        while name in self.used:
            name, k = f"{wanted}_{k}", k + 1
        self.used.add(name)
        return name


def grouped_weight(weight: np.ndarray, layer: LayerPlan) -> np.ndarray:
    """W' [Co, n, kh, kw]: group g's filters restricted to its kept input channels, in group order."""
    return np.concatenate([weight[np.ix_(f, c)] for f, c in zip(layer.groups, layer.kept_channels)])


class RewriteConv(Pass):
    name = "rewrite_conv"
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        nodes = {n.name: n for n in model.graph.node}
        for layer in plan.layers:
            node = nodes.get(layer.node)
            if node is None or node.op_type != "Conv" or node.input[1] != layer.weight:
                raise PassContractError(f"rewrite_conv: {layer.node} is not a Conv reading {layer.weight}")
            if layer.kept_channels is None:
                raise PassContractError(f"rewrite_conv: layer {layer.node} has no kernel selection")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        graph = gs.import_onnx(model)
        names = _Names(graph)
        nodes = {n.name: n for n in graph.nodes}
        gathers = {}  # input Gather -> the layer it serves
        for layer in plan.layers:
            gather = self._rewrite(graph, nodes[layer.node], layer, names)
            if gather is not None:
                gathers[gather] = layer.node
        graph.cleanup().toposort()
        rewritten = gs.export_onnx(graph)
        _keep_model_metadata(model, rewritten)
        for node in rewritten.graph.node:
            if node.name in gathers:
                mark(node, GATHER_IN, gathers[node.name])
        return PassResult(rewritten, plan, modified=bool(plan.layers))

    def _rewrite(self, graph: gs.Graph, conv: gs.Node, layer: LayerPlan, names: _Names) -> str | None:
        """Rewrite one Conv; returns the name of its input Gather, None when it needs none."""
        x, weight, y = conv.inputs[0], conv.inputs[1], conv.outputs[0]
        bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
        filter_order = np.concatenate(layer.groups).astype(np.int64)
        channel_index = np.concatenate(layer.kept_channels).astype(np.int64)

        conv_input, gather = x, None
        if not np.array_equal(channel_index, np.arange(layer.in_channels)):
            conv_input = gs.Variable(names(f"{layer.node}/gkp_channels"), dtype=x.dtype)
            gather = names(f"{layer.node}/gkp_gather_in")
            graph.nodes.append(gs.Node(
                "Gather", gather, attrs={"axis": 1},
                inputs=[x, gs.Constant(names(f"{layer.node}/gkp_channel_index"), channel_index)],
                outputs=[conv_input]))

        new_weight = grouped_weight(weight.values, layer)
        inputs = [conv_input, gs.Constant(names(f"{layer.weight}_gkp"), np.ascontiguousarray(new_weight))]
        if bias is not None:
            inputs.append(gs.Constant(names(f"{bias.name}_gkp"), np.ascontiguousarray(bias.values[filter_order])))

        restore = not np.array_equal(filter_order, np.arange(layer.out_channels))
        conv_output = gs.Variable(names(f"{layer.node}/gkp_grouped"), dtype=y.dtype) if restore else y
        attrs = dict(conv.attrs)
        attrs["group"] = layer.group_count
        conv.outputs.clear()
        conv.inputs.clear()
        layer.grouped_node = names(f"{layer.node}/gkp_conv")
        graph.nodes.append(gs.Node("Conv", layer.grouped_node, attrs=attrs, inputs=inputs, outputs=[conv_output]))
        if restore:
            graph.nodes.append(gs.Node(
                "Gather", names(f"{layer.node}/gkp_gather_out"), attrs={"axis": 1},
                inputs=[conv_output, gs.Constant(names(f"{layer.node}/gkp_filter_restore"),
                                                 np.argsort(filter_order).astype(np.int64))],
                outputs=[y]))
        return gather

    def ensures(self, model: onnx.ModelProto, plan: Plan) -> None:
        read = {name for node in model.graph.node for name in node.input} | subgraph_reads(model.graph)
        dead = [t.name for t in model.graph.initializer if t.name not in read]
        if dead:
            raise PassContractError(f"rewrite_conv left unread initializers: {dead[:5]}")


def _keep_model_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    target.ir_version = source.ir_version
    target.producer_name = source.producer_name
    target.producer_version = source.producer_version
    target.domain = source.domain
    target.model_version = source.model_version
    target.doc_string = source.doc_string
    del target.metadata_props[:]
    target.metadata_props.extend(source.metadata_props)
