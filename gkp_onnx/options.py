"""The options of `optimize`, defined once: the library, the CLI (its defaults and help) and saved
reports all read them from here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gkp_onnx.errors import GkpError

if TYPE_CHECKING:  # the command line reads the defaults without loading onnx
    from gkp_onnx.cost import CostModel
    from gkp_onnx.images import ImageSpec
    from gkp_onnx.validate import Fidelity

SELECTION_METHODS = ("leanflex", "l2", "random", "tmi", "sr")
DEFAULT_SPEED_WEIGHT = 0.25  # choose_groups: weight of the estimated latency against the kept importance
COST_MODELS = ("analytic", "measured")


@dataclass
class Thresholds:
    max_abs_diff: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None

    def failures(self, result: Fidelity) -> list[str]:
        missed = []
        if self.max_abs_diff is not None and result.max_abs_diff > self.max_abs_diff:
            missed.append(f"max abs diff {result.max_abs_diff:.3g} > {self.max_abs_diff:g}")
        if self.min_cosine is not None and result.min_cosine < self.min_cosine:
            missed.append(f"cosine {result.min_cosine:.6f} < {self.min_cosine:g}")
        if self.min_top1_agreement is not None and result.top1_agreement is not None \
                and result.top1_agreement < self.min_top1_agreement:
            missed.append(f"top-1 agreement {result.top1_agreement:.4f} < {self.min_top1_agreement:g}")
        return missed


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
    cost_model: CostModel | str | None = "analytic"  # "analytic", "measured", or a CostModel
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
            from gkp_onnx.nm import parse_nm

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


@dataclass
class RecoverOptions:
    epochs: int = 3
    lr: float = 1e-4
    batch: int = 64
    weight_decay: float = 0.0
    temperature: float = 4.0
    labels: bool = False  # add cross-entropy on the data's labels
    augment: bool = True  # random crop + flip for image inputs
    device: str = "cpu"
    seed: int = 0
    checkpoint: str | None = None  # folder; resumed from when it holds a checkpoint of this run
    checkpoint_every: int = 200  # steps (and at the end of every epoch)
    max_steps: int | None = None  # stop this invocation after so many steps (checkpoint kept)

    def __post_init__(self):
        for name in ("epochs", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise GkpError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise GkpError("--lr and --temperature must be positive")
        if self.device not in ("cpu", "cuda"):
            raise GkpError(f"--device must be cpu or cuda, got {self.device!r}")


DEFAULTS = OptimizeOptions()  # what the CLI shows and uses
RECOVER_DEFAULTS = RecoverOptions()


