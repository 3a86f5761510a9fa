"""Tiny ONNX models, one per graph topology that a channel rewrite can break.

Every fixture takes an 8-channel input (more than the stem limit, so its first Conv is
prunable) and returns a checked ModelProto at opset 17.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    def __init__(self, in_channels: int = 8, size: int = 10, dtype=np.float32, seed: int = 0, dims: int = 2):
        self.rng = np.random.default_rng(seed)
        self.dims = dims  # spatial dimensions: 1 for Conv1d, 2 for Conv2d, 3 for Conv3d
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes, self.inits = [], []
        self.input = helper.make_tensor_value_info("x", self.elem, ["batch", in_channels, *[size] * dims])
        self.channels = {"x": in_channels}
        self.count = 0

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}{self.count}"

    def weight(self, name: str, shape) -> str:
        scale = 1.0 / np.sqrt(np.prod(shape[1:]))
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(self.dtype), name))
        return name

    def conv(self, x: str, out_channels: int, kernel=3, bias=True, group=1, weight: str | None = None,
             **attrs) -> str:
        name = self._name("conv")
        kernel = (kernel,) * self.dims if isinstance(kernel, int) else tuple(kernel)
        if "pads" not in attrs and "auto_pad" not in attrs:  # "same" padding
            pads = [k // 2 * d for k, d in zip(kernel, attrs.get("dilations", [1] * self.dims))]
            attrs["pads"] = pads + pads
        if weight is None:
            weight = self.weight(f"{name}.weight", [out_channels, self.channels[x] // group, *kernel])
        inputs = [x, weight]
        if bias:
            inputs.append(self.weight(f"{name}.bias", [out_channels]))
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, group=group,
                                           kernel_shape=list(kernel), **attrs))
        self.channels[name] = out_channels
        return name

    def op(self, op_type: str, inputs: list[str], channels: int | None = None, **attrs) -> str:
        name = self._name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        self.channels[name] = channels if channels is not None else self.channels[inputs[0]]
        return name

    def build(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fixture", [self.input], [], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
        model.graph.output.extend(inferred[o] for o in outputs)
        onnx.checker.check_model(model, full_check=True)
        return model


def chain(**kw) -> onnx.ModelProto:
    b = GraphBuilder(**kw)
    y = b.op("Relu", [b.conv("x", 16)])
    return b.build(b.conv(y, 16))


def residual() -> onnx.ModelProto:
    b = GraphBuilder()
    a = b.op("Relu", [b.conv("x", 16)])
    c = b.conv(b.op("Relu", [b.conv(a, 16)]), 16)
    return b.build(b.op("Relu", [b.op("Add", [a, c])]))


def concat() -> onnx.ModelProto:
    b = GraphBuilder()
    left, right = b.conv("x", 16), b.conv("x", 8, kernel=1)
    joined = b.op("Concat", [left, right], channels=24, axis=1)
    return b.build(b.conv(joined, 16))


def fan_out() -> onnx.ModelProto:
    b = GraphBuilder()
    shared = b.op("Relu", [b.conv("x", 16)])
    return b.build(b.conv(shared, 16), b.conv(shared, 32, kernel=1))


def no_bias() -> onnx.ModelProto:
    b = GraphBuilder()
    return b.build(b.conv(b.conv("x", 16, bias=False), 16, bias=False))


def stride2() -> onnx.ModelProto:
    b = GraphBuilder()
    return b.build(b.conv(b.conv("x", 16, strides=[2, 2]), 32, strides=[2, 2]))


def padding_variants() -> onnx.ModelProto:
    b = GraphBuilder(size=11)
    y = b.conv("x", 16, pads=[0, 1, 2, 1])
    y = b.conv(y, 16, auto_pad="SAME_UPPER", strides=[2, 2])
    return b.build(b.conv(y, 16, auto_pad="VALID"))


def dilation() -> onnx.ModelProto:
    b = GraphBuilder(size=12)
    return b.build(b.conv(b.conv("x", 16, dilations=[2, 2]), 16, dilations=[2, 1]))


def kernel_sizes() -> onnx.ModelProto:
    b = GraphBuilder()
    y = b.conv(b.conv(b.conv("x", 16, kernel=1), 16, kernel=3), 16, kernel=5)
    return b.build(b.conv(y, 16, kernel=(1, 3)))


def depthwise() -> onnx.ModelProto:
    b = GraphBuilder()
    y = b.conv("x", 16)
    return b.build(b.conv(b.conv(y, 16, group=16), 16))


def shared_weight() -> onnx.ModelProto:
    b = GraphBuilder()
    y = b.conv("x", 8)
    weight = b.weight("shared.weight", [8, 8, 3, 3])
    return b.build(b.conv(b.conv(y, 8, weight=weight, bias=False), 8, weight=weight, bias=False))


def bn_chain() -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> Mul/Add by per-channel constants -> Clip -> Conv."""
    b = GraphBuilder()
    y = b.conv("x", 16)
    bn = [b.weight(f"bn.{p}", [16]) for p in ("scale", "bias", "mean")]
    b.inits.append(numpy_helper.from_array(np.linspace(0.5, 2.0, 16).astype(np.float32), "bn.var"))
    y = b.op("Relu", [b.op("BatchNormalization", [y, *bn, "bn.var"])])
    y = b.op("Mul", [b.conv(y, 16), b.weight("scale.c", [16, 1, 1])])
    y = b.op("Add", [y, b.weight("shift.c", [1, 16, 1, 1])])
    return b.build(b.conv(b.op("Clip", [y]), 16))


