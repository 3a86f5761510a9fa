"""N:M sparsity of a model larger than memory, one weight at a time.

A model whose weights live in external data (files beside the .onnx) is read without its data;
each initializer is then memory-mapped from its file, masked when it is an N:M layer's weight
(in its own dtype: float16 stays float16) and appended to the output's external data file, so the
memory in use is bounded by the largest weight, not the model. The graph itself is written
unchanged but for where each weight lives.

`gkp-onnx optimize` takes this path (`streams`) when the input's external data is at least
STREAM_BYTES and the options ask for nothing that needs the whole model: N:M by weight magnitude
(no calibration data, refit, fidelity thresholds, --ffn-ratio or latency measurement) and no Conv
for GKP to prune. The channel permutation search is not run (it edits two layers' weights together), and the
output is checked with onnx.checker, not run: the report says both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import initializer_map, input_specs, model_stats
from gkp_onnx.model_io import check_model_file, load_graph
from gkp_onnx.nm import (NM_OPS, NmLayer, NmResult, _dequantized, apply_mask, kept_share, mask_for, nm_candidates,
                         parse_nm, share_of_macs)
from gkp_onnx.options import OptimizeOptions
from gkp_onnx.plan import Plan
from gkp_onnx.report import Report

STREAM_BYTES = 1 << 30  # external data from this size up is streamed (when the options allow)
COPY_CHUNK = 64 << 20  # bytes copied at a time for the weights N:M leaves as they are
BLOCK = 1 << 20  # weight elements masked at a time


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers that live in external data."""
    return sum(int(_external(t).get("length", 0)) for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL)


def streams(model: onnx.ModelProto, opts: OptimizeOptions) -> bool:
    """Whether `optimize` streams this model (loaded without its data) with these options."""
    whole = (opts.calib or opts.reconstruct or opts.nm_method != "wanda" or opts.plan or opts.ffn_ratio or opts.head_ratio
             or opts.bench_batches or opts.thresholds.min_cosine is not None
             or opts.thresholds.max_abs_diff is not None or opts.thresholds.min_top1_agreement is not None)
    has_conv = any(node.op_type == "Conv" for node in model.graph.node)
    return bool(opts.nm) and not whole and not (opts.gkp and has_conv) and external_bytes(model) >= STREAM_BYTES


def streaming_writer(source: str | os.PathLike, **options):
    """When `optimize` would stream the model at `source` with these options: a function that
    writes the optimized model to a path (and its data beside it) and returns the report; else None."""
    opts = OptimizeOptions(**options)
    if not opts.nm:
        return None
    try:  # a quick look, without the weights; what is wrong with the file the chosen path reports
        model = onnx.load(str(source), load_external_data=False)
    except Exception:  # protobuf and file errors: the in-memory path names them
        return None
    if not streams(model, opts):
        return None
    patterns = opts.checked()
    model = load_graph(source)  # checked
    return lambda output: optimize_streaming(source, model, Path(output), opts, patterns)


def optimize_streaming(source: str | os.PathLike, model: onnx.ModelProto, output: Path, opts: OptimizeOptions,
                       patterns: list) -> Report:
    """N:M-sparsify `model` (loaded from `source` without its external data) into `output` and
    output.data, one weight at a time; returns the report."""
    start = time.perf_counter()
    n, m = parse_nm(opts.nm)
    base = Path(source).resolve().parent
    refs, skipped = nm_candidates(model, n, m, NM_OPS + (("Conv",) if opts.nm_conv else ()), patterns,
                                  opts.nm_include_head)
    result = NmResult(n, m, skipped=skipped)
    stats = model_stats(model, input_specs(model, opts.input_shapes))  # from dims: no data is read
    result.layers = stream_weights(model, base, output, refs, n, m)
    onnx.save_model(model, str(output))
    check_model_file(output)
    if not result.layers:
        raise GkpError("nothing to optimize: no weight N:M can sparsify (" +
                       ("; ".join(sorted({reason for _, reason in skipped})) or "the model has no MatMul/Gemm") + ")")
    result.eligible_mac_share = share_of_macs(stats.node_macs, {layer.node for layer in result.layers})
    return Report(source=str(source), plan=Plan(ratio=0.0, method="nm", seed=opts.seed), before=stats, after=stats,
                  timings={"nm_sparsify (streamed)": time.perf_counter() - start}, nm=result,
                  input_notes=[f"streamed: {external_bytes(model) / 1e9:.2f} GB of external data read and written one "
                               f"weight at a time; the output is checked (onnx.checker), not run: compare it with "
                               f"`gkp-onnx compare` where memory allows; no channel permutation search"])


