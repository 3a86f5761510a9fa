"""Shapes, MACs, parameters and op counts of an ONNX graph.

Shapes come from onnx shape inference on a weight-free skeleton of the model whose graph
inputs are made concrete (batch 1 unless the user says otherwise), so MACs are per sample.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from gkp_onnx.errors import GkpError
from gkp_onnx.graph.canonical import silenced
from gkp_onnx.graph.edit import initializers_as_inputs
from gkp_onnx.graph.index import node_attr

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# Dynamic dims other than the batch take these sizes unless --input-shape (or the calibration
# data) gives them: MAC ratios of a fully convolutional net do not depend on the spatial size, and
# N:M needs no shapes at all. The report says when they were assumed.
DEFAULT_SPATIAL = 224  # height / width (any axis >= 2 of a floating-point input of rank >= 3)
DEFAULT_SEQUENCE = 128  # any dynamic axis of an integer or boolean input (token ids, masks)


@dataclass
class InputSpec:
    name: str
    shape: list[int]
    dtype: np.dtype
    assumed: bool = False  # dims other than the batch were dynamic and took the defaults above
    upper: int | None = None  # integer inputs used as indices: exclusive bound (rows of the table they index)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs, not initializers listed as inputs (old exporters)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_specs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> list[InputSpec]:
    """Concrete shape and dtype of every graph input. A dim is dynamic when it is symbolic,
    missing, 0 or -1: the batch (axis 0) takes 1, others DEFAULT_SPATIAL / DEFAULT_SEQUENCE; a
    dynamic channel or feature axis must be given."""
    input_shapes = input_shapes or {}
    names = {i.name for i in graph_inputs(model)}
    for name in input_shapes:
        if name not in names:
            raise GkpError(f"--input-shape names '{name}', which is not a model input ({', '.join(sorted(names))})")
    specs, bounds = [], index_bounds(model)
    for value in graph_inputs(model):
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
        if value.name in input_shapes:
            shape = list(input_shapes[value.name])
            if len(shape) != len(declared) or any(d is not None and d != s for d, s in zip(declared, shape)):
                raise GkpError(f"--input-shape {value.name}:{_fmt(shape)} does not match the model's "
                               f"shape {_fmt(declared)}")
            specs.append(InputSpec(value.name, shape, dtype, upper=bounds.get(value.name)))
        else:
            shape = [_default_dim(value.name, declared, axis, dtype) if d is None else d for axis, d in enumerate(declared)]
            specs.append(InputSpec(value.name, shape, dtype, assumed=any(d is None for d in declared[1:]),
                                   upper=bounds.get(value.name)))
    return specs


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For graph inputs that index a constant table (Gather on axis 0, possibly through Cast,
    Reshape, Unsqueeze, Squeeze or Flatten), the number of rows of the smallest such table: random
    validation inputs must stay below it (token ids, token type ids)."""
    tables = {t.name: t.dims[0] for t in model.graph.initializer if t.dims}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    bounds = {}
    for value in model.graph.input:
        todo, seen = [value.name], set()
        while todo:
            tensor = todo.pop()
            seen.add(tensor)
            for node in readers.get(tensor, []):
                if node.op_type == "Gather" and node.input[1] == tensor and node.input[0] in tables \
                        and node_attr(node, "axis", 0) == 0:
                    bounds[value.name] = min(bounds.get(value.name, tables[node.input[0]]), tables[node.input[0]])
                elif node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten") and node.input[0] == tensor:
                    todo += [o for o in node.output if o not in seen]
    return bounds


def _default_dim(name: str, declared: list[int | None], axis: int, dtype: np.dtype) -> int:
    if axis == 0:
        return 1
    if dtype.kind in "iub":
        return DEFAULT_SEQUENCE
    if len(declared) >= 3 and axis >= 2:
        return DEFAULT_SPATIAL
    example = [1] + [d or (3 if i == 1 else DEFAULT_SPATIAL) for i, d in enumerate(declared)][1:]
    raise GkpError(f"input '{name}' has a dynamic channel or feature dimension (axis {axis} of {_fmt(declared)}); "
                   f"give it with --input-shape, e.g. --input-shape {name}:{_fmt(example)}")


def assumed_note(spec: InputSpec) -> str:
    return (f"input '{spec.name}' has dynamic dimensions, taken as {_fmt(spec.shape)} (give others with "
            f"--input-shape {spec.name}:...)")


