"""The latency guard of `optimize --bench`: a pruned model that is not faster is worthless, so
latency is measured, and while the optimized model is slower than the input the pruned layers
the cost model rates slowest are reverted to dense."""

from __future__ import annotations

import logging
from typing import Callable

import onnx

from gkp_onnx.bench import Timing, bench
from gkp_onnx.options import OptimizeOptions
from gkp_onnx.plan import LayerPlan, Plan, SkippedLayer

log = logging.getLogger(__name__)
MAX_REVERT_ROUNDS = 4  # each round reverts the quarter of the pruned layers estimated slowest


def slower(latency: list) -> list:
    return [t for t in latency if t.model == "optimized" and t.speedup < 1]


def never_slower(given: onnx.ModelProto, optimized: onnx.ModelProto, plan: Plan, opts: OptimizeOptions,
                 rebuild: Callable[[Plan], onnx.ModelProto]) -> tuple[onnx.ModelProto, list[Timing]]:
    """Measure input (`given`) vs optimized; while slower, revert the pruned layers the cost model
    rates slowest (a quarter per round, `plan` edited) and `rebuild` from the plan. Returns the
    model kept and its latency."""
    def measure(candidate):
        return bench([given, candidate], names=["input", "optimized"], batches=opts.bench_batches,
                     providers=opts.bench_providers, threads=opts.bench_threads,
                     input_shapes=opts.input_shapes, repeats=opts.bench_repeats, min_time_s=opts.bench_min_time_s)

    latency = measure(optimized)
    for _ in range(MAX_REVERT_ROUNDS):
        if not slower(latency) or not plan.layers:
            break
        ranked = sorted(plan.layers, key=estimated_cost, reverse=True)
        worst = {layer.node for layer in ranked[:max(1, len(ranked) // 4)]}
        log.info("optimized model measured slower than the input: reverting %d layer(s) to dense", len(worst))
        plan.skipped += [SkippedLayer(layer.node, "Conv", "reverted to dense: the optimized model measured "
                                      "slower than the input") for layer in plan.layers if layer.node in worst]
        plan.layers = [layer for layer in plan.layers if layer.node not in worst]
        optimized = rebuild(plan)
        latency = measure(optimized)
    return optimized, latency


def estimated_cost(layer: LayerPlan) -> tuple[float, int]:
    """The cost model's relative time of the chosen form (then the group count, for replayed plans)."""
    cost = next((c.relative_cost for c in layer.candidates if c.group_count == layer.group_count), 0.0)
    return cost, layer.group_count or 0

