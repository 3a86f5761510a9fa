"""Kernel scoring and the shared-partition arithmetic, used by several passes.

The grouped kernel of group g on input channel j is the vector K[g, j] = W[F_g, j] (d*kh*kw
numbers). LeanFlex scoring combines two signals, each normalised by its mean over the group:
    score[g, j] = (1 - a) * ||K[g, j]|| / mean_j ||K[g, j]||
                +      a  * ||K[g, j] - GM_g|| / mean_j ||K[g, j] - GM_g||
where GM_g is the geometric median of {K[g, j]}_j (Weiszfeld iterations). A kernel close to the
median is the one the others can stand in for (FPGM's argument); a small kernel contributes
little. The n highest scores are kept; ties go to the lower channel index. a = 0.5 by default.

Methods: "leanflex" (the above), "l2" (a = 0, magnitude only), "random" (a seeded random choice,
the baseline any scoring must beat), and two set-based ones from the prior art, both minimising
TMI-GKP's cost of a kept set S within a group (sim = 1 - Euclidean distance of grouped kernels):
    cost(S) = sum_{i<j in S} sim(i, j) - BALANCER * sum_{i not in S} (top-m of sim(i, S)),
    m = max(1, int(KEPT_SHARE * |S|))
(kept kernels should differ from each other, pruned ones resemble some kept ones):
  "tmi" (TMI-GKP, ICLR 2022): from each start kernel (the TMI_STARTS of largest norm when there are
        more), greedily add the kernel least similar to those kept; keep the candidate set of
        lowest cost. TMI-GKP's choice among clustering schemes by a "lottery" vote needs training
        snapshots, which an ONNX file does not have: its groups here come from balanced k-Means.
  "sr"  (SR-GKP, NeurIPS 2023): beam search (SR_BEAM sets, smoothest first on ties) over the
        same cost; of the better half of the final sets by cost, the smoothest is kept (roughness:
        sum over the kept kernels of |w_a^2 - w_b^2| over neighbouring kernel positions; smooth
        kernels are its robustness argument). Its groups are dealt in snake order by filter
        roughness (cluster.py).
The constants are TMI-GKP's published ResNet-56 setting (m = 20% of the kept set, balancer 2).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from gkp_onnx.options import SELECTION_METHODS  # noqa: F401 (the methods `select` takes)
from gkp_onnx.plan import LayerPlan

MEDIAN_WEIGHT = 0.5
KEPT_SHARE, BALANCER = 0.2, 2.0  # TMI-GKP's cost (its ResNet-56 setting)
TMI_STARTS = 64  # greedy runs per group at most
SR_BEAM = 8


def max_retained_importance(weight: np.ndarray, kept_per_filter: int) -> float:
    """Upper bound of R(G) for any grouping: every filter keeps its n strongest kernels."""
    energy = kernel_energy(weight)
    total = energy.sum()
    return 1.0 if total == 0 else float(-np.sort(-energy, axis=1)[:, :kept_per_filter].sum() / total)


def balanced_assign(score: np.ndarray) -> np.ndarray:
    """Labels [m] putting m / G rows of `score` [m, G] in each block, maximising the summed score."""
    m, blocks = score.shape
    size = m // blocks
    if blocks == 1:
        return np.zeros(m, dtype=np.int64)
    if blocks == 2:  # exact by sorting: the rows that gain most from block 0 go there
        labels = np.ones(m, dtype=np.int64)
        labels[np.argsort(score[:, 1] - score[:, 0], kind="stable")[:size]] = 0
        return labels
    _, slots = linear_sum_assignment(-np.repeat(score, size, axis=1))
    return slots // size


def block_sums(energy: np.ndarray, labels: np.ndarray, blocks: int) -> np.ndarray:
    """[rows, G]: each row's energy summed over the columns of each block."""
    return energy @ np.eye(blocks)[labels]


def kernel_energy(weight: np.ndarray) -> np.ndarray:
    """[Co, Ci] kernel energies sum(W^2) over the kernel (any number of kernel dimensions)."""
    return (weight.astype(np.float64) ** 2).reshape(*weight.shape[:2], -1).sum(axis=2)


