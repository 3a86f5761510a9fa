"""Loading and saving ONNX models: checked loads, atomic writes, external data for large models.

The input file is never written to. Outputs go to a temporary folder inside the target
directory and are renamed into place (gkp_onnx/outputs.py), so a reader never sees a
half-written model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from gkp_onnx.errors import GkpError
from gkp_onnx.graph import initializer_map
from gkp_onnx.graph.canonical import WEIGHT_SLOTS

SUBBYTE_TYPES = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)}
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# protobuf cannot serialise a message over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model (external data included); raise GkpError on bad input."""
    model = _parse(Path(path), external_data=True)
    check_model(model, what=str(path))
    check_tensor_sizes(model, what=str(path))
    return model


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model without its external data (the tensors keep their references)."""
    model = _parse(Path(path), external_data=False)
    check_model_file(path)
    return model


def _parse(path: Path, external_data: bool) -> onnx.ModelProto:
    if not path.exists():
        raise GkpError(f"no such file: {path}")
    if not path.is_file():
        raise GkpError(f"not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=external_data)
    except (DecodeError, RuntimeError, ValueError, OSError, onnx.checker.ValidationError) as exc:
        raise GkpError(f"not a readable ONNX model: {path} ({_first_line(exc)})") from None
    if not model.opset_import or not model.graph.node:
        raise GkpError(f"not an ONNX model (no graph or opset): {path}")
    return model


def check_model_file(path: str | os.PathLike) -> None:
    """onnx.checker on a model file, external data included, without loading it."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, DecodeError, ValueError, OSError) as exc:
        raise GkpError(f"invalid ONNX model {path}: {_first_line(exc)}") from None


def check_tensor_sizes(model: onnx.ModelProto, what: str = "model") -> None:
    """A one-line error naming the first initializer whose stored bytes do not fit its dims and
    type (onnx.checker does not look)."""
    for tensor in model.graph.initializer:
        if tensor.raw_data and tensor.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            count = int(np.prod(tensor.dims, dtype=np.int64))
            bits = 4 if tensor.data_type in SUBBYTE_TYPES else 8 * itemsize
            if len(tensor.raw_data) != -(-count * bits // 8):
                raise GkpError(f"invalid ONNX model {what}: initializer '{tensor.name}' holds "
                               f"{len(tensor.raw_data)} bytes for dims {list(tensor.dims)}")


def check_finite(model: onnx.ModelProto, what: str = "model") -> None:
    """A one-line error naming the first layer weight (Conv/Gemm/MatMul weight or bias, BN
    parameter) holding NaN or Inf. Other constants may hold Inf on purpose (attention masks)."""
    initializers = initializer_map(model.graph)
    weights = dict.fromkeys(node.input[slot] for node in model.graph.node
                            for slot in WEIGHT_SLOTS.get(node.op_type, ()) if slot < len(node.input))
    for name in weights:
        tensor = initializers.get(name)
        if tensor is not None and tensor.data_type in FLOAT_TYPES and not np.isfinite(numpy_helper.to_array(tensor)).all():
            raise GkpError(f"{what}: weight '{name}' holds NaN or Inf values")


def check_model(model: onnx.ModelProto, what: str = "model") -> None:
    """onnx.checker on a model of any size (large ones are checked through a temporary file)."""
    try:
        if not is_large(model):
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp) / "model.onnx"
                _save(model, tmp_path)
                onnx.checker.check_model(str(tmp_path))
    except (onnx.checker.ValidationError, DecodeError, ValueError) as exc:
        raise GkpError(f"invalid ONNX model {what}: {_first_line(exc)}") from None


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` atomically (outputs.Outputs); models near protobuf's 2 GiB limit get an
    external data file beside it."""
    from gkp_onnx.outputs import Outputs

    out = Path(path).resolve()
    with Outputs() as outputs:
        outputs.stage(out, lambda staged: write_model(model, staged))
    return out


def write_model(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write `model` to `path` (not atomically: see save_model); returns the files written."""
    try:
        return _save(model, path)
    except OSError as exc:
        raise GkpError(f"cannot write {path}: {exc.strerror or exc}") from None


def _save(model: onnx.ModelProto, path: Path) -> list[Path]:
    if not is_large(model):
        onnx.save_model(model, str(path))
        return [path]
    data_name = path.name + ".data"
    copy = onnx.ModelProto()  # save_model moves the weights of the proto it is given out to the file
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [path, path.parent / data_name]


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model cannot be serialised as one protobuf (weights near 2 GiB)."""
    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    return size >= EXTERNAL_DATA_THRESHOLD


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
