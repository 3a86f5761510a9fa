"""structured_budget: how many attention heads and feed-forward neurons each block keeps, for a
target speed-up (--target-speedup X with --calib).

1. Options: per attention block, keeping HEAD_LEVELS of its key/value groups; per feed-forward
   block, NEURON_LEVELS of its neurons (multiples of structured.ROUND_TO). The MACs an option
   saves are exact: those of the block's MatMuls scale with the units kept.
2. Damage, measured at the model output on up to SAMPLES calibration samples: 1 - the lowest output
   cosine (a sentence embedding's pooled cosine: validate.output_kinds) to the dense model with that
   block alone at that level, its output rows compensated as
   greedy Optimal Brain Surgeon leaves them (gkp_onnx.structured.obs_path; the output bias absorbs
   the mean, as the refit's intercept will), every other block dense. The weights are inputs of
   one onnxruntime session: each option is one run.
3. Allocation: from all dense, repeatedly take the step (a block to a lower level) that adds the
   least damage per MAC saved, until the MACs saved reach the share the target asks for.
4. Measured, never assumed: `measure` times the model pruned so against the input; the MAC share
   is scaled by the miss and the allocation redone, up to ROUNDS times (gkp_onnx/budget.py, shared
   with conv_budget). The allocation kept is the least damaging one that met the target, else the
   fastest; the report says which and by how much.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.budget import measured_rounds
from gkp_onnx.graph import initializer_map, initializers_as_inputs, output_bias, weight_rows
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan
from gkp_onnx.structured import kept_neurons, kept_units, obs_path
from gkp_onnx.validate import Dataset, fidelity, make_session, output_kinds, run_model, whole_batches

HEAD_LEVELS = (0.875, 0.75, 0.625, 0.5, 0.25)  # shares of a block's key/value groups an allocation may keep
NEURON_LEVELS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)  # shares of a block's neurons
SAMPLES = 64


class StructuredBudget(Pass):
    name = "structured_budget"
    in_place = False  # measures; the model is not edited

    def __init__(self, target: float, data: Dataset, covariances: dict, blocks: list, regions: list,
                 macs: dict[str, int | None], total_macs: int, measure: Callable[[dict], float],
                 levels: dict | None = None):
        self.target = target
        self.data = data
        self.covariances = covariances  # tensor -> (mean, covariance) of its channels
        self.blocks = blocks  # prune_heads.AttentionBlock
        self.regions = regions  # prune_neurons.ffn_regions: (tensor, Region)
        self.macs = macs  # node -> MACs of the model as given
        self.total_macs = total_macs
        self.measure = measure  # {"heads": {...}, "neurons": {...}} -> measured speed-up
        self.levels = levels  # the options measured before on this model (a sweep measures them once)

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        options = self.levels if self.levels is not None else self._options(model)
        allocation, summary = measured_rounds(options, self.target, self.total_macs, self.measure)
        return PassResult(model, plan, modified=False, details={"allocation": allocation,
                                                                "structured_budget": summary, "levels": options})

    def _options(self, model: onnx.ModelProto) -> dict[tuple[str, str], list[dict]]:
        """(kind, block) -> its levels, all dense first: {"keep", "saved" MACs, "damage"}."""
        initializers = initializer_map(model.graph)
        candidates = []  # (kind, key, covariance tensor, consumers, unit, units, kept counts, nodes whose MACs scale)
        for block in self.blocks:
            counted = list(dict.fromkeys([block.query.name, block.key.name, block.value.name, block.output.name,
                                          *block.core]))  # a fused Q/K/V projection once
            keeps = sorted({kept_units(block.units, 1 - f) for f in HEAD_LEVELS} - {block.units}, reverse=True)
            candidates.append(("heads", block.output.name, block.output.input[0], [block.output],
                               block.heads * block.value_width // block.units, block.units, keeps, counted))
        for tensor, region in self.regions:
            consumers = [c for c, _ in region.consumers]
            width = weight_rows(consumers[0], initializers)[0].shape[0]
            keeps = sorted({kept_neurons(width, 1 - f) for f in NEURON_LEVELS} - {width}, reverse=True)
            counted = [n.name for n, _ in region.sources] + [c.name for c in consumers]
            candidates.append(("neurons", tensor, tensor, consumers, 1, width, keeps, counted))
        weights = sorted({name for c in candidates for node in c[3]
                          for name in (node.input[1], output_bias(model, node, initializers)) if name})
        session = make_session(initializers_as_inputs(model, weights))
        names = [o.name for o in session.get_outputs()]
        sample = self.data.first(whole_batches(session, SAMPLES))
        dense = {name: numpy_helper.to_array(initializers[name]) for name in weights}
        reference = run_model(session, sample, dense)
        kinds = output_kinds(model)  # a sentence embedding's damage: its pooled cosine
        options = {}
        for kind, key, tensor, consumers, unit, units, keeps, nodes in candidates:
            levels = [{"keep": units, "saved": 0, "damage": 0.0}]
            if tensor not in self.covariances or not keeps:
                options[(kind, key)] = levels
                continue
            mean, covariance = self.covariances[tensor]
            fed = [weight_rows(node, initializers) for node in consumers]
            biases = [output_bias(model, node, initializers) for node in consumers]  # scans the graph: once
            rows = np.concatenate([r for r, _ in fed], axis=1)
            macs = sum(self.macs.get(n) or 0 for n in nodes)
            for keep, (_, compensated) in sorted(obs_path(covariance, rows, keeps, unit).items(), reverse=True):
                feed, start = dict(dense), 0
                for node, (part, restore), bias in zip(consumers, fed, biases):
                    new = compensated[:, start:start + part.shape[1]]
                    feed[node.input[1]] = restore(new)
                    if bias:  # the intercept: the mean the removed and changed rows contributed
                        feed[bias] = (dense[bias] + (mean @ (part - new)).reshape(dense[bias].shape)
                                      ).astype(dense[bias].dtype)
                    start += part.shape[1]
                measured = fidelity(reference, run_model(session, sample, feed), names, sample, kinds)
                cosine = min(o.pooled_cosine if o.pooled_cosine is not None else o.cosine for o in measured.outputs)
                levels.append({"keep": keep, "saved": int(round(macs * (1 - keep / units))),
                               "damage": max(0.0, 1.0 - cosine)})
            options[(kind, key)] = levels
        return options
