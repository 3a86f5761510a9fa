"""The options of `optimize` (and `recover`), defined once: the library, the CLI (its defaults,
help and value parsers) and saved reports all read them from here, and so do their checks: one
rule per option (RULES), so the library and the command line reject the same values with the
same words, naming the option by its flag (`--ratio must be in [0, 1), got 1.5`)."""

from __future__ import annotations

import math
import numbers
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
NM_METHODS = ("wanda", "sparsegpt")  # see --nm-method

SEED_LIMIT = 2 ** 32  # seeds are in [0, 2**32): what numpy's legacy seeding and scikit-learn take
MAX_BATCH = 4096  # largest batch size --bench-batch / bench --batch take
MAX_ELEMENTS = 2 ** 28  # largest input tensor made or assumed (1 GiB of float32): --input-shape, random inputs
FLAGS = {"bench_batches": "--bench-batch", "bench_min_time_s": "--bench-min-time", "bench_threads": "--threads",
         "input_shapes": "--input-shape"}  # where a flag is not the field's name with dashes


def flag(name: str) -> str:
    """The command-line spelling of an option field: min_cosine -> --min-cosine."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class Rule:
    """What an option's value may be: a finite number (an integer with `integer`) in [low, high]
    (ends left out with low_open / high_open; None: unbounded), or None with `optional`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    expected: str | None = None  # the words for "must be ...", where the range alone says it badly

    def describe(self) -> str:
        if self.expected:
            return self.expected
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'greater than' if self.low_open else 'at least'} {self.low}"
        if self.high is not None:
            return f"{'less than' if self.high_open else 'at most'} {self.high}"
        return "an integer" if self.integer else "a finite number"

    def admits(self, value) -> bool:
        return (self.low is None or value > self.low or (value == self.low and not self.low_open)) and \
            (self.high is None or value < self.high or (value == self.high and not self.high_open))


_COUNT = Rule(1, integer=True)
RULES = {
    # OptimizeOptions
    "ratio": Rule(0, 1, high_open=True),
    "ffn_ratio": Rule(0, 1, high_open=True, optional=True),
    "head_ratio": Rule(0, 1, high_open=True, optional=True),
    "target_speedup": Rule(1, 10, low_open=True, optional=True),
    "groups": Rule(1, integer=True, optional=True, expected="a positive integer or 'auto'"),
    "seed": Rule(0, SEED_LIMIT, high_open=True, integer=True, expected="an integer in [0, 2**32)"),
    "min_group_width": _COUNT,
    "speed_weight": Rule(0),
    "bench_threads": Rule(1, 1024, integer=True, optional=True),
    "bench_repeats": _COUNT,
    "bench_min_time_s": Rule(0),
    # Thresholds
    "max_abs_diff": Rule(0, optional=True),
    "min_cosine": Rule(-1, 1, optional=True),
    "min_top1_agreement": Rule(0, 1, optional=True),
    # RecoverOptions
    "epochs": _COUNT,
    "batch": _COUNT,
    "checkpoint_every": _COUNT,
    "max_steps": Rule(1, integer=True, optional=True),
    "lr": Rule(0, low_open=True),
    "temperature": Rule(0, low_open=True),
    "weight_decay": Rule(0),
    # image folders (gkp_onnx.images.ImageSpec) and data subsets (recover --limit)
    "resize": Rule(1, integer=True, optional=True),
    "crop": Rule(1, integer=True, optional=True),
    "limit": Rule(1, integer=True, optional=True),
    # bench
    "warmup": Rule(0, 10_000, integer=True),
    "repeats": Rule(1, 1_000_000, integer=True),
    "min_time": Rule(0, 3600),
}


