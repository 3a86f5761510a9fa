"""A Llama-shaped ONNX model with random weights in external data, written without holding it in memory.

    python -m gkp_onnx.models.llama_external OUT.onnx [--layers 22] [--dtype float16]

The default sizes are TinyLlama-1.1B's (22 layers, hidden 2048, FFN 5632, 32 heads, 4 KV heads,
vocabulary 32000): 1.1 G parameters, 2.2 GB in float16. Each weight is drawn and appended to
OUT.onnx.data one at a time, so writing it needs memory for one weight, not the model. The graph
runs (onnxruntime) and has every projection MatMul of the real model with its real shape; the
attention core is simplified (no softmax over positions: the key and value heads, repeated for the
query heads, gate the queries), since the weights are what N:M sparsity works on. Not committed:
generate it where it is needed (benchmarks/nm_streaming.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


@dataclass
class LlamaShape:
    layers: int = 22
    hidden: int = 2048
    ffn: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads


def write_llama(path: str | Path, shape: LlamaShape = LlamaShape(), dtype: str = "float16", seed: int = 0) -> Path:
    """Write the model to `path` and its weights to `path`.data; returns `path`."""
    path = Path(path)
    np_dtype = np.dtype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    with open(path.parent / data_name, "wb") as data:
        def weight(name: str, dims: tuple[int, ...], scale: float) -> str:
            values = (rng.standard_normal(dims, dtype=np.float32) * scale).astype(np_dtype)
            tensor = TensorProto(name=name, data_type=elem, dims=list(dims), data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(data.tell())), ("length", str(values.nbytes))):
                tensor.external_data.add(key=key, value=value)
            data.write(values.tobytes())
            initializers.append(tensor)
            return name

        def node(op: str, inputs: list[str], output: str, **attrs) -> str:
            nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
            return output

        h = shape.hidden
        x = node("Gather", [weight("embed_tokens", (shape.vocab, h), 0.02), "input_ids"], "embedded")
        repeats = helper.make_tensor("repeats", TensorProto.INT64, [3], [1, 1, shape.heads // shape.kv_heads])
        nodes.append(helper.make_node("Constant", [], ["kv_repeats"], value=repeats))
        for i in range(shape.layers):
            p = f"layers.{i}"
            normed = node("LayerNormalization", [x, weight(f"{p}.input_norm", (h,), 1.0)], f"{p}.norm1", axis=-1)
            q = node("MatMul", [normed, weight(f"{p}.q_proj", (h, h), h ** -0.5)], f"{p}.q")
            k = node("MatMul", [normed, weight(f"{p}.k_proj", (h, shape.kv_width), h ** -0.5)], f"{p}.k")
            v = node("MatMul", [normed, weight(f"{p}.v_proj", (h, shape.kv_width), h ** -0.5)], f"{p}.v")
            gate = node("Sigmoid", [node("Tile", [k, "kv_repeats"], f"{p}.k_rep")], f"{p}.gate")
            mixed = node("Add", [node("Mul", [q, gate], f"{p}.qk"), node("Tile", [v, "kv_repeats"], f"{p}.v_rep")],
                         f"{p}.attn")
            x = node("Add", [x, node("MatMul", [mixed, weight(f"{p}.o_proj", (h, h), h ** -0.5)], f"{p}.o")],
                     f"{p}.res1")
            normed = node("LayerNormalization", [x, weight(f"{p}.post_norm", (h,), 1.0)], f"{p}.norm2", axis=-1)
            up = node("MatMul", [normed, weight(f"{p}.up_proj", (h, shape.ffn), h ** -0.5)], f"{p}.up")
            gate = node("MatMul", [normed, weight(f"{p}.gate_proj", (h, shape.ffn), h ** -0.5)], f"{p}.gate_out")
            act = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.gate_sig")], f"{p}.silu")
            down = node("MatMul", [node("Mul", [act, up], f"{p}.ffn_in"),
                                   weight(f"{p}.down_proj", (shape.ffn, h), shape.ffn ** -0.5)], f"{p}.down")
            x = node("Add", [x, down], f"{p}.res2")
        normed = node("LayerNormalization", [x, weight("norm", (h,), 1.0)], "final_norm", axis=-1)
        node("MatMul", [normed, weight("lm_head", (h, shape.vocab), h ** -0.5)], "logits")
    graph = helper.make_graph(
        nodes, "llama_external",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "sequence", shape.vocab])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path))  # the weights are already in the data file: only the graph is written
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--layers", type=int, default=LlamaShape.layers)
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    args = parser.parse_args()
    path = write_llama(args.output, LlamaShape(layers=args.layers), args.dtype)
    print(f"wrote {path} and {path.name}.data")


if __name__ == "__main__":
    main()
