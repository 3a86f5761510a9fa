"""choose_groups: pick each layer's group count G among the clustered candidates.

Before: every layer has `candidate_groups` (cluster).
After:  the model is unchanged; every layer has `group_count`, `groups` and `candidates` (the
        score of every G considered).

Every candidate prunes the same MACs (the layer keeps n of Ci input channels whatever G is), so
the choice trades what the pruned layer keeps against what it costs to run:

    score(G) = R(G) - speed_weight * T(G)

R(G): retained importance, the share of the layer's weight energy sum(W^2) held by the kernels
      the selection method keeps with G groups (larger G = more freedom = more kept).
T(G): the cost model's estimate of the pruned layer's latency relative to the dense layer.
The highest score wins; a candidate within 1e-9 of it with a smaller G wins instead (the smaller
G is simpler and never slower; of equal G, the free selection). speed_weight = 0 picks the most accurate form; a large
speed_weight picks the fastest. With `never_slower` (the automatic choice), candidates the cost
model puts at or above the dense layer's time (T >= 1) are not considered, and a layer with no
other candidate stays dense (it moves to `plan.skipped`): a pruned layer must pay for itself.

A layer reading a channel space that partition_streams reordered (`shared_group_count`) has one
more candidate in the automatic choice, the shared form: G groups reading the space's blocks,
no Gather (its cost: `shared_view`), its R lower than a free selection's.

Candidates that cannot win are not clustered at all: whatever the grouping, each filter keeps n
of its Ci kernels, so R(G) <= R_max = share of energy in every filter's n strongest kernels, and
a G with R_max - speed_weight * T(G) below score(1) is dropped (`viable_group_counts`). The choice
is the same as with every candidate clustered; it only skips work (the big k-Means runs).

Cost models are pluggable: anything with `relative_time(layer, group_count) -> float`. The
default, `AnalyticCpuCost`, encodes onnxruntime-CPU measurements (see its docstring); a measured
per-provider model plugs in here.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import Candidate, LayerPlan, Plan, SkippedLayer
from gkp_onnx.passes.partition_streams import shared_blocks, shared_groups, shared_view
from gkp_onnx.passes.select_kernels import retained_importance, select

DEFAULT_SPEED_WEIGHT = 0.25


class CostModel(Protocol):
    def relative_time(self, layer: LayerPlan, group_count: int) -> float:
        """Estimated latency of the layer pruned with `group_count` groups / the dense layer."""


def gathers_left(layer: LayerPlan, group_count: int) -> tuple[bool, bool]:
    """(input Gather, output permutation) that fold_gathers leaves in front of / behind the layer."""
    return (not (layer.input_folds and group_count * layer.kept_per_group <= layer.in_channels),
            group_count > 1 and not layer.output_sinks)


class AnalyticCpuCost:
    """Gather + grouped Conv latency on onnxruntime CPU, relative to the dense Conv.

    T(G) = (n / Ci) / efficiency(Co / G) + moves(G)      (efficiency = 1 at G = 1: a plain narrower Conv)

    efficiency(c) is the fraction of the ideal speed-up a grouped Conv with c output channels per
    group reaches on onnxruntime CPU (measured on the 2-core reference machine, DESIGN.md):
    c >= 128: 0.96, 64: 0.88, 32: 0.85, 16: 0.59, 8: 0.35, 4: 0.14, interpolated in log2(c).

    `block` is onnxruntime's NCHWc channel block on this CPU (cost_model.nchwc_block_size: 16 with
    AVX512, 8 with AVX2; 1 = no NCHWc rule). A Conv reading c >= block channels costs as if c were
    rounded up to a multiple of the block (fewer: up to a multiple of half a block), so at G = 1
    the compute term is padded(n) / padded(Ci): 36 of 64 channels cost 48 (measured 0.78-0.83 of
    the dense time, n / Ci = 0.56), 12 of 16 cost 16 (measured 0.99-1.27). A grouped Conv runs in
    NCHWc only when n and Co / G are multiples of the block; otherwise it takes the plain NCHW
    path at SLOW_PATH times the efficiency (measured: G = 2, 36 of 64 channels: 1.03-1.11 of the
    dense time; G = 4: 1.15-1.70). The table's widths below 16 were measured on that path already.

    moves(G) is the time of the Gathers fold_gathers cannot remove, relative to the dense Conv:
    move_cost (multiply-adds one moved float costs) x floats moved per output pixel / (Ci*Co*kh*kw).
    onnxruntime runs Convs in its blocked NCHWc layout and a Gather cannot, so a Gather costs a
    reorder of its whole input, the copy and a reorder back: (Ci + 2*G*n) floats per input pixel
    (x the stride's pixels per output pixel) for the input Gather, unless it folds into the Conv
    producing the input (`layer.input_folds` and G*n <= Ci); 3*Co for an output permutation
    (G > 1), unless what reads the output absorbs it (`layer.output_sinks`). On a residual stream
    neither goes: a 1x1 Conv reading one pays more for its Gather than the pruning saves.

    Where the input Gather folds into the Conv producing the input (`layer.producer_macs`), that
    Conv computes only the G * n channels read: T is then the time of the pair relative to the
    dense pair, producer_macs / macs weighting the producer's output share padded(G * n) /
    padded(Ci). Without it a larger G looked nearly free (the layer's own term hardly moves), yet
    it keeps G times more of the producer: VGG-16 at ratio 0.75 chose G = 4 on the 512-wide
    layers and ran 2.15x faster than dense at batch 64, against 14.4x for plain filter pruning.
    move_cost = 25: a naive rewrite of ResNet-56 at G = 1 (every Conv behind a Gather) ran 1.43x
    faster than dense at batch 64 instead of 2.0x (DESIGN.md), i.e. ~25 multiply-adds per moved
    float; ResNet-50's larger, cache-missing tensors cost more (~90, profiled at batch 8), so the
    estimate errs on the fast side there.
    """

    WIDTHS = np.array([4, 8, 16, 32, 64, 128])
    EFFICIENCY = np.array([0.14, 0.35, 0.59, 0.85, 0.88, 0.96])
    SLOW_PATH = 0.5

    def __init__(self, move_cost: float = 25.0, block: int = 1):
        self.move_cost = move_cost
        self.block = block

    def efficiency(self, channels_per_group: float) -> float:
        return float(np.interp(np.log2(channels_per_group), np.log2(self.WIDTHS), self.EFFICIENCY))

    def padded(self, channels: int) -> float:
        """The channel count a Conv reading `channels` inputs costs as, in NCHWc blocks."""
        if self.block <= 1:
            return channels
        step = self.block if channels >= self.block else max(1, self.block // 2)
        return -(-channels // step) * step

    def relative_time(self, layer: LayerPlan, group_count: int) -> float:
        ci, co, n = layer.in_channels, layer.out_channels, layer.kept_per_group
        if group_count == 1:
            compute = self.padded(n) / self.padded(ci)
        else:
            width = co // group_count  # below a block the table already holds the NCHW path's efficiency
            aligned = self.block <= 1 or (n % self.block == 0 and (width < self.block or width % self.block == 0))
            compute = n / ci / (self.efficiency(width) * (1.0 if aligned else self.SLOW_PATH))
        return self.with_producer(layer, group_count, compute + self.moves(layer, group_count))

    def moves(self, layer: LayerPlan, group_count: int) -> float:
        """The time of the Gathers fold_gathers leaves, relative to the dense Conv."""
        ci, co, n = layer.in_channels, layer.out_channels, layer.kept_per_group
        gather_in, permute_out = gathers_left(layer, group_count)
        moved = 0.0
        if gather_in:
            moved += (ci + 2 * group_count * n) * int(np.prod(layer.conv_attrs.get("strides", [1])))
        if permute_out:
            moved += 3 * co
        return self.move_cost * moved / (ci * co * int(np.prod(layer.kernel_shape)))

    def with_producer(self, layer: LayerPlan, group_count: int, own: float) -> float:
        """`own` (the layer's relative time) paired with the Conv its input Gather folds into, which
        then computes G * n of its Ci outputs (all when the Gather stays): the pair's time relative
        to the dense pair. `own` as it is where no producer folds."""
        if not layer.producer_macs or not layer.macs:
            return own
        weight = layer.producer_macs / layer.macs
        folds = not gathers_left(layer, group_count)[0]
        outputs = self.padded(group_count * layer.kept_per_group) / self.padded(layer.in_channels) if folds else 1.0
        return (own + weight * outputs) / (1.0 + weight)


def max_retained_importance(weight: np.ndarray, kept_per_filter: int) -> float:
    """Upper bound of R(G) for any grouping: every filter keeps its n strongest kernels."""
    energy = (weight.astype(np.float64) ** 2).sum(axis=(2, 3))
    total = energy.sum()
    return 1.0 if total == 0 else float(-np.sort(-energy, axis=1)[:, :kept_per_filter].sum() / total)


class ChooseGroups(Pass):
    name = "choose_groups"

    def __init__(self, cost_model: CostModel | None = None, speed_weight: float = DEFAULT_SPEED_WEIGHT,
                 method: str = "leanflex", seed: int = 0, never_slower: bool = False):
        self.cost_model = cost_model or AnalyticCpuCost()
        self.never_slower = never_slower
        self.speed_weight = speed_weight
        self.method = method
        self.seed = seed

    def _evaluate(self, layer: LayerPlan, weight: np.ndarray, group_count: int,
                  groups: list[list[int]]) -> Candidate:
        kept = select(weight, groups, layer.kept_per_group, self.method, self.seed)
        retained = retained_importance(weight, groups, kept)
        cost = self.cost_model.relative_time(layer, group_count)
        return Candidate(group_count, retained, cost, retained - self.speed_weight * cost)

    def _evaluate_shared(self, layer: LayerPlan, weight: np.ndarray) -> tuple[Candidate, list[list[int]]]:
        """The shared form (partition_streams): the component's blocks as kept sets, no Gather;
        with its filter groups."""
        groups = shared_groups(layer, weight)
        retained = retained_importance(weight, groups, shared_blocks(layer))
        cost = self.cost_model.relative_time(shared_view(layer), layer.shared_group_count)
        score = retained - self.speed_weight * cost
        return Candidate(layer.shared_group_count, retained, cost, score, shared=True), groups

    def viable_group_counts(self, layer: LayerPlan, weight: np.ndarray, counts: list[int]) -> list[int]:
        """The counts whose best possible score reaches the score of G = 1 (others cannot win)."""
        if 1 not in counts or len(counts) == 1:
            return counts
        baseline = self._evaluate(layer, weight, 1, [list(range(layer.out_channels))]).score
        bound = max_retained_importance(weight, layer.kept_per_group)
        return [g for g in counts
                if g == 1 or bound - self.speed_weight * self.cost_model.relative_time(layer, g) >= baseline - 1e-9]

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        if any(not layer.candidate_groups for layer in plan.layers):
            raise PassContractError("choose_groups needs the candidate groupings from cluster")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        weights = {t.name: t for t in model.graph.initializer}
        kept = []
        for layer in plan.layers:
            weight = numpy_helper.to_array(weights[layer.weight])
            layer.candidates = [self._evaluate(layer, weight, g, groups)
                                for g, groups in sorted(layer.candidate_groups.items())]
            shared_form = None
            if layer.shared_group_count and self.never_slower:
                candidate, shared_form = self._evaluate_shared(layer, weight)
                layer.candidates.append(candidate)
            if not layer.candidates:
                raise PassContractError(f"choose_groups: no candidate for layer {layer.node}")
            pool = [c for c in layer.candidates if c.relative_cost < 1.0 or not self.never_slower]
            if not pool:
                fastest = min(c.relative_cost for c in layer.candidates)
                plan.skipped.append(SkippedLayer(layer.node, "Conv", f"kept dense: every group count is estimated "
                                                                     f"slower than the dense Conv (best {fastest:.2f}x its time)"))
                continue
            best = max(c.score for c in pool)
            chosen = min((c for c in pool if c.score >= best - 1e-9), key=lambda c: (c.group_count, c.shared))
            layer.group_count, layer.shared = chosen.group_count, chosen.shared
            layer.groups = shared_form if chosen.shared else layer.candidate_groups[chosen.group_count]
            kept.append(layer)
        plan.layers = kept
        return PassResult(model, plan, modified=False)
