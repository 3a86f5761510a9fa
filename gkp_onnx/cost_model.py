"""A measured cost model for the group-count choice: onnxruntime micro-benchmarks, cached on disk.

For a layer (its Conv geometry: channels, kernel, input size, strides, pads, dilations), a kept
width n and a group count G, two small models are timed side by side with `bench.bench`
(interleaved, medians): the dense Conv, and the GKP form as fold_gathers will leave it, the
grouped Conv with the Gathers analyze says cannot go (the same rule the analytic model charges):
a channel Gather of G * n channels in front unless the producer computes them itself
(`layer.input_folds` and G * n <= Ci; then the Conv reads G * n channels), and an output
permutation behind when G > 1 unless the readers absorb it (`layer.output_sinks`). The ratio of
the medians is the layer's relative time T(G) that choose_groups trades against retained
importance. Each model is timed alone, so onnxruntime's NCHWc reorders land at its edges in
both: the cost a Gather adds inside a model of NCHWc Convs is under-counted.

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
from gkp_onnx.passes.choose_groups import AnalyticCpuCost, gathers_left
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
    """The layer's dense Conv and its GKP form (grouped Conv and the Gathers left) as small models."""
    rng = np.random.default_rng(seed)
    co, ci, n = layer.out_channels, layer.in_channels, layer.kept_per_group
    gather_in, permute_out = gathers_left(layer, group_count)
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, co, None, None])
    attrs = dict(layer.conv_attrs, kernel_shape=list(layer.kernel_shape))

    def model(nodes, inits, channels=ci):
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, channels, *layer.input_size])
        graph = helper.make_graph(nodes, "layer", [x], [y], inits)
        built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        built.ir_version = 8
        return built

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)

    dense = model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)],
                  [weight("w", [co, ci, *layer.kernel_shape]), weight("b", [co])])
    nodes = [helper.make_node("Conv", ["gathered" if gather_in else "x", "w", "b"],
                              ["conv" if permute_out else "y"], group=group_count, **attrs)]
    inits = [weight("w", [co, n, *layer.kernel_shape]), weight("b", [co])]
    if gather_in:
        index = np.concatenate([np.sort(rng.choice(ci, n, replace=False)) for _ in range(group_count)])
        nodes.insert(0, helper.make_node("Gather", ["x", "index"], ["gathered"], axis=1))
        inits.append(numpy_helper.from_array(index.astype(np.int64), "index"))
    if permute_out:
        nodes.append(helper.make_node("Gather", ["conv", "permutation"], ["y"], axis=1))
        inits.append(numpy_helper.from_array(rng.permutation(co).astype(np.int64), "permutation"))
    return dense, model(nodes, inits, ci if gather_in else group_count * n)


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
        self.fallback = AnalyticCpuCost()
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("machine") == self.tag:
                self.entries = stored["entries"]
        except (OSError, ValueError, KeyError):
            pass

    def key(self, layer: LayerPlan, group_count: int) -> str:
        return json.dumps([layer.in_channels, layer.out_channels, layer.kernel_shape, layer.input_size,
                           layer.conv_attrs, layer.kept_per_group, group_count, self.batch,
                           gathers_left(layer, group_count)], sort_keys=True)

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
        return self.entries[key]

    def _save(self) -> None:
        write_atomic(self.path, json.dumps({"machine": self.tag, "entries": self.entries}, indent=0).encode())
