"""Deterministic corruptions of ONNX models and calibration archives, for tests/test_fuzz.py.

A model mutation takes a fresh copy of a valid ModelProto and the folder the mutated file will be
written to, and returns the bytes of that file (an ONNX proto, or anything else); it may write
side files there (external data) or one level up (data "outside the model folder"). It returns
None where the model has nothing to mutate that way (the test then skips, saying so).

A data mutation takes a folder and a valid (x, y) calibration pair and returns the bytes of the
.npz file to write.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

ModelMutation = Callable[[onnx.ModelProto, Path], "bytes | None"]
DataMutation = Callable[[Path, np.ndarray, np.ndarray], bytes]


# ---------------------------------------------------------------- where to cut

def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def _target_conv(model: onnx.ModelProto) -> onnx.NodeProto:
    """The second Conv (a prunable one in the fixtures, past the stem in the model zoo)."""
    convs = _convs(model)
    return convs[1] if len(convs) > 1 else convs[0]


def _target_tensor(model: onnx.ModelProto) -> TensorProto | None:
    """A float initializer a Conv reads: the target Conv's weight, else its bias, else any."""
    inits = _initializers(model)
    conv = _target_conv(model)
    for name in conv.input[1:]:
        if name in inits and inits[name].data_type == TensorProto.FLOAT:
            return inits[name]
    floats = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and t.dims]
    return floats[0] if floats else None


def _as_raw(tensor: TensorProto) -> TensorProto:
    """Store `tensor` in raw_data (the model zoo uses float_data in places)."""
    if not tensor.HasField("raw_data"):
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    return tensor


def _data_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The first graph input that is not an initializer (IR 3 models list weights as inputs)."""
    inits = _initializers(model)
    return next(v for v in model.graph.input if v.name not in inits)


def _proto(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


# ---------------------------------------------------------------- initializers

def _tensor_edit(edit: Callable[[TensorProto], None]) -> ModelMutation:
    def mutate(model, folder):
        tensor = _target_tensor(model)
        if tensor is None:
            return None
        edit(_as_raw(tensor))
        return _proto(model)
    return mutate


def _set_dims(tensor: TensorProto, dims) -> None:
    del tensor.dims[:]
    tensor.dims.extend(dims)


def _nan_weight(tensor: TensorProto) -> None:
    array = numpy_helper.to_array(tensor).copy()
    array.flat[0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _weight_rank(rank: int) -> ModelMutation:
    """The target Conv's weight with `rank` dims (same values): an initializer reshaped, or the
    shape a ConstantOfShape builds it from changed."""
    def mutate(model, folder):
        conv = _target_conv(model)
        inits, producers = _initializers(model), _producers(model)
        name = conv.input[1]
        if name in inits:
            tensor = _as_raw(inits[name])
            dims = list(tensor.dims)
            new = [dims[0], int(np.prod(dims[1:]))] if rank == 2 else dims + [1] * (rank - len(dims))
            _set_dims(tensor, new)
            return _proto(model)
        node = producers.get(name)
        if node is not None and node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = inits[node.input[0]]
            dims = [int(d) for d in numpy_helper.to_array(shape)]
            new = [dims[0], int(np.prod(dims[1:]))] if rank == 2 else dims + [1] * (rank - len(dims))
            shape.CopyFrom(numpy_helper.from_array(np.array(new, np.int64), shape.name))
            return _proto(model)
        return None
    return mutate


def _weight_channels(model, folder):
    """The target Conv's weight gets one more input channel than its input has."""
    conv = _target_conv(model)
    inits = _initializers(model)
    if conv.input[1] not in inits:
        return None
    tensor = inits[conv.input[1]]
    array = numpy_helper.to_array(tensor)
    bigger = np.concatenate([array, array[:, :1]], axis=1)
    tensor.CopyFrom(numpy_helper.from_array(bigger, tensor.name))
    return _proto(model)


