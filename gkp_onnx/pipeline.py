"""Pass infrastructure: a pass has one job and a contract.

`Pass.__call__` checks `requires`, runs `call`, then checks `ensures`; a broken contract is a
bug in gkp-onnx (PassContractError), not bad user input. Passes take and return a model and the
shared `Plan`, so one analysis can be reused and a plan can be saved and replayed. What a pass
finds beyond the plan (reconstruction errors, the N:M result) leaves in `PassResult.details`.

Every pass declares `in_place`: True when it edits the model it is given and returns it, False
when the model it is given is left as it was (it returns a new model, or the same one unchanged).
A caller that must keep its model copies it before an in-place pass (`run_passes(keep=True)`).
Passes import the graph layer, scoring and cost modules, the plan and this module, never another
pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

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
    details: dict = field(default_factory=dict)  # what the pass found beyond the plan, by key


class Pass:
    name = "pass"
    in_place = True  # see the module doc

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


def run_passes(passes: list[Pass], model: onnx.ModelProto, plan: Plan, details: dict | None = None,
               keep: bool = False) -> tuple[onnx.ModelProto, Plan]:
    """Run `passes` in order; their details are merged into `details` when given. With `keep`,
    `model` is copied before the first in-place pass, so the caller's model is never edited."""
    for p in passes:
        if keep and p.in_place:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model, keep = copy, False
        result = p(model, plan)
        model, plan = result.model, result.plan
        if details is not None:
            details.update(result.details)
    return model, plan
