"""Canonical form of a third-party ONNX model, the form the pruning passes expect.

`canonicalize(model)` returns a new model (the given one is never modified) and short notes on
what changed:

- Constant weight subgraphs become initializers: `Constant` nodes, `ConstantOfShape` of a
  constant shape, and any node all of whose inputs are constant (Identity/Cast/Reshape/
  Transpose/Unsqueeze/... chains), folded by onnx-graphsurgeon with onnxruntime. Nothing that
  reads a graph input is folded (no shape folding), nor random ops; tensor names and the names
  of the remaining nodes are kept. After folding, `graph.value_info` is dropped as stale.
- Initializers listed as graph inputs (IR < 4 exporters) are removed from the inputs, and an
  IR version below 4 is raised to 4, the first one that allows initializers that are not inputs.
- The opset is never changed.

A model with nothing to fold and no initializer among its inputs comes back as an exact copy,
with no notes.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

# Folding these would freeze one draw (random ops) or undo quantization (gs skips Q/DQ itself).
NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
              "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def canonicalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The canonical form of `model` (a new model) and notes on what was changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    notes = []
    if _has_foldable(out.graph):
        notes += _fold(out)
    notes += _drop_initializer_inputs(out, model)
    notes += _raise_ir_version(out)
    return out, notes


def _has_foldable(graph: onnx.GraphProto) -> bool:
    inits = {t.name for t in graph.initializer}
    return any(n.op_type == "Constant"
               or (n.op_type not in NOT_FOLDED and n.input and all(i in inits for i in n.input if i))
               for n in graph.node)


def _fold(model: onnx.ModelProto) -> list[str]:
    """Fold constant subgraphs of `model` in place; notes on what was folded."""
    with silenced():
        graph = gs.import_onnx(model)
        try:  # one onnxruntime session for the whole graph: fast
            _fold_graph(graph, partitioning=None, error_ok=False)
        except Exception:  # an op onnxruntime cannot run: fold node by node, skipping what fails
            _fold_graph(graph, partitioning="recursive", error_ok=True)
        graph.cleanup()
        if len(graph.nodes) == len(model.graph.node):
            return []
        exported = gs.export_onnx(graph, do_type_check=False)
    before = Counter(n.op_type for n in model.graph.node)
    removed = before - Counter(n.op_type for n in exported.graph.node)
    stale = len(model.graph.value_info)
    model.graph.CopyFrom(exported.graph)  # opsets, IR version, metadata and functions stay the model's
    del model.graph.value_info[:]
    ops = ", ".join(f"{op} {count}" for op, count in sorted(removed.items()))
    notes = [f"{sum(removed.values())} constant nodes folded into initializers ({ops})"]
    if stale:
        notes.append(f"{stale} stale value_info entries dropped")
    return notes


def _fold_graph(graph: gs.Graph, partitioning: str | None, error_ok: bool) -> None:
    # fold_shapes=False: Shape of a graph input is not a constant, even where its shape is static.
    # size_threshold=None: weights are large and must all be folded.
    graph.fold_constants(fold_shapes=False, partitioning=partitioning, error_ok=error_ok, size_threshold=None,
                         recurse_subgraphs=False, flatten_subgraphs=False, recurse_functions=False,
                         should_exclude_node=lambda node: node.op in NOT_FOLDED)


@contextmanager
def silenced():
    """Silence gs (G_LOGGER prints through Python; `gs.logger` is the module, not the logger) and
    onnxruntime (its C++ logger writes to file descriptor 2, e.g. 'UnsqueezeElimination cannot
    remove node')."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, G_LOGGER.suppress(G_LOGGER.CRITICAL):
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()  # what Python buffered meanwhile goes to /dev/null too
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _drop_initializer_inputs(model: onnx.ModelProto, original: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in original.graph.initializer}
    listed = sum(i.name in inits for i in original.graph.input)
    if not listed:
        return []
    inits = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return [f"{listed} initializers removed from the graph inputs (they are weights)"]


def _raise_ir_version(model: onnx.ModelProto) -> list[str]:
    if model.ir_version >= 4 or not model.graph.initializer:
        return []
    old, model.ir_version = model.ir_version, 4
    return [f"IR version {old} -> 4 (IR < 4 requires every initializer to be a graph input)"]


STORED_VIEWS = ("Transpose", "Cast", "DequantizeLinear")
WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                "BatchNormalization": (1, 2, 3, 4)}


def needs_canonical(model: onnx.ModelProto) -> bool:
    """Whether a pass would miss something the canonical form gives it: a layer weight (or BN
    parameter) computed by nodes instead of stored (a stored weight read through Transpose, Cast or
    DequantizeLinear is stored: N:M reads it there, in its own dtype), or initializers listed as
    graph inputs. Other models are left exactly as they are."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    if any(i.name in inits for i in graph.input):
        return True
    producers = {o: node for node in graph.node for o in node.output}

    def computed(name: str) -> bool:
        while name in producers and producers[name].op_type in STORED_VIEWS:
            name = producers[name].input[0]
        return name in producers

    return any(slot < len(node.input) and computed(node.input[slot])
               for node in graph.node for slot in WEIGHT_SLOTS.get(node.op_type, ()))
