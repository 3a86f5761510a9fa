"""N:M (2:4) sparsity: kept magnitude and fidelity, plain magnitude vs permuted vs calibration-aware.

    python benchmarks/nm_sparsity.py

1. Random 64x128 matrices: share of |w| kept by 2:4 in the default channel order and after the
   permutation search (1 s budget), 5 seeds.
2. The real tiny Llama (../shared/data/tinyllama-aidreams260K): 2:4 on every projection MatMul
   (the LM head stays dense). Evaluation text: sequences the dense model generates greedily;
   calibration text (for the calibration-aware score) is a disjoint set of such sequences.
   Reports next-token top-1 agreement with the dense model and perplexity on the dense text;
   "+ refit": the kept weights refit by least squares on the calibration text (--reconstruct).
3. The real all-MiniLM-L6-v2 (../shared/data/minilm-l6-v2): magnitude, Wanda + refit, SparseGPT, and
   Wanda + refit under the fidelity budgets --min-cosine 0.98 / 0.99 (token-level cosine of
   last_hidden_state on the calibration data): share of MatMul MACs made 2:4, pooled-embedding
   cosine and nearest-neighbour agreement on held-out sentences, and time.
4. A small ViT (ViT-S/16 widths, random weights): kept magnitude and output cosine vs dense.

Writes benchmarks/results/nm_sparsity.json and .md.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gkp_onnx import optimize
from gkp_onnx.models.export import build, export
from gkp_onnx.models.llama2c import BOS, decode, load_tokenizer
from gkp_onnx.nm_permutation import kept_score, search_permutation
from gkp_onnx.options import Thresholds

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT.parent / "shared" / "data" / "tinyllama-aidreams260K"
MINILM = ROOT.parent / "shared" / "data" / "minilm-l6-v2"
RESULTS = ROOT / "benchmarks" / "results"
SEQ = 128


def random_matrices() -> list[dict]:
    rows = []
    for seed in range(5):
        scores = np.abs(np.random.default_rng(seed).standard_normal((64, 128)))
        base = kept_score(scores, np.arange(128), 2, 4)
        start = time.perf_counter()
        perm = search_permutation(scores, 2, 4, seconds=1.0, seed=seed)
        rows.append({"seed": seed, "kept_default": base / scores.sum(),
                     "kept_permuted": kept_score(scores, perm, 2, 4) / scores.sum(),
                     "gain_pct": 100 * (kept_score(scores, perm, 2, 4) / base - 1),
                     "seconds": time.perf_counter() - start})
    return rows


def generate(session: ort.InferenceSession, first: int) -> list[int]:
    tokens = [BOS, first]
    while len(tokens) < SEQ:
        logits = session.run(None, {"input_ids": np.array([tokens])})[0]
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def next_token_metrics(session: ort.InferenceSession, texts: np.ndarray, dense_logits: np.ndarray) -> dict:
    logits = session.run(None, {"input_ids": texts})[0][:, :-1]
    targets = texts[:, 1:]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1).mean()
    agreement = (logits.argmax(-1) == dense_logits[:, :-1].argmax(-1)).mean()
    return {"top1_agreement": float(agreement), "perplexity": float(np.exp(nll))}


def tiny_llama(tmp: Path) -> dict:
    model = LLAMA / "aidreams260K_derived.onnx"
    if not model.exists():
        return {"skipped": f"{model} not found"}
    dense = ort.InferenceSession(str(model))
    # evaluation and calibration text: greedy continuations of different first tokens
    evaluation = np.array([generate(dense, t) for t in (100, 200, 300, 400)])
    calibration = np.array([generate(dense, t) for t in (150, 250, 350, 450)])
    np.savez(tmp / "calib.npz", input_ids=calibration)
    pieces = load_tokenizer(LLAMA / "tok512.bin", 512)
    dense_logits = dense.run(None, {"input_ids": evaluation})[0]
    result = {"evaluation_tokens": int(evaluation.size), "sample_text": decode(pieces, evaluation[0])[:160],
              "dense": next_token_metrics(dense, evaluation, dense_logits), "conditions": {}}
    shapes = {"input_ids": [1, SEQ]}
    conditions = {"magnitude": dict(nm_permute=False), "permuted": dict(nm_permute=True),
                  "calibration-aware + permuted": dict(nm_permute=True, calib=str(tmp / "calib.npz")),
                  "calibration-aware": dict(nm_permute=False, calib=str(tmp / "calib.npz")),
                  "calibration-aware + refit": dict(nm_permute=False, calib=str(tmp / "calib.npz"), reconstruct=True),
                  "calibration-aware + permuted + refit": dict(nm_permute=True, calib=str(tmp / "calib.npz"),
                                                               reconstruct=True),
                  "sparsegpt": dict(nm_permute=False, calib=str(tmp / "calib.npz"), nm_method="sparsegpt"),
                  "sparsegpt + permuted": dict(nm_permute=True, calib=str(tmp / "calib.npz"), nm_method="sparsegpt")}
    for name, options in conditions.items():
        start = time.perf_counter()
        sparse, report = optimize(model, gkp=False, nm="2:4", input_shapes=shapes, validate=False, **options)
        seconds = time.perf_counter() - start
        metrics = next_token_metrics(ort.InferenceSession(sparse.SerializeToString()), evaluation, dense_logits)
        layers = report.nm.layers
        metrics.update(kept_magnitude=float(np.mean([l.kept_magnitude for l in layers])),
                       layers=len(layers), eligible_mac_share=report.nm.eligible_mac_share, seconds=seconds)
        result["conditions"][name] = metrics
    return result


def sentence_embeddings(model, tokens: dict[str, np.ndarray]) -> np.ndarray:
    """sentence-transformers' pooling: mean of last_hidden_state over the tokens, L2-normalised."""
    session = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString())
    pooled = []
    for start in range(0, len(tokens["input_ids"]), 64):
        feed = {name: value[start:start + 64] for name, value in tokens.items()}
        hidden, mask = session.run(None, feed)[0], feed["attention_mask"][..., None]
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    pooled = np.concatenate(pooled)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def minilm(tmp: Path, calibration: int = 256) -> dict:
    """all-MiniLM-L6-v2, 2:4 on its 36 projection MatMuls: pooled-embedding cosine to the dense model
    and nearest-neighbour agreement on 512 held-out sentences (tokens 1000-1511)."""
    model = MINILM / "all-MiniLM-L6-v2.onnx"
    if not model.exists():
        return {"skipped": f"{model} not found"}
    tokens = dict(np.load(MINILM / "tokens.npz"))
    np.savez(tmp / "minilm_calib.npz", **{k: v[:calibration] for k, v in tokens.items()})
    held_out = {k: v[1000:1512] for k, v in tokens.items()}
    dense = sentence_embeddings(str(model), held_out)
    neighbours = np.argsort(-(dense @ dense.T), 1)[:, 1]
    calib = str(tmp / "minilm_calib.npz")
    result = {"calibration_sentences": calibration, "held_out_sentences": 512, "conditions": {}}
    conditions = {"magnitude": dict(), "wanda + refit": dict(calib=calib, reconstruct=True),
                  "sparsegpt": dict(calib=calib, nm_method="sparsegpt")}
    for budget in (0.98, 0.99):  # the budget is the token-level cosine of last_hidden_state on the calibration data
        conditions[f"wanda + refit, --min-cosine {budget}"] = dict(calib=calib, reconstruct=True,
                                                                  thresholds=Thresholds(min_cosine=budget))
    for name, options in conditions.items():
        start = time.perf_counter()
        sparse, report = optimize(str(model), gkp=False, nm="2:4", validate="thresholds" in options, **options)
        seconds = time.perf_counter() - start
        pooled = sentence_embeddings(sparse, held_out)
        cosine = (pooled * dense).sum(1)
        result["conditions"][name] = {
            "cosine_mean": float(cosine.mean()), "cosine_worst": float(cosine.min()),
            "neighbour_agreement": float((np.argsort(-(pooled @ pooled.T), 1)[:, 1] == neighbours).mean()),
            "layers": len(report.nm.layers), "mac_share": report.nm.eligible_mac_share, "seconds": seconds,
            "nm_sparsify_seconds": report.timings["nm_sparsify"]}
    return result