def stream_weights(model: onnx.ModelProto, base: Path, output: Path, refs: list, n: int, m: int) -> list[NmLayer]:
    """Write every external weight of `model` (its files relative to `base`), N:M-masked when it is
    one of `refs`, to output.data and point `model`'s tensors there; returns the masked layers."""
    by_weight = {ref.initializer: ref for ref in refs}
    small = initializer_map(model.graph)  # zero points of quantized weights are read from here (inline)
    layers, data_name = [], output.name + ".data"
    with open(output.parent / data_name, "wb") as out:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.name not in by_weight:
                continue  # stays inside the model file
            values = _read(tensor, base)
            ref = by_weight.get(tensor.name)
            offset = out.tell()
            if ref is None:
                flat = values.reshape(-1).view(np.uint8)
                for begin in range(0, len(flat), COPY_CHUNK):
                    out.write(flat[begin:begin + COPY_CHUNK].tobytes())
            else:
                weight = np.array(values)  # this one weight in memory
                masked, share = _masked(ref, weight, small, n, m)
                out.write(np.ascontiguousarray(masked).tobytes())
                layers.append(NmLayer(ref.node, ref.op, ref.initializer, list(weight.shape), ref.axis,
                                      share, share, "magnitude"))
            _point_to(tensor, data_name, offset, out.tell() - offset)
            del values
    return layers


def _masked(ref, weight: np.ndarray, small: dict, n: int, m: int) -> tuple[np.ndarray, float]:
    """The N:M-masked weight and the share of sum|w| it keeps, computed BLOCK elements at a time
    along an axis other than the reduction axis (the scores are float64: a whole layer's would be
    four times its float16 size, several times over)."""
    if ref.zero_point is not None or weight.ndim < 2:  # quantized (per-channel zero points): at once
        mask = mask_for(ref, weight, small, None, n, m)
        return apply_mask(ref, weight, mask, small), kept_share(_dequantized(ref, weight, small), mask)
    axis = weight.ndim - 1 if ref.axis != weight.ndim - 1 else 0
    step = max(1, BLOCK * weight.shape[axis] // weight.size)
    masked, kept, total = np.empty_like(weight), 0.0, 0.0
    for start in range(0, weight.shape[axis], step):
        part = [slice(None)] * weight.ndim
        part[axis] = slice(start, start + step)
        block = weight[tuple(part)]
        mask = mask_for(ref, block, small, None, n, m)
        masked[tuple(part)] = apply_mask(ref, block, mask, small)
        magnitude = np.abs(block.astype(np.float64))
        kept, total = kept + float(magnitude[mask].sum()), total + float(magnitude.sum())
    return masked, kept / total if total else 1.0


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _read(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    """The tensor's values: memory-mapped from its external file, or from the model file."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = _external(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    location = (base / info["location"]).resolve()
    if base not in location.parents:
        raise GkpError(f"external data of '{tensor.name}' points outside the model's folder: {info['location']}")
    try:
        return np.memmap(location, dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                         shape=(count,)).reshape(tuple(tensor.dims))
    except (OSError, ValueError) as exc:
        raise GkpError(f"cannot read the external data of '{tensor.name}' from {location}: {exc}") from None


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
