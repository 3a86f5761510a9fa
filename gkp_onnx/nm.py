"""N:M sparsity arithmetic: masks, where a layer's weight lives, which layers qualify, the result
record. The pass is passes/nm_sparsify.py; the channel-permutation search is nm_permutation.py."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import graph_index, initializer_map, node_attr, reduction_axis


NM_OPS = ("MatMul", "Gemm")
# TensorRT's sparse kernels pay off on big GEMMs; the rule of thumb used in `tensorrt_sparse_likely`.
TRT_MIN_DIM = 256


def tensorrt_sparse_likely(weight_shape: list[int], axis: int, is_nm: bool, n: int, m: int) -> bool:
    """Whether TensorRT's 2:4 sparse kernels would likely run a layer with this weight: 2:4, and the
    reduction and output sizes both at least TRT_MIN_DIM and multiples of 16."""
    if not is_nm or (n, m) != (2, 4) or len(weight_shape) < 2:
        return False
    reduction = weight_shape[axis]
    outputs = int(np.prod(weight_shape)) // reduction
    return all(d >= TRT_MIN_DIM and d % 16 == 0 for d in (reduction, outputs))


def parse_nm(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not match:
        raise GkpError(f"--nm expects N:M such as 2:4, got {text!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise GkpError(f"--nm {n}:{m}: need 0 < N < M")
    return n, m


def nm_mask(scores: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """Boolean mask keeping the n best-scored of every m consecutive entries along `axis`."""
    moved = np.moveaxis(scores, axis, -1)
    if moved.shape[-1] % m:
        raise ValueError(f"reduction length {moved.shape[-1]} is not a multiple of {m}")
    runs = moved.reshape(*moved.shape[:-1], -1, m)
    order = np.argsort(-runs, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(runs.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def satisfies_nm(weight: np.ndarray, axis: int, n: int, m: int) -> bool:
    """True when every run of m consecutive weights along `axis` has at most n non-zeros."""
    moved = np.moveaxis(np.asarray(weight), axis, -1)
    if moved.shape[-1] % m:
        return False
    return bool(((moved.reshape(*moved.shape[:-1], -1, m) != 0).sum(-1) <= n).all())


def kept_share(weight: np.ndarray, mask: np.ndarray) -> float:
    """Share of the weight's total magnitude sum|w| that the mask keeps."""
    total = np.abs(weight).sum()
    return float(np.abs(weight[mask]).sum() / total) if total else 1.0


@dataclass
class WeightRef:
    """Where a layer's constant weight lives and which of its axes is the reduction axis."""

    node: str
    op: str
    initializer: str  # the tensor whose values are masked
    axis: int  # reduction axis in the initializer's own layout
    path: list[str] = field(default_factory=list)  # tensors between initializer and layer input
    zero_point: str | None = None  # DequantizeLinear: pruned entries take this value
    quant_axis: int | None = None  # DequantizeLinear per-axis zero point axis


def find_weight(node: onnx.NodeProto, producers: dict, initializers: dict) -> WeightRef | str:
    """Follow the weight input through Transpose/Cast/DequantizeLinear; a reason string if impossible."""
    name, path, zero_point, quant_axis, perm = node.input[1], [], None, None, None
    while name not in initializers:
        producer = producers.get(name)
        if producer is None or producer.op_type not in ("Transpose", "Cast", "DequantizeLinear"):
            return "weight is computed at run time"
        path.append(name)
        if producer.op_type == "Transpose":
            if perm is not None:
                return "weight behind two Transposes"
            perm = node_attr(producer, "perm", [])  # no perm attribute: the axes are reversed
        elif producer.op_type == "DequantizeLinear":
            zero_point = producer.input[2] if len(producer.input) > 2 and producer.input[2] else None
            quant_axis = node_attr(producer, "axis", 1)
        name = producer.input[0]
    rank = len(initializers[name].dims)
    axis = reduction_axis(node, rank)
    if perm is not None:
        perm = perm or list(reversed(range(rank)))
        axis = perm[axis]  # output axis i of a Transpose is input axis perm[i]
    return WeightRef(node.name, node.op_type, name, axis, path, zero_point, quant_axis)


@dataclass
class NmLayer:
    node: str
    op: str
    weight: str
    shape: list[int]
    axis: int
    kept_magnitude: float  # share of sum|w| kept by the applied mask
    kept_magnitude_plain: float  # what plain |w| selection in the original channel order keeps
    score: str  # "magnitude" or "calibration"
    permuted: bool = False
    damage: float | None = None  # with a fidelity budget: output cosine regained by keeping it alone dense


@dataclass
class NmResult:
    n: int
    m: int
    layers: list[NmLayer] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    eligible_mac_share: float = 0.0  # MatMul/Gemm MACs now N:M-sparse / all MatMul/Gemm MACs
    reconstruction: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> MSE before/after refit
    budget: dict | None = None  # with --min-cosine: the budget, the cosine reached, layers kept sparse


def share_of_macs(node_macs: dict[str, int | None], nodes: set[str]) -> float:
    """The share of the MACs of the nodes with known MACs that `nodes` hold."""
    known = {name: macs for name, macs in node_macs.items() if macs}
    total = sum(known.values())
    return sum(macs for name, macs in known.items() if name in nodes) / total if total else 0.0


