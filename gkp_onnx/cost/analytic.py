"""The analytic onnxruntime-CPU cost model: a pruned layer's latency relative to the dense layer,
from its geometry and the NCHWc rules (docs/cost-model.md)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from gkp_onnx.plan import LayerPlan




class CostModel(Protocol):
    def relative_time(self, layer: LayerPlan, group_count: int) -> float:
        """Estimated latency of the layer pruned with `group_count` groups / the dense layer."""


def gathers_left(layer: LayerPlan, group_count: int) -> tuple[bool, bool]:
    """(input Gather, output permutation) that fold_gathers leaves in front of / behind the layer."""
    return (not (layer.input_folds and group_count * layer.kept_per_group <= layer.in_channels),
            group_count > 1 and not layer.output_sinks)


class AnalyticCpuCost:
    """Gather + grouped Conv latency on onnxruntime CPU, relative to the dense Conv.

    T(G) = (n / Ci) / efficiency(Co / G) + moves(G)      (efficiency = 1 at G = 1: a plain narrower Conv)

    efficiency(c) is the fraction of the ideal speed-up a grouped Conv with c output channels per
    group reaches on onnxruntime CPU (measured on the 2-core reference machine, docs/cost-model.md):
    c >= 128: 0.96, 64: 0.88, 32: 0.85, 16: 0.59, 8: 0.35, 4: 0.14, interpolated in log2(c).

    `block` is onnxruntime's NCHWc channel block on this CPU (cost_model.nchwc_block_size: 16 with
    AVX512, 8 with AVX2; 1 = no NCHWc rule). A Conv reading c >= block channels costs as if c were
    rounded up to a multiple of the block (fewer: up to a multiple of half a block), so at G = 1
    the compute term is padded(n) / padded(Ci): 36 of 64 channels cost 48 (measured 0.78-0.83 of
    the dense time, n / Ci = 0.56), 12 of 16 cost 16 (measured 0.99-1.27). A grouped Conv runs in
    NCHWc only when n and Co / G are multiples of the block; otherwise it takes the plain NCHW
    path at SLOW_PATH times the efficiency (measured: G = 2, 36 of 64 channels: 1.03-1.11 of the
    dense time; G = 4: 1.15-1.70). The table's widths below 16 were measured on that path already.

    moves(G) is the time of the Gathers fold_gathers cannot remove, relative to the dense Conv:
    move_cost (multiply-adds one moved float costs) x floats moved per output pixel / (Ci*Co*kh*kw).
    onnxruntime runs Convs in its blocked NCHWc layout and a Gather cannot, so a Gather costs a
    reorder of its whole input, the copy and a reorder back: (Ci + 2*G*n) floats per input pixel
    (x the stride's pixels per output pixel) for the input Gather, unless it folds into the Conv
    producing the input (`layer.input_folds` and G*n <= Ci); 3*Co for an output permutation
    (G > 1), unless what reads the output absorbs it (`layer.output_sinks`). On a residual stream
    neither goes: a 1x1 Conv reading one pays more for its Gather than the pruning saves.

    Where the input Gather folds into the Conv producing the input (`layer.producer_macs`), that
    Conv computes only the G * n channels read: T is then the time of the pair relative to the
    dense pair, producer_macs / macs weighting the producer's output share padded(G * n) /
    padded(Ci). Without it a larger G looked nearly free (the layer's own term hardly moves), yet
    it keeps G times more of the producer: VGG-16 at ratio 0.75 chose G = 4 on the 512-wide
    layers and ran 2.15x faster than dense at batch 64, against 14.4x for plain filter pruning.
    move_cost = 25: a naive rewrite of ResNet-56 at G = 1 (every Conv behind a Gather) ran 1.43x
    faster than dense at batch 64 instead of 2.0x (docs/cost-model.md), i.e. ~25 multiply-adds per moved
    float; ResNet-50's larger, cache-missing tensors cost more (~90, profiled at batch 8), so the
    estimate errs on the fast side there.
    """

    WIDTHS = np.array([4, 8, 16, 32, 64, 128])
    EFFICIENCY = np.array([0.14, 0.35, 0.59, 0.85, 0.88, 0.96])
    SLOW_PATH = 0.5

    def __init__(self, move_cost: float = 25.0, block: int = 1):
        self.move_cost = move_cost
        self.block = block

    def efficiency(self, channels_per_group: float) -> float:
        return float(np.interp(np.log2(channels_per_group), np.log2(self.WIDTHS), self.EFFICIENCY))

    def block_of(self, layer: LayerPlan) -> int:
        """The NCHWc block that applies to the layer; 0 where onnxruntime runs it outside NCHWc
        altogether: it does so for 2-D Convs only, and Conv1d / Conv3d take the plain path, where a
        grouped Conv is SLOW_PATH as efficient (measured: G = 1 is their fastest form)."""
        return self.block if len(layer.kernel_shape) == 2 else 0

    @staticmethod
    def padded(channels: int, block: int) -> float:
        """The channel count a Conv reading `channels` inputs costs as, in NCHWc blocks."""
        if block <= 1:
            return channels
        step = block if channels >= block else max(1, block // 2)
        return -(-channels // step) * step

    def relative_time(self, layer: LayerPlan, group_count: int) -> float:
        ci, co, n = layer.in_channels, layer.out_channels, layer.kept_per_group
        block = self.block_of(layer)
        if group_count == 1:
            compute = self.padded(n, block) / self.padded(ci, block)
        else:
            width = co // group_count  # below a block the table already holds the NCHW path's efficiency
            aligned = block == 1 or (block > 1 and n % block == 0 and (width < block or width % block == 0))
            compute = n / ci / (self.efficiency(width) * (1.0 if aligned else self.SLOW_PATH))
        return self.with_producer(layer, group_count, compute + self.moves(layer, group_count))

    def moves(self, layer: LayerPlan, group_count: int) -> float:
        """The time of the Gathers fold_gathers leaves, relative to the dense Conv."""
        ci, co, n = layer.in_channels, layer.out_channels, layer.kept_per_group
        gather_in, permute_out = gathers_left(layer, group_count)
        moved = 0.0
        if gather_in:
            moved += (ci + 2 * group_count * n) * int(np.prod(layer.conv_attrs.get("strides", [1])))
        if permute_out:
            moved += 3 * co
        return self.move_cost * moved / (ci * co * int(np.prod(layer.kernel_shape)))

    def with_producer(self, layer: LayerPlan, group_count: int, own: float) -> float:
        """`own` (the layer's relative time) paired with the Conv its input Gather folds into, which
        then computes G * n of its Ci outputs (all when the Gather stays): the pair's time relative
        to the dense pair. `own` as it is where no producer folds."""
        if not layer.producer_macs or not layer.macs:
            return own
        weight = layer.producer_macs / layer.macs
        folds = not gathers_left(layer, group_count)[0]
        block = self.block_of(layer)
        outputs = self.padded(group_count * layer.kept_per_group, block) / self.padded(layer.in_channels, block) \
            if folds else 1.0
        return (own + weight * outputs) / (1.0 + weight)
