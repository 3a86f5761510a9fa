"""Run an ONNX graph as a trainable torch module, and write trained weights back into the graph.

`TorchGraph` interprets the ONNX nodes in order with torch operators; the graph's initializers
become torch tensors, the trainable ones `nn.Parameter`s. Nothing is restructured: a GKP model
keeps its channel Gathers and grouped Convs, so training it cannot undo the compression, and
`write_back` puts the trained values into the initializers of a copy of the same graph.
Only the arithmetic may differ: a channel Gather feeding a narrow grouped Conv runs as one dense
Conv whose weight is scattered from the grouped one each step (`_gather_conv`). The function, the
parameters and their gradients are those of the grouped form; torch's CPU grouped Conv with few
filters per group is several times slower than the dense Conv that replaces it.

Why not onnx2torch: it imports torchvision unconditionally, and its package metadata resolves
to a CUDA torch build (pip replaced the pinned torch 2.13.0+cpu with a CUDA 2.15 and 3 GB of
NVIDIA wheels when we tried); with torchvision stubbed it converted our GKP ResNet-56 correctly,
but names its parameters after nodes, not initializers, so the write-back would need a second
mapping anyway. The interpreter below covers the operators of CNN and transformer exports
(every model in models/ and every test topology) and names an unsupported operator in a
one-line error.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import explicit_pads, initializer_map, last_axis_first

# Initializers these ops read as learnable weights (input positions); everything else (shape
# constants, indices, scalars, BN running statistics) stays a fixed buffer.
WEIGHT_INPUTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "Add": (0, 1), "Sub": (0, 1),
    "Mul": (0, 1), "Gather": (0,),
}
# Weights whose exact zeros are pruning decisions (N:M, zeroed kernels) and must stay zero.
MASKED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def trainable_initializers(model: onnx.ModelProto) -> dict[str, bool]:
    """Float initializers with more than one element read as a weight: name -> keep zeros at zero."""
    inits = initializer_map(model.graph)
    found: dict[str, bool] = {}
    for node in model.graph.node:
        for position in WEIGHT_INPUTS.get(node.op_type, ()):
            if position >= len(node.input) or node.input[position] not in inits:
                continue
            tensor = inits[node.input[position]]
            if tensor.data_type != onnx.TensorProto.FLOAT or math.prod(tensor.dims) <= 1:
                continue
            masked = node.op_type in MASKED_OPS and len(tensor.dims) >= 2
            found[tensor.name] = found.get(tensor.name, False) or masked
    return found


class TorchGraph(nn.Module):
    """An ONNX graph as a torch module: `forward(**inputs)` returns the graph outputs in order."""

    def __init__(self, model: onnx.ModelProto, trainable: dict[str, bool] | None = None):
        super().__init__()
        unsupported = sorted({n.op_type for n in model.graph.node
                              if n.op_type not in OPS or n.op_type == "GatherConv"} - {"Constant"})
        if unsupported:
            raise GkpError(f"cannot run the model in torch: unsupported operator(s) {', '.join(unsupported)}")
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        trainable = trainable_initializers(model) if trainable is None else trainable
        self.weights = nn.ParameterDict()
        self.keys: dict[str, str] = {}  # initializer name -> ParameterDict / buffer key
        self.masks: dict[str, torch.Tensor] = {}
        self._constants: dict[str, str] = {}
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            key = f"w{len(self.keys)}"
            self.keys[tensor.name] = key
            if tensor.name in trainable:
                self.weights[key] = nn.Parameter(torch.from_numpy(array.copy()))
                if trainable[tensor.name]:
                    self.masks[tensor.name] = torch.from_numpy(array != 0)
            else:
                self._add_constant(tensor.name, array)
        self.nodes = []
        for node in model.graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Split":
                attrs.setdefault("num_outputs", len(node.output))
            if node.op_type == "Constant":
                self._add_constant(node.output[0], _constant_value(attrs))
                continue
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs, node.name))
        initializer_names = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in initializer_names]
        self.output_names = [o.name for o in model.graph.output]
        self._fuse_gather_convs()

    def _fuse_gather_convs(self) -> None:
        """Gather(axis 1, constant indices) read only by a grouped Conv -> one `GatherConv` node."""
        readers: dict[str, int] = {}
        for _, ins, _, _, _ in self.nodes:
            for name in ins:
                readers[name] = readers.get(name, 0) + 1
        producers = {outs[0]: i for i, (op, _, outs, attrs, _) in enumerate(self.nodes)
                     if op == "Gather" and attrs.get("axis", 0) == 1}
        fused, dropped = [], set()
        for op, ins, outs, attrs, name in self.nodes:
            gather = producers.get(ins[0]) if op == "Conv" and attrs.get("group", 1) > 1 else None
            if gather is not None:
                _, (x, indices), (gathered,), _, _ = self.nodes[gather]
                if (indices in self._constants and getattr(self, self._constants[indices]).dim() == 1
                        and readers[gathered] == 1 and gathered not in self.output_names):
                    dropped.add(gather)
                    fused.append(("GatherConv", [x, indices, *ins[1:]], outs, attrs, name))
                    continue
            fused.append((op, ins, outs, attrs, name))
        self.nodes = [node for i, node in enumerate(fused) if i not in dropped]

    def _add_constant(self, name: str, array: np.ndarray) -> None:
        key = f"c{len(self._constants)}"
        self._constants[name] = key
        self.register_buffer(key, torch.from_numpy(np.array(array, copy=True)), persistent=False)

    def named_weights(self):
        """(initializer name, parameter) for every trainable initializer."""
        return [(name, self.weights[key]) for name, key in self.keys.items() if key in self.weights]

    def forward(self, *args, **inputs) -> list[torch.Tensor]:
        inputs.update(zip(self.input_names, args))
        env: dict[str, torch.Tensor | None] = {"": None}
        env.update({name: getattr(self, key) for name, key in self._constants.items()})
        env.update(self.named_weights())
        env.update(inputs)
        for op, ins, outs, attrs, name in self.nodes:
            try:
                result = OPS[op](self, attrs, *[env[i] for i in ins])
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise GkpError(f"torch could not run node '{name}' ({op}): {str(exc).splitlines()[0][:200]}") from None
            if not isinstance(result, (tuple, list)):
                result = (result,)
            env.update(zip(outs, result))
        return [env[name] for name in self.output_names]


def write_back(model: onnx.ModelProto, graph: TorchGraph) -> onnx.ModelProto:
    """A copy of `model` whose trainable initializers hold the module's current values."""
    trained = {name: p.detach().cpu().numpy() for name, p in graph.named_weights()}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name in trained:
            tensor.CopyFrom(numpy_helper.from_array(trained[tensor.name].astype(np.float32), tensor.name))
    return out


