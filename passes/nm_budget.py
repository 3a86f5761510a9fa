"""nm_budget: keep N:M sparsity only where the model's outputs can afford it (--min-cosine with --nm).

Before: the N:M-sparsified model, the values each sparsified weight had before its mask (`dense`,
after any channel permutation, so putting them back is exact), and the reference outputs on the data.
After:  the same graph with the layers that would take the outputs below the budget put back dense.

1. Sensitivity, measured at the model output: for each layer, the cosine (to the reference outputs)
   regained by keeping it alone dense while every other layer stays sparse, on up to
   SENSITIVITY_SAMPLES samples. Measured from all-sparse, not from all-dense: a refit layer
   compensates for the sparse layers before it, and is only right in that company.
2. Order: layers TensorRT's sparse kernels would run (tensorrt_sparse_likely) first, then by MACs
   made N:M per unit of that damage.
3. The longest prefix of that order whose model keeps min cosine >= budget on all the data, by
   bisection over the prefix length (each step one run of the model on the data); damage is not
   exactly additive, so the prefix found is measured and, if it misses, shortened until it holds.
4. With a refit (--reconstruct, --nm-method sparsegpt): the chosen layers are refit again without
   the others (their fit assumed every layer sparse), and what that gains is spent on a longer
   prefix, kept only when its own refit keeps the budget.

The weights are graph inputs of one onnxruntime session, so each measurement is a run, not a new
model. The layers put back dense leave the N:M result with the reason, the damage of all in `budget`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from gkp_onnx.graph import initializer_map, initializers_as_inputs
from gkp_onnx.nm import NmResult, tensorrt_sparse_likely
from gkp_onnx.pipeline import Pass, PassResult
from gkp_onnx.plan import Plan
from gkp_onnx.validate import Dataset, fidelity, make_session, run_model, whole_batches

SENSITIVITY_SAMPLES = 64
# weights fed as inputs run other kernels than weights in initializers: float32 rounding differs by
# about 1e-9 of the cosine, so the budget is kept with this margin for the model as written
MARGIN = 1e-6
EXTENSION_REFITS = 2  # refits tried to spend on more layers what refitting only the chosen ones gains


class NmBudget(Pass):
    name = "nm_budget"
    in_place = True  # edits the model's weights in place

    def __init__(self, result: NmResult, dense: dict[str, np.ndarray], reference: list[np.ndarray],
                 data: Dataset, min_cosine: float, macs: dict[str, int | None], refit=None):
        self.result = result
        self.dense = dense  # weight initializer -> its values before the mask
        self.reference = reference  # the reference model's outputs on `data`
        self.data = data
        self.min_cosine = min_cosine
        self.macs = macs  # node -> MACs (None when unknown)
        self.refit = refit  # (model, layer nodes) -> (model, errors): the N:M refit of just those layers

    def call(self, model: onnx.ModelProto, plan: Plan) -> PassResult:
        layers = [layer for layer in self.result.layers if layer.weight in self.dense]
        initializers = initializer_map(model.graph)
        sparse = {layer.weight: numpy_helper.to_array(initializers[layer.weight]) for layer in layers}
        session = make_session(initializers_as_inputs(model, sparse))
        names = [o.name for o in session.get_outputs()]
        count = whole_batches(session, SENSITIVITY_SAMPLES)
        sample = self.data.first(count)
        sample_reference = [out[:count] for out in self.reference]

        def cosine(weights: dict[str, np.ndarray], data: Dataset = self.data, reference=self.reference) -> float:
            feed = {name: weights.get(name, self.dense[name]) for name in sparse}
            return fidelity(reference, run_model(session, data, feed), names, data).min_cosine

        everything = cosine(sparse, sample, sample_reference)
        for layer in layers:
            others = {name: values for name, values in sparse.items() if name != layer.weight}
            layer.damage = max(0.0, cosine(others, sample, sample_reference) - everything)
        order = sorted(layers, key=self._priority)
        prefixes: dict[int, float] = {0: cosine({})}  # cosine with the first k layers of `order` sparse

        def longest(target: float, low: int) -> int:
            """The longest prefix at least `low` long whose cosine reaches `target`, by bisection."""
            def holds(count: int) -> bool:
                if count not in prefixes:
                    prefixes[count] = cosine({layer.weight: sparse[layer.weight] for layer in order[:count]})
                return prefixes[count] >= target
            high = len(order)
            if holds(high):
                return high
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if holds(middle) else (low, middle)
            while low > 0 and not holds(low):  # damage is not exactly monotone in the prefix
                low -= 1
            return low

        budget = self.min_cosine + MARGIN
        count = longest(budget, 0)
        chosen = {layer.weight: sparse[layer.weight] for layer in order[:count]}
        reached, errors = prefixes[count], self.result.reconstruction
        if self.refit is not None and 0 < count:
            # the refit saw every layer sparse; fit again with only the chosen ones, and spend what that
            # gains on more layers: a longer prefix from the cosines scaled by the gain, checked by a refit
            refit, refit_errors, refit_reached = self._refit_prefix(model, order[:count], chosen, cosine)
            if refit_reached >= reached:
                chosen, reached, errors = refit, refit_reached, refit_errors
            gain = (1 - refit_reached) / max(1 - prefixes[count], 1e-12)
            if refit_reached >= budget and 0 < gain < 1:
                longer = longest(1 - (1 - budget) / gain, count)
                for _ in range(EXTENSION_REFITS):  # the estimate is an upper end: halve towards `count` on a miss
                    if longer <= count:
                        break
                    first = {layer.weight: sparse[layer.weight] for layer in order[:longer]}
                    more, more_errors, more_reached = self._refit_prefix(model, order[:longer], first, cosine)
                    if more_reached >= budget:
                        count, chosen, reached, errors = longer, more, more_reached, more_errors
                        break
                    longer = (count + longer) // 2
        for layer in layers:
            initializers[layer.weight].CopyFrom(numpy_helper.from_array(chosen.get(layer.weight, self.dense[layer.weight]),
                                                                        layer.weight))
        dense_layers = [layer for layer in layers if layer.weight not in chosen]
        self.result.layers = [layer for layer in self.result.layers if layer not in dense_layers]
        self.result.skipped += [(layer.node, f"kept dense by the fidelity budget (cosine >= {self.min_cosine:g})")
                                for layer in dense_layers]
        self.result.reconstruction = {node: error for node, error in errors.items()
                                      if node in {layer.node for layer in self.result.layers}}
        self.result.budget = {"min_cosine": self.min_cosine, "cosine": reached, "samples": len(self.data),
                              "data": self.data.source, "sparse_layers": count, "candidates": len(order),
                              "damage": {layer.node: layer.damage for layer in order}}
        return PassResult(model, plan, modified=bool(dense_layers), details={})

    def _priority(self, layer) -> tuple:
        """TensorRT-sized layers first, then the most MACs made N:M per unit of damage."""
        macs = self.macs.get(layer.node) or int(np.prod(layer.shape))
        trt = tensorrt_sparse_likely(layer.shape, layer.axis, True, self.result.n, self.result.m)
        return (not trt, -macs / max(layer.damage, 1e-12), layer.node)

    def _refit_prefix(self, model: onnx.ModelProto, layers: list, weights: dict[str, np.ndarray], cosine):
        """Refit `layers` (sparse with `weights`, every other candidate dense) on a copy of `model`:
        their new weights, the refit's errors and the cosine reached."""
        trial = onnx.ModelProto()
        trial.CopyFrom(model)
        initializers = initializer_map(trial.graph)
        for name, values in self.dense.items():
            initializers[name].CopyFrom(numpy_helper.from_array(weights.get(name, values), name))
        trial, errors = self.refit(trial, [layer.node for layer in layers])
        initializers = initializer_map(trial.graph)
        refit = {name: numpy_helper.to_array(initializers[name]) for name in weights}
        return refit, errors, cosine(refit)