def nm_candidates(model: onnx.ModelProto, n: int, m: int, ops=NM_OPS, exclude=(), include_head=False
                  ) -> tuple[list[WeightRef], list[tuple[str, str]]]:
    """The layers the pass can sparsify, and (node, reason) for the others."""
    initializers = initializer_map(model.graph)
    producers, _, readers, outputs = graph_index(model.graph)
    refs, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in ops:
            continue
        ref = find_weight(node, producers, initializers)
        reason = ref if isinstance(ref, str) else None
        if reason is None:
            if node.op_type == "Conv" and node_attr(node, "group", 1) != 1 \
                    and initializers[ref.initializer].dims[1] == 1:
                reason = "depthwise Conv"
            elif any(readers[t] > 1 for t in [ref.initializer] + ref.path):
                reason = "weight is shared with another node"
            elif initializers[ref.initializer].dims[ref.axis] % m:
                reason = f"reduction length {initializers[ref.initializer].dims[ref.axis]} is not a multiple of {m}"
            elif any(p.search(node.name) or p.search(ref.initializer) for p in exclude):
                reason = "excluded by --exclude"
            elif not include_head and node.output[0] in outputs:
                reason = "produces a graph output (classifier / LM head kept dense; --nm-include-head)"
        if reason:
            skipped.append((node.name, reason))
        else:
            refs.append(ref)
    return refs, skipped


def mask_for(ref: WeightRef, weight: np.ndarray, initializers: dict, input_norm: np.ndarray | None,
             n: int, m: int) -> np.ndarray:
    scores = np.abs(_dequantized(ref, weight, initializers))
    if input_norm is not None and input_norm.size == weight.shape[ref.axis]:
        shape = [1] * weight.ndim
        shape[ref.axis] = -1
        scores = scores * input_norm.reshape(shape)
    elif input_norm is not None and ref.op == "Conv" and ref.axis == 1 and input_norm.size % weight.shape[1] == 0:
        # a grouped Conv: filter f of group g reads input channels g * width .. (g + 1) * width - 1
        groups, width = input_norm.size // weight.shape[1], weight.shape[1]
        per_filter = input_norm.reshape(groups, width)[np.arange(weight.shape[0]) * groups // weight.shape[0]]
        scores = scores * per_filter.reshape(*per_filter.shape, *[1] * (weight.ndim - 2))
    return nm_mask(scores, ref.axis, n, m)


def _dequantized(ref: WeightRef, weight: np.ndarray, initializers: dict) -> np.ndarray:
    if ref.zero_point is None:
        return weight.astype(np.float64)
    zero = numpy_helper.to_array(initializers[ref.zero_point]).astype(np.float64)
    if zero.ndim == 1 and weight.ndim > 1:
        shape = [1] * weight.ndim
        shape[ref.quant_axis] = -1
        zero = zero.reshape(shape)
    return weight.astype(np.float64) - zero


def apply_mask(ref: WeightRef, weight: np.ndarray, mask: np.ndarray, initializers: dict) -> np.ndarray:
    """The masked weight in its own dtype; quantized weights take their zero point where pruned."""
    fill = np.zeros_like(weight)
    if ref.zero_point is not None:
        fill = fill + (weight - _dequantized(ref, weight, initializers)).astype(weight.dtype)
    return np.where(mask, weight, fill)


def sparsegpt_nm(weight: np.ndarray, gram: np.ndarray, n: int, m: int, damp: float = 0.01,
                 block: int = 128) -> np.ndarray:
    """N:M-sparse W' [D, out] close to `weight` [D, out] in the layer's output on the data whose
    Gram matrix X^T X is `gram` [D, D]: min ||X W' - X W||^2, the runs of m consecutive rows of each
    column keeping n. SparseGPT (Frantar & Alistarh, 2023): rows are visited in order; at the start
    of each run its n survivors are the weights whose removal costs least (w^2 / [H^-1]_ii^2), and
    each removed weight's error is spread over the rows not yet visited through the inverse Hessian
    (Optimal Brain Surgeon), lazily, `block` rows at a time. One D^3 Cholesky and D^2 * out updates:
    no per-column solve. `damp`: ridge of damp * mean(diag H), as in the paper."""
    import scipy.linalg

    rows = weight.shape[0]
    if rows % m:
        raise ValueError(f"reduction length {rows} is not a multiple of {m}")
    block = max(m, block // m * m)
    w = weight.T.astype(np.float32).copy()  # [out, D]: SparseGPT's layout, a row per output
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) == 0  # inputs that are always 0: their weights are free, set them to 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(rows)] += damp * np.mean(np.diag(h))
    inverse = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h), np.eye(rows))
    upper = scipy.linalg.cholesky(inverse, lower=False).astype(np.float32)  # H^-1 = U^T U
    for start in range(0, rows, block):
        end = min(start + block, rows)
        part, u = w[:, start:end].copy(), upper[start:end, start:end]
        errors = np.zeros_like(part)
        scale = np.diag(u) ** 2
        for i in range(end - start):
            if i % m == 0:  # this run's survivors: the n with the largest saliency w^2 / [H^-1]_ii^2
                saliency = part[:, i:i + m] ** 2 / scale[i:i + m]
                drop = np.argsort(saliency, axis=1, kind="stable")[:, :m - n]
                pruned = np.zeros((part.shape[0], m), dtype=bool)
                np.put_along_axis(pruned, drop, True, axis=1)
            error = np.where(pruned[:, i % m], part[:, i], 0.0) / u[i, i]
            part[:, i:] -= np.outer(error, u[i, i:])
            part[:, i] = np.where(pruned[:, i % m], 0.0, part[:, i])
            errors[:, i] = error
        w[:, start:end] = part
        w[:, end:] -= errors @ upper[start:end, end:]
    return w.T.astype(np.float64)
