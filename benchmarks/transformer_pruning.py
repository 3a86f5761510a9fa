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
from nm_sparsity import MINILM, RESULTS, sentence_embeddings  # the same pooling as the N:M benchmark

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
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transformers.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "transformers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
