"""Latency of ONNX models on onnxruntime providers, measured side by side.

All variants of one (provider, batch) are loaded together, warmed up, then timed interleaved
(A B A B ...) so that machine noise hits them alike; the median and p90 of the per-call times
are reported with the speed-up of each model over the first (median_first / median_model).
The number of rounds is `repeats`, raised until the timed rounds take at least `min_time_s`
(estimated from the warm-up): 30 calls of a 1 ms model last 30 ms, too short for a median to
rise above the noise of a shared machine. Worker threads do not spin between runs: a spinning
pool of one session would slow the next.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import input_specs
from gkp_onnx.model_io import load_model
from gkp_onnx.validate import make_session, random_dataset, run_session

PROVIDERS = {
    "cpu": ("CPUExecutionProvider", {}),
    # exhaustive cuDNN algorithm search: the fastest kernel per shape, as a deployment would use
    "cuda": ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
}


@dataclass
class Timing:
    model: str
    provider: str
    batch: int
    median_ms: float
    p90_ms: float
    speedup: float  # median of the first model / median of this one
    rounds: int = 0  # timed calls the median and p90 come from


def provider_spec(name: str) -> tuple[str, dict]:
    if name not in PROVIDERS:
        raise GkpError(f"unknown provider {name!r} (choose from {', '.join(PROVIDERS)})")
    provider, options = PROVIDERS[name]
    if provider not in ort.get_available_providers():
        raise GkpError(f"{provider} is not available in this onnxruntime build "
                       f"({', '.join(ort.get_available_providers())})")
    return provider, options


def describe_provider(name: str, threads: int | None) -> str:
    provider, options = provider_spec(name)
    settings = dict(options)
    if name == "cpu":
        settings["intra_op_num_threads"] = threads or "default"
        settings["allow_spinning"] = 0
    return f"{provider} " + ", ".join(f"{k}={v}" for k, v in settings.items())


def bench(models: list[str | onnx.ModelProto], names: list[str] | None = None, batches=(1,), providers=("cpu",),
          threads: int | None = None, input_shapes: dict | None = None, warmup: int = 5, repeats: int = 30,
          seed: int = 0, min_time_s: float = 0.0) -> list[Timing]:
    loaded = [load_model(m) if not isinstance(m, onnx.ModelProto) else m for m in models]
    names = names or [str(m) if not isinstance(m, onnx.ModelProto) else f"model{i}" for i, m in enumerate(models)]
    specs = [input_specs(m, input_shapes) for m in loaded]  # alike, but for a layer's micro-models
    results = []
    for provider_name in providers:
        provider = [provider_spec(provider_name)]
        sessions = [make_session(m, provider, threads, spinning=False) for m in loaded]
        for batch in batches:
            feeds = [random_dataset(s, seed, batch=batch).inputs for s in specs]
            # one interleaved round, from each model's fastest warm-up call (a slow outlier
            # would cut the rounds short of min_time_s)
            round_s = 0.0
            for session, feed in zip(sessions, feeds):
                fastest = math.inf
                run_session(session, feed)  # a model that cannot run says so in one line
                for _ in range(max(1, warmup)):
                    start = time.perf_counter()
                    session.run(None, feed)
                    fastest = min(fastest, time.perf_counter() - start)
                round_s += fastest
            rounds = max(repeats, math.ceil(min_time_s / round_s)) if round_s > 0 else repeats
            times = np.zeros((len(sessions), rounds))
            for r in range(rounds):
                for i, (session, feed) in enumerate(zip(sessions, feeds)):
                    start = time.perf_counter()
                    session.run(None, feed)
                    times[i, r] = time.perf_counter() - start
            medians = np.median(times, axis=1)
            for name, median, row in zip(names, medians, times):
                results.append(Timing(name, provider_name, batch, 1e3 * median, 1e3 * np.percentile(row, 90),
                                      float(medians[0] / median), rounds))
    return results


def format_timings(timings: list[Timing], threads: int | None = None) -> str:
    lines, key = [], None
    width = max(len(t.model) for t in timings)
    for t in timings:
        if (t.provider, t.batch) != key:
            key = (t.provider, t.batch)
            lines += ["", f"{describe_provider(t.provider, threads)}; batch {t.batch}; {t.rounds} interleaved rounds",
                      f"{'model':<{width}}  {'median ms':>10} {'p90 ms':>9} {'speed-up':>9}"]
        lines.append(f"{t.model:<{width}}  {t.median_ms:>10.3f} {t.p90_ms:>9.3f} {t.speedup:>8.2f}x")
    return "\n".join(lines).lstrip("\n")


def timings_to_dict(timings: list[Timing]) -> list[dict]:
    return [asdict(t) for t in timings]
