"""Validation with onnxruntime: run two models on the same inputs and measure fidelity.

Inputs come from a calibration/evaluation .npz (arrays keyed by input name, or `x` for a
single-input model; optional labels `y`) or are seeded random tensors of the model's input
shapes. Fidelity per output: max/mean absolute difference, cosine similarity, top-1 agreement
(argmax over the last axis, for logits of rank 2 or 3), and accuracy when labels are given. With a
padding mask (PADDING_INPUT), a [batch, sequence, features] output is measured at the tokens only,
and runs skip the padding after each batch's last token (see `batches`).
Data is checked as it is read: at least one sample, finite floating-point inputs, labels that are
class indices (integers >= 0, one per sample); random inputs are capped at MAX_ELEMENTS each.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import InputSpec
from gkp_onnx.images import ImageSpec, load_image_folder
from gkp_onnx.model_io import is_large, save_model
from gkp_onnx.options import MAX_ELEMENTS, check

RANDOM_BATCH = 8
HOLDOUT_SHARE, HOLDOUT_MIN = 8, 16  # what fitting runs validate on: the last 1/8 of --calib, >= 16 samples
RUN_BATCH = 64
CUT_BATCH = 16  # samples per run when runs are cut after their last token: less padding per batch
# an input of this name, [batch, sequence], marks padding tokens with 0 (the Hugging Face convention)
PADDING_INPUT = "attention_mask"


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "random"

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def first(self, count: int) -> Dataset:
        """The first `count` samples (and their labels)."""
        return self._part(slice(None, count), self.source)

    def _part(self, rows: slice, source: str) -> Dataset:
        return Dataset({name: value[rows] for name, value in self.inputs.items()},
                       None if self.labels is None else self.labels[rows], source)

    def held_out(self, step: int = 1) -> tuple[Dataset, Dataset] | None:
        """(the samples to fit on, the last HOLDOUT_SHARE of them, at least HOLDOUT_MIN and whole
        batches of `step`, to validate on), or None when fewer than 4 x HOLDOUT_MIN samples."""
        if len(self) < 4 * HOLDOUT_MIN:
            return None
        count = -(-max(HOLDOUT_MIN, len(self) // HOLDOUT_SHARE) // step) * step
        fit = len(self) - count
        return self.first(fit), self._part(slice(fit, None), f"{self.source}, its last {count} samples (not fitted on)")


def make_session(model: onnx.ModelProto | str | os.PathLike, providers=("CPUExecutionProvider",),
                 threads: int | None = None, spinning: bool = True) -> ort.InferenceSession:
    """An onnxruntime session; `spinning=False` stops idle worker threads from busy-waiting, which
    would steal the cores from another session run right after (interleaved benchmarks)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors reach the caller as exceptions (GkpError), not as log lines
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto) and is_large(model):
        # too large for one protobuf: go through a file; the session holds the weights once created
        with tempfile.TemporaryDirectory(prefix="gkp-session-") as tmp:
            return _session(str(save_model(model, Path(tmp) / "model.onnx")), options, providers)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return _session(source, options, providers)


def _session(source: bytes | str, options: ort.SessionOptions, providers) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise GkpError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}") from None


