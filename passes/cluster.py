"""cluster: split each prunable Conv's filters into G equal-size groups of similar filters.

Before: `plan.layers` from analyze.
After:  the model is unchanged; every layer has `candidate_groups[G]` for each candidate group
        count G: G lists of d = Co / G filter indices, sorted, each filter in exactly one group.

Balanced k-Means++ (LeanFlex-GKP): scikit-learn KMeans(init="k-means++") on the flattened filters
W[f] in R^(Ci*kh*kw) gives G centroids; an exact equal-size assignment then solves
    min sum_f ||W[f] - c_{g(f)}||^2   subject to |{f : g(f) = g}| = d for every g
as a linear assignment of filters to G*d centroid slots (scipy linear_sum_assignment). Centroids
are re-estimated from the balanced groups and the assignment repeated a few times (balanced
Lloyd steps). Deterministic for a given seed.

Results are cached on disk (gkp_onnx.cache, under clusters/) keyed by the filters' bytes, G, the
seed and the library versions: the clustering does not depend on the pruning ratio, so trying
another ratio on the same model skips it.

With method "sr" (SR-GKP) the groups are not clustered: filters sorted by roughness
(select_kernels.roughness summed over the filter) are dealt to the groups in snake order
(0, 1, .., G-1, G-1, .., 0, 0, 1, ..), so every group mixes smooth and rough filters.

Candidate group counts are the divisors G of Co with Co / G >= `min_group_width` (output
channels per group: below ~16 grouped convolutions run far from their ideal speed), or the one
G the user forced with --groups; the choice pass may drop candidates it can prove it would not
pick (`viable`), so they are never clustered.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.exceptions import ConvergenceWarning
import sklearn
from sklearn.cluster import KMeans

from gkp_onnx.cache import write_atomic
from gkp_onnx.errors import GkpError
from gkp_onnx.graph import initializer_map
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import LayerPlan, Plan
from gkp_onnx.scoring import roughness

BALANCED_LLOYD_STEPS = 3


def candidate_group_counts(layer: LayerPlan, min_group_width: int, forced: int | None = None) -> list[int]:
    co = layer.out_channels
    if forced is not None:
        if forced < 1 or co % forced:
            raise GkpError(f"--groups {forced} does not divide layer '{layer.node}' "
                           f"({co} output channels)")
        return [forced]
    return [g for g in range(1, co + 1) if co % g == 0 and (co // g >= min_group_width or g == 1)]


def balanced_kmeans(filters: np.ndarray, group_count: int, seed: int = 0) -> list[list[int]]:
    """Equal-size groups of similar rows of `filters` [Co, D]; groups ordered by first member."""
    co = filters.shape[0]
    if co % group_count:
        raise ValueError(f"{group_count} groups do not divide {co} filters")
    size = co // group_count
    if group_count == 1:
        return [list(range(co))]
    if group_count == co:
        return [[f] for f in range(co)]
    data = filters.astype(np.float64).reshape(co, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate filters: fewer distinct centres
        centers = KMeans(n_clusters=group_count, init="k-means++", n_init=1,
                         random_state=seed).fit(data).cluster_centers_
    labels = None
    for _ in range(BALANCED_LLOYD_STEPS):
        slot_cost = np.repeat(cdist(data, centers, "sqeuclidean"), size, axis=1)  # [Co, G*d]
        _, slots = linear_sum_assignment(slot_cost)
        new_labels = slots // size
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centers = np.stack([data[labels == g].mean(axis=0) for g in range(group_count)])
    groups = [np.flatnonzero(labels == g).tolist() for g in range(group_count)]
    return sorted(groups, key=lambda members: members[0])


def snake_groups(weight: np.ndarray, group_count: int) -> list[list[int]]:
    """SR-GKP's grouping: filters by ascending roughness, dealt to the groups in snake order."""
    order = np.argsort(roughness(weight).sum(axis=1), kind="stable")
    position = np.arange(len(order))
    lap, seat = np.divmod(position, group_count)
    label = np.where(lap % 2 == 0, seat, group_count - 1 - seat)
    groups = [sorted(order[label == g].tolist()) for g in range(group_count)]
    return sorted(groups, key=lambda members: members[0])


