"""Structured transformer pruning: feed-forward neurons and attention heads removed, speed and fidelity.

    python benchmarks/transformer_pruning.py

The real all-MiniLM-L6-v2 (../shared/data/minilm-l6-v2), calibration rows 0-255 of tokens.npz,
`--reconstruct`:
- uniform shapes: `--ffn-ratio R`, `--head-ratio R`;
- `gkp-onnx sweep --targets 1.1,1.2,1.3,1.5,2` (api.sweep: one damage analysis, per block heads and
  neurons for each --target-speedup, measured while allocating).
All models and the dense one are timed side by side in one process (interleaved runs, medians) on
onnxruntime CPU at batch 1 x 128 and 32 x 128 tokens; the pooled sentence embedding (masked mean of
last_hidden_state, L2-normalised) is compared with the dense model's on 512 held-out sentences
(rows 1000-1511): cosine mean / worst and nearest-neighbour agreement. The tiny Llama (real
weights): next-token top-1 agreement and perplexity on text the dense model generated. Writes
benchmarks/results/transformers.json, .md and .png (matplotlib).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gkp_onnx import optimize
from gkp_onnx.api import sweep
from gkp_onnx.sweep_report import sweep_rows
from gkp_onnx.validate import make_session
from nm_sparsity import LLAMA, MINILM, RESULTS, SEQ, generate, next_token_metrics, sentence_embeddings

UNIFORM = [("ffn_ratio", 0.25), ("ffn_ratio", 0.5), ("head_ratio", 0.25), ("head_ratio", 0.5)]
TARGETS = [1.1, 1.2, 1.3, 1.5, 2.0]
LLAMA_TARGETS = [1.1, 1.3]


WARMUP = 5


def latencies(sessions: list[ort.InferenceSession], feed: dict, rounds: int) -> tuple[list[float], list[float]]:
    """Per session: the median seconds per run, and the median over rounds of the first session's
    time / this one's (the sessions interleaved round by round, so a change in the machine's load
    hits both sides of each ratio)."""
    times = np.zeros((len(sessions), rounds))
    for session in sessions:
        for _ in range(WARMUP):
            session.run(None, feed)
    for r in range(rounds):
        for i, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, feed)
            times[i, r] = time.perf_counter() - start
    return list(np.median(times, axis=1)), list(np.median(times[0] / times, axis=1))


def kept(report) -> dict:
    """Heads and neurons kept in the whole model, of how many."""
    row = sweep_rows([report])[0]
    return {kind: f"{row[kind]} of {row[kind + '_of']}" if row[kind + "_of"] else "all"
            for kind in ("heads", "neurons")}


def minilm() -> list[dict]:
    model = MINILM / "all-MiniLM-L6-v2.onnx"
    tokens = dict(np.load(MINILM / "tokens.npz"))
    held_out = {k: v[1000:1512] for k, v in tokens.items()}
    reference = sentence_embeddings(str(model), held_out)
    neighbours = np.argsort(-(reference @ reference.T), 1)[:, 1]
    rows, sessions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        calib = str(Path(tmp) / "calib.npz")
        np.savez(calib, **{k: v[:256] for k, v in tokens.items()})
        results = []
        for name, value in UNIFORM:
            start = time.perf_counter()
            out, report = optimize(str(model), gkp=False, calib=calib, reconstruct=True, validate=False,
                                   **{name: value})
            results.append((f"--{name.replace('_', '-')} {value:g}", out, report, time.perf_counter() - start))
        start = time.perf_counter()
        family = sweep(str(model), TARGETS, gkp=False, calib=calib, reconstruct=True, validate=False)
        seconds = (time.perf_counter() - start) / len(TARGETS)
        results += [(f"--target-speedup {report.structured_budget['target_speedup']:g}", out, report, seconds)
                    for out, report in family]
        for variant, out, report, seconds in results:
            pooled = sentence_embeddings(out, held_out)
            cosine = (pooled * reference).sum(1)
            budget = report.structured_budget
            rows.append({"variant": variant, **kept(report), "macs": report.after.macs / report.before.macs,
                         "cosine_mean": float(cosine.mean()), "cosine_worst": float(cosine.min()),
                         "neighbour_agreement": float((np.argsort(-(pooled @ pooled.T), 1)[:, 1] == neighbours).mean()),
                         "optimize_seconds": seconds, "budget_speedup": budget["speedup"] if budget else None})
            sessions.append(make_session(out, spinning=False))  # idle threads must not steal the others' cores
    dense = make_session(str(model), spinning=False)
    for batch, rounds in ((1, 60), (32, 8)):
        feed = {"input_ids": np.full((batch, 128), 1000, np.int64), "attention_mask": np.ones((batch, 128), np.int64),
                "token_type_ids": np.zeros((batch, 128), np.int64)}
        times, speedups = latencies([dense] + sessions, feed, rounds)
        for row, speedup in zip(rows, speedups[1:]):
            row[f"speedup_b{batch}"] = speedup
            row[f"dense_ms_b{batch}"] = 1e3 * times[0]
    return rows


def tiny_llama() -> list[dict]:
    """The tiny Llama: uniform --ffn-ratio / --head-ratio and --target-speedup; next-token top-1
    agreement and perplexity on text the dense model generated, calibration on other such text."""
    model = LLAMA / "aidreams260K_derived.onnx"
    if not model.exists():
        return []
    dense = make_session(str(model), spinning=False)
    evaluation = np.array([generate(dense, t) for t in (100, 200, 300, 400)])
    calibration = np.array([generate(dense, t) for t in (150, 250, 350, 450)])
    dense_logits = dense.run(None, {"input_ids": evaluation})[0]
    rows, sessions = [], []
    shapes = {"input_ids": [4, SEQ]}  # what the speed-up is measured at, as in the evaluation below
    with tempfile.TemporaryDirectory() as tmp:
        calib = str(Path(tmp) / "calib.npz")
        np.savez(calib, input_ids=calibration)
        results = [(f"--{name.replace('_', '-')} {value:g}",
                    *optimize(str(model), gkp=False, calib=calib, reconstruct=True, validate=False,
                              input_shapes=shapes, **{name: value}))
                   for name, value in [("ffn_ratio", 0.25), ("ffn_ratio", 0.5), ("head_ratio", 0.5)]]
        results += [(f"--target-speedup {report.structured_budget['target_speedup']:g}", out, report)
                    for out, report in sweep(str(model), LLAMA_TARGETS, gkp=False, calib=calib, reconstruct=True,
                                             validate=False, input_shapes=shapes)]
        for variant, out, report in results:
            session = make_session(out, spinning=False)
            sessions.append(session)
            rows.append({"variant": variant, **kept(report), "macs": report.after.macs / report.before.macs,
                         "evaluation_tokens": int(evaluation.size),
                         "budget_speedup": report.structured_budget["speedup"] if report.structured_budget else None,
                         **next_token_metrics(session, evaluation, dense_logits)})
    _, speedups = latencies([dense] + sessions, {"input_ids": evaluation}, 50)
    for row, speedup in zip(rows, speedups[1:]):
        row["speedup"] = speedup
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    for prefix, style, label in (("--target-speedup", "o-", "--target-speedup (per block)"),
                                 ("--ffn-ratio", "s--", "--ffn-ratio (uniform)"),
                                 ("--head-ratio", "^--", "--head-ratio (uniform)")):
        chosen = [r for r in rows if r["variant"].startswith(prefix)]
        axes.plot([1.0] + [r["speedup_b1"] for r in chosen], [1.0] + [r["cosine_mean"] for r in chosen], style,
                  label=label)
    axes.set_xlabel("measured speed-up, onnxruntime CPU, 1 x 128 tokens")
    axes.set_ylabel("pooled-embedding cosine (mean, held out)")
    axes.set_title("all-MiniLM-L6-v2: structured pruning", fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main() -> None:
    if not (MINILM / "all-MiniLM-L6-v2.onnx").exists():
        raise SystemExit(f"{MINILM} not found (see ../shared/data/minilm-l6-v2/SOURCE.md)")
    rows = minilm()
    llama = tiny_llama()
    lines = ["# Transformers: attention heads and feed-forward neurons removed (all-MiniLM-L6-v2)", "",
             "`--calib` (256 sentences) `--reconstruct`; uniform `--ffn-ratio` / `--head-ratio`, and `gkp-onnx sweep` "
             "(per-block allocation for each `--target-speedup`, one damage analysis). onnxruntime CPU, 2 threads, "
             "interleaved runs, speed-up = median over rounds of the per-round ratio; pooled-embedding fidelity on 512 "
             "held-out sentences. measured (budget): what the allocation measured on its own.", "",
             "| variant | heads kept | neurons kept | MACs | measured (budget) | speed-up 1x128 | speed-up 32x128 "
             "| cosine mean | cosine worst | nearest-neighbour agreement | optimize s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = f"{r['budget_speedup']:.2f}x" if r["budget_speedup"] else "-"
        lines.append(f"| {r['variant']} | {r['heads']} | {r['neurons']} | x{r['macs']:.3f} | {budget} | "
                     f"{r['speedup_b1']:.2f}x | "
                     f"{r['speedup_b32']:.2f}x | {r['cosine_mean']:.4f} | {r['cosine_worst']:.4f} | "
                     f"{100 * r['neighbour_agreement']:.1f}% | {r['optimize_seconds']:.0f} |")
    lines += ["", f"Dense: {rows[0]['dense_ms_b1']:.1f} ms at 1x128, {rows[0]['dense_ms_b32']:.0f} ms at 32x128. "
              "Sweep rows: optimize s is the sweep's time divided by its targets."]
    RESULTS.mkdir(exist_ok=True)
    if plot(rows, RESULTS / "transformers.png"):
        lines += ["", "![speed-up vs fidelity](transformers.png)"]
    if llama:
        lines += ["", "## The tiny Llama (real weights, SwiGLU): next-token agreement with the dense model", "",
                  f"Calibration and evaluation: {llama[0]['evaluation_tokens']} tokens each of different greedy "
                  f"continuations; `--calib --reconstruct`; timed at 4 x {SEQ}.", "",
                  "| variant | heads kept | neurons kept | MACs | top-1 agreement | perplexity on dense text "
                  f"| measured (budget) | speed-up 4x{SEQ} |", "|---|---|---|---|---|---|---|---|"]
        for r in llama:
            budget = f"{r['budget_speedup']:.2f}x" if r["budget_speedup"] else "-"
            lines.append(f"| {r['variant']} | {r['heads']} | {r['neurons']} | x{r['macs']:.3f} | "
                         f"{100 * r['top1_agreement']:.1f}% | {r['perplexity']:.3f} | {budget} | {r['speedup']:.2f}x |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "transformers.json").write_text(json.dumps({"minilm": rows, "tiny_llama": llama}, indent=1))
    (RESULTS / "transformers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