def _constant_value(attrs: dict) -> np.ndarray:
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64),
                       ("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    raise GkpError(f"unsupported Constant attribute(s) {sorted(attrs)}")


# ---------------------------------------------------------------------------------------- ops

def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _arg_or_attr(attrs, name, tensor):
    """Values given as an input (newer opsets) or as an attribute (older ones)."""
    if tensor is not None:
        return _ints(tensor)
    return list(attrs[name]) if name in attrs else None


def _pads(attrs, x, kernel, strides, dilations):
    """ONNX pads [b1..bn, e1..en] after auto_pad, as (symmetric padding or None, explicit F.pad list)."""
    n = len(kernel)
    pads = explicit_pads({**attrs, "strides": strides, "dilations": dilations}, list(x.shape[2:]), kernel)
    if pads[:n] == pads[n:]:
        return pads[:n], x
    return [0] * n, last_axis_first(pads)


def _conv(g, attrs, x, w, b=None):
    n = w.dim() - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    padding, explicit = _pads(attrs, x, kernel, strides, dilations)
    if explicit is not x:
        x = F.pad(x, explicit)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    if n == 2:  # channels-last: torch's CPU grouped Conv (and its backward) is 2-4x faster so
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    return conv(x, w, b, strides, padding, dilations, attrs.get("group", 1))


def _conv_transpose(g, attrs, x, w, b=None):
    """ONNX ConvTranspose with explicit pads (cropped off the full output) and output_padding."""
    n = w.dim() - 2
    if attrs.get("output_shape") or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"", ""):
        raise GkpError("cannot run the model in torch: ConvTranspose with output_shape or auto_pad")
    strides, dilations = list(attrs.get("strides", [1] * n)), list(attrs.get("dilations", [1] * n))
    pads = list(attrs.get("pads", [0] * 2 * n))
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = conv(x, w, b, strides, 0, list(attrs.get("output_padding", [0] * n)), attrs.get("group", 1), dilations)
    return y[(..., *(slice(pads[i], y.shape[2 + i] - pads[n + i]) for i in range(n)))]


def _dequantize(g, attrs, x, scale, zero=None):
    """DequantizeLinear: (x - zero) * scale, per tensor or along `axis`."""
    if attrs.get("block_size"):
        raise GkpError("cannot run the model in torch: blocked DequantizeLinear (block_size)")
    shape = [1] * x.dim()
    if scale.dim() == 1 and scale.numel() > 1:
        shape[_axis(attrs.get("axis", 1), x.dim())] = -1
    zero = zero.to(torch.float32).reshape(shape) if zero is not None else 0.0
    return ((x.to(torch.float32) - zero) * scale.reshape(shape)).to(scale.dtype)


