"""A measured cost model for the group-count choice: onnxruntime micro-benchmarks, cached on disk.

For a layer (its Conv geometry: channels, kernel, input size, strides, pads, dilations), a kept
width n and a group count G, two small models are timed side by side with `bench.bench`
(interleaved, medians): the dense Conv and the grouped Conv reading G * n channels. The ratio of
the medians is the compute term of the layer's relative time T(G); the Gathers fold_gathers
leaves are added by the analytic model's move term (AnalyticCpuCost.moves), and the pair with
the producer Conv the input Gather folds into is weighed as there (AnalyticCpuCost.with_producer).
Both Convs sit between depthwise 1x1 Convs, so that their input and output live in onnxruntime's
NCHWc layout as inside a CNN; those two cheap Convs are in both timings, which pulls T slightly
towards 1. The Gathers are not timed: a Gather + grouped Conv timed alone looked cheap, but the
same layers in the model cost the reorders and cache misses around each Gather, which the move
term was calibrated on (whole-model figures: README, benchmarks/results/latency_measured.md).

Results are cached in a JSON file per machine (CPU model, core count, onnxruntime version,
provider, threads) under $GKP_ONNX_CACHE or ~/.cache/gkp-onnx, so a second run on the same
machine measures nothing. A layer whose input size shape inference did not find falls back to
the analytic model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from gkp_onnx.bench import bench
from gkp_onnx.cache import cache_dir, write_atomic
from gkp_onnx.cost.analytic import AnalyticCpuCost
from gkp_onnx.cost.nchwc import nchwc_block_size
from gkp_onnx.plan import LayerPlan


def machine_tag(provider: str, threads: int | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} | {os.cpu_count()} cores | onnxruntime {ort.__version__} | {provider} | threads {threads or 'default'}"


def layer_models(layer: LayerPlan, group_count: int, batch: int, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The layer's dense Conv and its grouped Conv (G groups of n input channels), each between
    depthwise 1x1 Convs: in a CNN a layer reads and writes tensors that other Convs produce and
    read, which onnxruntime keeps in its NCHWc layout."""
    rng = np.random.default_rng(seed)
    co, ci, n = layer.out_channels, layer.in_channels, layer.kept_per_group
    attrs = dict(layer.conv_attrs, kernel_shape=list(layer.kernel_shape))

    def array(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.1

    def chain(channels: int, steps: list[tuple[str, list[np.ndarray], dict]]) -> onnx.ModelProto:
        """x [batch, channels, *input_size] -> depthwise -> steps -> depthwise -> y;
        a step is (op, constant inputs after the tensor, attributes)."""
        ones = [1] * len(layer.kernel_shape)
        steps = [("Conv", [array(channels, 1, *ones)], {"group": channels, "kernel_shape": ones}), *steps,
                 ("Conv", [array(co, 1, *ones)], {"group": co, "kernel_shape": ones})]
        nodes, inits, current = [], [], "x"
        for i, (op, constants, step_attrs) in enumerate(steps):
            names = [f"c{i}_{j}" for j in range(len(constants))]
            inits += [numpy_helper.from_array(c, name) for c, name in zip(constants, names)]
            output = "y" if i == len(steps) - 1 else f"t{i}"
            nodes.append(helper.make_node(op, [current, *names], [output], **step_attrs))
            current = output
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, channels, *layer.input_size])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, co, *[None] * len(layer.input_size)])
        built = helper.make_model(helper.make_graph(nodes, "layer", [x], [y], inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        built.ir_version = 8
        return built

    dense = chain(ci, [("Conv", [array(co, ci, *layer.kernel_shape), array(co)], attrs)])
    grouped = chain(group_count * n, [("Conv", [array(co, n, *layer.kernel_shape), array(co)],
                                       {**attrs, "group": group_count})])
    return dense, grouped


class MeasuredCost:
    """`relative_time(layer, G)` measured on the target provider; see the module docstring."""

    def __init__(self, provider: str = "cpu", threads: int | None = None, batch: int = 1, repeats: int = 30,
                 cache: Path | None = None):
        self.provider, self.threads, self.batch, self.repeats = provider, threads, batch, repeats
        self.tag = machine_tag(provider, threads)
        name = hashlib.sha1(self.tag.encode()).hexdigest()[:12]
        self.path = (cache or cache_dir()) / f"latency-{name}.json"
        self.entries: dict[str, float] = {}
        self.measured = 0  # micro-benchmarks run by this instance (cache misses)
        self.fallback = AnalyticCpuCost(block=nchwc_block_size() if provider == "cpu" else 1)
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("machine") == self.tag:
                self.entries = stored["entries"]
        except (OSError, ValueError, KeyError):
            pass

    def key(self, layer: LayerPlan, group_count: int) -> str:
        return json.dumps([layer.in_channels, layer.out_channels, layer.kernel_shape, layer.input_size,
                           layer.conv_attrs, layer.kept_per_group, group_count, self.batch, "conv"],
                          sort_keys=True)

    def relative_time(self, layer: LayerPlan, group_count: int) -> float:
        if not layer.input_size:
            return self.fallback.relative_time(layer, group_count)
        key = self.key(layer, group_count)
        if key not in self.entries:
            dense, pruned = layer_models(layer, group_count, self.batch)
            timings = bench([dense, pruned], names=["dense", "gkp"], batches=[self.batch],
                            providers=[self.provider], threads=self.threads, repeats=self.repeats)
            self.entries[key] = 1.0 / timings[1].speedup
            self.measured += 1
            self._save()
        own = self.entries[key] + self.fallback.moves(layer, group_count)
        return self.fallback.with_producer(layer, group_count, own)

    def _save(self) -> None:
        write_atomic(self.path, json.dumps({"machine": self.tag, "entries": self.entries}, indent=0).encode())