def vit(tmp: Path) -> dict:
    model, shape = build("vit_small")
    path = export(model, shape, tmp / "vit.onnx")
    result = {}
    for name, permute in (("magnitude", False), ("permuted", True)):
        _, report = optimize(path, gkp=False, nm="2:4", nm_permute=permute, seed=0)
        result[name] = {"kept_magnitude": float(np.mean([l.kept_magnitude for l in report.nm.layers])),
                        "layers": len(report.nm.layers), "permuted_layers": sum(l.permuted for l in report.nm.layers),
                        "cosine": report.fidelity.min_cosine, "eligible_mac_share": report.nm.eligible_mac_share}
    return result


def markdown(results: dict) -> str:
    lines = ["# N:M 2:4 sparsity benchmark", "", "## Random 64x128 (share of sum|w| kept)", "",
             "| seed | default order | permuted | gain | search s |", "|---|---|---|---|---|"]
    for r in results["random_64x128"]:
        lines.append(f"| {r['seed']} | {r['kept_default']:.4f} | {r['kept_permuted']:.4f} | "
                     f"+{r['gain_pct']:.2f}% | {r['seconds']:.2f} |")
    llama = results["tiny_llama"]
    if "conditions" in llama:
        lines += ["", f"## Tiny Llama (real weights), {llama['evaluation_tokens']} tokens of dense-generated text", "",
                  f"Dense perplexity on it: {llama['dense']['perplexity']:.3f}", "",
                  "| condition | kept |w| | top-1 agreement | perplexity | optimize s |", "|---|---|---|---|---|"]
        for name, m in llama["conditions"].items():
            lines.append(f"| {name} | {m['kept_magnitude']:.4f} | {100 * m['top1_agreement']:.2f}% | "
                         f"{m['perplexity']:.3f} | {m['seconds']:.1f} |")
    mini = results.get("minilm", {})
    if "conditions" in mini:
        lines += ["", f"## all-MiniLM-L6-v2 (real weights), 2:4 on every projection MatMul, "
                      f"{mini['calibration_sentences']} calibration sentences", "",
                  "Pooled sentence embedding vs the dense model's on 512 held-out sentences.", "",
                  "| condition | layers | MatMul MACs 2:4 | cosine mean | cosine worst | nearest-neighbour agreement "
                  "| nm_sparsify s | optimize s |", "|---|---|---|---|---|---|---|---|"]
        for name, m in mini["conditions"].items():
            lines.append(f"| {name} | {m['layers']} | {100 * m['mac_share']:.1f}% | {m['cosine_mean']:.4f} | "
                         f"{m['cosine_worst']:.4f} | {100 * m['neighbour_agreement']:.1f}% | "
                         f"{m['nm_sparsify_seconds']:.0f} | {m['seconds']:.0f} |")
    lines += ["", "## ViT-S/16 widths, 4 blocks (random weights)", "", "| condition | kept |w| | output cosine |",
              "|---|---|---|"]
    for name, m in results["vit_small"].items():
        lines.append(f"| {name} | {m['kept_magnitude']:.4f} | {m['cosine']:.5f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {"random_64x128": random_matrices(), "tiny_llama": tiny_llama(Path(tmp)),
                   "minilm": minilm(Path(tmp)), "vit_small": vit(Path(tmp))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nm_sparsity.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (RESULTS / "nm_sparsity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