def cached_balanced_kmeans(filters: np.ndarray, group_count: int, seed: int, cache: Path | None) -> list[list[int]]:
    """balanced_kmeans, looked up in / stored to `cache` (None: no cache)."""
    if cache is None or group_count in (1, filters.shape[0]):
        return balanced_kmeans(filters, group_count, seed)
    data = np.ascontiguousarray(filters)
    tag = f"{data.shape}|{data.dtype}|G{group_count}|seed{seed}|steps{BALANCED_LLOYD_STEPS}|sklearn{sklearn.__version__}"
    # Raw little-endian int32 labels, not .npy: np.load parses its header with ast, and CPython 3.11's
    # compile() can fail with "AST constructor recursion depth mismatch" when threads call it at once.
    path = cache / "clusters" / f"{hashlib.sha1(data.tobytes() + tag.encode()).hexdigest()}.i32"
    try:
        labels = np.frombuffer(path.read_bytes(), dtype="<i4")
        if labels.shape == (data.shape[0],) and (np.bincount(labels, minlength=group_count)
                                                 == data.shape[0] // group_count).all():
            return [np.flatnonzero(labels == g).tolist() for g in range(group_count)]
    except (OSError, ValueError):
        pass
    groups = balanced_kmeans(filters, group_count, seed)
    labels = np.empty(data.shape[0], dtype="<i4")
    for g, members in enumerate(groups):
        labels[members] = g
    write_atomic(path, labels.tobytes())
    return groups


class ClusterFilters(Pass):
    name = "cluster"
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

    def __init__(self, min_group_width: int = 8, forced_groups: int | None = None, seed: int = 0,
                 viable: Callable[[LayerPlan, np.ndarray, list[int]], list[int]] | None = None,
                 cache: Path | None = None, method: str = "leanflex"):
        """`viable(layer, weight, counts)` may drop candidates that cannot be chosen (saves clustering);
        `cache`: directory of cached clusterings (None: always compute); `method` "sr": snake groups."""
        self.min_group_width = min_group_width
        self.forced_groups = forced_groups
        self.seed = seed
        self.viable = viable
        self.cache = cache
        self.method = method

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        if not plan.layers:
            raise PassContractError("cluster needs the layers found by analyze")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        weights = initializer_map(model.graph)
        jobs = []  # (layer, G, weight): one grouping each
        for layer in plan.layers:
            weight = numpy_helper.to_array(weights[layer.weight])
            counts = candidate_group_counts(layer, self.min_group_width, self.forced_groups)
            if self.viable is not None:
                counts = self.viable(layer, weight, counts)
            jobs += [(layer, g, weight) for g in counts]
            layer.candidate_groups = {}

        def group(job) -> list[list[int]]:
            layer, g, weight = job
            if self.method == "sr":
                return snake_groups(weight, g)
            return cached_balanced_kmeans(weight.reshape(layer.out_channels, -1), g, self.seed, self.cache)

        # scipy's linear_sum_assignment, nearly all of the time on wide layers, releases the GIL
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1) or 1) as pool:
            for (layer, g, _), groups in zip(jobs, pool.map(group, jobs)):
                layer.candidate_groups[g] = groups
        return PassResult(model, plan, modified=False)

    def ensures(self, model: onnx.ModelProto, plan: Plan) -> None:
        for layer in plan.layers:
            for g, groups in layer.candidate_groups.items():
                members = sorted(f for group in groups for f in group)
                if len(groups) != g or members != list(range(layer.out_channels)) \
                        or len({len(group) for group in groups}) != 1:
                    raise PassContractError(f"cluster: layer {layer.node} G={g} is not a balanced partition")