def graph_output_inside() -> onnx.ModelProto:
    """The activation between two Convs is also a graph output: it must keep every channel."""
    b = GraphBuilder()
    mid = b.op("Relu", [b.conv("x", 16)])
    return b.build(b.conv(mid, 16), mid)


def classifier() -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm: logits [batch, 10]."""
    b = GraphBuilder()
    y = b.conv(b.op("Relu", [b.conv("x", 16)]), 16)
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    return b.build(b.op("Gemm", [flat, b.weight("head.weight", [10, 16]), b.weight("head.bias", [10])], transB=1))


def residual_stream(width: int = 16) -> onnx.ModelProto:
    """Two bottleneck stages as in ResNet-50: a `width`-channel stream (two identity blocks), then
    a stride-2 block whose projection shortcut starts a 2*`width`-channel stream, closed by a
    squeeze-excite Mul and GlobalAveragePool -> Flatten -> Gemm. The streams are read by several
    Convs and added to: their GKP Gathers cannot fold into a producer."""
    b = GraphBuilder()

    def bn(x):
        channels = b.channels[x]
        params = [b.weight(f"{x}.bn.{p}", [channels]) for p in ("scale", "bias", "mean")]
        b.inits.append(numpy_helper.from_array(np.linspace(0.5, 2.0, channels).astype(np.float32), f"{x}.bn.var"))
        return b.op("BatchNormalization", [x, *params, f"{x}.bn.var"])

    def block(x, width, out, stride=1):
        y = b.op("Relu", [b.conv(x, width, kernel=1)])
        y = b.op("Relu", [b.conv(y, width, strides=[stride, stride])])
        y = bn(b.conv(y, out, kernel=1))
        shortcut = x if stride == 1 else bn(b.conv(x, out, kernel=1, strides=[2, 2]))
        return b.op("Relu", [b.op("Add", [y, shortcut])])

    stream = b.op("Relu", [bn(b.conv("x", width))])
    stream = block(block(stream, width // 2, width), width // 2, width)
    stream = block(block(stream, width, 2 * width, stride=2), width, 2 * width)
    squeeze = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [stream]), width // 2, kernel=1)])
    stream = b.op("Mul", [stream, b.op("Sigmoid", [b.conv(squeeze, 2 * width, kernel=1)])])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [stream])])
    head = [b.weight("head.weight", [10, 2 * width]), b.weight("head.bias", [10])]
    return b.build(b.op("Gemm", [flat, *head], transB=1))


def option_a_shortcut() -> onnx.ModelProto:
    """The CIFAR ResNets' downsampling block: the shortcut takes x[:, :, ::2, ::2] and zero-pads
    its channels 16 -> 32 (pads computed by a constant subgraph, as torch exports F.pad)."""
    b = GraphBuilder()
    stream = b.op("Relu", [b.conv("x", 16)])
    main = b.conv(b.op("Relu", [b.conv(stream, 32, strides=[2, 2])]), 32)
    shortcut = stream
    for axis in (2, 3):  # x[:, :, ::2] then [..., ::2]: start 0, open end, step 2
        args = [f"slice{axis}.{name}" for name in ("starts", "ends", "axes", "steps")]
        b.inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in zip(args, (0, 2**63 - 1, axis, 2))]
        shortcut = b.op("Slice", [shortcut, *args])
    b.inits += [numpy_helper.from_array(np.array([0, 8, 0, 0], np.int64), f"pads.{end}") for end in ("begin", "end")]
    pads = b.op("Concat", ["pads.begin", "pads.end"], channels=0, axis=0)
    shortcut = b.op("Pad", [shortcut, pads], channels=32, mode="constant")
    stream = b.op("Relu", [b.op("Add", [main, shortcut])])
    return b.build(b.conv(b.op("Relu", [b.conv(stream, 32)]), 32))


def mobilenet_block() -> onnx.ModelProto:
    """MobileNetV2-style: pointwise -> BN -> HardSwish -> depthwise 3x3 (stride 2) -> Relu ->
    pointwise -> depthwise -> pointwise. A Gather before a pointwise Conv folds through the
    depthwise Conv and its per-channel ops into the pointwise Conv above."""
    b = GraphBuilder(size=12)
    y = b.conv("x", 32, kernel=1)
    bn = [b.weight(f"bn.{p}", [32]) for p in ("scale", "bias", "mean")]
    b.inits.append(numpy_helper.from_array(np.linspace(0.5, 2.0, 32).astype(np.float32), "bn.var"))
    y = b.op("HardSwish", [b.op("BatchNormalization", [y, *bn, "bn.var"])])
    y = b.op("Relu", [b.conv(y, 32, group=32, strides=[2, 2])])
    y = b.op("Relu", [b.conv(y, 32, kernel=1)])
    y = b.conv(b.conv(y, 32, group=32, bias=False), 32, kernel=1)
    return b.build(y)


def fp16() -> onnx.ModelProto:
    return chain(dtype=np.float16)


def conv1d() -> onnx.ModelProto:
    """A speech / time-series net: Conv1d (k 3, 5 stride 2, dilated), BatchNorm, a residual Add,
    GlobalAveragePool -> Flatten -> Gemm."""
    b = GraphBuilder(size=24, dims=1)
    y = b.op("Relu", [b.conv("x", 16)])
    bn = [b.weight(f"bn.{p}", [16]) for p in ("scale", "bias", "mean")]
    b.inits.append(numpy_helper.from_array(np.linspace(0.5, 2.0, 16).astype(np.float32), "bn.var"))
    y = b.op("Relu", [b.op("BatchNormalization", [b.conv(y, 16, kernel=5, strides=[2]), *bn, "bn.var"])])
    y = b.op("Relu", [b.op("Add", [y, b.conv(b.op("Relu", [b.conv(y, 16, dilations=[2])]), 16)])])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [b.conv(y, 32, kernel=1)])])
    return b.build(b.op("Gemm", [flat, b.weight("head.weight", [10, 32]), b.weight("head.bias", [10])], transB=1))


def conv3d() -> onnx.ModelProto:
    """A video / volume net: Conv3d 3x3x3, a stride-2 Conv3d, a (1, 3, 3) kernel and a residual Add."""
    b = GraphBuilder(size=6, dims=3)
    y = b.op("Relu", [b.conv("x", 16)])
    y = b.op("Relu", [b.conv(y, 16, strides=[2, 2, 2])])
    return b.build(b.op("Add", [y, b.conv(b.op("Relu", [b.conv(y, 16, kernel=(1, 3, 3))]), 16)]))


def subgraph() -> onnx.ModelProto:
    """An If whose branch runs a Conv on a tensor of the main graph (outer scope): GKP prunes the
    main graph's Convs around it, and that tensor keeps every channel."""
    b = GraphBuilder()
    y = b.op("Relu", [b.conv("x", 16)])
    mid = b.conv(y, 16)
    weight = numpy_helper.from_array(b.rng.standard_normal((16, 16, 3, 3)).astype(np.float32) / 12, "branch.weight")
    then = helper.make_graph([helper.make_node("Conv", [y, "branch.weight"], ["t"], name="branch_conv",
                                               pads=[1, 1, 1, 1])], "then", [],
                             [helper.make_tensor_value_info("t", b.elem, None)], [weight])
    other = helper.make_graph([helper.make_node("Relu", [mid], ["e"], name="branch_relu")], "else", [],
                              [helper.make_tensor_value_info("e", b.elem, None)])
    b.inits.append(numpy_helper.from_array(np.array(True), "cond"))
    b.nodes.append(helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then, else_branch=other))
    b.channels["branch"] = 16
    return b.build(b.conv(b.op("Add", [b.op("Relu", [mid]), "branch"]), 16))


