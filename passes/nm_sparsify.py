"""nm_sparsify: N:M structured sparsity (e.g. 2:4) for MatMul / Gemm weights (and Conv with --nm-conv).

Before                                  After
    A ──MatMul(B [K, N])── Y               A ──MatMul(B' [K, N])── Y
                                        B' = B with, in every run of M consecutive weights along the
                                        reduction axis K, only the N largest-scored kept (rest = 0)

The reduction axis is where NVIDIA's sparse tensor cores need the pattern:
MatMul B [..., K, N]: axis -2; Gemm B: axis 1 if transB else 0; Conv W [Co, Ci, kh, kw]: axis 1.
The weight may sit behind Transpose (the axis is mapped through its perm), Cast, or
DequantizeLinear (the quantized tensor is masked: pruned entries become the zero point, so they
dequantize to exactly 0). Score: |w|, or with calibration data |w| * ||x_k|| where ||x_k|| is the
RMS of the layer's input channel k over the calibration set.

A layer is skipped, with the reason reported, when: its weight is computed at run time; the weight
(or a tensor on its way) is read by another node; the reduction length is not a multiple of M; it
matches --exclude; or it produces a graph output (the classifier / LM head: kept dense unless
`include_head`). Shape, graph and dtypes are unchanged; only weight values become zero.

Dense runtimes (onnxruntime CPU/CUDA) run the same number of MACs: the speed-up needs TensorRT with
sparse weights enabled, and is realised for large enough fp16/int8 layers only.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph import initializer_map
from gkp_onnx.nm import NM_OPS, NmLayer, NmResult, _dequantized, apply_mask, kept_share, mask_for, nm_candidates
from gkp_onnx.nm_permutation import permute_reduction_channels
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan



class NmSparsify(Pass):
    name = "nm_sparsify"
    in_place = True  # edits the model's weights or nodes in place

    def __init__(self, n: int, m: int, include_conv: bool = False, include_head: bool = False,
                 exclude: list[re.Pattern] = (), input_norms: dict[str, np.ndarray] | None = None,
                 permute: bool = True, permutation_seconds: float = 1.0, seed: int = 0, keep_dense: bool = False):
        self.n, self.m = n, m
        self.ops = NM_OPS + (("Conv",) if include_conv else ())
        self.include_head = include_head
        self.exclude = list(exclude)
        self.input_norms = input_norms or {}
        self.permute = permute
        self.permutation_seconds = permutation_seconds
        self.seed = seed
        self.keep_dense = keep_dense  # details["nm_dense"]: each weight's values before its mask (nm_budget)

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:

        refs, skipped = nm_candidates(model, self.n, self.m, self.ops, self.exclude, self.include_head)
        result = NmResult(self.n, self.m, skipped=skipped)
        initializers = initializer_map(model.graph)
        plain = {}
        for ref in refs:
            weight = numpy_helper.to_array(initializers[ref.initializer])
            plain[ref.node] = kept_share(_dequantized(ref, weight, initializers),
                                         mask_for(ref, weight, initializers, None, self.n, self.m))
        permuted, output_orders = set(), {}  # MatMul/Gemm -> order of its output channels now
        if self.permute:
            permuted, output_orders = permute_reduction_channels(
                model, refs, self.n, self.m, self.input_norms, self.permutation_seconds, self.seed)
            initializers = initializer_map(model.graph)
        dense = {}
        for ref in refs:
            init = initializers[ref.initializer]
            weight = numpy_helper.to_array(init)
            if self.keep_dense:
                dense[ref.initializer] = weight
            mask = mask_for(ref, weight, initializers, self.input_norms.get(ref.node), self.n, self.m)
            init.CopyFrom(numpy_helper.from_array(apply_mask(ref, weight, mask, initializers), init.name))
            result.layers.append(NmLayer(
                ref.node, ref.op, ref.initializer, list(weight.shape), ref.axis,
                kept_share(_dequantized(ref, weight, initializers), mask), plain[ref.node],
                "calibration" if ref.node in self.input_norms else "magnitude", ref.node in permuted))
        return PassResult(model, plan, modified=bool(refs), details={"nm": result, "output_orders": output_orders,
                                                                      "nm_dense": dense})
