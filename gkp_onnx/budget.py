"""The allocation both budgets share (passes/structured_budget.py for transformer blocks,
passes/conv_budget.py for Convs): options with measured damage, taken by least damage per MAC saved
until a MAC share, and measured rounds that rescale the share until the model times as fast as the
target asks."""

from __future__ import annotations

from typing import Callable

FIRST_GUESS = 1.25  # first MAC share tried: target ** -FIRST_GUESS (latency falls slower than MACs)
ROUNDS = 4


def measured_rounds(options: dict, target: float, total_macs: int, measure: Callable[[dict], float]
                    ) -> tuple[dict, dict]:
    """Allocate for a MAC share, measure, rescale the share by the miss; up to ROUNDS times.
    (the allocation kept: the least damaging that met `target`, else the fastest; the summary)."""
    rounds, share = [], target ** -FIRST_GUESS
    for _ in range(ROUNDS):
        allocation, saved, damage = allocate(options, total_macs * (1 - share))
        speedup = measure(allocation)
        rounds.append({"macs": 1 - saved / total_macs, "speedup": speedup, "damage": damage,
                       "allocation": allocation})
        deepest = all(len(levels) == 1 or allocation[kind][key] == levels[-1]["keep"]
                      for (kind, key), levels in options.items())
        if speedup >= target and (speedup < target * 1.05 or len(rounds) > 1) or deepest:
            break
        share *= speedup / target
    met = [r for r in rounds if r["speedup"] >= target]
    best = min(met, key=lambda r: r["damage"]) if met else max(rounds, key=lambda r: r["speedup"])
    summary = {"target_speedup": target, "speedup": best["speedup"], "macs": best["macs"],
               "met": bool(met), "rounds": [{k: r[k] for k in ("macs", "speedup", "damage")} for r in rounds],
               "damage": {f"{kind} {key}": {level["keep"]: level["damage"] for level in levels}
                          for (kind, key), levels in options.items()}}
    return best["allocation"], summary


def allocate(options: dict, needed: float) -> tuple[dict, int, float]:
    """Levels saving at least `needed` MACs (or all the deepest), the cheapest in damage per MAC
    first: ({kind: {key: keep}} for the options' (kind, key), e.g. {"heads": {block: keep},
    "neurons": {block: keep}}; MACs saved, summed damage)."""
    at = {key: 0 for key in options}

    def saved() -> int:
        return sum(options[key][i]["saved"] for key, i in at.items())

    while saved() < needed:
        best = None
        for key, levels in options.items():
            here = levels[at[key]]
            for j in range(at[key] + 1, len(levels)):
                gain = levels[j]["saved"] - here["saved"]
                if gain > 0:
                    cost = max(levels[j]["damage"] - here["damage"], 0.0) / gain
                    if best is None or cost < best[0]:
                        best = (cost, key, j)
        if best is None:
            break
        at[best[1]] = best[2]
    allocation = {"heads": {}, "neurons": {}}
    for (kind, key), i in at.items():
        allocation.setdefault(kind, {})[key] = options[(kind, key)][i]["keep"]
    return allocation, saved(), sum(options[key][i]["damage"] for key, i in at.items())
