"""canonicalize: bring a third-party model into the form the passes expect (first in the pipeline,
and what `inspect` looks at).

Before                                          After
    ConstantOfShape ─ Cast ─ W ─┐                   W (initializer) ─┐
    X ─────────────────────────Conv─ Y               X ──────────────Conv─ Y
    graph.input: X, W (IR 3)                         graph.input: X (IR 4)

Fires only when a layer's weight (Conv/ConvTranspose/Gemm/MatMul, BatchNormalization
parameters) is computed by constant nodes, or when initializers are listed as graph inputs
(`needs_canonical`); then the whole graph is folded (gkp_onnx.graph.canonical). Any other model
passes through unchanged. Exact: the folded values are what the nodes computed.
"""

from __future__ import annotations

import onnx

from gkp_onnx.graph.canonical import canonicalize, needs_canonical
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan


class Canonicalize(Pass):
    name = "canonicalize"
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        if not needs_canonical(model):
            return PassResult(model, plan, modified=False, details={"canonical": []})
        canonical, notes = canonicalize(model)
        return PassResult(canonical, plan, modified=bool(notes), details={"canonical": notes})
