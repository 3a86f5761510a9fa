"""choose_groups: pick each layer's group count G among the clustered candidates.

Before: every layer has `candidate_groups` (cluster).
After:  the model is unchanged; every layer has `group_count`, `groups` and `candidates` (the
        score of every G considered), and `kept_channels` when the winner is a free selection
        (the one its score was computed from).

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


import onnx
from onnx import numpy_helper

from gkp_onnx.choice import GroupScore
from gkp_onnx.graph import initializer_map
from gkp_onnx.pipeline import Pass, PassContractError, PassResult
from gkp_onnx.plan import Plan, SkippedLayer


class ChooseGroups(Pass):
    name = "choose_groups"
    in_place = False  # the model is left as given (a new one is returned, or the plan alone changes)

    def __init__(self, scorer: GroupScore, never_slower: bool = False):
        self.scorer = scorer
        self.never_slower = never_slower

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        if any(not layer.candidate_groups for layer in plan.layers):
            raise PassContractError("choose_groups needs the candidate groupings from cluster")

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        weights = initializer_map(model.graph)
        kept = []
        for layer in plan.layers:
            weight = numpy_helper.to_array(weights[layer.weight])
            layer.candidates = [self.scorer.evaluate(layer, weight, g, groups)
                                for g, groups in sorted(layer.candidate_groups.items())]
            shared_form = None
            if layer.shared_group_count and self.never_slower:
                candidate, shared_form = self.scorer.evaluate_shared(layer, weight)
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
            layer.kept_channels = None if chosen.shared else self.scorer.kept[layer.node, chosen.group_count]
            kept.append(layer)
        plan.layers = kept
        return PassResult(model, plan, modified=False)