def energy(weight: np.ndarray) -> np.ndarray:
    """[Co, Ci] kernel energies sum(W^2) over the kernel, normalised to sum 1."""
    e = kernel_energy(weight)
    total = e.sum()
    return e / total if total > 0 else e


def shared_blocks(layer: LayerPlan) -> list[list[int]]:
    """The kept channels of a layer in the shared form: block b = channels b*n .. (b+1)*n - 1."""
    n = layer.kept_per_group
    return [list(range(b * n, (b + 1) * n)) for b in range(layer.shared_group_count)]


def shared_groups(layer: LayerPlan, weight: np.ndarray, needed: list[int] | None = None) -> list[list[int]]:
    """The filters of each block of a layer in the shared form: the balanced assignment keeping
    most energy, or the blocks of the component it produces (`shared_output`). `needed`: the
    filters a later Conv reads (its Gather folds into this one); they are spread evenly over the
    blocks when they can be, so that this layer computes only them (fold_gathers.shrink_grouped)."""
    blocks, co = layer.shared_group_count, layer.out_channels
    if layer.shared_output:
        return [list(range(b * co // blocks, (b + 1) * co // blocks)) for b in range(blocks)]
    sums = block_sums(energy(weight), np.repeat(np.arange(blocks), layer.kept_per_group), blocks)
    labels = np.empty(co, dtype=np.int64)
    parts = [np.arange(co)]
    if needed is not None and 0 < len(needed) < co and len(needed) % blocks == 0:
        parts = [np.asarray(needed), np.setdiff1d(np.arange(co), needed)]
    for rows in parts:
        labels[rows] = balanced_assign(sums[rows])
    return [np.flatnonzero(labels == b).tolist() for b in range(blocks)]


def shared_view(layer: LayerPlan) -> LayerPlan:
    """The layer as the cost models see its shared form: no input Gather, no producer pruned, no
    output permutation where its filters follow the blocks of the component it produces."""
    return replace(layer, input_folds=True, producer_macs=0.0, output_sinks=layer.output_sinks or layer.shared_output)


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
    """[G, Ci, d*kh*kw]: the grouped kernel W[F_g, j] of every group g and input channel j
    (any number of kernel dimensions: Conv1d, 2d, 3d)."""
    members = np.asarray(groups)  # [G, d]
    g, d = members.shape
    co, ci = weight.shape[:2]
    flat = weight.reshape(co, ci, -1)
    return flat[members].astype(np.float64).transpose(0, 2, 1, 3).reshape(g, ci, -1)


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


def roughness(weight: np.ndarray) -> np.ndarray:
    """[Co, Ci] sum over neighbouring kernel positions (the 8-neighbourhood in 2-D, 2 in 1-D, 26 in
    3-D; each pair once) of |w_a^2 - w_b^2|; 0 for 1x1 kernels."""
    w2 = weight.astype(np.float64) ** 2
    total = np.zeros(weight.shape[:2])
    spatial = w2.shape[2:]
    for offset in itertools.product((-1, 0, 1), repeat=len(spatial)):
        if not any(offset) or offset[np.flatnonzero(offset)[0]] < 0:  # each pair once
            continue
        if any(abs(o) >= size for o, size in zip(offset, spatial)):
            continue
        a = w2[(..., *(slice(max(0, -o), size - max(0, o)) for o, size in zip(offset, spatial)))]
        b = w2[(..., *(slice(max(0, o), size - max(0, -o)) for o, size in zip(offset, spatial)))]
        total += np.abs(a - b).sum(axis=tuple(range(2, w2.ndim)))
    return total


def select(weight: np.ndarray, groups: list[list[int]], n: int, method: str = "leanflex",
           seed: int = 0) -> list[list[int]]:
    """The n kept input channels of every group, sorted."""
    if method not in ("tmi", "sr"):
        return keep_top(kernel_scores(weight, groups, method, seed), n)
    kernels = grouped_kernels(weight, groups)
    rough = roughness(weight)[np.asarray(groups)].sum(axis=1) if method == "sr" else None  # [G, Ci]
    kept = []
    for g in range(len(groups)):
        sim = 1.0 - cdist(kernels[g], kernels[g])
        sets = _tmi_greedy(sim, n, np.linalg.norm(kernels[g], axis=1)) if method == "tmi" \
            else _sr_beam(sim, n, rough[g])
        kept.append(np.flatnonzero(sets).tolist())
    return kept


def tmi_cost(sim: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """TMI-GKP's cost of each kept set (rows of the boolean `chosen` [B, C])."""
    chosen = chosen.astype(bool)
    weights = chosen.astype(np.float64)
    pairs = 0.5 * (np.einsum("bi,ij,bj->b", weights, sim, weights) - weights @ np.diag(sim))
    m = max(1, int(KEPT_SHARE * int(chosen[0].sum())))
    represented = np.empty(len(chosen))
    for b, kept in enumerate(chosen):  # per pruned kernel, its m largest similarities to kept ones
        to_kept = sim[np.ix_(~kept, kept)]
        represented[b] = -np.partition(-to_kept, m - 1, axis=1)[:, :m].sum() if to_kept.size else 0.0
    return pairs - BALANCER * represented


def _tmi_greedy(sim: np.ndarray, n: int, norms: np.ndarray) -> np.ndarray:
    channels = len(sim)
    starts = np.sort(np.argsort(-norms, kind="stable")[:TMI_STARTS])
    chosen = np.zeros((len(starts), channels), dtype=bool)
    chosen[np.arange(len(starts)), starts] = True
    total = sim[starts].copy()  # [S, C]: summed similarity of each kernel to the kept set
    for _ in range(n - 1):
        nxt = np.where(chosen, np.inf, total).argmin(axis=1)
        chosen[np.arange(len(starts)), nxt] = True
        total += sim[nxt]
    return chosen[int(np.argmin(tmi_cost(sim, chosen)))]


def _sr_beam(sim: np.ndarray, n: int, rough: np.ndarray) -> np.ndarray:
    channels = len(sim)
    chosen, pairs = np.zeros((1, channels), dtype=bool), np.zeros(1)
    for _ in range(n):
        score = np.where(chosen, np.inf, pairs[:, None] + chosen.astype(np.float64) @ sim)  # [B, C]
        order = np.lexsort((np.broadcast_to(rough, score.shape).ravel(), score.ravel()))
        beams, seen = [], set()
        for flat in order:
            b, j = divmod(int(flat), channels)
            if not np.isfinite(score[b, j]):
                break
            candidate = chosen[b].copy()
            candidate[j] = True
            key = np.packbits(candidate).tobytes()
            if key not in seen:
                seen.add(key)
                beams.append((candidate, score[b, j]))
                if len(beams) == SR_BEAM:
                    break
        chosen, pairs = np.stack([c for c, _ in beams]), np.array([p for _, p in beams])
    better = np.argsort(tmi_cost(sim, chosen), kind="stable")[:(len(chosen) + 1) // 2]
    return chosen[min(better, key=lambda b: chosen[b] @ rough)]


def keep_top(scores: np.ndarray, n: int) -> list[list[int]]:
    """The n best channels of each group, sorted ascending; ties go to the lower index."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    return np.sort(order, axis=1).tolist()


def retained_importance(weight: np.ndarray, groups: list[list[int]], kept: list[list[int]]) -> float:
    """Share of the layer's weight energy sum(W^2) held by the kept grouped kernels."""
    energy = kernel_energy(weight)
    total = energy.sum()
    if total == 0:
        return 1.0
    kept_energy = sum(energy[np.ix_(f, c)].sum() for f, c in zip(groups, kept))
    return float(kept_energy / total)


def _normalised(values: np.ndarray) -> np.ndarray:
    mean = values.mean(axis=1, keepdims=True)
    return values / np.where(mean > 0, mean, 1.0)
