"""reconstruct: refit each pruned layer's kept kernels so its output matches the original model.

Before: the rewritten model (rewrite_conv; Gathers not folded yet) and calibration inputs.
After:  the same graph; each grouped Conv's weight (and bias) replaced by a least-squares refit.
        Layers are refit in topological order, so each fit sees the errors of the layers before
        it in its inputs and corrects for them.

For layer L with groups g (filters F_g, kept channels S_g): X' = L's input in the pruned-so-far
model, Y = L's Conv output in the original model, both captured with onnxruntime on the
calibration set. When L's output is read only by an Add with a computed tensor R (the shortcut of
a residual block), the target becomes Y + R_original - R_pruned: the refit aims at the sum the
block passes on, absorbing what the pruned layers before it left on the shortcut (`shortcut`,
on by default; ResNet-56 G = 8, 256 images: 88.1% -> 89.1% top-1). With P_g the im2col patches
of X'[:, S_g] (plus a ones column for the bias),
    [W_g; b_g] = argmin ||P_g [W_g; b_g] - Y[:, F_g]||^2 + lam * ||W_g||^2,
    lam = ridge * trace(P_g^T P_g) / dim
solved from one Gram matrix per layer accumulated over batches, over the patches of the channels
any group reads ((|S_0 u .. u S_G-1|*kh*kw + 1)^2); each group's system is a sub-block of it. The
refit is kept only when it lowers the layer's output error on the calibration data (computed from
the same Gram matrix), so a layer never gets worse than before. The captures come from
`Activations`: both models run once, segment by segment, keeping only the tensors later nodes read
(up to ACTIVATION_BUDGET bytes per model; beyond, each capture is recomputed from the inputs).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper
from threadpoolctl import threadpool_limits

from gkp_onnx.graph import (GATHER_IN, explicit_pads, initializer_map, last_axis_first, marked, node_attr, output_bias,
                            outer_reads, permuted, pinned)
from gkp_onnx.nm import sparsegpt_nm
from gkp_onnx.optional import require_torch
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import LayerPlan, Plan
from gkp_onnx.validate import PADDING_INPUT, Dataset, batches, make_session, token_rows

if TYPE_CHECKING:  # torch is imported where it is used: it is an optional dependency
    import torch


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def patches(x: np.ndarray, attrs: dict, kernel: list[int]) -> torch.Tensor:
    """im2col in float32: [N, C*k, L] with k the kernel positions (channel-major, as Conv weights
    are laid out; Conv1d, 2d or 3d). The Gram products are summed per batch in float32 and
    accumulated across batches in float64."""
    import torch
    import torch.nn.functional as F

    dims = len(kernel)
    strides, dilations = attrs.get("strides", [1] * dims), attrs.get("dilations", [1] * dims)
    tensor = F.pad(torch.from_numpy(x.astype(np.float32)), last_axis_first(explicit_pads(attrs, x.shape[2:], kernel)))
    if dims == 2:
        return F.unfold(tensor, kernel, dilation=dilations, stride=strides)
    out = [(size - (k - 1) * d - 1) // s + 1 for size, k, s, d in zip(tensor.shape[2:], kernel, strides, dilations)]
    shifted = [tensor[(..., *(slice(o * d, o * d + (n - 1) * s + 1, s)
                              for o, d, n, s in zip(offset, dilations, out, strides)))]
               for offset in itertools.product(*(range(k) for k in kernel))]  # each [N, C, *out]
    return torch.stack(shifted, dim=2).reshape(x.shape[0], -1, int(np.prod(out)))


ACTIVATION_BUDGET = 2 << 30  # bytes of cached activations per model (see Activations)


class Reconstruct(Pass):
    name = "reconstruct"
    in_place = True  # edits the model's weights or nodes in place

    def __init__(self, original: onnx.ModelProto, data: Dataset, ridge: float = 1e-3, shortcut: bool = True):
        require_torch("reconstruction (--reconstruct)")
        self.original = original
        self.data = data
        self.ridge = ridge
        self.shortcut = shortcut

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        names = {n.name for n in model.graph.node}
        if any(layer.grouped_node not in names for layer in plan.layers):
            raise PassContractError("reconstruct needs the grouped Convs made by rewrite_conv")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        errors = {}  # layer -> (output MSE before, after)
        original_nodes = {n.name: n for n in self.original.graph.node}  # names: the same after reordering
        order = {n.name: i for i, n in enumerate(model.graph.node)}
        producers = {o: n for n in model.graph.node for o in n.output}
        initializers = initializer_map(model.graph)
        original = permuted(self.original, plan.permutations) if plan.permutations else self.original
        pruned, reference = Activations(model, self.data), Activations(original, self.data)
        for layer in sorted(plan.layers, key=lambda l: order[l.grouped_node]):
            conv = next(n for n in model.graph.node if n.name == layer.grouped_node)
            source, index = conv.input[0], np.arange(layer.group_count * layer.kept_per_group)
            gather = producers.get(source)
            if gather is not None and marked(gather, GATHER_IN) == layer.node:  # else the identity
                source, index = gather.input[0], numpy_helper.to_array(initializers[gather.input[1]])
            output = original_nodes[layer.node].output[0]
            targets = reference.values(output)
            shortcut = _shortcut(model, output, producers) if self.shortcut else None
            if shortcut is not None:  # aim at the sum: conv + shortcut as in the original
                drift = [r - p for r, p in zip(list(reference.values(shortcut)), list(pruned.values(shortcut)))]
                targets = (y + d for y, d in zip(targets, drift))
            pairs = zip(pruned.values(source), targets)
            errors[layer.node] = self._refit(model, layer, conv, index, pairs)
        return PassResult(model, plan, modified=bool(plan.layers), details={"reconstruction": errors})

    def _refit(self, model, layer: LayerPlan, conv: onnx.NodeProto, index: np.ndarray, pairs) -> tuple[float, float]:
        """`pairs`: per batch, (the tensor the layer's Gather reads in the pruned model, the layer's
        output in the original); `index`: the Gather's channel list (G*n). Returns the layer's
        output MSE before and after."""
        attrs = _attrs(conv)
        initializers = initializer_map(model.graph)
        weight = numpy_helper.to_array(initializers[conv.input[1]])
        bias = numpy_helper.to_array(initializers[conv.input[2]]) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(weight.shape[0], weight.dtype)
        g, d, n = layer.group_count, layer.out_channels // layer.group_count, layer.kept_per_group
        kernel = list(weight.shape[2:])
        k = int(np.prod(kernel))
        used, position = np.unique(index, return_inverse=True)  # the channels any group reads
        gram, cross, energy = _normal_equations(pairs, attrs, kernel, used, np.concatenate(layer.groups))
        samples = gram[-1, -1]
        new_weight, new_bias = weight.astype(np.float64).copy(), bias.astype(np.float64).copy()
        before = after = 0.0
        # One BLAS thread, whatever the process did before: OpenBLAS rounds a solve differently on 1
        # and 2 threads, and a run that clustered (a cold cache) leaves numpy's OpenBLAS on 1, so the
        # bytes depended on the cache. These systems are small; one thread costs nothing visible.
        with threadpool_limits(1, user_api="blas"):
            for group in range(g):
                rows = slice(group * d, (group + 1) * d)
                columns = np.append((position[group * n:(group + 1) * n, None] * k + np.arange(k)).ravel(), len(gram) - 1)
                sub_gram, sub_cross, total = gram[np.ix_(columns, columns)], cross[columns, rows], energy[rows].sum()
                old = np.concatenate([weight[rows].reshape(d, -1).T, bias[rows][None, :]]).astype(np.float64)
                reg = self.ridge * np.trace(sub_gram) / len(columns) * np.eye(len(columns))
                reg[-1, -1] = 0.0  # no penalty on the bias
                fit = np.linalg.solve(sub_gram + reg, sub_cross)
                err_old = _squared_error(old, sub_gram, sub_cross, total)
                err_new = _squared_error(fit, sub_gram, sub_cross, total)
                before += err_old
                if err_new < err_old:
                    new_weight[rows] = fit[:-1].T.reshape(d, n, *kernel)
                    new_bias[rows] = fit[-1]
                after += min(err_new, err_old)
        initializers[conv.input[1]].CopyFrom(numpy_helper.from_array(new_weight.astype(weight.dtype), conv.input[1]))
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{conv.input[1]}_bias"
        if bias_name in initializers:
            initializers[bias_name].CopyFrom(numpy_helper.from_array(new_bias.astype(weight.dtype), bias_name))
        else:
            model.graph.initializer.append(numpy_helper.from_array(new_bias.astype(weight.dtype), bias_name))
            conv.input.append(bias_name)
        return before / samples / layer.out_channels, after / samples / layer.out_channels


def _normal_equations(pairs, attrs: dict, kernel: list[int], channels: np.ndarray, order: np.ndarray):
    """Gram [D, D], cross [D, Co] and per-filter energy [Co] of the least-squares problem
    patches(X[:, channels]) @ coef = Y[:, order], D = len(channels)*kh*kw + 1 (the last column is
    ones, for the bias). One Gram serves every group, whichever of the channels it reads. Per batch
    the products are summed in float32, across batches in float64."""
    import torch

    gram = cross = energy = 0.0
    for x, y in pairs:
        cols = patches(np.ascontiguousarray(x[:, channels]), attrs, kernel)  # [N, C*k, L]
        cols = torch.cat([cols, torch.ones_like(cols[:, :1])], dim=1)
        y = torch.from_numpy(np.ascontiguousarray(y[:, order], dtype=np.float32)).flatten(2)  # [N, Co, L]
        gram = gram + torch.einsum("bkl,bjl->kj", cols, cols).double().numpy()
        cross = cross + torch.einsum("bkl,bol->ko", cols, y).double().numpy()
        energy = energy + (y.double() ** 2).sum(dim=(0, 2)).numpy()
    return gram, cross, energy


class ReconstructNm(Pass):
    """Refit the weights N:M sparsity kept, per output column, on captured inputs.

    For each sparsified layer, in topological order, with its linear part seen as rows @ W
    (MatMul: the input's last axis; Gemm: alpha * B, transposed when transB; Conv: im2col patches
    and a block-diagonal W for groups), X' = its input in the sparse-so-far model and
    T = X @ W_original from the original model (columns in the order nm_permutation left, and only
    those prune_neurons kept: `output_orders`). Column j keeps its non-zero set S_j (the N:M pattern
    is unchanged) and gets argmin ||X'[:, S_j] w - T[:, j]||^2 + lam ||w||^2, kept only when it
    lowers that column's error. Biases are not refit, except with `intercept` (prune_neurons' dense
    down-projections): the output bias then absorbs the mean the removed inputs contributed. Layers
    whose weight is not a plain initializer (Transpose / Cast / DequantizeLinear on the way, batched
    MatMul weights) are left as masked. With method
    "sparsegpt" a MatMul/Gemm's mask is chosen anew with the weights (gkp_onnx.nm.sparsegpt_nm).
    Rows at padding positions (PADDING_INPUT is 0) are left out of a MatMul's Gram matrices.
    """

    name = "reconstruct_nm"
    in_place = True  # edits the model's weights or nodes in place

    def __init__(self, original: onnx.ModelProto, data: Dataset, layers: list[str],
                 output_orders: dict[str, np.ndarray] | None = None, ridge: float = 1e-3,
                 method: str = "refit", nm: tuple[int, int] = (2, 4), intercept: bool = False,
                 residual: bool = False):
        require_torch("reconstruction (--reconstruct)")
        if method not in ("refit", "sparsegpt"):  # per-column least squares on the mask given / SparseGPT
            raise ValueError(f"unknown N:M update {method!r}")
        self.original = original
        self.data = data
        self.layers = layers
        self.output_orders = output_orders or {}  # layer -> its output channels' order (nm_permutation)
        self.ridge = ridge
        self.method = method
        self.n, self.m = nm
        self.intercept = intercept  # also refit the layer's output bias (MatMul + Add, Gemm C) when it has one
        self.residual = residual  # a layer added to a residual stream also makes up for the stream's drift

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        errors = {}  # layer -> (output MSE before, after)
        order = {n.name: i for i, n in enumerate(model.graph.node)}
        original_nodes = {n.name: n for n in self.original.graph.node}  # names: the same after reordering
        original_weights = initializer_map(self.original.graph)
        sparse, dense = Activations(model, self.data), Activations(self.original, self.data)
        for name in sorted(self.layers, key=order.__getitem__):
            node = next(n for n in model.graph.node if n.name == name)
            initializers = initializer_map(model.graph)
            view = _linear_view(node, initializers)
            reference = original_nodes.get(name)
            reference_view = _linear_view(reference, original_weights) if reference is not None else None
            if view is None or reference_view is None:
                continue
            order = self.output_orders.get(name)  # prune_neurons may have removed columns, or rows (the inputs)
            if (len(order) if order is not None else reference_view[1].shape[1]) != view[1].shape[1]:
                continue
            bias = output_bias(model, node, initializers) if self.intercept else None
            stream = _residual_stream(model, node, bias) if self.residual else None
            drift = zip(dense.values(stream), sparse.values(stream)) if stream else itertools.repeat((None, None))
            pairs = zip(sparse.values(node.input[0]), dense.values(reference.input[0]), sparse.padding, drift)
            errors[name] = self._refit(node, view, reference_view, pairs, initializers[node.input[1]],
                                       initializers.get(bias))
        return PassResult(model, plan, modified=bool(errors), details={"reconstruction": errors})

    def _refit(self, node, view, reference_view, pairs, init, bias=None) -> tuple[float, float]:
        """`pairs`: per batch, (the layer's input in the sparse model, in the original). Returns
        the layer's output MSE before and after. `bias`: the output bias, refit too when the weight
        is dense (an intercept: what removed inputs added on average)."""
        import torch

        features, weight, store = view
        reference_features, reference_weight, _ = reference_view
        order = self.output_orders.get(node.name, np.arange(weight.shape[1]))
        target_weight = torch.from_numpy(reference_weight[:, order].astype(np.float32))
        dim = weight.shape[0]
        gram, cross, energy = np.zeros((dim, dim)), np.zeros(weight.shape), np.zeros(weight.shape[1])
        samples, row_sum, target_sum = 0, np.zeros(dim), np.zeros(weight.shape[1])
        for x, x_original, padding, (stream, stream_now) in pairs:
            rows = features(x)
            target = reference_features(x_original) @ target_weight
            if stream is not None and stream.size == target.numel():
                # what the residual stream this layer is added to has drifted from the original's
                target = target + torch.from_numpy((stream - stream_now).reshape(target.shape).astype(np.float32))
            tokens = token_rows(padding, x.shape) if node.op_type == "MatMul" else None
            if tokens is not None:  # padding positions are not calibration data
                rows, target = rows[torch.from_numpy(tokens)], target[torch.from_numpy(tokens)]
            samples += rows.shape[0]
            gram += (rows.T @ rows).double().numpy()
            cross += (rows.T @ target).double().numpy()
            energy += (target.double() ** 2).sum(0).numpy()
            row_sum += rows.double().sum(0).numpy()
            target_sum += target.double().sum(0).numpy()
        if samples == 0:  # the data is all padding: nothing to fit to, the weights stay as they are
            return 0.0, 0.0
        if bias is not None:  # (an intercept is asked for dense weights only: prune_neurons)
            new, shift, before, after = self._refit_affine(weight, gram, cross, energy, samples, row_sum, target_sum)
            values = numpy_helper.to_array(bias)
            bias.CopyFrom(numpy_helper.from_array((values + shift.reshape(values.shape)).astype(values.dtype), bias.name))
        elif self.method == "sparsegpt" and node.op_type != "Conv":
            new, before, after = self._sparsegpt(weight, gram, cross, energy)
        else:
            new, before, after = self._refit_columns(weight, gram, cross, energy)
        init.CopyFrom(numpy_helper.from_array(store(new).astype(numpy_helper.to_array(init).dtype), init.name))
        return before / samples / weight.shape[1], after / samples / weight.shape[1]

    def _refit_columns(self, weight, gram, cross, energy) -> tuple[np.ndarray, float, float]:
        """Each column's kept weights refit by least squares; a column keeps the fit only when it lowers
        its error. Returns the new weight and the summed squared errors before and after."""
        kept = weight != 0
        if kept.all():  # a dense weight (prune_neurons' down-projections): one solve for every column
            candidate = _ridge_solve(gram, cross, self.ridge)
        else:
            candidate = self._solve_columns(weight, kept, gram, cross)
        return _better_columns(weight, candidate, gram, cross, energy)

    def _solve_columns(self, weight, kept, gram, cross) -> np.ndarray:
        """Per column, the ridge least-squares fit of its kept weights. Columns with as many kept
        weights go in batches: their sub-Gram matrices gathered at once and solved by a float32
        Cholesky factorisation (a column whose factorisation fails keeps its weights)."""
        import torch

        candidate = weight.copy()
        counts = kept.sum(0)
        gram32, cross32 = torch.from_numpy(gram.astype(np.float32)), torch.from_numpy(cross.astype(np.float32))
        for count in map(int, np.unique(counts[counts > 0])):
            columns = np.flatnonzero(counts == count)
            for chunk in np.array_split(columns, max(1, len(columns) * count ** 2 // 2 ** 24)):
                index = np.nonzero(kept[:, chunk].T)[1].reshape(len(chunk), count)  # [b, k] kept rows
                rows = torch.from_numpy(index)
                g = gram32[rows[:, :, None], rows[:, None, :]]
                lam = self.ridge * torch.diagonal(g, dim1=1, dim2=2).sum(1) / max(count, 1)
                g.diagonal(dim1=1, dim2=2).add_(lam[:, None])
                factor, failed = torch.linalg.cholesky_ex(g)
                fit = torch.cholesky_solve(cross32[rows, torch.from_numpy(chunk)[:, None]].unsqueeze(-1), factor)
                fit = fit.squeeze(-1).numpy()
                solved = (failed.numpy() == 0) & np.isfinite(fit).all(1)
                candidate[index[solved], chunk[solved, None]] = fit[solved]
        return candidate

    def _refit_affine(self, weight, gram, cross, energy, samples, row_sum, target_sum):
        """A dense weight and an added bias b by least squares on centred data:
        W = (Xc^T Xc + lam I)^-1 Xc^T Tc, b = mean(T) - mean(X) W. A column keeps them only when they
        lower its error. Returns the weight, the bias shift and the summed errors before and after."""
        mean_x, mean_t = row_sum / samples, target_sum / samples
        centred = gram - samples * np.outer(mean_x, mean_x)
        fit = _ridge_solve(centred, cross - samples * np.outer(mean_x, mean_t), self.ridge)
        shift = mean_t - mean_x @ fit
        err_old = _column_errors(weight, gram, cross, energy)
        err_new = _column_errors(fit, gram, cross, energy) + samples * shift ** 2 \
            + 2 * shift * (row_sum @ fit) - 2 * shift * target_sum
        better = err_new < err_old
        return (np.where(better[None, :], fit, weight), np.where(better, shift, 0.0), float(err_old.sum()),
                float(np.where(better, err_new, err_old).sum()))

    def _sparsegpt(self, weight, gram, cross, energy) -> tuple[np.ndarray, float, float]:
        """SparseGPT from the dense least-squares optimum W* = (G + lam I)^-1 C: since
        ||X W - T||^2 = ||X (W - W*)||^2 + const, pruning W* towards itself with G as the Hessian
        minimises the error to the target itself, mask included. A column keeps the result only when
        it beats the magnitude-masked weight it replaces."""
        optimum = _ridge_solve(gram, cross, self.ridge)
        return _better_columns(weight, sparsegpt_nm(optimum, gram, self.n, self.m), gram, cross, energy)


def _shortcut(model: onnx.ModelProto, output: str, producers: dict) -> str | None:
    """The other input of the Add that alone reads `output`, when it is a computed tensor
    (`producers`: tensor -> the node that computes it)."""
    readers = [n for n in model.graph.node if output in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add" or output in pinned(model.graph):
        return None
    other = [name for name in readers[0].input if name != output]
    return other[0] if len(other) == 1 and other[0] in producers else None


def _residual_stream(model: onnx.ModelProto, node: onnx.NodeProto, bias: str | None) -> str | None:
    """The computed tensor the layer's output (after its bias Add) is added to, if it is."""
    producers = {o: n for n in model.graph.node for o in n.output}
    output = node.output[0]
    if bias and node.op_type != "Gemm":
        output = next(n for n in model.graph.node if output in n.input).output[0]  # output_bias: the only reader
    return _shortcut(model, output, producers)


def _linear_view(node: onnx.NodeProto, initializers: dict):
    """(features, W [D, out], store): `features` maps the layer's input to rows [samples, D] (torch,
    float32) with the layer's linear part = rows @ W; `store` puts a W back into the initializer's
    layout. None when the weight is not a plain initializer or the layout is not handled."""
    import torch

    if len(node.input) < 2 or node.input[1] not in initializers:
        return None
    weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
    if node.op_type == "MatMul" and weight.ndim == 2:
        return (lambda x: torch.from_numpy(x.reshape(-1, x.shape[-1]).astype(np.float32)), weight, lambda w: w)
    if node.op_type == "Gemm" and not node_attr(node, "transA", 0):
        alpha, trans = node_attr(node, "alpha", 1.0), node_attr(node, "transB", 0)
        return (lambda x: torch.from_numpy(x.astype(np.float32)), alpha * (weight.T if trans else weight),
                lambda w: (w.T if trans else w) / alpha)
    if node.op_type == "Conv":
        attrs, kernel = _attrs(node), list(weight.shape[2:])
        group, (out, per_group) = attrs.get("group", 1), weight.shape[:2]
        width, height = out // group, per_group * int(np.prod(kernel))  # filters / patch rows per group
        dense = np.zeros((group * height, out))
        for g in range(group):
            rows, columns = slice(g * height, (g + 1) * height), slice(g * width, (g + 1) * width)
            dense[rows, columns] = weight[columns].reshape(width, -1).T
        def features(x):
            cols = patches(x, attrs, kernel)  # [N, D, L]
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        def store(w):
            return np.concatenate([w[g * height:(g + 1) * height, g * width:(g + 1) * width].T
                                   for g in range(group)]).reshape(weight.shape)
        return features, dense, store
    return None


def _ridge_solve(gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
    """(G + lam I)^-1 C with lam = ridge * mean(diag G), on one BLAS thread (the bytes must not
    depend on the BLAS thread state)."""
    lam = ridge * np.trace(gram) / len(gram)
    with threadpool_limits(1, user_api="blas"):
        return np.linalg.solve(gram + lam * np.eye(len(gram)), cross)


def _better_columns(weight, candidate, gram, cross, energy) -> tuple[np.ndarray, float, float]:
    """Per column, the candidate where it lowers the error, else the weight as it was; the summed
    squared errors before and after."""
    err_old, err_new = _column_errors(weight, gram, cross, energy), _column_errors(candidate, gram, cross, energy)
    better = err_new < err_old
    new = np.where(better[None, :], candidate, weight)
    return new, float(err_old.sum()), float(np.where(better, err_new, err_old).sum())


def _column_errors(w: np.ndarray, gram: np.ndarray, cross: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """||X w_j - T_j||^2 per column j from the Gram matrices."""
    return np.einsum("ij,ij->j", w, gram @ w) - 2 * np.einsum("ij,ij->j", w, cross) + energy


def _squared_error(coef: np.ndarray, gram: np.ndarray, cross: np.ndarray, energy: np.ndarray) -> float:
    """sum ||P coef - T||^2 from the Gram matrices: tr(c^T G c) - 2 tr(c^T X) + ||T||^2."""
    return float(np.einsum("ij,ik,kj->", coef, gram, coef) - 2 * np.einsum("ij,ij->", coef, cross) + energy.sum())


class Activations:
    """Per-batch values of a model's tensors on the calibration data, for layers visited in
    topological order.

    The model is run segment by segment: only the tensors that later nodes still read (the
    frontier) are kept, per batch, so capturing the inputs of L layers costs one forward pass, not
    L prefix passes. Each segment is built from the live model, so weights refit since the last
    call are used. Memory: the frontier over the whole calibration set; past ACTIVATION_BUDGET (or for
    a tensor no longer on the frontier, or graphs with subgraphs) it falls back to recomputing each
    tensor from the inputs, batch by batch.
    """

    def __init__(self, model: onnx.ModelProto, data: Dataset):
        self.model, self.data = model, data
        self.position = 0  # nodes before it have been run
        has_subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for node in model.graph.node for a in node.attribute)
        feeds = list(batches(make_session(_up_to(model, model.graph.input[0].name)), data))
        # per batch, where the samples' padding is (0 in the attention mask), if the data says
        self.padding = [feed.get(PADDING_INPUT) for feed in feeds]
        self.frontier: list[dict[str, np.ndarray]] | None = None if has_subgraphs else feeds

    def values(self, tensor: str):
        """Iterate over `tensor`'s value per batch."""
        if self.frontier is not None:
            producers = {o: i for i, node in enumerate(self.model.graph.node) for o in node.output}
            end = producers[tensor] + 1 if tensor in producers else 0
            if end > self.position:
                self._advance(end, tensor)
            if self.frontier is not None and tensor in self.frontier[0]:
                return (batch[tensor] for batch in self.frontier)
        return self._recompute(tensor)

    def _recompute(self, tensor: str):
        session = make_session(_up_to(self.model, tensor))
        return (session.run([tensor], feed)[0] for feed in batches(session, self.data))

    def _advance(self, end: int, keep: str) -> None:
        nodes = list(self.model.graph.node)
        segment = nodes[self.position:end]
        later = {name for node in nodes[end:] for name in node.input} | {keep}
        reads = {name for node in segment for name in node.input}
        outputs = [o for node in segment for o in node.output if o in later]
        first = self.frontier[0]
        inputs = [name for name in first if name in reads]
        initializers = [t for t in self.model.graph.initializer if t.name in reads]
        part = onnx.helper.make_model(
            onnx.helper.make_graph(
                segment, "segment",
                [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(first[n].dtype), None)
                 for n in inputs],
                [onnx.ValueInfoProto(name=o) for o in outputs], initializers),
            opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        session = make_session(part) if outputs else None
        for index, batch in enumerate(self.frontier):
            new = dict(zip(outputs, session.run(outputs, {n: batch[n] for n in inputs}))) if session else {}
            self.frontier[index] = {n: v for n, v in batch.items() if n in later} | new
        self.position = end
        if sum(v.nbytes for batch in self.frontier for v in batch.values()) > ACTIVATION_BUDGET:
            self.frontier = None


def _up_to(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """The part of `model` that computes `tensor`, with it as the only output (onnxruntime runs
    every node of a graph, whatever outputs are asked for)."""
    producers = {o: node for node in model.graph.node for o in node.output}
    needed, todo = set(), [tensor]
    while todo:
        node = producers.get(todo.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            todo.extend(node.input)
            todo.extend(outer_reads([node]))  # what its If / Loop bodies read
    part = onnx.ModelProto()
    part.CopyFrom(model)
    keep = [node for node in model.graph.node if node.name in needed]
    read = {name for node in keep for name in node.input} | outer_reads(keep)
    del part.graph.node[:], part.graph.output[:], part.graph.value_info[:]
    part.graph.node.extend(keep)
    part.graph.output.append(onnx.ValueInfoProto(name=tensor))
    inits = [t for t in model.graph.initializer if t.name in read]
    del part.graph.initializer[:]
    part.graph.initializer.extend(inits)
    return part