def _text(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(name: str, value):
    """`value` if option `name` may take it (RULES[name]); else a GkpError naming the flag."""
    rule = RULES[name]
    if value is None and rule.optional:
        return value
    kind = numbers.Integral if rule.integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise GkpError(f"{flag(name)} must be {rule.expected or ('an integer' if rule.integer else 'a number')}, "
                       f"got {_text(value)}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise GkpError(f"{flag(name)} must be a finite number, got {_text(value)}")
    if not rule.admits(value):
        raise GkpError(f"{flag(name)} must be {rule.describe()}, got {_text(value)}")
    return value


def check_batches(values, name: str | None = "bench_batches") -> list[int]:
    """Batch sizes: integers in [1, MAX_BATCH]; the message starts with the flag when `name` is given."""
    prefix = f"{flag(name)}: " if name else ""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_BATCH:
            raise GkpError(f"{prefix}batch sizes must be integers in [1, {MAX_BATCH}], got {_text(value)}")
    return list(values)


MAX_TARGETS = 16


def check_targets(values) -> list[float]:
    """sweep's target speed-ups: 1 to MAX_TARGETS distinct values, each a valid --target-speedup; sorted."""
    try:
        values = list(values)
    except TypeError:
        raise GkpError(f"--targets: expected a list of speed-ups like 1.25,1.5,2, got {_text(values)}") from None
    if not 1 <= len(values) <= MAX_TARGETS:
        raise GkpError(f"--targets: give 1 to {MAX_TARGETS} speed-ups, got {len(values)}")
    for value in values:
        check("target_speedup", value)
    if len({f"{value:g}" for value in values}) != len(values):  # also what names the models
        raise GkpError("--targets: each speed-up once")
    return sorted(values)


def check_shape(name: str, shape) -> list[int]:
    """An --input-shape for input `name`: dims of at least 1, at most MAX_ELEMENTS elements in all."""
    try:
        shape = list(shape)
    except TypeError:
        raise GkpError(f"--input-shape {name}: expected a list of dims, got {shape!r}") from None
    given = f"--input-shape {name}:{','.join(map(_text, shape))}"
    if not shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape):
        raise GkpError(f"{given}: dims must be integers of at least 1")
    elements = math.prod(int(d) for d in shape)
    if elements > MAX_ELEMENTS:
        raise GkpError(f"{given}: {elements} elements, more than the {MAX_ELEMENTS} (2**28) one input may have")
    return list(shape)


def check_floats(name: str, values, nonzero: bool = False) -> tuple[float, ...]:
    """Per-channel numbers (--mean, --std): at least one, all finite (and not 0 with `nonzero`)."""
    given = values
    try:
        values = tuple(values) if not isinstance(values, (str, bytes)) else ()
    except TypeError:
        values = ()
    if not values or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values):
        raise GkpError(f"{flag(name)} must be comma-separated numbers, got {given!r}")
    text = ",".join(map(_text, values))
    if not all(math.isfinite(v) for v in values):
        raise GkpError(f"{flag(name)} values must be finite numbers, got {text}")
    if nonzero and any(v == 0 for v in values):
        raise GkpError(f"{flag(name)} values must not be 0, got {text}")
    return values