def random_dataset(specs: list[InputSpec], seed: int = 0, batch: int | None = None) -> Dataset:
    """Seeded random inputs: normal floats, small non-negative ints (below the size of the table they
    index), random bools; a padding mask (PADDING_INPUT) is all ones."""
    rng = np.random.default_rng(check("seed", seed))
    inputs = {}
    for spec in specs:
        shape = list(spec.shape)
        if batch is not None and shape:
            shape[0] = batch
        if math.prod(shape) > MAX_ELEMENTS:
            raise GkpError(f"a random input '{spec.name}' of shape {shape} would have {math.prod(shape)} elements, "
                           f"more than the {MAX_ELEMENTS} (2**28) gkp-onnx makes; give data (--calib, --data) or "
                           f"smaller --input-shape dims")
        if spec.name == PADDING_INPUT:  # a padding mask: every position a token
            inputs[spec.name] = np.ones(shape, spec.dtype)
        elif spec.dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            high = min(spec.upper, 8) if spec.upper else 8  # indices stay inside the table they index
            inputs[spec.name] = rng.integers(0, high, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            inputs[spec.name] = rng.random(shape) < 0.5
        else:
            raise GkpError(f"cannot make random data for input '{spec.name}' of type {spec.dtype}; give --calib")
    return Dataset(inputs)


def subset(count: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random `limit` of `count` samples (all of them without a limit)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def _dims(shape) -> str:
    return ",".join(map(str, shape))


def data_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """The shape of each array in an .npz, read from the .npy headers (not the data); {} when it
    cannot be read (load_dataset says why)."""
    from numpy.lib import format as npy

    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as stream:
                    shapes[member.removesuffix(".npy")] = list(readers[npy.read_magic(stream)](stream)[0])
        return shapes
    except Exception:  # a .npy version without a public header reader: load it; anything unreadable is
        pass           # load_dataset's to report
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: list(archive[key].shape) for key in archive.files}
    except Exception:
        return {}


def load_dataset(path: str | os.PathLike, specs: list[InputSpec], dynamic_batch: bool = True,
                 images: ImageSpec | None = None, limit: int | None = None, seed: int = 0) -> Dataset:
    """Read an .npz (arrays keyed by input name or `x`, optional labels `y`) or an image folder
    (one subfolder per class, see gkp_onnx.images) and check it against the model's inputs (every
    axis but the batch). `limit` keeps a seeded random subset of that many samples."""
    check("limit", limit)
    check("seed", seed)
    if os.path.isdir(path):
        if len(specs) != 1:
            raise GkpError(f"an image folder can feed a single-input model; this one has {len(specs)} inputs")
        x, y = load_image_folder(path, specs[0].shape, images or ImageSpec(), lambda n: subset(n, limit, seed))
        inputs = {specs[0].name: x.astype(specs[0].dtype, copy=False)}
        _check_finite(f"image folder {path}", inputs)
        return Dataset(inputs, y, source=str(path))
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive (np.savez writes one)")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
        stray = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
        if stray:
            raise ValueError(f"member {stray[0]!r} is not a .npy array")
    except Exception as exc:  # truncated or corrupt archives raise zipfile, zlib, EOF, header-parsing errors
        reason = (str(exc).splitlines() or [""])[0][:300] or type(exc).__name__
        raise GkpError(f"cannot read data file {path}: {reason}") from None
    inputs = {}
    for spec in specs:
        if spec.name in arrays:
            array = arrays[spec.name]
        elif len(specs) == 1 and "x" in arrays:
            array = arrays["x"]
        else:
            raise GkpError(f"data file {path} has no array for input '{spec.name}' "
                           f"(it has: {', '.join(sorted(arrays))})")
        if array.ndim != len(spec.shape) or list(array.shape[1:]) != list(spec.shape[1:]) \
                or (not dynamic_batch and array.shape[0] != spec.shape[0]):
            hint = (f" (its dynamic dims were taken as {_dims(spec.shape)}; give --input-shape "
                    f"{spec.name}:{_dims([1] + list(array.shape[1:]))} if the data is right)") if spec.assumed else ""
            raise GkpError(f"data file {path}: array for input '{spec.name}' has shape {list(array.shape)}, "
                           f"the model expects [N, {', '.join(map(str, spec.shape[1:]))}]{hint}")
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise GkpError(f"data file {path}: array for input '{spec.name}' is {array.dtype}, "
                           f"the model expects {spec.dtype}")
        inputs[spec.name] = array.astype(spec.dtype, copy=False)
    sizes = {len(a) for a in inputs.values()}
    if len(sizes) != 1:
        raise GkpError(f"data file {path}: input arrays have different lengths {sorted(sizes)}")
    labels = arrays.get("y")
    count = sizes.pop()
    if count == 0:
        raise GkpError(f"data file {path} holds no samples (its arrays have length 0)")
    if labels is not None:
        _check_labels(f"data file {path}", labels, count)
    chosen = subset(count, limit, seed)
    if len(chosen) < count:
        inputs = {name: array[chosen] for name, array in inputs.items()}
        labels = None if labels is None else labels[chosen]
    _check_finite(f"data file {path}", inputs)
    mask = inputs.get(PADDING_INPUT)
    if mask is not None and mask.ndim == 2 and not (mask != 0).any(axis=1).all():
        empty = int(np.flatnonzero(~(mask != 0).any(axis=1))[0])
        raise GkpError(f"data file {path}: {PADDING_INPUT} of sample {empty} has no token (all zeros); every "
                       f"sample needs at least one")
    return Dataset(inputs, labels, source=str(path))


def _check_finite(source: str, inputs: dict[str, np.ndarray]) -> None:
    """NaN or infinite inputs make every fidelity metric NaN, which no threshold catches."""
    for name, array in inputs.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise GkpError(f"{source}: the {array.dtype} input '{name}' holds NaN or infinite values "
                           f"({bad} of {array.size})")


def _check_labels(source: str, labels: np.ndarray, count: int) -> None:
    """Labels y: one class index (an integer >= 0) per sample."""
    if labels.ndim != 1:
        raise GkpError(f"{source}: labels y have shape {list(labels.shape)}; expected one class index per sample, "
                       f"shape [{count}]")
    if len(labels) != count:
        raise GkpError(f"{source}: {len(labels)} labels for {count} samples")
    integral = labels.dtype.kind in "iub" or (labels.dtype.kind == "f" and bool(np.isfinite(labels).all())
                                              and bool((labels == np.round(labels)).all()))
    if not integral:
        raise GkpError(f"{source}: labels y must be integer class indices, got {labels.dtype} values")
    if labels.dtype.kind != "b" and labels.min() < 0:
        raise GkpError(f"{source}: labels y must be class indices of at least 0, got {labels.min():g}")


def batches(session: ort.InferenceSession, data: Dataset, batch: int = RUN_BATCH, cut: bool = True):
    """Feeds covering the dataset: `batch` samples each, or the model's fixed batch size. With a
    padding mask over a dynamic sequence axis (`sequence_axis`) and `cut`, samples go shortest
    first, at most CUT_BATCH per feed, and each feed is cut after its last token: the tokens'
    values are the same, the work a fraction of it."""
    sequence = sequence_axis(session) if cut else None
    for rows in _batch_rows(session, data, batch, sequence):
        yield _feed(session, data, rows, sequence)


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size the model's first input fixes; None when it is dynamic."""
    shape = session.get_inputs()[0].shape
    fixed = shape[0] if shape else None
    return fixed if isinstance(fixed, int) and fixed > 0 else None


def whole_batches(session: ort.InferenceSession, rows: int) -> int:
    """`rows` rounded down to whole batches where the model fixes its batch size (at least one)."""
    step = fixed_batch(session) or 1
    return max(step, rows // step * step)


def _batch_rows(session: ort.InferenceSession, data: Dataset, batch: int, sequence: str | None) -> list[np.ndarray]:
    batch = min(batch, CUT_BATCH) if sequence is not None else batch
    step = fixed_batch(session) or batch
    if len(data) % step and step != batch:
        raise GkpError(f"the model's batch size is fixed at {step}; the data's {len(data)} samples "
                       f"are not a multiple of it")
    order = np.arange(len(data))
    if sequence is not None:
        order = np.argsort(_last_token(data.inputs[PADDING_INPUT]), kind="stable")
    return [order[start:start + step] for start in range(0, len(data), step)]


def _feed(session: ort.InferenceSession, data: Dataset, rows: np.ndarray, sequence: str | None
          ) -> dict[str, np.ndarray]:
    """The samples `rows`, cut after their last token along the `sequence` axis (None: not cut)."""
    feed = {name: array[rows] for name, array in data.inputs.items()}
    if sequence is not None:
        end = max(1, int(_last_token(feed[PADDING_INPUT]).max()) + 1)
        for value in session.get_inputs():
            if len(value.shape) >= 2 and value.shape[1] == sequence:
                feed[value.name] = feed[value.name][:, :end]
    return feed


def _last_token(padding: np.ndarray) -> np.ndarray:
    """Per sample, the position of its last token (-1 for none)."""
    tokens = padding.reshape(len(padding), -1) != 0
    return np.where(tokens.any(axis=1), tokens.shape[1] - 1 - np.argmax(tokens[:, ::-1], axis=1), -1)


def sequence_axis(session: ort.InferenceSession) -> str | None:
    """The name of the dynamic sequence axis of the padding mask (PADDING_INPUT, [batch, sequence]
    with both dims symbolic); the inputs with that name at axis 1 can be cut after the last token."""
    mask = next((value for value in session.get_inputs() if value.name == PADDING_INPUT), None)
    if mask is None or len(mask.shape) != 2 or not all(isinstance(dim, str) for dim in mask.shape):
        return None
    return mask.shape[1]


def _reassembles(session: ort.InferenceSession) -> bool:
    """Outputs of cut feeds can be put back in order and length: each is [batch, ...] with its other
    dims fixed or the sequence axis at position 1."""
    batch, sequence = next(v for v in session.get_inputs() if v.name == PADDING_INPUT).shape
    return all(value.shape and value.shape[0] == batch
               and all(isinstance(dim, int) or (axis == 1 and dim == sequence)
                       for axis, dim in enumerate(value.shape[1:], start=1))
               for value in session.get_outputs())


def token_rows(padding: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Which rows of a [batch, sequence, features] tensor of `shape`, flattened to [rows, features],
    are tokens and not padding (`padding`: the batch's PADDING_INPUT); None when the data has no
    padding mask or the tensor is not laid out along it."""
    if padding is None or tuple(shape[:-1]) != padding.shape:
        return None
    return padding.reshape(-1) != 0


def run_session(session: ort.InferenceSession, feed: dict) -> list[np.ndarray]:
    """One onnxruntime call; a model that loads but cannot run (inconsistent shapes, inputs it
    rejects) is a one-line GkpError."""
    try:
        return session.run(None, feed)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise GkpError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0][:300]}") from None


def run_model(session: ort.InferenceSession, data: Dataset, constants: dict[str, np.ndarray] | None = None
              ) -> list[np.ndarray]:
    """All outputs over the whole dataset, run in batches, in the data's order (cut feeds: the
    outputs back to the full length, zeros after each batch's last token); `constants`: inputs
    fed whole to every batch (e.g. weights)."""
    sequence = sequence_axis(session)
    if sequence is not None and not _reassembles(session):
        sequence = None  # not cut
    groups = _batch_rows(session, data, RUN_BATCH, sequence)
    chunks = [run_session(session, _feed(session, data, rows, sequence) | (constants or {})) for rows in groups]
    outputs = []
    for i, value in enumerate(session.get_outputs()):
        parts = [chunk[i] for chunk in chunks]
        if sequence is not None and len(value.shape) >= 2 and value.shape[1] == sequence:
            full = data.inputs[PADDING_INPUT].shape[1]
            parts = [np.pad(part, [(0, 0), (0, full - part.shape[1])] + [(0, 0)] * (part.ndim - 2))
                     for part in parts]
        merged = np.concatenate(parts)
        if sequence is not None:
            merged[np.concatenate(groups)] = merged.copy()
        outputs.append(merged)
    return outputs


@dataclass
class OutputFidelity:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    top1_agreement: float | None
    # an embedding output (output_kinds "pooled"): per sample, the masked mean over its tokens
    pooled_cosine: float | None = None  # mean over samples of the pooled embeddings' cosine
    pooled_worst: float | None = None
    neighbour_agreement: float | None = None  # samples whose nearest other sample is the same in both


@dataclass
class Fidelity:
    samples: int
    data: str
    outputs: list[OutputFidelity] = field(default_factory=list)
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None

    @property
    def max_abs_diff(self) -> float:
        return max(o.max_abs_diff for o in self.outputs)

    @property
    def min_cosine(self) -> float:
        return min(o.cosine for o in self.outputs)

    @property
    def top1_agreement(self) -> float | None:
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = f"max|diff| {self.max_abs_diff:.3g}  cosine {self.min_cosine:.6f}"
        if self.top1_agreement is not None:
            text += f"  top-1 agreement {100 * self.top1_agreement:.2f}%"
        for output in self.outputs:
            if output.pooled_cosine is not None:
                text += f"  {output.name} pooled: cosine {output.pooled_cosine:.4f} (worst {output.pooled_worst:.4f})"
                if output.neighbour_agreement is not None:
                    text += f", nearest-neighbour agreement {100 * output.neighbour_agreement:.1f}%"
        if self.accuracy_reference is not None:
            text += (f"  accuracy {100 * self.accuracy_reference:.2f}% -> "
                     f"{100 * self.accuracy_candidate:.2f}%")
        return text + f"  ({self.samples} samples, {self.data})"


def output_kinds(model: onnx.ModelProto) -> dict[str, str]:
    """What fidelity measures per output: "pooled" for a [batch, sequence, features] output of a
    model with a padding mask (PADDING_INPUT) that no classifier head (MatMul/Gemm, + bias, Softmax)
    produces: a sentence embedding, compared by its masked mean, not by an argmax; "values" else."""
    if PADDING_INPUT not in {i.name for i in model.graph.input}:
        return {}
    producers = {o: node for node in model.graph.node for o in node.output}

    def classifier(name: str) -> bool:
        node = producers.get(name)
        if node is not None and node.op_type == "Add":
            return any(classifier(t) for t in node.input if t in producers)
        return node is not None and node.op_type in ("MatMul", "Gemm", "Softmax", "LogSoftmax")

    kinds = {}
    for output in model.graph.output:
        rank = len(output.type.tensor_type.shape.dim) if output.type.tensor_type.HasField("shape") else 0
        kinds[output.name] = "pooled" if rank == 3 and not classifier(output.name) else "values"
    return kinds


def describe_measures(model: onnx.ModelProto) -> list[str]:
    """What `optimize` and `compare` will measure on each output of `model` (for inspect)."""
    kinds = output_kinds(model)
    masked = PADDING_INPUT in {i.name for i in model.graph.input}
    lines = []
    for output in model.graph.output:
        rank = len(output.type.tensor_type.shape.dim) if output.type.tensor_type.HasField("shape") else 0
        if kinds.get(output.name) == "pooled":
            what = (f"max|diff| and cosine at the tokens ({PADDING_INPUT} != 0); the pooled embedding (masked "
                    f"mean): its cosine and nearest-neighbour agreement")
        elif rank in (2, 3):
            what = "max|diff|, cosine and top-1 agreement (argmax of the last axis)" + (
                f", at the tokens ({PADDING_INPUT} != 0)" if masked and rank == 3 else "")
        else:
            what = "max|diff| and cosine"
        lines.append(f"{output.name}: {what}")
    return lines


def _pooled(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[batch, sequence, features] -> the L2-normalised mean over each sample's tokens."""
    weights = (mask != 0).astype(np.float64)[..., None]
    pooled = (values.astype(np.float64) * weights).sum(1) / np.maximum(weights.sum(1), 1)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str],
             data: Dataset, kinds: dict[str, str] | None = None) -> Fidelity:
    """How far `candidate`'s outputs are from `reference`'s on `data`; `kinds`: output_kinds."""
    result = Fidelity(samples=len(data), data=data.source)
    kinds = kinds or {}
    for name, ref, new in zip(names, reference, candidate):
        if ref.shape != new.shape:
            raise GkpError(f"output '{name}' changed shape: {list(ref.shape)} -> {list(new.shape)}")
        pooled = {}
        mask = data.inputs.get(PADDING_INPUT)
        if kinds.get(name) == "pooled" and mask is not None and mask.shape == ref.shape[:2]:
            a, b = _pooled(ref, mask), _pooled(new, mask)
            cosines = (a * b).sum(1)
            pooled = {"pooled_cosine": float(cosines.mean()), "pooled_worst": float(cosines.min())}
            if len(a) >= 3:  # the nearest other sample, in each model's embedding space
                near = [np.argmax(np.where(np.eye(len(e), dtype=bool), -np.inf, e @ e.T), axis=1) for e in (a, b)]
                pooled["neighbour_agreement"] = float((near[0] == near[1]).mean())
        tokens = token_rows(mask, ref.shape)
        if tokens is not None:  # [batch, sequence, features]: the tokens' values, not the padding's
            ref, new = ref.reshape(-1, ref.shape[-1])[tokens], new.reshape(-1, new.shape[-1])[tokens]
        ref64, new64 = ref.astype(np.float64).ravel(), new.astype(np.float64).ravel()
        diff = np.abs(ref64 - new64)
        denominator = np.linalg.norm(ref64) * np.linalg.norm(new64)
        cosine = float(ref64 @ new64 / denominator) if denominator > 0 else float(np.array_equal(ref64, new64))
        top1 = None
        if ref.ndim in (2, 3) and ref.shape[-1] > 1 and not pooled:  # an argmax of an embedding means nothing
            top1 = float((ref.argmax(-1) == new.argmax(-1)).mean())
        result.outputs.append(OutputFidelity(name, float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0,
                                             cosine, top1, **pooled))
    if data.labels is not None and reference[0].ndim == 2:
        classes = reference[0].shape[-1]
        if classes > 1 and len(data.labels) and data.labels.max() >= classes:
            raise GkpError(f"the labels go up to {data.labels.max():g}, but the model's output '{names[0]}' "
                           f"has {classes} classes")
        result.accuracy_reference = float((reference[0].argmax(-1) == data.labels).mean())
        result.accuracy_candidate = float((candidate[0].argmax(-1) == data.labels).mean())
    return result


def compare(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str, data: Dataset,
            providers=("CPUExecutionProvider",)) -> Fidelity:
    """Run both models on `data` and measure how far the candidate's outputs are from the reference's."""
    ref_session = make_session(reference, providers)
    new_session = make_session(candidate, providers)
    names = [o.name for o in ref_session.get_outputs()]
    if names != [o.name for o in new_session.get_outputs()]:
        raise GkpError(f"the models have different outputs: {names} vs "
                       f"{[o.name for o in new_session.get_outputs()]}")
    graph = reference if isinstance(reference, onnx.ModelProto) else onnx.load(str(reference), load_external_data=False)
    return fidelity(run_model(ref_session, data), run_model(new_session, data), names, data, output_kinds(graph))


def channel_rms(model: onnx.ModelProto, tensors: dict[str, int], data: Dataset) -> dict[str, np.ndarray]:
    """Root-mean-square of every channel of the named tensors over `data` (tensor -> channel axis);
    a [batch, sequence, channels] tensor leaves out the padding positions (see PADDING_INPUT)."""
    return {name: np.sqrt(squares / count) for name, (count, _, squares) in _channel_sums(model, tensors, data).items()}


def channel_covariances(model: onnx.ModelProto, tensors: dict[str, int], data: Dataset
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(mean, covariance x rows) of the channels of the named tensors over `data` (tensor -> channel
    axis; padding positions left out): the covariance part is X_c^T X_c with X_c the centred rows."""
    return {name: (sums / count, outer - np.outer(sums, sums) / count)
            for name, (count, sums, outer) in _channel_sums(model, tensors, data, outer=True).items()}


def _channel_sums(model: onnx.ModelProto, tensors: dict[str, int], data: Dataset, outer: bool = False) -> dict:
    """Per tensor: (rows, per-channel sums, per-channel sums of squares or, with `outer`, X^T X)."""
    session = make_session(with_outputs(model, list(tensors)))
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, list] = {}
    for feed in batches(session, data):
        for name, value in zip(names, run_session(session, feed)):
            if name in tensors:
                moved = np.moveaxis(value.astype(np.float64), tensors[name], -1)
                flat = moved.reshape(-1, moved.shape[-1])
                tokens = token_rows(feed.get(PADDING_INPUT), moved.shape)
                if tokens is not None:
                    flat = flat[tokens]
                total = sums.setdefault(name, [0, 0.0, 0.0])
                total[0] += flat.shape[0]
                total[1] = total[1] + flat.sum(axis=0)
                total[2] = total[2] + (flat.T @ flat if outer else (flat ** 2).sum(axis=0))
    return sums


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the named intermediate tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return probe
