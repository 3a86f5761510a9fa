"""The optimize report: a before/after table for people and the same as JSON for tools."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gkp_onnx.bench import timings_to_dict
from gkp_onnx.graph import ModelStats
from gkp_onnx.nm import NmResult
from gkp_onnx.plan import Plan
from gkp_onnx.validate import Fidelity


NM_NOTE = ("N:M sparsity changes weight values only: dense runtimes (onnxruntime CPU/CUDA) run the same "
           "MACs at the same speed; the speed-up needs TensorRT with sparse weights enabled "
           "(trtexec --sparsity=enable) and shows on large fp16/int8 layers only.")


BROKEN_COSINE, BROKEN_AGREEMENT = 0.9, 0.5  # below either, a model is likely broken for use


@dataclass
class Report:
    source: str
    plan: Plan
    before: ModelStats
    after: ModelStats
    fidelity: Fidelity | None = None
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    nm: NmResult | None = None
    latency: list | None = None  # bench.Timing rows: input vs optimized
    reconstruction: dict[str, tuple[float, float]] | None = None  # layer -> output MSE before/after refit
    input_notes: list[str] = field(default_factory=list)  # what loading changed or assumed (canonical form, shapes)
    notes: list[str] = field(default_factory=list)  # what an option found nothing to do on
    neurons: list[dict] = field(default_factory=list)  # prune_neurons: per feed-forward block, neurons and kept
    heads: list[dict] = field(default_factory=list)  # prune_heads: per attention block, heads and kept
    heads_skipped: list[tuple[str, str]] = field(default_factory=list)  # (output projection, why left whole)
    structured_budget: dict | None = None  # --target-speedup: the target, what was measured, the damage table
    structured_totals: dict = field(default_factory=dict)  # heads / neurons in all the blocks found (pruned or not)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def warnings(self) -> list[str]:
        """A verdict on fidelity far below what a usable model keeps (thresholds aside)."""
        f = self.fidelity
        if f is None or not f.outputs:
            return []
        agreement = f.top1_agreement
        if f.min_cosine >= BROKEN_COSINE and (agreement is None or agreement >= BROKEN_AGREEMENT):
            return []
        measured = f"cosine {f.min_cosine:.3f}" + (f", top-1 agreement {100 * agreement:.1f}%" if agreement is not None else "")
        advice = "measure it on real inputs with --calib and repair it with --reconstruct" if f.data == "random" \
            else "repair it with --reconstruct, or prune less (a lower --ratio)"
        return [f"the optimized model's outputs are far from the input's on {f.data} inputs ({measured}): "
                f"it is likely broken for use; {advice}"]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "notes": self.input_notes + self.notes + ([NM_NOTE] if self.nm is not None else []),
            "ratio": self.plan.ratio,
            "method": self.plan.method,
            "seed": self.plan.seed,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "layers": [
                {"node": layer.node, "out_channels": layer.out_channels, "in_channels": layer.in_channels,
                 "kernel_shape": layer.kernel_shape, "group_count": layer.group_count, "shared": layer.shared,
                 "kept_per_group": layer.kept_per_group, "macs_before": layer.macs,
                 "macs_after": layer.pruned_macs, "retained_importance": layer.retained_importance}
                for layer in self.plan.layers],
            "skipped": [{"node": s.node, "reason": s.reason} for s in self.plan.skipped],
            "fidelity": self.fidelity.to_dict() if self.fidelity else None,
            "passed": self.passed,
            "failures": self.failures,
            "warnings": self.warnings,
            "timings_s": self.timings,
            "plan": self.plan.to_dict(),
            "latency": None if self.latency is None else timings_to_dict(self.latency),
            "reconstruction": None if self.reconstruction is None else {
                node: {"mse_before": before, "mse_after": after} for node, (before, after) in self.reconstruction.items()},
            "nm": None if self.nm is None else {
                "pattern": f"{self.nm.n}:{self.nm.m}", "layers": [asdict(layer) for layer in self.nm.layers],
                "skipped": [{"node": node, "reason": reason} for node, reason in self.nm.skipped],
                "eligible_mac_share": self.nm.eligible_mac_share, "budget": self.nm.budget, "note": NM_NOTE},
            "neurons": self.neurons,
            "heads": self.heads,
            "heads_skipped": [{"node": node, "reason": reason} for node, reason in self.heads_skipped],
            "structured_budget": self.structured_budget,
            "structured_totals": self.structured_totals,
        }

    def _structured_flag(self, ratio_flag: str) -> str:
        return " (--target-speedup: per block)" if self.structured_budget and not self.plan.layer_ratios \
            else f" ({ratio_flag})"

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON report atomically."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=".gkp-report-", dir=path.resolve().parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_dict(), handle, indent=1)
        os.replace(tmp, path)

    def table(self, max_layers: int = 200) -> str:
        ratio = "per layer (--target-speedup)" if self.plan.layer_ratios else f"{self.plan.ratio:g}"
        lines = [f"gkp-onnx optimize  {self.source}  ratio {ratio}  method {self.plan.method}  "
                 f"seed {self.plan.seed}"] + [f"input: {note}" for note in self.input_notes] \
            + [f"note: {note}" for note in self.notes] + [""]
        if self.plan.layers:
            width = max([len(layer.node) for layer in self.plan.layers] + [5])
            damage = (self.structured_budget or {}).get("damage", {}) if self.plan.layer_ratios else {}
            lines.append(f"{'layer':<{width}}  {'Co':>5} {'Ci':>5} {'kernel':>6} {'G':>4} {'n':>5} "
                         f"{'MACs':>9} {'-> MACs':>9} {'kept W^2':>8}" + ("  ratio   damage" if damage else ""))
            for layer in self.plan.layers[:max_layers]:
                kernel = "x".join(map(str, layer.kernel_shape))
                retained = f"{layer.retained_importance:.3f}" if layer.retained_importance is not None else "-"
                groups = f"{layer.group_count}{'s' if layer.shared else ''}"
                chosen = ""
                if damage:  # the budget's ratio for the layer and the damage measured at it
                    ratio = self.plan.layer_ratios.get(layer.node, 0.0)
                    measured = damage.get(f"convs {layer.node}", {}).get(ratio)
                    chosen = f"  {ratio:>5g} " + (f"{measured:>8.2g}" if measured is not None else f"{'-':>8}")
                lines.append(f"{layer.node:<{width}}  {layer.out_channels:>5} {layer.in_channels:>5} {kernel:>6} "
                             f"{groups:>4} {layer.kept_per_group:>5} {_si(layer.macs):>9} "
                             f"{_si(layer.pruned_macs):>9} {retained:>8}{chosen}")
            if len(self.plan.layers) > max_layers:
                lines.append(f"... {len(self.plan.layers) - max_layers} more layers (see --report)")
            if any(layer.shared for layer in self.plan.layers):
                lines.append(f"Gs: the shared form: the {len(self.plan.permutations)} reordered residual stream(s) / "
                             f"fan-out(s) read block by block, no Gather")
        for skipped in self.plan.skipped:
            lines.append(f"skipped {skipped.node}: {skipped.reason}")
        if self.neurons:
            kept = sorted({(block["kept"], block["neurons"]) for block in self.neurons})
            verb = "blocks keep" if len(self.neurons) > 1 else "block keeps"
            lines.append(f"feed-forward neurons: {len(self.neurons)} {verb} "
                         + ", ".join(f"{k} of {n}" for k, n in kept) + self._structured_flag("--ffn-ratio"))
        if self.heads:
            kept = sorted({(block["kept"], block["heads"]) for block in self.heads})
            verb = "blocks keep" if len(self.heads) > 1 else "block keeps"
            lines.append(f"attention heads: {len(self.heads)} {verb} "
                         + ", ".join(f"{k} of {n}" for k, n in kept) + self._structured_flag("--head-ratio"))
        for node, reason in self.heads_skipped:
            lines.append(f"attention heads kept in {node}: {reason}")
        if self.structured_budget:
            budget = self.structured_budget
            verdict = "met" if budget["met"] else "MISSED (the fastest allocation tried is kept)"
            lines.append(f"--target-speedup {budget['target_speedup']:g}: measured {budget['speedup']:.2f}x at MACs "
                         f"x{budget['macs']:.3f}, {verdict}; {len(budget['rounds'])} measured allocation(s)")
        if self.nm is not None:
            lines += self._nm_table()
        lines += ["", f"{'':<12} {'before':>12} {'after':>12} {'after/before':>13}"]
        rows = [("params", self.before.params, self.after.params), ("MACs", self.before.macs, self.after.macs)]
        rows += [(f"{op} nodes", self.before.op_counts.get(op, 0), self.after.op_counts.get(op, 0))
                 for op in ("Conv", "Gather")]
        for label, before, after in rows:
            ratio = f"{after / before:.3f}" if before else "-"
            lines.append(f"{label:<12} {before:>12,} {after:>12,} {ratio:>13}")
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        if self.reconstruction:
            before = sum(b for b, _ in self.reconstruction.values())
            after = sum(a for _, a in self.reconstruction.values())
            lines.append(f"reconstruction: summed layer-output MSE on the calibration data {before:.4g} -> {after:.4g} "
                         f"({len(self.reconstruction)} layers refit)")
        if self.fidelity:
            lines.append("fidelity: " + self.fidelity.summary())
        lines += [f"warning: {warning}" for warning in self.warnings]
        if self.latency:
            from gkp_onnx.bench import format_timings
            lines += ["latency (onnxruntime, interleaved medians):", format_timings(self.latency)]
        lines.append("PASSED" if self.passed else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


    def _nm_table(self) -> list[str]:
        nm = self.nm
        width = max([len(layer.node) for layer in nm.layers] + [5])
        lines = ["", f"N:M {nm.n}:{nm.m} sparsity (reduction axis)",
                 f"{'layer':<{width}}  {'op':<6} {'weight':<14} {'axis':>4} {'kept |w|':>9} "
                 f"{'(plain)':>8} {'permuted':>8}  {'damage':>7}  score"]
        for layer in nm.layers:
            shape = "[" + ",".join(map(str, layer.shape)) + "]"
            damage = "-" if layer.damage is None else f"{layer.damage:.1e}"
            lines.append(f"{layer.node:<{width}}  {layer.op:<6} {shape:<14} {layer.axis:>4} "
                         f"{layer.kept_magnitude:>9.4f} {layer.kept_magnitude_plain:>8.4f} "
                         f"{'yes' if layer.permuted else 'no':>8}  {damage:>7}  {layer.score}")
        damage = nm.budget["damage"] if nm.budget else {}
        for node, reason in nm.skipped:
            lines.append(f"skipped {node}: {reason}" + (f", damage {damage[node]:.1e}" if node in damage else ""))
        lines.append(f"MatMul/Gemm MACs now {nm.n}:{nm.m}-sparse: {100 * nm.eligible_mac_share:.1f}%")
        if nm.budget:
            budget = nm.budget
            lines.append(f"fidelity budget: cosine >= {budget['min_cosine']:g} on {budget['samples']} samples "
                         f"({budget['data']}): {budget['sparse_layers']} of {budget['candidates']} layers kept "
                         f"{nm.n}:{nm.m}, cosine {budget['cosine']:.6f} (damage: the cosine regained by keeping the layer "
                         f"alone dense)")
        lines.append("note: " + NM_NOTE)
        return lines


def _si(value: float | None) -> str:
    if value is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(int(value))
