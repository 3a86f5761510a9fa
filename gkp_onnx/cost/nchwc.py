"""onnxruntime CPU's NCHWc channel block: the width that channel counts are rounded to."""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from gkp_onnx.errors import GkpError


BLOCK_ENV = "GKP_ONNX_NCHWC_BLOCK"


def nchwc_block_size() -> int:
    """onnxruntime CPU's NCHWc channel block for the target: $GKP_ONNX_NCHWC_BLOCK when set (e.g.
    16 to optimize on one machine for an AVX512 server), else this machine's (probe_nchwc_block)."""
    text = os.environ.get(BLOCK_ENV)
    if text is None:
        return probe_nchwc_block()
    if not text.isdigit() or int(text) < 1:
        raise GkpError(f"${BLOCK_ENV} must be a positive integer, got {text!r}")
    return int(text)


@functools.lru_cache(maxsize=None)
def probe_nchwc_block() -> int:
    """onnxruntime CPU's NCHWc channel block on this machine (16 with AVX512, 8 with AVX2), 1 if
    it does not use NCHWc. Asked of onnxruntime itself: it pads the weight of a one-filter Conv
    it converts to NCHWc to one block of filters."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, 4, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    weight = numpy_helper.from_array(np.ones((1, 64, 1, 1), np.float32), "w")
    probe = helper.make_model(helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe", [x], [y],
                                                [weight]), opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "probe.onnx")
        options.log_severity_level = 3  # the "NCHWc model is hardware specific" warning
        ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    if not any(node.domain.endswith("nchwc") for node in optimized.graph.node):
        return 1
    return max([int(t.dims[0]) for t in optimized.graph.initializer if len(t.dims) == 4] + [1])