def _conv_attribute(name: str, value) -> ModelMutation:
    def mutate(model, folder):
        conv = _target_conv(model)
        kept = [a for a in conv.attribute if a.name != name]
        del conv.attribute[:]
        conv.attribute.extend(kept)
        conv.attribute.append(helper.make_attribute(name, value))
        return _proto(model)
    return mutate


def _duplicate_initializer(model, folder):
    tensor = _target_tensor(model)
    if tensor is None:
        return None
    copy = model.graph.initializer.add()
    copy.CopyFrom(tensor)
    return _proto(model)


# ---------------------------------------------------------------- value infos

def _input_edit(edit: Callable[[onnx.ValueInfoProto], None]) -> ModelMutation:
    def mutate(model, folder):
        edit(_data_input(model))
        return _proto(model)
    return mutate


def _dims(value: onnx.ValueInfoProto):
    return value.type.tensor_type.shape.dim


def _set_dim(index: int, size: int):
    def edit(value):
        dim = _dims(value)[index]
        dim.Clear()
        dim.dim_value = size
    return edit


def _reverse_dims(value):
    dims = [onnx.TensorShapeProto.Dimension() for _ in _dims(value)]
    for new, old in zip(dims, reversed(list(_dims(value)))):
        new.CopyFrom(old)
    del _dims(value)[:]
    _dims(value).extend(dims)


def _drop_rank(value):
    value.type.tensor_type.shape.Clear()
    value.type.tensor_type.shape.SetInParent()  # a rank-0 input


def _no_type(value):
    value.ClearField("type")


def _int_input(value):
    value.type.tensor_type.elem_type = TensorProto.INT64


def _wrong_value_info(model, folder):
    """Every intermediate tensor declared [1, 3, 7] (shape inference would say otherwise)."""
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    known = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    del model.graph.value_info[:]
    for value in inferred:
        if value.name in known or not value.type.HasField("tensor_type"):
            continue
        value.type.tensor_type.shape.Clear()
        for size in (1, 3, 7):
            value.type.tensor_type.shape.dim.add().dim_value = size
        model.graph.value_info.append(value)
    return _proto(model)


def _wrong_output_shape(model, folder):
    output = model.graph.output[0]
    output.type.tensor_type.shape.Clear()
    for size in (1, 2, 3):
        output.type.tensor_type.shape.dim.add().dim_value = size
    return _proto(model)


def _wrong_output_dtype(model, folder):
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT8
    return _proto(model)


# ---------------------------------------------------------------- graph structure

def _dangling_input(model, folder):
    model.graph.node[1].input[0] = "no_such_tensor"
    return _proto(model)


def _cycle(model, folder):
    """The first Conv reads the output of the node after it (which reads the Conv's output)."""
    nodes = list(model.graph.node)
    conv = _target_conv(model)
    index = nodes.index(conv)
    consumer = next(n for n in nodes[index + 1:] if conv.output[0] in n.input)
    conv.input[0] = consumer.output[0]
    return _proto(model)


def _cycle_sorted(model, folder):
    """As _cycle, with the two nodes also swapped (no topological order exists at all)."""
    nodes = list(model.graph.node)
    conv = _target_conv(model)
    index = nodes.index(conv)
    consumer_index = next(i for i in range(index + 1, len(nodes)) if conv.output[0] in nodes[i].input)
    consumer = nodes[consumer_index]
    conv.input[0] = consumer.output[0]
    nodes[index], nodes[consumer_index] = nodes[consumer_index], nodes[index]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return _proto(model)


def _self_loop(model, folder):
    node = next(n for n in model.graph.node if n.op_type == "Relu")
    node.input[0] = node.output[0]
    return _proto(model)


def _duplicate_output(model, folder):
    model.graph.node[1].output[0] = model.graph.node[0].output[0]
    return _proto(model)


def _unsorted(model, folder):
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return _proto(model)


def _opset(version: int | None, domain: str = "") -> ModelMutation:
    def mutate(model, folder):
        del model.opset_import[:]
        if version is not None:
            model.opset_import.append(helper.make_opsetid(domain, version))
        return _proto(model)
    return mutate


