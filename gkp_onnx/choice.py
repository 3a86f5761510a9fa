"""The score of a group count G for one layer (choose_groups' objective, docs/algorithm.md):

    score(G) = R(G) - speed_weight * T(G)

R: the share of the layer's weight energy the kept kernels hold; T: the cost model's relative
time. `viable_group_counts` bounds R to skip the candidates that cannot win before they are
clustered; cluster and choose_groups share one GroupScore, so neither pass calls the other. The
selection of each candidate is kept (`kept`), so the winner's is not computed again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gkp_onnx.cost import AnalyticCpuCost, CostModel
from gkp_onnx.options import DEFAULT_SPEED_WEIGHT
from gkp_onnx.plan import Candidate, LayerPlan
from gkp_onnx.scoring import (max_retained_importance, retained_importance, select, shared_blocks, shared_groups,
                              shared_view)


@dataclass
class GroupScore:
    cost_model: CostModel = field(default_factory=AnalyticCpuCost)
    speed_weight: float = DEFAULT_SPEED_WEIGHT
    method: str = "leanflex"
    seed: int = 0
    kept: dict[tuple[str, int], list[list[int]]] = field(default_factory=dict, repr=False)  # (layer, G) -> last selection

    def evaluate(self, layer: LayerPlan, weight: np.ndarray, group_count: int,
                  groups: list[list[int]]) -> Candidate:
        kept = self.kept[layer.node, group_count] = select(weight, groups, layer.kept_per_group, self.method,
                                                           self.seed)
        retained = retained_importance(weight, groups, kept)
        cost = self.cost_model.relative_time(layer, group_count)
        return Candidate(group_count, retained, cost, retained - self.speed_weight * cost)

    def evaluate_shared(self, layer: LayerPlan, weight: np.ndarray) -> tuple[Candidate, list[list[int]]]:
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
        baseline = self.evaluate(layer, weight, 1, [list(range(layer.out_channels))]).score
        bound = max_retained_importance(weight, layer.kept_per_group)
        return [g for g in counts
                if g == 1 or bound - self.speed_weight * self.cost_model.relative_time(layer, g) >= baseline - 1e-9]