def infer_shapes(model: onnx.ModelProto, specs: list[InputSpec]) -> dict[str, list[int]]:
    """Static shape of every tensor onnx can infer for the given concrete inputs (and, where it
    leaves a Conv/ConvTranspose/Gemm/MatMul without one, what onnxruntime's symbolic shape inference finds)."""
    skeleton = _skeleton(model)
    del skeleton.graph.value_info[:]
    by_name = {s.name: s for s in specs}
    for value in skeleton.graph.input:
        if value.name in by_name:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, by_name[value.name].shape):
                dim.Clear()
                dim.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(fold_constants(skeleton), strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several types here; any of them means: no shapes
        raise GkpError(f"onnx shape inference failed: {str(exc).splitlines()[0][:300]}") from None
    shapes = _static_shapes(inferred.graph)
    if any(node.output[0] not in shapes for node in model.graph.node if node.op_type in MAC_OPS):
        # onnx stops at shapes computed at run time (attention masks built from Shape, Range, Expand);
        # onnxruntime's symbolic shape inference follows them
        shapes = _symbolic_shapes(skeleton) | shapes
    graph = inferred.graph
    for init in list(graph.initializer) + list(model.graph.initializer):  # folded constants have shapes too
        shapes[init.name] = list(init.dims)
    return shapes


def _static_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    shapes = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape") \
                and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The shapes onnxruntime's symbolic shape inference finds, also when it cannot find them all
    (its `infer_shapes` then raises, after writing the model to the working directory)."""
    if not any(o.domain in ("", "ai.onnx") and o.version >= 7 for o in model.opset_import):
        return {}
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")  # it warns through Python's logging
    disabled, logger.disabled = logger.disabled, True
    try:
        # imported here: onnxruntime.tools imports torch when it is installed, which only this needs to pay
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with silenced():
            inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # auto_merge, like infer_shapes(...)
            inference._preprocess(model)
            while inference.run_:
                inference._infer_impl()
            inference._update_output_from_vi()
        return _static_shapes(inference.out_mp_.graph)
    except Exception:  # an op it does not know, a shape it cannot merge, no onnxruntime.tools: onnx's shapes stay
        return {}
    finally:
        logger.disabled = disabled


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose big initializers (and those in external data, maybe not loaded) are graph inputs
    of their dtype and dims: shape inference reads only dims, and constant folding must not take a
    weight without its data for a constant."""
    external = onnx.TensorProto.EXTERNAL
    return initializers_as_inputs(model, [init.name for init in model.graph.initializer
                                          if len(init.raw_data) > 4096 or init.data_location == external])


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate constant subgraphs (exporters compute pads and shapes with them) so that shape
    inference sees their values; tensor names are kept, so the shapes map back to `model`."""
    copy = onnx.ModelProto()  # onnx-graphsurgeon names the Constant tensors it exports in place
    copy.CopyFrom(model)
    with silenced():  # its notes and onnxruntime's warnings are not the user's business
        graph = gs.import_onnx(copy)
        graph.fold_constants(error_ok=True).cleanup()
        return gs.export_onnx(graph, do_type_check=False)


def explicit_pads(attrs: dict, in_size: tuple[int, ...], kernel: list[int]) -> list[int]:
    """A Conv's or pool's padding in ONNX's layout [x1_begin, x2_begin, .., x1_end, x2_end], auto_pad
    resolved (any number of spatial dimensions; `in_size`: the input's spatial sizes)."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    dims = len(kernel)
    if auto in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * dims))
    if auto == "VALID":
        return [0] * 2 * dims
    strides, dilations = attrs.get("strides", [1] * dims), attrs.get("dilations", [1] * dims)
    pads = []
    for size, k, s, d in zip(in_size, kernel, strides, dilations):
        out = -(-size // s)
        pads.append(max(0, (out - 1) * s + (k - 1) * d + 1 - size))
    begin = [p // 2 if auto == "SAME_UPPER" else p - p // 2 for p in pads]
    return begin + [p - b for p, b in zip(pads, begin)]


def last_axis_first(pads: list[int]) -> list[int]:
    """ONNX pads [x1_begin, .., xn_begin, x1_end, .., xn_end] in torch's F.pad order (last axis first)."""
    n = len(pads) // 2
    return [p for axis in reversed(range(n)) for p in (pads[axis], pads[n + axis])]


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    """Multiply-accumulates of one Conv/ConvTranspose/Gemm/MatMul node, None when shapes are unknown."""
    out = shapes.get(node.output[0])
    if out is None:
        return None
    if node.op_type == "ConvTranspose":  # every input pixel meets every weight of its group
        x, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        return None if x is None or weight is None else int(np.prod(x) * np.prod(weight[1:]))
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1])
        return None if weight is None else int(np.prod(out) * np.prod(weight[1:]))
    if node.op_type == "Gemm":
        a = shapes.get(node.input[0])
        if a is None:
            return None
        trans_a = node_attr(node, "transA", 0)
        return int(np.prod(out) * (a[0] if trans_a else a[1]))
    if node.op_type == "MatMul":
        a = shapes.get(node.input[0])
        return None if a is None else int(np.prod(out) * a[-1])
    return None


@dataclass
class ModelStats:
    params: int  # elements of floating-point initializers
    macs: int  # Conv + ConvTranspose + Gemm + MatMul, per the given input shapes
    op_counts: Counter
    node_macs: dict[str, int | None]

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "op_counts": dict(sorted(self.op_counts.items()))}


def model_stats(model: onnx.ModelProto, specs: list[InputSpec], shapes: dict | None = None) -> ModelStats:
    shapes = shapes if shapes is not None else infer_shapes(model, specs)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                 if helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f")
    per_node = {n.name: node_macs(n, shapes) for n in model.graph.node if n.op_type in MAC_OPS}
    return ModelStats(params=params, macs=sum(m or 0 for m in per_node.values()),
                      op_counts=Counter(n.op_type for n in model.graph.node), node_macs=per_node)


def _fmt(shape) -> str:
    return ",".join("?" if d is None else str(d) for d in shape)