def _gather_conv(g, attrs, x, indices, w, b=None):
    """Conv(Gather(x, indices, axis=1), w, group=G) as a dense Conv on x: output channel o of group
    k reads input channels indices[k*n:(k+1)*n], so its kept kernels are scattered (summed where an
    index repeats) into row o of a dense weight that is zero elsewhere. The dense Conv does Ci / n
    times the multiply-adds; it is faster (forward + backward, torch CPU, measured) only where
    that is at most 2 and groups have at most 16 filters, elsewhere the grouped form runs."""
    groups = attrs.get("group", 1)
    co, n = w.shape[:2]
    if x.shape[1] > 2 * n or co // groups > 16:
        return _conv(g, attrs, _gather(g, {"axis": 1}, x, indices), w, b)
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[1], idx)
    rows = torch.arange(co, device=w.device).repeat_interleave(n)
    cols = idx.reshape(groups, n)[rows // (co // groups), torch.arange(n, device=w.device).repeat(co)]
    dense = w.new_zeros((co, x.shape[1], *w.shape[2:]))
    dense = dense.index_put((rows, cols), w.reshape(co * n, *w.shape[2:]), accumulate=True)
    return _conv(g, {**attrs, "group": 1}, x, dense, b)


def _pool(kind):
    def run(g, attrs, x):
        kernel = list(attrs["kernel_shape"])
        n = len(kernel)
        strides = list(attrs.get("strides", [1] * n))
        dilations = list(attrs.get("dilations", [1] * n))
        padding, explicit = _pads(attrs, x, kernel, strides, dilations)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            if explicit is not x:
                x = F.pad(x, explicit, value=-math.inf)
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return pool(x, kernel, strides, padding, dilations, ceil)
        include = bool(attrs.get("count_include_pad", 0))
        if explicit is not x:
            if not include:
                raise ValueError("asymmetric AveragePool padding without count_include_pad")
            x = F.pad(x, explicit)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        return pool(x, kernel, strides, padding, ceil, include)
    return run


def _gemm(g, attrs, a, b, c=None):
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _batch_norm(g, attrs, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, attrs.get("epsilon", 1e-5))


def _layer_norm(g, attrs, x, scale, bias=None):
    axis = _axis(attrs.get("axis", -1), x.dim())
    return F.layer_norm(x, x.shape[axis:], scale, bias, attrs.get("epsilon", 1e-5))


def _reshape(g, attrs, x, shape):
    shape = _ints(shape)
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _gather(g, attrs, x, indices):
    axis = _axis(attrs.get("axis", 0), x.dim())
    idx = indices.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if axis == 1 and x.dim() == 4 and idx.dim() == 1 and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape  # channel gather on channels-last data: gather rows of an (NHW, C) matrix
        rows = x.permute(0, 2, 3, 1).reshape(-1, c).index_select(1, idx)
        return rows.reshape(n, h, w, len(idx)).permute(0, 3, 1, 2)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def _slice(g, attrs, x, starts=None, ends=None, axes=None, steps=None):
    starts = _arg_or_attr(attrs, "starts", starts)
    ends = _arg_or_attr(attrs, "ends", ends)
    axes = _arg_or_attr(attrs, "axes", axes) or list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        indices = range(x.shape[axis])[slice(start, end, step)]
        if step == 1:
            x = x.narrow(axis, indices.start, len(indices))
        else:
            x = torch.index_select(x, axis, torch.tensor(indices, dtype=torch.long, device=x.device))
    return x


def _pad(g, attrs, x, pads=None, value=None, axes=None):
    pads = _arg_or_attr(attrs, "pads", pads)
    axes = [_axis(a, x.dim()) for a in _ints(axes)] if axes is not None else list(range(x.dim()))
    n = len(axes)
    full = dict(zip(axes, zip(pads[:n], pads[n:])))
    explicit = []
    for axis in reversed(range(x.dim())):
        explicit += list(full.get(axis, (0, 0)))
    while explicit[-2:] == [0, 0]:  # torch pads trailing axes only: drop the untouched leading ones
        explicit = explicit[:-2]
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "constant":
        fill = float(value.reshape(-1)[0]) if value is not None and value.numel() else attrs.get("value", 0.0)
        return F.pad(x, explicit, value=fill)
    return F.pad(x, explicit, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _unsqueeze(g, attrs, x, axes=None):
    axes = _arg_or_attr(attrs, "axes", axes)
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(g, attrs, x, axes=None):
    axes = _arg_or_attr(attrs, "axes", axes)
    if axes is None:
        return x.squeeze()
    for axis in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _split(g, attrs, x, split=None):
    axis = _axis(attrs.get("axis", 0), x.dim())
    sizes = _arg_or_attr(attrs, "split", split)
    if sizes is None:
        parts = attrs["num_outputs"]
        sizes = [math.ceil(x.shape[axis] / parts)] * (parts - 1)
        sizes.append(x.shape[axis] - sum(sizes))
    return torch.split(x, sizes, axis)


def _reduce(fn):
    def run(g, attrs, x, axes=None):
        axes = _arg_or_attr(attrs, "axes", axes)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [_axis(a, x.dim()) for a in axes], keep)
    return run


def _softmax(g, attrs, x):
    if g.opset >= 13:
        return torch.softmax(x, _axis(attrs.get("axis", -1), x.dim()))
    axis = _axis(attrs.get("axis", 1), x.dim())
    return torch.softmax(x.flatten(axis), -1).reshape(x.shape)


def _clip(g, attrs, x, low=None, high=None):
    low = low if low is not None else attrs.get("min")
    high = high if high is not None else attrs.get("max")
    return x if low is None and high is None else torch.clamp(x, low, high)


def _constant_of_shape(g, attrs, shape):
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=_dtype(value.dtype), device=shape.device)


