"""Structured transformer pruning: feed-forward neurons removed (--ffn-ratio), speed and fidelity.

    python benchmarks/transformer_pruning.py

The real all-MiniLM-L6-v2 (../shared/data/minilm-l6-v2): `optimize --ffn-ratio R --calib (256
sentences) --reconstruct` for several R; the dense and pruned models timed side by side in one
process (interleaved runs, medians) on onnxruntime CPU at batch 1 x 128 and 32 x 128 tokens; the
pooled sentence embedding (masked mean of last_hidden_state, L2-normalised) compared with the dense
model's on 512 held-out sentences (rows 1000-1511 of tokens.npz; calibration uses rows 0-255):
cosine mean / worst and nearest-neighbour agreement. Writes benchmarks/results/transformers.json
and .md.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gkp_onnx import optimize
from gkp_onnx.validate import make_session
from nm_sparsity import LLAMA, MINILM, RESULTS, SEQ, generate, next_token_metrics, sentence_embeddings

RATIOS = (0.25, 0.375, 0.5, 0.625)


def latencies(sessions: list[ort.InferenceSession], batch: int, rounds: int) -> list[float]:
    """Median seconds per run of each session, the sessions interleaved round by round."""
    feed = {"input_ids": np.full((batch, 128), 1000, np.int64), "attention_mask": np.ones((batch, 128), np.int64),
            "token_type_ids": np.zeros((batch, 128), np.int64)}
    times = [[] for _ in sessions]
    for session in sessions:
        session.run(None, feed)
    for _ in range(rounds):
        for session, kept in zip(sessions, times):
            start = time.perf_counter()
            session.run(None, feed)
            kept.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def tiny_llama() -> list[dict]:
    """The tiny Llama at several --ffn-ratio: next-token top-1 agreement and perplexity on text the
    dense model generated, calibration on other such text."""
    model = LLAMA / "aidreams260K_derived.onnx"
    if not model.exists():
        return []
    dense = make_session(str(model), spinning=False)
    evaluation = np.array([generate(dense, t) for t in (100, 200, 300, 400)])
    calibration = np.array([generate(dense, t) for t in (150, 250, 350, 450)])
    dense_logits = dense.run(None, {"input_ids": evaluation})[0]
    rows, sessions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "calib.npz", input_ids=calibration)
        for ratio in (0.25, 0.5):
            out, report = optimize(str(model), gkp=False, ffn_ratio=ratio, calib=str(Path(tmp) / "calib.npz"),
                                   reconstruct=True, validate=False, input_shapes={"input_ids": [1, SEQ]})
            session = make_session(out, spinning=False)
            sessions.append(session)
            rows.append({"ffn_ratio": ratio, "macs": report.after.macs / report.before.macs,
                         "evaluation_tokens": int(evaluation.size),
                         **next_token_metrics(session, evaluation, dense_logits)})
    times = [[] for _ in range(len(sessions) + 1)]
    for _ in range(50):
        for session, kept in zip([dense] + sessions, times):
            start = time.perf_counter()
            session.run(None, {"input_ids": evaluation})
            kept.append(time.perf_counter() - start)
    for row, measured in zip(rows, times[1:]):
        row["speedup"] = float(np.median(times[0]) / np.median(measured))
    return rows


def main() -> None:
    model = MINILM / "all-MiniLM-L6-v2.onnx"
    if not model.exists():
        raise SystemExit(f"{model} not found (see ../shared/data/minilm-l6-v2/SOURCE.md)")
    tokens = dict(np.load(MINILM / "tokens.npz"))
    held_out = {k: v[1000:1512] for k, v in tokens.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "calib.npz", **{k: v[:256] for k, v in tokens.items()})
        dense = make_session(str(model), spinning=False)  # idle threads must not steal the other sessions' cores
        reference = sentence_embeddings(str(model), held_out)
        neighbours = np.argsort(-(reference @ reference.T), 1)[:, 1]
        pruned = {}
        for ratio in RATIOS:
            start = time.perf_counter()
            out, report = optimize(str(model), gkp=False, ffn_ratio=ratio, calib=str(Path(tmp) / "calib.npz"),
                                   reconstruct=True, validate=False)
            seconds = time.perf_counter() - start
            session = make_session(out, spinning=False)
            pooled = sentence_embeddings(out, held_out)
            cosine = (pooled * reference).sum(1)
            pruned[ratio] = session
            rows.append({"ffn_ratio": ratio, "kept": report.neurons[0]["kept"], "neurons": report.neurons[0]["neurons"],
                         "macs": report.after.macs / report.before.macs, "cosine_mean": float(cosine.mean()),
                         "cosine_worst": float(cosine.min()),
                         "neighbour_agreement": float((np.argsort(-(pooled @ pooled.T), 1)[:, 1] == neighbours).mean()),
                         "optimize_seconds": seconds})
        for batch, rounds in ((1, 40), (32, 8)):
            times = latencies([dense] + list(pruned.values()), batch, rounds)
            for row, seconds in zip(rows, times[1:]):
                row[f"speedup_b{batch}"] = times[0] / seconds
                row[f"dense_ms_b{batch}"] = 1e3 * times[0]
    llama = tiny_llama()
    lines = ["# Transformers: feed-forward neurons removed (all-MiniLM-L6-v2)", "",
             "`optimize --ffn-ratio R --calib` (256 sentences) `--reconstruct`; onnxruntime CPU, 2 threads, interleaved "
             "medians; pooled-embedding fidelity on 512 held-out sentences.", "",
             "| --ffn-ratio | neurons kept | MACs | speed-up 1x128 | speed-up 32x128 | cosine mean | cosine worst "
             "| nearest-neighbour agreement | optimize s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ffn_ratio']} | {r['kept']} of {r['neurons']} | x{r['macs']:.3f} | {r['speedup_b1']:.2f}x | "
                     f"{r['speedup_b32']:.2f}x | {r['cosine_mean']:.4f} | {r['cosine_worst']:.4f} | "
                     f"{100 * r['neighbour_agreement']:.1f}% | {r['optimize_seconds']:.0f} |")
    lines += ["", f"Dense: {rows[0]['dense_ms_b1']:.1f} ms at 1x128, {rows[0]['dense_ms_b32']:.0f} ms at 32x128."]
    if llama:
        lines += ["", "## The tiny Llama (real weights, SwiGLU): next-token agreement with the dense model", "",
                  f"Calibration and evaluation: {llama[0]['evaluation_tokens']} tokens each of different greedy "
                  f"continuations; `--calib --reconstruct`.", "",
                  "| --ffn-ratio | MACs | top-1 agreement | perplexity on dense text | speed-up 4x{SEQ} |".replace(
                      "{SEQ}", str(SEQ)), "|---|---|---|---|---|"]
        for r in llama:
            lines.append(f"| {r['ffn_ratio']} | x{r['macs']:.3f} | {100 * r['top1_agreement']:.1f}% | "
                         f"{r['perplexity']:.3f} | {r['speedup']:.2f}x |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transformers.json").write_text(json.dumps({"minilm": rows, "tiny_llama": llama}, indent=1))
    (RESULTS / "transformers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
