"""What `gkp-onnx sweep` writes besides the models: one row per target, a Markdown table, a plot.

A row: the target speed-up, the speed-up the budget measured while allocating, the --bench
speed-up of the final (refit) model, MACs, the fidelity on the data the run validated on, and the
heads and neurons kept. The plot (matplotlib, the `plot` extra) is fidelity against measured
speed-up, with the input model at (1, 1).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from gkp_onnx.report import Report


def sweep_rows(reports: list[Report]) -> list[dict]:
    rows = []
    for report in reports:
        budget = report.structured_budget or {}
        bench = [t for t in (report.latency or []) if t.model != "input"]
        fidelity = report.fidelity
        rows.append({
            "target_speedup": budget.get("target_speedup"),
            "met": budget.get("met"),
            "budget_speedup": budget.get("speedup"),
            "bench_speedup": bench[0].speedup if bench else None,
            "bench": f"{bench[0].provider} batch {bench[0].batch}" if bench else None,
            "macs": report.after.macs / report.before.macs if report.before.macs else None,
            "cosine": fidelity.min_cosine if fidelity else None,
            "data": fidelity.data if fidelity else None,
            **_kept(report, "heads"), **_kept(report, "neurons"),
            "convs": len(report.plan.layers), "convs_of": len(report.plan.layer_ratios),  # CNNs: Convs pruned
        })
    return rows


def _kept(report: Report, kind: str) -> dict:
    """{kind: kept in the whole model, kind_of: in all the blocks found} (blocks left whole count too)."""
    blocks = report.heads if kind == "heads" else report.neurons
    total = report.structured_totals.get(kind, 0)
    return {kind: total - sum(block[kind] - block["kept"] for block in blocks), f"{kind}_of": total}


def sweep_table(rows: list[dict]) -> str:
    def number(value, text):
        return "-" if value is None else text.format(value)

    lines = ["| target | met | measured (budget) | measured (--bench) | MACs | min cosine | heads kept "
             "| neurons kept | Convs pruned |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        heads = f"{row['heads']} of {row['heads_of']}" if row["heads_of"] else "-"
        neurons = f"{row['neurons']} of {row['neurons_of']}" if row["neurons_of"] else "-"
        convs = f"{row['convs']} of {row['convs_of']}" if row.get("convs_of") else "-"
        lines.append(f"| {row['target_speedup']:g}x | {'yes' if row['met'] else 'no'} | "
                     f"{number(row['budget_speedup'], '{:.2f}x')} | {number(row['bench_speedup'], '{:.2f}x')} | "
                     f"{number(row['macs'], 'x{:.3f}')} | {number(row['cosine'], '{:.4f}')} | {heads} | {neurons} "
                     f"| {convs} |")
    data = next((row["data"] for row in rows if row["data"]), None)
    bench = next((row["bench"] for row in rows if row["bench"]), None)
    if data or bench:
        lines += ["", "Fidelity on " + (data or "-") + "; --bench on " + (bench or "-") + "."]
    return "\n".join(lines) + "\n"


def write_json(rows: list[dict], reports: list[Report], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps({"rows": rows, "reports": [r.to_dict() for r in reports]}, indent=1))


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plot(rows: list[dict], path: str | os.PathLike, title: str) -> None:
    """Fidelity (min cosine) against measured speed-up, the input at (1, 1); needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(row, row["bench_speedup"] or row["budget_speedup"], row["cosine"]) for row in rows
              if (row["bench_speedup"] or row["budget_speedup"]) and row["cosine"] is not None]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([1.0] + [x for _, x, _ in points], [1.0] + [y for _, _, y in points], "o-", label="gkp-onnx sweep")
    axes.annotate("input", (1.0, 1.0))
    for row, x, y in points:
        axes.annotate(f"target {row['target_speedup']:g}x", (x, y), fontsize=8)
    axes.set_xlabel("measured speed-up")
    axes.set_ylabel("min output cosine to the input model")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)
    plt.close(figure)
