"""The plan: what the passes decided per layer, serialisable so it can be written, read and replayed.

A `LayerPlan` describes one prunable Conv (weight W of shape [Co, Ci, kh, kw]; Conv1d / Conv3d
have one or three kernel dimensions):
`groups[g]` lists the filters of group g (equal sizes d = Co / G) and `kept_channels[g]` the
input channels that group keeps (the same count n for every group, sets may overlap).
The grouped kernel W[f, j] survives iff j is in the kept set of f's group: `LayerPlan.mask()`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from gkp_onnx.errors import GkpError

PLAN_FORMAT = "gkp-onnx-plan/1"


@dataclass
class Candidate:
    """One group count considered for a layer and how the choice scored it."""

    group_count: int
    retained_importance: float  # share of the layer's weight energy (sum of W^2) kept
    relative_cost: float  # estimated latency of the pruned layer / dense layer
    score: float
    shared: bool = False  # the shared form (partition_streams): kept sets are the component's blocks


@dataclass
class LayerPlan:
    node: str
    weight: str
    out_channels: int
    in_channels: int
    kernel_shape: list[int]
    macs: int  # dense MACs for one sample
    kept_per_group: int  # n = round((1 - ratio) * Ci), at least 1
    input_size: list[int] | None = None  # spatial size of the Conv input, for measured cost models
    conv_attrs: dict = field(default_factory=dict)  # strides, pads, dilations, auto_pad as set on the node
    # Where the GKP Gathers can go (analyze; for cost models): the input Gather into the Conv that
    # produces the input (read by this Conv only), an output permutation into what reads the output.
    input_folds: bool = False
    output_sinks: bool = False
    # MACs of the Conv the input Gather folds into (its input side pruned at the ratio when it is a
    # layer too), 0 when none: at G = 1 that Conv computes n of its Co filters, at G > 1 G * n.
    producer_macs: float = 0.0
    # partition_streams: G of the shared partition of the component this Conv reads (0: none); its
    # filters follow the blocks of the component it produces (`shared_output`); the form chosen.
    shared_group_count: int = 0
    shared_output: bool = False
    shared: bool = False
    group_count: int | None = None
    groups: list[list[int]] | None = None
    kept_channels: list[list[int]] | None = None
    retained_importance: float | None = None
    candidates: list[Candidate] = field(default_factory=list)
    # Groupings per candidate G, produced by the cluster pass; large and derivable: not serialised.
    candidate_groups: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)
    # Name of the grouped Conv that rewrite_conv made for this layer (in the rewritten model only).
    grouped_node: str | None = field(default=None, repr=False)

    def mask(self) -> np.ndarray:
        """Boolean [Co, Ci]: True where the grouped kernel W[f, j] is kept."""
        if self.groups is None or self.kept_channels is None:
            raise ValueError(f"layer {self.node} has no kernel selection yet")
        keep = np.zeros((self.out_channels, self.in_channels), dtype=bool)
        for filters, channels in zip(self.groups, self.kept_channels):
            keep[np.ix_(filters, channels)] = True
        return keep

    @property
    def pruned_macs(self) -> int:
        return self.macs * self.kept_per_group // self.in_channels

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("candidate_groups", "grouped_node")}
        data["candidates"] = [asdict(c) for c in self.candidates]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LayerPlan:
        data = dict(data)
        data["candidates"] = [Candidate(**c) for c in data.get("candidates", [])]
        return cls(**data)


@dataclass
class SkippedLayer:
    node: str
    op: str
    reason: str


@dataclass
class Plan:
    ratio: float
    method: str
    seed: int
    layers: list[LayerPlan] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    # partition_streams: per reordered channel space (named by a tensor of it), the new channel
    # order (channel k = old channel order[k]), applied to the dense model before the rewrite.
    permutations: dict[str, list[int]] = field(default_factory=dict)
    # --target-speedup on Convs: per layer (node name), the ratio its budget chose instead of `ratio`
    layer_ratios: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "ratio": self.ratio,
            "method": self.method,
            "seed": self.seed,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "permutations": self.permutations,
            "layer_ratios": self.layer_ratios,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if data.get("format") != PLAN_FORMAT:
            raise GkpError(f"not a gkp-onnx plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        if not isinstance(data["ratio"], (int, float)) or not isinstance(data["method"], str) \
                or not isinstance(data["seed"], int):
            raise ValueError("ratio, method and seed must be a number, a string and an integer")
        ratios = data.get("layer_ratios", {})
        if not isinstance(ratios, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                   and not isinstance(v, bool) and 0 <= v < 1 for k, v in ratios.items()):
            raise ValueError("layer_ratios must map node names to ratios in [0, 1)")
        return cls(
            ratio=data["ratio"],
            method=data["method"],
            seed=data["seed"],
            layers=[LayerPlan.from_dict(layer) for layer in data["layers"]],
            skipped=[SkippedLayer(**s) for s in data.get("skipped", [])],
            permutations=data.get("permutations", {}),
            layer_ratios=ratios,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise GkpError(f"cannot read plan {path}: {str(exc).splitlines()[0][:200]}") from None
        try:
            return cls.from_dict(data)
        except GkpError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise GkpError(f"plan {path} is not a gkp-onnx plan ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