def conv_transpose() -> onnx.ModelProto:
    """A U-Net-style upsampling step: Conv -> ConvTranspose (stride 2) -> Concat with a skip -> Conv."""
    b = GraphBuilder()
    skip = b.op("Relu", [b.conv("x", 16)])
    down = b.op("Relu", [b.conv(skip, 16, strides=[2, 2])])
    up = b.op("ConvTranspose", [down, b.weight("up.weight", [16, 8, 2, 2])], channels=8, strides=[2, 2],
              kernel_shape=[2, 2])
    return b.build(b.conv(b.op("Concat", [skip, up], channels=24, axis=1), 16))


def qdq() -> onnx.ModelProto:
    """A QDQ-quantized Conv (int8 weight, per-output-channel scales, as onnxruntime.quantization
    writes it) between two float Convs."""
    b = GraphBuilder()
    y = b.op("Relu", [b.conv("x", 16)])
    weight = b.rng.standard_normal((16, 16, 3, 3)) / 12
    scale = np.abs(weight).reshape(16, -1).max(axis=1) / 127
    b.inits += [numpy_helper.from_array(np.round(weight / scale[:, None, None, None]).astype(np.int8), "q.weight"),
                numpy_helper.from_array(scale.astype(np.float32), "q.scale"),
                numpy_helper.from_array(np.zeros(16, np.int8), "q.zero")]
    b.nodes.append(helper.make_node("DequantizeLinear", ["q.weight", "q.scale", "q.zero"], ["q.dequantized"],
                                    name="dequantize", axis=0))
    y = b.op("Relu", [b.conv(y, 16, weight="q.dequantized")])
    return b.build(b.conv(y, 16))


