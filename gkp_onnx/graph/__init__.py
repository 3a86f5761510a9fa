"""The graph layer every pass builds on; it imports only onnx, onnx-graphsurgeon, numpy and onnxruntime's
symbolic shape inference.

- `index`: producers, readers, node attributes and names, initializers by name, node marks.
- `shapes`: concrete input specs, shape inference, MACs and parameter counts.
- `channels`: the op table of per-channel ops, the channel walks, the reorderable channel spaces.
- `edit`: in-place edits (re-index initializers, reorder a channel space, drop unread tensors).
"""

from gkp_onnx.graph.channels import (BINARY_PER_CHANNEL, GLOBAL_POOLS, POOLS, UNARY_ELEMENTWISE, Component,
                                     chain_index, channel_constant, channel_count, components, gather_index, is_depthwise,
                                     is_per_channel, reduction_axis, walk_to_consumer, walk_to_producer,
                                     weight_rows)
from gkp_onnx.graph.edit import (drop_unread, initializers_as_inputs, permuted, reindex_params, reorder,
                                 replace_initializer, take_rows)
from gkp_onnx.graph.index import (GATHER_IN, SHORTCUT_CONV, GraphIndex, clear_marks, ensure_node_names, graph_index, initializer_map, mark,
                                  marked, node_attr, outer_reads, output_bias, pinned, reader_lists,
                                  subgraph_reads, subgraphs)
from gkp_onnx.graph.shapes import (MAC_OPS, InputSpec, ModelStats, assumed_note, explicit_pads, fold_constants,
                                   graph_inputs, infer_shapes, input_specs, last_axis_first, model_stats, node_macs)

__all__ = [name for name in dir() if not name.startswith("_")]
