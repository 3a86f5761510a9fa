"""Pass infrastructure: a pass has one job and a contract.

`Pass.__call__` checks `requires`, runs `call`, then checks `ensures`; a broken contract is a
bug in gkp-onnx (PassContractError), not bad user input. Passes take and return a model and the
shared `Plan`, so one analysis can be reused and a plan can be saved and replayed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import onnx

from gkp_onnx.plan import Plan

log = logging.getLogger("gkp_onnx")


class PassContractError(RuntimeError):
    """A pass found its pre- or post-condition broken."""


@dataclass
class PassResult:
    model: onnx.ModelProto
    plan: Plan
    modified: bool


class Pass:
    name = "pass"

    def requires(self, model: onnx.ModelProto, plan: Plan) -> None:
        """Raise PassContractError when the input does not satisfy the pass's precondition."""

    def ensures(self, model: onnx.ModelProto, plan: Plan) -> None:
        """Raise PassContractError when the output breaks the pass's guarantee."""

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        self.requires(model, plan)
        start = time.perf_counter()
        result = self.call(model, plan)
        log.info("pass %-16s %s in %.2fs", self.name,
                 "modified" if result.modified else "unchanged", time.perf_counter() - start)
        self.ensures(result.model, result.plan)
        return result


def run_passes(passes: list[Pass], model: onnx.ModelProto, plan: Plan) -> tuple[onnx.ModelProto, Plan]:
    for p in passes:
        result = p(model, plan)
        model, plan = result.model, result.plan
    return model, plan
