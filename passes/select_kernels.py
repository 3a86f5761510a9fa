"""select_kernels: choose, per filter group, the n input channels whose grouped kernels survive.

Before: every layer has `group_count` and `groups` (choose_groups).
After:  the model is unchanged; every layer has `kept_channels` (G sorted lists of n distinct
        input channels, n = kept_per_group) and `retained_importance`.

The grouped kernel of group g on input channel j is the vector K[g, j] = W[F_g, j] (d*kh*kw
numbers). LeanFlex scoring combines two signals, each normalised by its mean over the group:
    score[g, j] = (1 - a) * ||K[g, j]|| / mean_j ||K[g, j]||
                +      a  * ||K[g, j] - GM_g|| / mean_j ||K[g, j] - GM_g||
where GM_g is the geometric median of {K[g, j]}_j (Weiszfeld iterations). A kernel close to the
median is the one the others can stand in for (FPGM's argument); a small kernel contributes
little. The n highest scores are kept; ties go to the lower channel index. a = 0.5 by default.

Methods: "leanflex" (the above), "l2" (a = 0, magnitude only), "random" (a seeded random choice,
the baseline any scoring must beat).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import Plan

SELECTION_METHODS = ("leanflex", "l2", "random")
MEDIAN_WEIGHT = 0.5


def geometric_median(points: np.ndarray, iterations: int = 200, tol: float = 1e-7) -> np.ndarray:
    """Weiszfeld's algorithm, vectorised over leading axes: points [..., m, D] -> [..., D].

    Minimises sum_i ||x_i - y||. A point coinciding with the estimate gets a bounded weight
    (distance floored at eps), which keeps the iteration defined.
    """
    points = np.asarray(points, dtype=np.float64)
    estimate = points.mean(axis=-2)
    scale = max(float(np.abs(points).max()), 1e-30)
    eps = 1e-12 * scale
    for _ in range(iterations):
        distance = np.linalg.norm(points - estimate[..., None, :], axis=-1)
        weights = 1.0 / np.maximum(distance, eps)
        updated = (weights[..., None] * points).sum(axis=-2) / weights.sum(axis=-1)[..., None]
        converged = np.abs(updated - estimate).max() <= tol * scale
        estimate = updated
        if converged:
            break
    return estimate


def grouped_kernels(weight: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """[G, Ci, d*kh*kw]: the grouped kernel W[F_g, j] of every group g and input channel j."""
    members = np.asarray(groups)  # [G, d]
    g, d = members.shape
    ci = weight.shape[1]
    return weight[members].astype(np.float64).transpose(0, 2, 1, 3, 4).reshape(g, ci, -1)


def kernel_scores(weight: np.ndarray, groups: list[list[int]], method: str = "leanflex",
                  seed: int = 0) -> np.ndarray:
    """[G, Ci] importance of each grouped kernel (higher is kept first)."""
    kernels = grouped_kernels(weight, groups)
    if method == "random":
        return np.random.default_rng(seed).random(kernels.shape[:2])
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}")
    norms = np.linalg.norm(kernels, axis=-1)
    score = _normalised(norms)
    if method == "leanflex":
        distance = np.linalg.norm(kernels - geometric_median(kernels)[:, None, :], axis=-1)
        score = (1 - MEDIAN_WEIGHT) * score + MEDIAN_WEIGHT * _normalised(distance)
    return score


def keep_top(scores: np.ndarray, n: int) -> list[list[int]]:
    """The n best channels of each group, sorted ascending; ties go to the lower index."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    return np.sort(order, axis=1).tolist()


def retained_importance(weight: np.ndarray, groups: list[list[int]], kept: list[list[int]]) -> float:
    """Share of the layer's weight energy sum(W^2) held by the kept grouped kernels."""
    energy = (weight.astype(np.float64) ** 2).sum(axis=(2, 3))  # [Co, Ci]
    total = energy.sum()
    if total == 0:
        return 1.0
    kept_energy = sum(energy[np.ix_(f, c)].sum() for f, c in zip(groups, kept))
    return float(kept_energy / total)


def _normalised(values: np.ndarray) -> np.ndarray:
    mean = values.mean(axis=1, keepdims=True)
    return values / np.where(mean > 0, mean, 1.0)


class SelectKernels(Pass):
    name = "select_kernels"

    def __init__(self, method: str = "leanflex", seed: int = 0):
        self.method = method
        self.seed = seed

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        if any(layer.groups is None for layer in plan.layers):
            raise PassContractError("select_kernels needs the groups chosen by choose_groups")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        weights = {t.name: t for t in model.graph.initializer}
        for layer in plan.layers:
            weight = numpy_helper.to_array(weights[layer.weight])
            scores = kernel_scores(weight, layer.groups, self.method, self.seed)
            layer.kept_channels = keep_top(scores, layer.kept_per_group)
            layer.retained_importance = retained_importance(weight, layer.groups, layer.kept_channels)
        return PassResult(model, plan, modified=False)

    def ensures(self, model: onnx.ModelProto, plan: Plan) -> None:
        for layer in plan.layers:
            for channels in layer.kept_channels:
                if len(channels) != layer.kept_per_group or len(set(channels)) != len(channels) \
                        or not all(0 <= c < layer.in_channels for c in channels):
                    raise PassContractError(f"select_kernels: bad kept set in layer {layer.node}")
