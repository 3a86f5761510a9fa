"""The options of `optimize`, defined once: the library, the CLI (its defaults and help) and saved
reports all read them from here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gkp_onnx.cost import DEFAULT_SPEED_WEIGHT, CostModel
from gkp_onnx.errors import GkpError
from gkp_onnx.images import ImageSpec
from gkp_onnx.nm import parse_nm
from gkp_onnx.scoring import SELECTION_METHODS
from gkp_onnx.validate import Thresholds


COST_MODELS = ("analytic", "measured")


@dataclass
class OptimizeOptions:
    ratio: float = 0.4375
    groups: int | None = None  # None: chosen per layer
    method: str = "leanflex"
    exclude: list[str] = field(default_factory=list)
    include_stem: bool = False
    seed: int = 0
    min_group_width: int = 8
    channel_multiple: int | str = "auto"  # round kept channels to multiples of this; auto: the NCHWc block
    speed_weight: float = DEFAULT_SPEED_WEIGHT
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    calib: str | None = None  # .npz or image folder
    images: ImageSpec | None = None  # preprocessing when calib is an image folder
    thresholds: Thresholds = field(default_factory=Thresholds)
    validate: bool = True
    plan: str | None = None  # replay a saved plan instead of analysing
    cost_model: CostModel | str | None = None  # "analytic" (default), "measured", or a CostModel
    gkp: bool = True  # False: skip Grouped Kernel Pruning (e.g. N:M only)
    fold: bool = True  # fold channel Gathers into their producing Convs
    share_streams: bool = True  # offer the shared form to Convs reading residual streams / fan-outs (auto G only)
    cache: bool = True  # reuse clusterings from the on-disk cache (gkp_onnx.cache)
    reconstruct: bool = False  # refit the kept kernels on the calibration data (needs calib)
    bench_batches: list[int] = field(default_factory=list)  # measure input vs optimized latency
    bench_providers: list[str] = field(default_factory=lambda: ["cpu"])
    bench_threads: int | None = None
    bench_repeats: int = 30
    bench_min_time_s: float = 1.0  # more rounds until the timed ones last this long per batch
    nm: str | None = None  # "2:4": N:M sparsity for MatMul/Gemm weights
    nm_conv: bool = False
    nm_include_head: bool = False
    nm_permute: bool = True

    def checked(self) -> list[re.Pattern]:
        """Check the options; return the compiled --exclude patterns."""
        if not 0.0 <= self.ratio < 1.0:
            raise GkpError(f"--ratio must be in [0, 1), got {self.ratio:g}")
        if self.method not in SELECTION_METHODS:
            raise GkpError(f"unknown --method {self.method!r} (choose from {', '.join(SELECTION_METHODS)})")
        if self.nm is not None:
            parse_nm(self.nm)
        if self.reconstruct and not self.calib:
            raise GkpError("--reconstruct needs calibration data: give --calib data.npz")
        multiple = self.channel_multiple
        if multiple != "auto" and (not isinstance(multiple, int) or multiple < 1):
            raise GkpError(f"--channel-multiple must be a positive integer or 'auto', got {multiple}")
        if isinstance(self.cost_model, str) and self.cost_model not in COST_MODELS:
            raise GkpError(f"unknown --cost-model {self.cost_model!r} (choose from {', '.join(COST_MODELS)})")
        if self.groups is not None and self.groups < 1:
            raise GkpError(f"--groups must be a positive integer or 'auto', got {self.groups}")
        patterns = []
        for text in self.exclude:
            try:
                patterns.append(re.compile(text))
            except re.error as exc:
                raise GkpError(f"--exclude '{text}' is not a valid regular expression: {exc}") from None
        return patterns
DEFAULTS = OptimizeOptions()  # the CLI shows and uses these