def _ir_version(version: int) -> ModelMutation:
    def mutate(model, folder):
        model.ir_version = version
        return _proto(model)
    return mutate


def _unknown_op(domain: str) -> ModelMutation:
    def mutate(model, folder):
        node = next(n for n in model.graph.node if n.op_type == "Relu")
        node.op_type = "FooBar"
        if domain:
            node.domain = domain
            model.opset_import.append(helper.make_opsetid(domain, 1))
        return _proto(model)
    return mutate


def _no_nodes(model, folder):
    del model.graph.node[:]
    return _proto(model)


def _identity_only(model, folder):
    """A valid graph with nothing to prune: y = Identity(x)."""
    x = _data_input(model)
    y = helper.make_tensor_value_info("y", x.type.tensor_type.elem_type, None)
    y.type.CopyFrom(x.type)
    graph = helper.make_graph([helper.make_node("Identity", [x.name], ["y"])], "identity", [x], [y])
    return _proto(helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version))


def _no_outputs(model, folder):
    del model.graph.output[:]
    return _proto(model)


def _no_graph(model, folder):
    model.ClearField("graph")
    return _proto(model)


def _empty_names(model, folder):
    """Every node named '' and the graph output renamed to an empty string."""
    for node in model.graph.node:
        node.name = ""
    return _proto(model)


# ---------------------------------------------------------------- external data

def _external(location: str | None, place: str = "inside", truncate: bool = False) -> ModelMutation:
    """Weights moved to an external file; its recorded location set to `location` (None: kept)
    and the file placed inside the model folder, one level up ('outside'), or nowhere."""
    def mutate(model, folder, location=location):
        external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                                            location="weights.bin", size_threshold=0)
        external_data_helper.write_external_data_tensors(model, str(folder))
        data = folder / "weights.bin"
        if truncate:
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        if place == "outside":
            target = folder.parent / "outside.bin"
            data.replace(target)
        elif place == "absolute":
            target = folder.parent / "absolute.bin"
            data.replace(target)
            location = str(target)
        elif place == "missing":
            data.unlink()
        if location is not None:
            for tensor in external_data_helper._get_all_tensors(model):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location
        return _proto(model)
    return mutate


# ---------------------------------------------------------------- not a (whole) model

def _truncated(fraction: float) -> ModelMutation:
    def mutate(model, folder):
        data = _proto(model)
        return data[: int(len(data) * fraction)]
    return mutate


def _random_bytes(model, folder):
    return np.random.default_rng(0).bytes(4096)


def _json(model, folder):
    return json.dumps({"ir_version": 8, "graph": {"node": []}}).encode()


def _empty(model, folder):
    return b""


def _npz(model, folder):
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(3))
    return buffer.getvalue()