def _expand(g, attrs, x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _dtype(np_dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, np_dtype)).dtype


def _cast(g, attrs, x):
    return x.to(_dtype(helper.tensor_dtype_to_np_dtype(attrs["to"])))


def _trilu(g, attrs, x, k=None):
    k = int(k.reshape(-1)[0]) if k is not None else 0
    return torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k)


def _flatten(g, attrs, x):
    axis = _axis(attrs.get("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _shape(g, attrs, x):
    dims = list(x.shape)[attrs.get("start", 0):attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


def _gelu(g, attrs, x):
    approximate = attrs.get("approximate", b"none")
    return F.gelu(x, approximate=approximate.decode() if isinstance(approximate, bytes) else approximate)


def _fold(fn):
    def run(g, attrs, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return run


OPS = {
    "Add": lambda g, a, x, y: x + y,
    "Sub": lambda g, a, x, y: x - y,
    "Mul": lambda g, a, x, y: x * y,
    "Div": lambda g, a, x, y: torch.div(x, y, rounding_mode="trunc") if not x.is_floating_point() else x / y,
    "Pow": lambda g, a, x, y: torch.pow(x, y),
    "Neg": lambda g, a, x: -x,
    "Abs": lambda g, a, x: torch.abs(x),
    "Sqrt": lambda g, a, x: torch.sqrt(x),
    "Exp": lambda g, a, x: torch.exp(x),
    "Log": lambda g, a, x: torch.log(x),
    "Reciprocal": lambda g, a, x: torch.reciprocal(x),
    "Erf": lambda g, a, x: torch.erf(x),
    "Tanh": lambda g, a, x: torch.tanh(x),
    "Sigmoid": lambda g, a, x: torch.sigmoid(x),
    "Relu": lambda g, a, x: F.relu(x),
    "LeakyRelu": lambda g, a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "HardSigmoid": lambda g, a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda g, a, x: F.hardswish(x),
    "Gelu": _gelu,
    "Clip": _clip,
    "Softmax": _softmax,
    "Min": _fold(torch.minimum),
    "Max": _fold(torch.maximum),
    "Sum": _fold(torch.add),
    "Equal": lambda g, a, x, y: torch.eq(x, y),
    "Where": lambda g, a, c, x, y: torch.where(c, x, y),
    "Conv": _conv,
    "GatherConv": _gather_conv,
    "ConvTranspose": _conv_transpose,
    "DequantizeLinear": _dequantize,
    "Gemm": _gemm,
    "MatMul": lambda g, a, x, y: torch.matmul(x, y),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda g, a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda g, a, x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True),
    "ReduceMean": _reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep)),
    "ReduceSum": _reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep)),
    "ReduceMax": _reduce(lambda x, axes, keep: x.amax(dim=axes, keepdim=keep)),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda g, a, x: x.permute(a.get("perm", list(reversed(range(x.dim()))))),
    "Concat": lambda g, a, *xs: torch.cat(xs, _axis(a["axis"], xs[0].dim())),
    "Split": _split,
    "Gather": _gather,
    "Slice": _slice,
    "Pad": _pad,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Shape": _shape,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": lambda g, a, x, repeats: x.repeat(_ints(repeats)),
    "Range": lambda g, a, start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(),
                                                            dtype=start.dtype, device=start.device),
    "Cast": _cast,
    "Trilu": _trilu,
    "Identity": lambda g, a, x: x,
    "Dropout": lambda g, a, x, *rest: x,
}