@dataclass
class Thresholds:
    max_abs_diff: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None

    def __post_init__(self):
        self.checked()

    def checked(self) -> Thresholds:
        for name in ("max_abs_diff", "min_cosine", "min_top1_agreement"):
            check(name, getattr(self, name))
        return self

    def failures(self, result: Fidelity) -> list[str]:
        """What `result` misses; a NaN metric misses every threshold set on it."""
        missed = []
        if self.max_abs_diff is not None and not result.max_abs_diff <= self.max_abs_diff:
            missed.append(f"max abs diff {result.max_abs_diff:.3g} > {self.max_abs_diff:g}")
        if self.min_cosine is not None and not result.min_cosine >= self.min_cosine:
            missed.append(f"cosine {result.min_cosine:.6f} < {self.min_cosine:g}")
        if self.min_top1_agreement is not None and result.top1_agreement is not None \
                and not result.top1_agreement >= self.min_top1_agreement:
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
    ffn_ratio: float | None = None  # share of transformer feed-forward neurons removed (passes/prune_neurons.py)
    head_ratio: float | None = None  # share of transformer attention heads removed (passes/prune_heads.py)
    target_speedup: float | None = None  # with calib: per-Conv ratios (or per-block heads and neurons) for this speed-up
    nm: str | None = None  # "2:4": N:M sparsity for MatMul/Gemm weights
    nm_conv: bool = False
    nm_include_head: bool = False
    nm_permute: bool = True
    nm_method: str = "wanda"  # "wanda": |w| * ||x|| masks (+ refit with reconstruct); "sparsegpt" (needs calib)

    def checked(self) -> list[re.Pattern]:
        """Check the options; return the compiled --exclude patterns."""
        check("ratio", self.ratio)
        check("ffn_ratio", self.ffn_ratio)
        check("head_ratio", self.head_ratio)
        check("target_speedup", self.target_speedup)
        if self.target_speedup is not None and not self.calib:
            raise GkpError("--target-speedup measures the damage of each layer or block on calibration data: give "
                           "--calib data.npz")
        if self.plan is not None and (self.ffn_ratio or self.head_ratio or self.target_speedup):
            raise GkpError("--plan replays GKP's Conv plan; the heads and neurons removed are not in it: give "
                           "--ffn-ratio / --head-ratio / --target-speedup without --plan")
        if self.target_speedup is not None and (self.ffn_ratio is not None or self.head_ratio is not None):
            raise GkpError("--target-speedup chooses what each layer or block keeps: give it or "
                           "--ffn-ratio / --head-ratio, not both")
        if self.method not in SELECTION_METHODS:
            raise GkpError(f"unknown --method {self.method!r} (choose from {', '.join(SELECTION_METHODS)})")
        if self.nm is not None:
            from gkp_onnx.nm import parse_nm

            parse_nm(self.nm)
        if self.nm_method not in NM_METHODS:
            raise GkpError(f"unknown --nm-method {self.nm_method!r} (choose from {', '.join(NM_METHODS)})")
        if self.nm is not None and self.nm_method == "sparsegpt" and not self.calib:
            raise GkpError("--nm-method sparsegpt needs calibration data: give --calib data.npz")
        if self.reconstruct and not self.calib:
            raise GkpError("--reconstruct needs calibration data: give --calib data.npz")
        multiple = self.channel_multiple
        if multiple != "auto" and (not isinstance(multiple, int) or multiple < 1):
            raise GkpError(f"--channel-multiple must be a positive integer or 'auto', got {multiple}")
        if isinstance(self.cost_model, str) and self.cost_model not in COST_MODELS:
            raise GkpError(f"unknown --cost-model {self.cost_model!r} (choose from {', '.join(COST_MODELS)})")
        for name in ("groups", "seed", "min_group_width", "speed_weight", "bench_threads", "bench_repeats",
                     "bench_min_time_s"):
            check(name, getattr(self, name))
        check_batches(self.bench_batches)
        if not isinstance(self.input_shapes, dict):
            raise GkpError(f"input_shapes must map input names to shapes, got {self.input_shapes!r}")
        for name, shape in self.input_shapes.items():
            check_shape(name, shape)
        if not isinstance(self.thresholds, Thresholds):
            raise GkpError(f"thresholds must be a gkp_onnx.options.Thresholds, got {self.thresholds!r}")
        self.thresholds.checked()
        patterns = []
        for text in self.exclude:
            try:
                patterns.append(re.compile(text))
            except (re.error, OverflowError, RecursionError) as exc:
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
        for name in ("epochs", "batch", "checkpoint_every", "max_steps", "lr", "temperature", "weight_decay",
                     "seed"):
            check(name, getattr(self, name))
        if self.device not in ("cpu", "cuda"):
            raise GkpError(f"--device must be cpu or cuda, got {self.device!r}")


DEFAULTS = OptimizeOptions()  # what the CLI shows and uses
RECOVER_DEFAULTS = RecoverOptions()