def activations() -> onnx.ModelProto:
    """Activations as exporters spell them, reading their input more than once: SiLU x*sigmoid(x)
    (EfficientNet, YOLO), GELU x*0.5*(1+erf(x/sqrt 2)) and its tanh form (Pow), then a classifier."""
    b = GraphBuilder()

    def const(name, value):
        b.inits.append(numpy_helper.from_array(np.array(value, b.dtype), name))
        return name

    x = b.conv("x", 16)
    x = b.op("Mul", [x, b.op("Sigmoid", [x])])
    x = b.conv(x, 16)
    erf = b.op("Erf", [b.op("Div", [x, const("sqrt2", np.sqrt(2.0))])])
    x = b.op("Mul", [b.op("Mul", [x, b.op("Add", [erf, const("one", 1.0)])]), const("half", 0.5)])
    x = b.conv(x, 16)
    inner = b.op("Add", [x, b.op("Mul", [b.op("Pow", [x, const("three", 3.0)]), const("c", 0.044715)])])
    tanh = b.op("Tanh", [b.op("Mul", [inner, const("k", np.sqrt(2 / np.pi))])])
    x = b.op("Mul", [b.op("Mul", [x, const("half2", 0.5)]), b.op("Add", [tanh, const("one2", 1.0)])])
    x = b.conv(x, 16)
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    return b.build(b.op("Gemm", [flat, b.weight("head.weight", [10, 16]), b.weight("head.bias", [10])], transB=1))


TOPOLOGIES = {
    "chain": chain, "residual": residual, "concat": concat, "fan_out": fan_out, "no_bias": no_bias,
    "stride2": stride2, "padding_variants": padding_variants, "dilation": dilation,
    "kernel_sizes": kernel_sizes, "depthwise": depthwise, "shared_weight": shared_weight, "fp16": fp16,
    "bn_chain": bn_chain, "graph_output_inside": graph_output_inside, "classifier": classifier,
    "residual_stream": residual_stream, "option_a_shortcut": option_a_shortcut, "mobilenet_block": mobilenet_block,
    "conv1d": conv1d, "conv3d": conv3d, "subgraph": subgraph, "conv_transpose": conv_transpose, "qdq": qdq,
    "activations": activations,
}