MODEL_MUTATIONS: dict[str, ModelMutation] = {
    # initializers
    "init_dims_reversed": _tensor_edit(lambda t: _set_dims(t, list(t.dims)[::-1])),
    "init_dim_zero": _tensor_edit(lambda t: _set_dims(t, [0] + list(t.dims)[1:])),
    "init_dim_negative": _tensor_edit(lambda t: _set_dims(t, [-t.dims[0]] + list(t.dims)[1:])),
    "init_dim_huge": _tensor_edit(lambda t: _set_dims(t, [2 ** 40] + list(t.dims)[1:])),
    "init_dims_dropped": _tensor_edit(lambda t: _set_dims(t, [])),
    "init_dtype_int64": _tensor_edit(lambda t: setattr(t, "data_type", TensorProto.INT64)),
    "init_dtype_int32": _tensor_edit(lambda t: setattr(t, "data_type", TensorProto.INT32)),
    "init_dtype_double": _tensor_edit(lambda t: setattr(t, "data_type", TensorProto.DOUBLE)),
    "init_dtype_float16": _tensor_edit(lambda t: setattr(t, "data_type", TensorProto.FLOAT16)),
    "init_dtype_string": _tensor_edit(lambda t: setattr(t, "data_type", TensorProto.STRING)),
    "init_dtype_undefined": _tensor_edit(lambda t: setattr(t, "data_type", TensorProto.UNDEFINED)),
    "init_raw_truncated": _tensor_edit(lambda t: setattr(t, "raw_data", t.raw_data[: len(t.raw_data) // 2])),
    "init_raw_odd_length": _tensor_edit(lambda t: setattr(t, "raw_data", t.raw_data[:-1])),
    "init_raw_empty": _tensor_edit(lambda t: setattr(t, "raw_data", b"")),
    "init_nan": _tensor_edit(_nan_weight),
    "init_duplicated": _duplicate_initializer,
    # value infos
    "input_channels_zero": _input_edit(_set_dim(1, 0)),
    "input_channels_negative": _input_edit(_set_dim(1, -8)),
    "input_channels_wrong": _input_edit(_set_dim(1, 3)),
    "input_dims_reversed": _input_edit(_reverse_dims),
    "input_rank_zero": _input_edit(_drop_rank),
    "input_huge_batch": _input_edit(_set_dim(0, 2 ** 24)),
    "input_huge_spatial": _input_edit(_set_dim(2, 2 ** 31)),
    "input_no_type": _input_edit(_no_type),
    "input_int64": _input_edit(_int_input),
    "value_info_wrong": _wrong_value_info,
    "output_shape_wrong": _wrong_output_shape,
    "output_dtype_wrong": _wrong_output_dtype,
    # graph structure
    "dangling_input": _dangling_input,
    "cycle": _cycle,
    "cycle_swapped": _cycle_sorted,
    "self_loop": _self_loop,
    "duplicate_output": _duplicate_output,
    "nodes_reversed": _unsorted,
    "opset_missing": _opset(None),
    "opset_1": _opset(1),
    "opset_99": _opset(99),
    "opset_only_custom_domain": _opset(1, "com.example"),
    "ir_version_0": _ir_version(0),
    "ir_version_99": _ir_version(99),
    "unknown_op": _unknown_op(""),
    "unknown_domain_op": _unknown_op("com.example"),
    "no_nodes": _no_nodes,
    "identity_only": _identity_only,
    "no_outputs": _no_outputs,
    "no_graph": _no_graph,
    "empty_node_names": _empty_names,
    # Convs
    "conv_weight_rank2": _weight_rank(2),
    "conv_weight_rank5": _weight_rank(5),
    "conv_weight_extra_channel": _weight_channels,
    "conv_group_3": _conv_attribute("group", 3),
    "conv_group_0": _conv_attribute("group", 0),
    "conv_kernel_shape_wrong": _conv_attribute("kernel_shape", [5, 5]),
    "conv_pads_negative": _conv_attribute("pads", [-1, -1, -1, -1]),
    "conv_strides_zero": _conv_attribute("strides", [0, 0]),
    # external data
    "external_ok": _external(None),
    "external_outside_folder": _external("../outside.bin", place="outside"),
    "external_absolute_path": _external(None, place="absolute"),
    "external_missing": _external(None, place="missing"),
    "external_truncated": _external(None, truncate=True),
    # not a (whole) model
    "truncated_half": _truncated(0.5),
    "truncated_tenth": _truncated(0.1),
    "random_bytes": _random_bytes,
    "json_file": _json,
    "empty_file": _empty,
    "npz_file": _npz,
}


# ---------------------------------------------------------------- calibration data

def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy_header_zip(name: str, shape: tuple[int, ...], payload: bytes) -> bytes:
    """A zip holding NAME.npy whose header declares `shape` (float32) over `payload`."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{name}.npy", npy)
    return buffer.getvalue()


def _with_x(transform) -> DataMutation:
    return lambda folder, x, y: npz_bytes(x=transform(x.copy()), y=y)


def _with_y(transform) -> DataMutation:
    return lambda folder, x, y: npz_bytes(x=x, y=transform(y.copy()))


def _set_first(value):
    def transform(array):
        array.flat[0] = value
        return array
    return transform


DATA_MUTATIONS: dict[str, DataMutation] = {
    "valid": lambda folder, x, y: npz_bytes(x=x, y=y),
    "valid_no_labels": lambda folder, x, y: npz_bytes(x=x),
    "x_nan": _with_x(_set_first(np.nan)),
    "x_inf": _with_x(_set_first(-np.inf)),
    "x_all_nan": _with_x(lambda a: np.full_like(a, np.nan)),
    "x_zero_samples": lambda folder, x, y: npz_bytes(x=x[:0], y=y[:0]),
    "x_zero_samples_no_labels": lambda folder, x, y: npz_bytes(x=x[:0]),
    "x_float64": _with_x(lambda a: a.astype(np.float64)),
    "x_float16": _with_x(lambda a: a.astype(np.float16)),
    "x_int64": _with_x(lambda a: a.astype(np.int64)),
    "x_bool": _with_x(lambda a: a > 0),
    "x_complex": _with_x(lambda a: a.astype(np.complex64)),
    "x_strings": _with_x(lambda a: a.astype(str)),
    "x_datetime": _with_x(lambda a: a.astype(np.int64).astype("datetime64[s]")),
    "x_structured": _with_x(lambda a: np.zeros(a.shape, dtype=[("a", np.float32), ("b", np.int8)])),
    "x_scalar": _with_x(lambda a: np.float32(1.0)),
    "x_rank3": _with_x(lambda a: a[:, 0]),
    "x_rank5": _with_x(lambda a: a[..., None]),
    "x_wrong_channels": _with_x(lambda a: a[:, :3]),
    "x_wrong_spatial": _with_x(lambda a: np.concatenate([a, a[..., :1]], axis=-1)),
    "x_transposed": _with_x(lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))),
    "x_fortran_order": _with_x(np.asfortranarray),
    "x_zero_size_huge_batch": lambda folder, x, y: npz_bytes(x=np.zeros((2 ** 31, 8, 0, 10), np.float32)),
    "x_pickled_objects": lambda folder, x, y: npz_bytes(x=np.array([{"a": 1}, None], dtype=object), y=y),
    "x_object_floats": _with_x(lambda a: a.astype(object)),
    "x_huge_declared_shape": lambda folder, x, y: _npy_header_zip("x", (2 ** 40, 8, 10, 10), b"\0" * 64),
    "x_declared_shape_short": lambda folder, x, y: _npy_header_zip("x", (4, 8, 10, 10), b"\0" * 64),
    "x_missing": lambda folder, x, y: npz_bytes(inputs=x, y=y),
    "x_and_input_name_differ": lambda folder, x, y: npz_bytes(x=x, input=x[:1], y=y),
    "y_only": lambda folder, x, y: npz_bytes(y=y),
    "empty_archive": lambda folder, x, y: npz_bytes(),
    "y_float": _with_y(lambda a: a.astype(np.float32) + 0.5),
    "y_nan": _with_y(lambda a: np.full(a.shape, np.nan, np.float32)),
    "y_negative": _with_y(lambda a: -a - 1),
    "y_out_of_range": _with_y(lambda a: a + 1000),
    "y_int64_max": _with_y(lambda a: np.full_like(a, np.iinfo(np.int64).max)),
    "y_uint64_max": _with_y(lambda a: np.full(a.shape, np.iinfo(np.uint64).max, np.uint64)),
    "y_too_few": _with_y(lambda a: a[:1]),
    "y_2d": _with_y(lambda a: a[:, None]),
    "y_scalar": _with_y(lambda a: np.int64(1)),
    "y_one_hot": _with_y(lambda a: np.eye(10, dtype=np.float32)[a]),
    "y_pickled_objects": _with_y(lambda a: np.array([object()] * len(a), dtype=object)),
    "y_bool": _with_y(lambda a: a > 3),
    "truncated_half": lambda folder, x, y: npz_bytes(x=x, y=y)[: len(npz_bytes(x=x, y=y)) // 2],
    "truncated_tail": lambda folder, x, y: npz_bytes(x=x, y=y)[:-10],
    "npy_not_npz": lambda folder, x, y: _npy_only(x),
    "random_bytes": lambda folder, x, y: np.random.default_rng(1).bytes(2048),
    "empty_file": lambda folder, x, y: b"",
    "json_file": lambda folder, x, y: b'{"x": [[1, 2, 3]]}',
    "zip_of_text": lambda folder, x, y: _zip_text(),
}


def _npy_only(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def _zip_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", "not an array")
    return buffer.getvalue()


# ---------------------------------------------------------------- saved plans (--plan)

def _plan_edit(edit) -> Callable[[dict], str]:
    def mutate(plan: dict) -> str:
        plan = json.loads(json.dumps(plan))
        edit(plan)
        return json.dumps(plan)
    return mutate


def _first_layer(edit):
    return _plan_edit(lambda plan: edit(plan["layers"][0]))


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _delete(key):
    return lambda d: d.pop(key, None)


PLAN_MUTATIONS: dict[str, Callable[[dict], str]] = {
    "valid": _plan_edit(lambda plan: None),
    "no_layers": _plan_edit(_set("layers", [])),
    "format_wrong": _plan_edit(_set("format", "something-else")),
    "format_missing": _plan_edit(_delete("format")),
    "layers_missing": _plan_edit(_delete("layers")),
    "layers_not_list": _plan_edit(_set("layers", {"a": 1})),
    "layer_not_dict": _plan_edit(_set("layers", [1, 2])),
    "ratio_string": _plan_edit(_set("ratio", "half")),
    "ratio_out_of_range": _plan_edit(_set("ratio", 7.5)),
    "method_unknown": _plan_edit(_set("method", "bogus")),
    "seed_negative": _plan_edit(_set("seed", -1)),
    "layer_unknown_key": _first_layer(_set("bogus", 1)),
    "layer_key_missing": _first_layer(_delete("weight")),
    "layer_node_unknown": _first_layer(_set("node", "no_such_node")),
    "layer_weight_unknown": _first_layer(_set("weight", "no_such_weight")),
    "layer_channels_wrong": _first_layer(_set("in_channels", 3)),
    "kept_channel_out_of_range": _first_layer(lambda l: l["kept_channels"][0].__setitem__(0, 10 ** 6)),
    "kept_channel_negative": _first_layer(lambda l: l["kept_channels"][0].__setitem__(0, -1)),
    "kept_channels_empty": _first_layer(_set("kept_channels", [])),
    "kept_channels_null": _first_layer(_set("kept_channels", None)),
    "kept_channels_duplicated": _first_layer(lambda l: l["kept_channels"][0].__setitem__(1, l["kept_channels"][0][0])),
    "groups_out_of_range": _first_layer(lambda l: l["groups"][0].__setitem__(0, 10 ** 6)),
    "groups_empty": _first_layer(_set("groups", [])),
    "groups_overlapping": _first_layer(lambda l: l["groups"].__setitem__(-1, l["groups"][0])),
    "group_count_zero": _first_layer(_set("group_count", 0)),
    "kept_per_group_zero": _first_layer(_set("kept_per_group", 0)),
    "kept_per_group_huge": _first_layer(_set("kept_per_group", 10 ** 9)),
    "candidates_bad": _first_layer(_set("candidates", [{"x": 1}])),
    "permutation_bad": _plan_edit(_set("permutations", {"conv1": [0, 0, 0]})),
    "permutation_unknown_tensor": _plan_edit(_set("permutations", {"nowhere": [0, 1]})),
    "json_list": lambda plan: "[1, 2, 3]",
    "json_null": lambda plan: "null",
    "json_string": lambda plan: '"plan"',
    "json_nan": lambda plan: '{"format": NaN}',
    "not_json": lambda plan: "this is not json {",
    "empty": lambda plan: "",
    "deeply_nested": lambda plan: "[" * 100000 + "]" * 100000,
}
